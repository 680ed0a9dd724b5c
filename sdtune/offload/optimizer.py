"""AdamW whose fp32 master weights and moments live in host memory (`optimizer_offload = "cpu"`).

The compute device keeps only the working-precision weights: every trainable parameter becomes a view
into one flat device buffer per bucket (about `BUCKET_MB` of fp32 each, in parameter order). On the host,
each bucket has a flat fp32 master copy and AdamW's two moments (12 bytes a parameter, pageable), and a
slice of one exactly sized page-locked staging buffer in the working precision (2 bytes a parameter).

As backward produces a parameter's gradient (a post-accumulate-grad hook), its norm is taken on the device
and the gradient is copied into the staging buffer, then freed on the device, so gradients never pile up
on the GPU. On CUDA the copies run on a gradient stream, one event a bucket; a worker thread handles each
bucket once its copies are done. Parameters under `layout.SMALL_PARAM` values are gathered on the device
and leave in one copy per bucket. Without gradient accumulation the staged gradients are the step's
gradients; with it, the worker sums the micro-batches in an fp32 host buffer (4 more bytes a parameter) and
takes their norm while it adds the last one.

The step needs no pass over the gradients of its own: the norm (device-side, or from the last fold) gives the
clipping factor and the overflow check. The host then makes one pass over memory, chunk by chunk of
`layout.STEP_CHUNK` values that stay in a core's L2 cache: upcast the gradient (fp32 ones are used in place),
unscale and clip it (two in-cache multiplies by the same fp32 factors as GradScaler and `tier.clip_gradients`
use, so that results equal plain AdamW's bit for bit, which folding them into the kernel's `grad_scale`
division would not), AdamW, and cast the new weight into the staging buffer, from which an upload stream (not
the gradient stream) copies the bucket back to the device. Without clipping, loss scaling and accumulation
(`step_in_backward`), each bucket is stepped and sent back as soon as its gradients are in, on the worker
thread while backward goes on (a parameter's weight is not read by backward again once its gradient is
complete). With them, the host step overlaps the next forward instead (`overlap_step`: a `StepQueue`,
overlap.py). fp16 overflow checks go through `HostGradScaler` (sdtune/offload/scaler.py).

The tier also answers for its fp32 weights by name: the masters (`master_weights`, what a checkpoint and the
export take) and, built with `ema=True` (`train.ema_decay` with a host tier), their moving average. Each
bucket keeps the average in host RAM (`Bucket.ema`, 4 bytes a parameter), updated chunk by chunk in the pass
that steps AdamW, right after a chunk of the master changed and while it is still in the CPU's caches: the
average costs no VRAM and no pass of its own. `ema_decay` is the decay of the update made with the next step
(None: no update), read with the step's settings (`_step_settings`), so that a queued step or one run inside
backward uses its own.
"""

from __future__ import annotations

import math
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path

import torch

from sdtune.errors import SdtuneError
from sdtune.offload import layout
from sdtune.offload.layout import Bucket, Scaling, adamw_kernel, chunks, clip_factor, host_bytes, partition
from sdtune.offload.overlap import StepQueue
from sdtune.offload.pinned import PinnedBuffer, host_empty
from sdtune.offload.streams import blocking_event, on_cuda, side_stream, synchronous

RELEASED = ("device_flat", "master", "grad", "staging", "sq_host", "small_device", "small_host", "ema")  # `close()`


class OffloadAdamW(torch.optim.AdamW):
    """AdamW over host fp32 masters of `params`, which it moves to `device` in `dtype`.

    `params` must arrive in fp32 (on any device): they become the masters exactly. With `host_weights`
    the working-precision weights stay in (pinned) host memory instead, for `ParamStreamer` to bring
    to the device block by block; gradients still arrive on `device`. `max_grad_norm` clips inside the
    step; `accumulation_steps` backward passes make one step. `step_in_backward` is only exact without
    clipping, loss scaling and accumulation: the caller decides. `model` (which owns `params`) lets the
    step overlap the next forward (`overlap_step`: default on CUDA, off with host weights or when stepping
    in backward). `ema` keeps a moving average of the masters (`ema_weights`). After `step()`,
    `last_grad_norm` is the unscaled gradient norm and `skipped` says whether an inf/NaN gradient made it skip."""

    host_bytes = staticmethod(host_bytes)  # what it allocates, for the estimator
    ema_decay: float | None = None  # the decay of the moving average's next update (`sdtune.train.ema` sets it)

    def __init__(self, params, *, device, dtype, lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, bucket_mb: int | None = None, host_weights: bool = False,
                 step_in_backward: bool = False, max_grad_norm: float = 0.0, accumulation_steps: int = 1,
                 model: torch.nn.Module | None = None, overlap_step: bool | None = None, ema: bool = False):
        self.device, self.dtype, self.host_weights, self.keeps_ema = torch.device(device), dtype, host_weights, ema
        self.step_in_backward, self.max_grad_norm = step_in_backward, max_grad_norm
        self.accumulation_steps = accumulation_steps
        self.model = model  # names the masters (`masters_by_name`)
        cuda = on_cuda(self.device)
        self._cast_in_place = host_weights or not cuda  # the working weights are host memory: cast straight in
        trainable = [p for p in params if p.requires_grad]
        ranges = partition([p.numel() for p in trainable], bucket_mb)
        total = sum(p.numel() for p in trainable)
        # the host weights are page-locked once built: pinned up front, all of them were resident beside all
        # of the fp32 parameters they replace (SDXL: 4.8 + 9.6 GiB)
        self._weights = PinnedBuffer(total, dtype, pin=cuda, later=True) if host_weights else None
        largest = max((sum(trainable[i].numel() for i in r) for r in ranges), default=0)
        self._scratch = host_empty(min(layout.STEP_CHUNK, largest), torch.float32)  # one chunk of upcast gradients
        self._buckets: list[Bucket] = []
        self._where: dict[torch.nn.Parameter, tuple[Bucket, int, int]] = {}
        self._gathered: dict[torch.nn.Parameter, int] = {}  # a small parameter's offset in its bucket's gathering
        start, self._hooks, self._closed = 0, [], False  # the gradient hooks, which `close()` removes
        for r in ranges:
            bucket = self._make_bucket([trainable[i] for i in r], start)
            start += len(bucket.master)
            self._buckets.append(bucket)
            for p, offset in zip(bucket.params, bucket.offsets, strict=True):
                self._where[p] = (bucket, offset, p.numel())
                self._hooks.append(p.register_post_accumulate_grad_hook(self._on_grad))
            self._gathered.update({p: gathered for p, _, gathered in bucket.small})
        if self._weights is not None and self._weights.pin():  # moved to torch's pinned allocator
            self._point_at_weights()
        self._allocate_staging(total, cuda)
        self._grads_stream, self._upload_stream = side_stream(self.device), side_stream(self.device)
        overlap = (cuda and not synchronous()) if overlap_step is None else overlap_step
        self.overlap_step = overlap and model is not None and not host_weights and not step_in_backward
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="sdtune-offload") if (
            cuda or self.overlap_step) else None
        self._queue = StepQueue(model, self._buckets, self._where, self._worker, self._step_bucket,
                                self._upload_stream, self._uploaded, self.device) if self.overlap_step else None
        self._futures: list[Future] = []
        self._waited = 0.0  # seconds the training thread waited for the worker (`host_wait_seconds`)
        self._host_sq = 0.0                     # squared norm of the summed gradients (accumulation)
        self._state_file_due = False            # a checkpoint's state loaded: its file must follow
        self._task, self._in_backward, self._backwards, self._poisoned = None, False, 0, False
        if step_in_backward:  # where each bucket's gradient norm lands before the worker steps it
            for bucket in self._buckets:
                bucket.sq_host = torch.zeros((), dtype=torch.float64, pin_memory=cuda)
        self.last_grad_norm, self.skipped = None, False
        super().__init__([b.master for b in self._buckets], lr=lr, betas=betas, eps=eps,
                         weight_decay=weight_decay, fused=True)
        self._step_supports_amp_scaling = True  # GradScaler hands over grad_scale and found_inf
        self._allocate_state()

    def _make_bucket(self, params: list, start: int) -> Bucket:
        offsets, n = [], 0
        for p in params:
            offsets.append(n)
            n += p.numel()
        values = host_empty(n, torch.float32)
        for p, offset in zip(params, offsets, strict=True):
            values[offset:offset + p.numel()].copy_(p.detach().reshape(-1))
        if self.host_weights:
            device_flat = self._weights.tensor[start:start + n]
        else:
            device_flat = torch.empty(n, dtype=self.dtype, device=self.device)
        device_flat.copy_(values)
        for p, offset in zip(params, offsets, strict=True):
            p.data = device_flat[offset:offset + p.numel()].view(p.shape)
        grad = host_empty(n, torch.float32) if self.accumulation_steps > 1 else None
        ema = values.clone() if self.keeps_ema else None
        bucket = Bucket(params, offsets, start, device_flat, self._keep_master(len(self._buckets), values), grad,
                        ema=ema)
        bucket.gather_small(self.dtype, self.device)
        return bucket

    def _point_at_weights(self) -> None:
        """Every bucket's and parameter's view of the host weights made again, where their buffer moved."""
        for bucket in self._buckets:
            bucket.device_flat = self._weights.tensor[bucket.start:bucket.start + len(bucket.master)]
            for p, offset in zip(bucket.params, bucket.offsets, strict=True):
                p.data = bucket.device_flat[offset:offset + p.numel()].view(p.shape)

    def _allocate_staging(self, total: int, cuda: bool) -> None:
        """Every bucket's gradient (and upload) staging, allocated once the fp32 parameters are released."""
        self._staging = PinnedBuffer(total, self.dtype, pin=cuda)
        self._small = PinnedBuffer(sum(len(b.small_device) for b in self._buckets if b.small), self.dtype, pin=cuda)
        start_small = 0
        for bucket in self._buckets:
            bucket.staging = self._staging.tensor[bucket.start:bucket.start + len(bucket.master)]
            if bucket.small:
                size = len(bucket.small_device)
                bucket.small_host = self._small.tensor[start_small:start_small + size]
                start_small += size

    @property
    def host_pinning(self) -> str:
        """How its DMA buffers (staging, host weights) are page-locked: "registered" (in place, exact sizes),
        "pin_memory" (torch's pinned allocator: this machine refused registration), or "pageable" (no CUDA)."""
        if self._closed:
            return self._pinning
        buffers = (self._weights, self._staging, self._small)
        return "+".join(sorted({b.how for b in buffers if b is not None and b.nbytes})) or "pageable"

    def _keep_master(self, index: int, values: torch.Tensor) -> torch.Tensor:
        """Where bucket `index`'s fp32 master lives: here, the host tensor itself."""
        return values

    def _allocate_state(self) -> None:
        """AdamW's moments, laid out as torch's fused AdamW's; allocated now, so a short host fails before step 1."""
        for bucket in self._buckets:
            self.state[bucket.master].update(
                step=torch.zeros((), dtype=torch.float32),
                exp_avg=host_empty(len(bucket.master), torch.float32, zero=True),
                exp_avg_sq=host_empty(len(bucket.master), torch.float32, zero=True))

    # ------------------------------------------------------------------------------------------------
    # backward: gradients leave the device as they are produced

    def _on_grad(self, param: torch.nn.Parameter) -> None:
        task = torch._C._current_graph_task_id()
        if task != self._task or not self._in_backward:
            self._start_backward(task)
        bucket, offset, n = self._where[param]
        grad = param.grad
        if n < layout.SMALL_PARAM:  # gathered on the device: one copy to the host for all of the bucket's
            gathered = self._gathered[param]
            bucket.small_device[gathered:gathered + n].view(grad.shape).copy_(grad)
        else:
            if self.accumulation_steps == 1:  # with accumulation the norm is of the sum, taken on the host
                bucket.norms.append(torch.linalg.vector_norm(grad, dtype=torch.float64))  # as clip_gradients does
            self._send(grad, bucket.staging[offset:offset + n])
        param.grad = None
        bucket.pending.discard(param)
        if not bucket.pending:
            self._complete(bucket)

    def _start_backward(self, task: int) -> None:
        self._settle()  # blocks whose weights the forward did not use have theirs now too
        if self._in_backward:  # the last backward raised before it finished: drop what it left
            self._reset()
        self._task, self._in_backward = task, True
        self._backwards += 1
        for bucket in self._buckets:
            bucket.pending = set(bucket.params)
        torch.autograd.Variable._execution_engine.queue_callback(self._backward_done)

    def _send(self, grad: torch.Tensor, target: torch.Tensor) -> None:
        flat = grad.contiguous().view(-1)  # a copy when the gradient is not contiguous (channels_last)
        if self._grads_stream is None:
            target.copy_(flat)
            return
        self._grads_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._grads_stream):
            target.copy_(flat, non_blocking=True)
        flat.record_stream(self._grads_stream)  # the tensor the copy reads stays allocated until it is done

    def _complete(self, bucket: Bucket) -> None:
        """Every gradient of `bucket` that this backward will produce is on its way: hand it to the worker."""
        missing, bucket.pending = [p for p in bucket.params if p in bucket.pending], set()
        bucket.event = None
        if bucket.small:
            for p, _, gathered in bucket.small:
                if p in missing:  # what the last backward left there must not count
                    bucket.small_device[gathered:gathered + p.numel()].zero_()
            if self.accumulation_steps == 1:
                bucket.norms.append(torch.linalg.vector_norm(bucket.small_device, dtype=torch.float64))
        squared = None
        if bucket.sq_host is not None:  # on the device even without a gradient: record_stream takes CUDA tensors only
            squared = (torch.stack(bucket.norms).square().sum() if bucket.norms
                       else torch.zeros((), dtype=torch.float64, device=self.device))
        stream = self._grads_stream  # None: copies in order (CPU, or SDTUNE_OFFLOAD_SYNC=1)
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):  # both land before the event the worker waits for
            if bucket.small:  # (the device buffer is rewritten only in the next backward, after the event)
                bucket.small_host.copy_(bucket.small_device, non_blocking=stream is not None)
            if squared is not None:
                bucket.sq_host.copy_(squared, non_blocking=stream is not None)
        if stream is not None:
            if squared is not None:
                squared.record_stream(stream)
            bucket.event = blocking_event()
            bucket.event.record(stream)
        final = self._backwards >= self.accumulation_steps
        if self._worker is None:
            self._arrived(bucket, missing, final)
        else:
            self._futures.append(self._worker.submit(self._arrived, bucket, missing, final))

    def _arrived(self, bucket: Bucket, missing: list, final: bool) -> None:
        """On the worker: the bucket's gradients are in its staging buffer once its event has passed."""
        if bucket.event is not None:
            bucket.event.synchronize()
        for p, offset, gathered in bucket.small:
            bucket.staging[offset:offset + p.numel()].copy_(bucket.small_host[gathered:gathered + p.numel()])
        for p in missing:  # no gradient in this backward (an unused parameter): it counts as zero
            _, offset, n = self._where[p]
            bucket.staging[offset:offset + n].zero_()
        if bucket.grad is not None:
            self._fold(bucket, final)
        if self.step_in_backward:
            # An inf/NaN gradient stops the stepping here: buckets stepped before it cannot be taken back,
            # the rest keep their weights, and step() reports the step as skipped.
            self._poisoned = self._poisoned or not math.isfinite(bucket.sq_host.item())
            if not self._poisoned:
                self._step_bucket(bucket, Scaling())

    def _fold(self, bucket: Bucket, final: bool) -> None:
        """Add this micro-batch's gradients into the fp32 sum; after the last one, take the sum's norm."""
        for part in chunks(len(bucket.grad)):
            total, staged = bucket.grad[part], bucket.staging[part]
            total.copy_(staged) if bucket.folds == 0 else total.add_(staged)
            if final:
                self._host_sq += torch.linalg.vector_norm(total, dtype=torch.float64).item() ** 2
        bucket.folds += 1

    def _backward_done(self) -> None:
        """End of a backward pass: buckets with parameters that got no gradient are complete now too."""
        for bucket in self._buckets:
            if bucket.pending:
                self._complete(bucket)
        self._wait()
        self._in_backward = False

    def _wait(self) -> None:
        """Every queued worker task is done (all of them, even when one raised; then that error is raised)."""
        futures, self._futures = self._futures, []
        started = time.perf_counter()
        errors = [future.exception() for future in futures]
        self._waited += time.perf_counter() - started
        for error in errors:
            if error is not None:
                raise error

    def _reset(self) -> None:
        """Forget this step's gradients (after a step, a skipped step, or a backward that raised)."""
        try:
            self._wait()
        finally:
            if self._in_backward:  # copies of the unfinished backward may still be writing the staging
                self._drain_streams()
            self._in_backward, self._backwards, self._host_sq, self._poisoned = False, 0, 0.0, False
            for bucket in self._buckets:
                bucket.pending, bucket.folds, bucket.stepped, bucket.norms = set(), 0, False, []

    def _drain_streams(self) -> None:
        """The host waits for every copy queued on the side streams (before it writes their buffers itself)."""
        for stream in (self._grads_stream, self._upload_stream):
            if stream is not None:
                stream.synchronize()

    # ------------------------------------------------------------------------------------------------
    # step: fused AdamW over each bucket's master on the host, then its weights go back to the device

    def grad_sq_norm(self) -> float:
        """Squared L2 norm of this step's (still scaled) gradients, summed in float64."""
        if self.accumulation_steps > 1:
            return self._host_sq
        norms = [norm for bucket in self._buckets for norm in bucket.norms]
        return torch.stack(norms).square().sum().item() if norms else 0.0

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError(f"{type(self).__name__}.step takes no closure")
        if self._in_backward:
            raise RuntimeError(f"{type(self).__name__}.step() after a backward that did not finish; "
                               "call zero_grad() first")
        self._settle()
        scale = getattr(self, "grad_scale", None)  # set by GradScaler.step when loss scaling is on
        scale = 1.0 if scale is None else float(scale)
        try:
            self._step(scale)
        finally:
            self._reset()

    def _step(self, scale: float) -> None:
        self.last_grad_norm = math.sqrt(self.grad_sq_norm()) / scale
        self.skipped = self._poisoned if self.step_in_backward else not math.isfinite(self.last_grad_norm)
        if not self.skipped:
            if self._backwards == 0:  # no backward since the last step: every gradient is zero
                self._drain_streams()  # the last uploads may still read the staging
                for bucket in self._buckets:
                    bucket.staging.zero_()
                    if bucket.grad is not None:
                        bucket.grad.zero_()
            scaling = Scaling(scale, clip_factor(self.last_grad_norm, self.max_grad_norm))
            if self._queue is not None:
                self._queue.queue(scaling, self._step_settings())
            else:
                self._step_all(scaling)
                self._uploaded()
        elif self.step_in_backward:  # buckets stepped before the overflow: their uploads are still in flight
            self._uploaded()

    def _settle(self) -> None:
        """Every step queued by `step()` is done (`StepQueue.settle`): before backward, checkpoints, or anything
        else that reads the masters, the state or the staging."""
        if self._queue is not None:
            self._queue.settle()

    @property
    def host_wait_seconds(self) -> float:
        """Seconds the training thread has waited for the worker so far: the gradients' host handling at the
        end of a backward, the queued steps before the next backward or a checkpoint, and each block of the
        forward waiting for its buckets (`overlap_step`). Clock reads only: no device sync."""
        return self._waited + (self._queue.waited if self._queue is not None else 0.0)

    def _step_settings(self) -> dict:
        """This step's learning rate and betas (the first param group) and its EMA decay."""
        return {**self.param_groups[0], "ema_decay": self.ema_decay}

    def _step_all(self, scaling: Scaling) -> None:
        for bucket in self._buckets:
            if not bucket.stepped:
                self._step_bucket(bucket, scaling)

    def _step_bucket(self, bucket: Bucket, scaling: Scaling, group: dict | None = None) -> None:
        state = self.state[bucket.master]
        state["step"] += 1
        self._update(bucket, bucket.master, state["exp_avg"], state["exp_avg_sq"], state["step"], scaling, group)
        bucket.stepped = True

    def _update(self, bucket: Bucket, master, exp_avg, exp_avg_sq, step, scaling: Scaling,
                group: dict | None = None) -> None:
        """AdamW over `master` chunk by chunk, each new chunk cast on its way out; then the upload.

        One pass over memory: each chunk (`layout.STEP_CHUNK` values, in L2) is upcast, stepped, averaged and cast
        out while it is in the cache. Gradients already in fp32 (an fp32 staging, or the accumulation sum)
        are unscaled in place, with no upcast copy; `split` makes every chunk's views in one call."""
        group, out = group or self._step_settings(), bucket.device_flat if self._cast_in_place else bucket.staging
        decay = group["ema_decay"] if bucket.ema is not None else None
        grads = bucket.grad if bucket.grad is not None else bucket.staging
        upcast = grads.dtype != torch.float32
        pieces = [t.split(layout.STEP_CHUNK) for t in (master, grads, exp_avg, exp_avg_sq, out)]
        averages = bucket.ema.split(layout.STEP_CHUNK) if decay is not None else [None] * len(pieces[0])
        for new, grad, moment, moment_sq, cast, average in zip(*pieces, averages, strict=True):
            if upcast:
                grad = self._scratch[:len(new)].copy_(grad)
            scaling.apply(grad)
            adamw_kernel(new, grad, moment, moment_sq, step, group)
            if average is not None:  # while the new chunk is in the caches
                average.lerp_(new, 1.0 - decay)
            cast.copy_(new)
        self._upload(bucket)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Device gradients were freed in the hooks; the host ones are replaced by the next backward."""
        self._reset()

    def _publish(self, bucket: Bucket, master: torch.Tensor) -> None:
        """`master` (this bucket's fp32 weights, e.g. loaded from a checkpoint) becomes its working weights."""
        self._drain_streams()  # an earlier upload may still read the staging
        (bucket.device_flat if self._cast_in_place else bucket.staging).copy_(master)
        self._upload(bucket)

    def _upload(self, bucket: Bucket) -> None:
        """Queue the copy of the bucket's staged working weights to the device."""
        if self._cast_in_place:
            return
        stream = self._upload_stream
        with torch.cuda.stream(stream):
            if stream is not None and bucket.event is not None:  # backward has read the old weights by then
                stream.wait_event(bucket.event)
            bucket.device_flat.copy_(bucket.staging, non_blocking=stream is not None)

    def _uploaded(self) -> None:
        """The device weights are used next on the compute stream: it waits for the queued copies."""
        if self._upload_stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self._upload_stream)

    def close(self) -> None:
        """Release the worker thread and the host memory: the pinned staging (and host weights), the moments,
        the gradient sums, the scratch, and the masters and averages no one else holds (a view taken with
        `masters_by_name` or `ema_weights`, such as the weights an export writes, keeps its bucket's values).
        Queued steps and copies finish first. The tier is not used afterwards; a second call does nothing."""
        if self._closed:
            return
        try:
            for finish in (self._settle, self._wait):  # a failed step raised where the run read it; a run
                with suppress(Exception):                # ending on another error ends with that one
                    finish()
            self._drain_streams()
        finally:
            self._pinning, self._waited, self._closed = self.host_pinning, self.host_wait_seconds, True
            if self._worker is not None:
                self._worker.shutdown(wait=True)
            for hook in self._hooks:
                hook.remove()
            for bucket in self._buckets:  # the forward's gates (`StepQueue`) still name the buckets: empty them
                for name in RELEASED:
                    setattr(bucket, name, None)
                bucket.params, bucket.small = [], []
            for group in self.param_groups:  # the LR schedule keeps the optimizer: its groups keep no master
                group["params"] = []
            self.state.clear()
            self._buckets, self._where, self._gathered, self._hooks, self._futures = [], {}, {}, [], []
            self._worker = self._queue = self._weights = self._staging = self._small = self._scratch = None

    # ------------------------------------------------------------------------------------------------
    # checkpoints: the masters are part of the state, the device weights follow from them. A checkpoint
    # keeps the masters and moments in a file of their own, read back straight into the buckets: a pickle
    # of them would be read whole beside the buckets, and resuming would need twice the tier's RAM.

    def state_dict(self) -> dict:
        """Everything, in memory: the masters and moments are the buckets' own tensors."""
        self._settle()
        return {**super().state_dict(), "masters": [b.master for b in self._buckets]}

    def checkpoint_state(self) -> dict:
        """What a checkpoint's `training_state.pt` keeps: the param groups and step counts; the masters and
        moments go to `save_state_files`' file."""
        self._settle()
        full = super().state_dict()
        return {"param_groups": full["param_groups"], "state_file": layout.STATE_FILE,
                "state": {index: {"step": values["step"]} for index, values in full["state"].items()}}

    def state_file_bytes(self) -> int:
        return layout.MASTER_BYTES * sum(len(bucket.master) for bucket in self._buckets)

    def save_state_files(self, folder: Path) -> None:
        """Write each bucket's [master | exp_avg | exp_avg_sq] to `folder`/optimizer_state.bin (the nvme
        tier's layout), from the buckets' own memory."""
        self._settle()
        fd = os.open(Path(folder) / layout.STATE_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            for offset, tensor in self._state_regions():
                layout.write_region(fd, tensor, offset)
        finally:
            os.close(fd)

    def load_state_files(self, folder: Path) -> None:
        """After `load_state_dict` of a `checkpoint_state`: read its file into the buckets, then publish the
        masters as the working weights. Nothing to read after a whole `state_dict`."""
        if not self._state_file_due:
            return
        path = Path(folder) / layout.STATE_FILE
        if not path.is_file():
            raise SdtuneError(f"{path} is missing: this checkpoint has no optimizer state to resume from")
        if path.stat().st_size != self.state_file_bytes():
            raise SdtuneError(f"{path} does not match this model's optimizer state (size differs)")
        fd = os.open(path, os.O_RDONLY)
        try:
            for offset, tensor in self._state_regions():
                layout.read_region(fd, tensor, offset)
        finally:
            os.close(fd)
        self._state_file_due = False
        for bucket in self._buckets:
            self._publish(bucket, bucket.master)
        self._uploaded()

    def _state_regions(self):
        """(byte offset in the state file, tensor) of each bucket's master and moments, in file order."""
        offset = 0
        for bucket in self._buckets:
            state = self.state[bucket.master]
            for tensor in (bucket.master, state["exp_avg"], state["exp_avg_sq"]):
                yield offset, tensor
                offset += tensor.numel() * tensor.element_size()

    def masters_by_name(self) -> dict[str, torch.Tensor]:
        """The fp32 master of each trained parameter of `model`, by its name there (views of the buckets)."""
        return {} if self.model is None else self._views(self.model, "master")

    def load_state_dict(self, state_dict: dict) -> None:
        self._settle()
        state_dict = dict(state_dict)
        if state_dict.pop("state_file", None):  # a checkpoint_state: the moments stay where they are
            moments = [{key: self.state[b.master][key] for key in ("exp_avg", "exp_avg_sq")} for b in self._buckets]
            super().load_state_dict(state_dict)
            for bucket, kept in zip(self._buckets, moments, strict=True):
                self.state[bucket.master].update(kept)
            self._state_file_due = True
            return
        masters = state_dict.pop("masters")
        super().load_state_dict(state_dict)
        for bucket, master in zip(self._buckets, masters, strict=True):
            bucket.master.copy_(master)
            self._publish(bucket, bucket.master)
        self._uploaded()

    # ------------------------------------------------------------------------------------------------
    # the fp32 weights by name: the masters, and their moving average (`ema=True`)

    def master_weights(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """`module.state_dict()` with every offloaded parameter replaced by its fp32 master."""
        return {**module.state_dict(), **self._views(module, "master")}

    def ema_weights(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The moving average of each of `module`'s trained parameters, by name (views of the buckets)."""
        return self._views(module, "ema")

    def _views(self, module: torch.nn.Module, part: str) -> dict[str, torch.Tensor]:
        """Each of `module`'s trained parameters' slice of its bucket's `part` ("master", "ema"), by name."""
        self._settle()
        views = {}
        for name, p in module.named_parameters():
            if p in self._where:
                bucket, offset, n = self._where[p]
                views[name] = getattr(bucket, part)[offset:offset + n].view(p.shape)
        return views

    @torch.no_grad()
    def load_ema(self, module: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
        """Copy `weights` (as `ema_weights` names them) into the buckets' averages."""
        for name, view in self.ema_weights(module).items():
            view.copy_(weights[name])

    @contextmanager
    @torch.no_grad()
    def ema_applied(self):
        """The working weights hold the moving average (cast), then exactly their own values again."""
        self._settle()
        self._drain_streams()
        kept = [bucket.device_flat.to("cpu", copy=True) for bucket in self._buckets]
        try:
            for bucket in self._buckets:
                bucket.device_flat.copy_(bucket.ema)
            yield
        finally:
            for bucket, own in zip(self._buckets, kept, strict=True):
                bucket.device_flat.copy_(own)
