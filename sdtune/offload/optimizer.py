"""AdamW whose fp32 master weights, gradients and moments live in host memory (`optimizer_offload = "cpu"`).

The compute device keeps only the working-precision weights: every trainable parameter becomes a view
into one flat device buffer per bucket (about `bucket_mb` of fp32 each). On the host, each bucket has a
flat fp32 master copy, a flat fp32 gradient and AdamW's two moments, stepped by torch's fused CPU AdamW.

As backward produces a parameter's gradient (a post-accumulate-grad hook), the gradient is copied to the
host and freed on the device, so gradients never pile up on the GPU; with gradient accumulation the host
sums the micro-batches in fp32. On CUDA the copy runs on a side stream into pinned memory and a worker
thread folds it into the fp32 gradient while backward goes on. The optimizer's parameters are the host
masters, so torch's GradScaler (fp16 overflow check and skip), `clip_grad_norm_` over its param groups and
LR schedulers work unchanged. After the step, each bucket's weights go back to the device.

Gradient clipping needs the norm of all gradients, and fp16 loss scaling needs to know whether any
overflowed, before any weight may change: with either, or with gradient accumulation, the step runs after
backward. Without them (`step_in_backward`), each bucket is stepped and its weights sent back as soon as
its last gradient has arrived, on the worker thread while backward goes on (a parameter's weight is not
read by backward again once its gradient is complete); `step()` then only finishes what is left.
"""

from __future__ import annotations

import itertools
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch


@dataclass
class _Bucket:
    params: list[torch.nn.Parameter]
    offsets: list[int]
    device_flat: torch.Tensor          # working-precision weights (on the compute device unless host_weights)
    master: torch.Tensor               # fp32 weights on the host; `.grad` is the fp32 host gradient
    staging: torch.Tensor | None       # pinned working-precision host buffer for the copies (CUDA only)
    waiting: int = 0                   # parameters still to receive their gradient in this backward
    stepped: bool = False              # already stepped in this backward (step_in_backward)


def _partition(params: list, bucket_bytes: int) -> list[list]:
    groups, current, size = [], [], 0
    for p in params:
        current.append(p)
        size += p.numel() * 4
        if size >= bucket_bytes:
            groups.append(current)
            current, size = [], 0
    return groups + ([current] if current else [])


def _fold(target: torch.Tensor, grad: torch.Tensor, first: bool) -> None:
    if first:
        target.copy_(grad)
    else:
        target.add_(grad)


def _fold_after(event, target: torch.Tensor, staged: torch.Tensor, first: bool) -> None:
    event.synchronize()
    _fold(target, staged, first)


def adamw_kernel(master: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                 step: torch.Tensor, group: dict, grad_scale: torch.Tensor | None = None) -> None:
    """One AdamW update of `master` in place, by the kernel torch's fused AdamW runs (so results match it
    bit for bit); `step` is the already incremented step count."""
    beta1, beta2 = group["betas"]
    torch._fused_adamw_([master], [grad], [exp_avg], [exp_avg_sq], [], [step], lr=group["lr"], beta1=beta1,
                        beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"], amsgrad=False,
                        maximize=False, grad_scale=grad_scale, found_inf=None)


class OffloadAdamW(torch.optim.AdamW):
    """AdamW over host fp32 masters of `params`, which it moves to `device` in `dtype`.

    `params` must arrive in fp32 (on any device): they become the masters exactly. With `host_weights`
    the working-precision weights stay in (pinned) host memory instead, for `ParamStreamer` to bring
    to the device block by block; gradients still arrive on `device`. `step_in_backward` is only exact
    without gradient clipping, loss scaling and gradient accumulation: the caller decides."""

    def __init__(self, params, *, device, dtype, lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, bucket_mb: int = 64, host_weights: bool = False,
                 step_in_backward: bool = False):
        self.device, self.dtype, self.host_weights = torch.device(device), dtype, host_weights
        self.step_in_backward = step_in_backward
        cuda = self.device.type == "cuda"
        trainable = [p for p in params if p.requires_grad]
        self._buckets: list[_Bucket] = []
        for group in _partition(trainable, bucket_mb * 2**20):
            self._buckets.append(self._make_bucket(group, cuda))
        self._where = {}
        for bucket in self._buckets:
            for p, offset in zip(bucket.params, bucket.offsets, strict=True):
                self._where[p] = (bucket, offset, p.numel())
                p.register_post_accumulate_grad_hook(self._on_grad)
        self._fresh = set(self._where)  # parameters whose next gradient replaces the host one
        self._stream = torch.cuda.Stream(self.device) if cuda else None
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="sdtune-offload") if cuda else None
        self._pending: list[Future] = []
        self._in_backward = False
        super().__init__([b.master for b in self._buckets], lr=lr, betas=betas, eps=eps,
                         weight_decay=weight_decay, fused=True)

    def _make_bucket(self, params: list, cuda: bool) -> _Bucket:
        sizes = [p.numel() for p in params]
        offsets = list(itertools.accumulate([0, *sizes[:-1]]))
        values = torch.empty(sum(sizes), dtype=torch.float32, pin_memory=cuda)
        for p, offset, n in zip(params, offsets, sizes, strict=True):
            values[offset:offset + n].copy_(p.detach().reshape(-1))
        if self.host_weights:
            device_flat = torch.empty(len(values), dtype=self.dtype, pin_memory=cuda)
        else:
            device_flat = torch.empty(len(values), dtype=self.dtype, device=self.device)
        device_flat.copy_(values)
        for p, offset, n in zip(params, offsets, sizes, strict=True):
            p.data = device_flat[offset:offset + n].view(p.shape)
        staging = torch.empty(len(values), dtype=self.dtype, pin_memory=True) if cuda else None
        master = self._keep_master(len(self._buckets), values)
        master.grad = torch.zeros(len(values), dtype=torch.float32, pin_memory=cuda)
        return _Bucket(params, offsets, device_flat, master, staging)

    def _keep_master(self, index: int, values: torch.Tensor) -> torch.Tensor:
        """Where bucket `index`'s fp32 master lives: here, the host tensor itself."""
        return values

    # ------------------------------------------------------------------------------------------------
    # backward: gradients leave the device as they are produced

    def _on_grad(self, param: torch.nn.Parameter) -> None:
        if not self._in_backward:
            self._in_backward = True
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_done)
            for b in self._buckets:
                b.waiting = len(b.params)
        bucket, offset, n = self._where[param]
        first = param in self._fresh
        self._fresh.discard(param)
        grad, target = param.grad.reshape(-1), bucket.master.grad[offset:offset + n]
        if self._stream is None:
            _fold(target, grad, first)
        else:
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._stream):
                staged = bucket.staging[offset:offset + n]
                staged.copy_(grad, non_blocking=True)
                param.grad.record_stream(self._stream)  # keep the device memory until the copy is done
                event = torch.cuda.Event()
                event.record(self._stream)
            self._pending.append(self._worker.submit(_fold_after, event, target, staged, first))
        param.grad = None
        bucket.waiting -= 1
        if self.step_in_backward and bucket.waiting == 0:  # after its folds: the worker runs tasks in order
            if self._worker is None:
                self._step_bucket(bucket)
            else:
                self._pending.append(self._worker.submit(self._step_bucket, bucket))

    def _backward_done(self) -> None:
        """End of a backward pass: the host gradient is complete once the queued folds are."""
        self._in_backward = False
        for future in self._pending:
            future.result()
        self._pending.clear()

    # ------------------------------------------------------------------------------------------------
    # step: fused AdamW over each bucket's master on the host, then its weights go back to the device

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError(f"{type(self).__name__}.step takes no closure")
        if not self._overflowed():
            self._zero_unused_grads()
            for bucket in self._buckets:
                if not bucket.stepped:
                    self._step_bucket(bucket)
            self._uploaded()
        for bucket in self._buckets:
            bucket.stepped = False
        self._fresh = set(self._where)

    @torch.no_grad()
    def _step_bucket(self, bucket: _Bucket) -> None:
        state = self.state[bucket.master]
        if not state:  # laid out as torch's fused AdamW lays out its state, so checkpoints are the same
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(bucket.master, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(bucket.master, memory_format=torch.preserve_format)
        state["step"] += 1
        adamw_kernel(bucket.master, bucket.master.grad, state["exp_avg"], state["exp_avg_sq"], state["step"],
                     self.param_groups[0], getattr(self, "grad_scale", None))
        self._upload_bucket(bucket, bucket.master)
        bucket.stepped = True

    def _zero_unused_grads(self) -> None:
        for p in self._fresh:  # no gradient since the last step (an unused parameter): count it as zero
            bucket, offset, n = self._where[p]
            bucket.master.grad[offset:offset + n].zero_()

    def _overflowed(self) -> bool:
        """GradScaler found inf/NaN gradients (it sets `found_inf` on fused optimizers): skip the step."""
        found_inf = getattr(self, "found_inf", None)
        return found_inf is not None and bool(found_inf.item())

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Host gradients are overwritten by the next backward; device ones were freed in the hooks."""
        self._fresh = set(self._where)

    def _upload(self) -> None:
        for bucket in self._buckets:
            self._upload_bucket(bucket, bucket.master)
        self._uploaded()

    def _upload_bucket(self, bucket: _Bucket, master: torch.Tensor) -> None:
        """Queue the copy of `master` (this bucket's fp32 weights) to the device in working precision."""
        if self._stream is None or self.host_weights:
            bucket.device_flat.copy_(master)
            return
        bucket.staging.copy_(master)  # cast on the host, then one copy per bucket
        with torch.cuda.stream(self._stream):
            bucket.device_flat.copy_(bucket.staging, non_blocking=True)

    def _uploaded(self) -> None:
        """The device weights are used next on the compute stream: it waits for the queued copies."""
        if self._stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self._stream)

    # ------------------------------------------------------------------------------------------------
    # checkpoints: the masters are part of the state, the device weights follow from them

    def state_dict(self) -> dict:
        return {**super().state_dict(), "masters": [b.master for b in self._buckets]}

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        masters = state_dict.pop("masters")
        super().load_state_dict(state_dict)
        for bucket, master in zip(self._buckets, masters, strict=True):
            bucket.master.copy_(master)
        self._upload()

    def master_weights(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """`module.state_dict()` with every offloaded parameter replaced by its fp32 master."""
        weights = dict(module.state_dict())
        for name, p in module.named_parameters():
            if p in self._where:
                bucket, offset, n = self._where[p]
                weights[name] = bucket.master[offset:offset + n].view(p.shape)
        return weights
