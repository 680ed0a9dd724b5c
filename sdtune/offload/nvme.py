"""AdamW whose fp32 master weights and moments live in a file on a fast disk (`optimizer_offload = "nvme"`).

Everything about gradients is `OffloadAdamW`'s: they leave the device during backward and are summed in
fp32 in host RAM (4 bytes a parameter), so GradScaler's overflow check and gradient clipping see all of
them before any weight changes. What moves to disk is the rest of the optimizer's 16 bytes a parameter:
the master weight and AdamW's two moments, 12 bytes, stored bucket after bucket in one file under
`memory.offload_dir` as `[master | exp_avg | exp_avg_sq]`.

A step streams the buckets through a ring of three host buffers: a reader thread loads bucket i+1 while
the fused AdamW kernel updates bucket i and a writer thread stores bucket i-1, so host RAM holds three
buckets of state instead of all of it. Each updated bucket's weights go to the device as soon as its
kernel is done. Reads and writes are `os.preadv`/`os.pwrite`, which release the GIL.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from sdtune.errors import SdtuneError
from sdtune.offload.optimizer import OffloadAdamW, _Bucket, _partition, adamw_kernel

STATE_FILE = "optimizer_state.bin"
_FLOAT = 4
_RING = 3  # buffers: one being read, one being stepped, one being written


def check_offload_dir(directory: str) -> Path:
    """`directory` exists and this process may create files in it; one line saying which is wrong otherwise."""
    path = Path(directory).expanduser()
    if not path.is_dir():
        raise SdtuneError(f"memory.offload_dir {directory} does not exist; create it (on a fast local disk) first")
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise SdtuneError(f"memory.offload_dir {directory} is not writable ({exc.strerror})") from None
    return path


def _remove(fd: int, directory: Path) -> None:
    os.close(fd)
    shutil.rmtree(directory, ignore_errors=True)


class _StateFile:
    """One file of fp32 regions, `3 * length` floats for each bucket, in a private temporary folder."""

    def __init__(self, parent: Path, lengths: list[int]):
        needed = 3 * _FLOAT * sum(lengths)
        free = shutil.disk_usage(parent).free
        if free < needed:
            raise SdtuneError(f"memory.offload_dir {parent} has {free / 2**30:.1f} GiB free but the optimizer state "
                              f"needs {needed / 2**30:.1f} GiB; free space or choose another disk")
        self.folder = Path(tempfile.mkdtemp(prefix="sdtune-offload-", dir=parent))
        self.path = self.folder / STATE_FILE
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        self._finalizer = weakref.finalize(self, _remove, self.fd, self.folder)
        self.offsets, self.size = [], 0
        for n in lengths:
            self.offsets.append(self.size)
            self.size += 3 * _FLOAT * n

    def read(self, index: int, out: torch.Tensor, start: int = 0) -> None:
        """Fill `out` (contiguous fp32) from bucket `index`'s region, `start` floats in."""
        view, done, offset = memoryview(out.numpy()).cast("B"), 0, self.offsets[index] + _FLOAT * start
        while done < len(view):
            count = os.preadv(self.fd, [view[done:]], offset + done)
            if count == 0:
                raise SdtuneError(f"{self.path} is shorter than expected: the optimizer state was truncated")
            done += count

    def write(self, index: int, data: torch.Tensor, start: int = 0) -> None:
        view, done, offset = memoryview(data.numpy()).cast("B"), 0, self.offsets[index] + _FLOAT * start
        try:
            while done < len(view):
                done += os.pwrite(self.fd, view[done:], offset + done)
        except OSError as exc:
            raise SdtuneError(f"writing optimizer state to {self.path} failed ({exc.strerror}); "
                              "free space there or set memory.offload_dir to another disk") from None

    def close(self) -> None:
        self._finalizer()

    def save(self, target: Path) -> None:
        os.fsync(self.fd)
        shutil.copyfile(self.path, target)

    def load(self, source: Path) -> None:
        if not source.is_file():
            raise SdtuneError(f"{source} is missing: this checkpoint has no nvme optimizer state to resume from")
        if source.stat().st_size != self.size:
            raise SdtuneError(f"{source} does not match this model's optimizer state (size differs)")
        shutil.copyfile(source, self.path)


class NvmeAdamW(OffloadAdamW):
    """`OffloadAdamW` with the masters and moments in a file under `offload_dir`, streamed bucket by bucket.

    The optimizer's parameters are zero-stride placeholders, one per bucket, whose `.grad` is the bucket's
    host gradient: GradScaler and clipping work on them as on any parameter, and no master is in RAM."""

    def __init__(self, params, *, offload_dir: str, device, dtype, lr: float, betas=(0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, bucket_mb: int = 64, host_weights: bool = False):
        params = [p for p in params if p.requires_grad]
        lengths = [sum(p.numel() for p in group) for group in _partition(params, bucket_mb * 2**20)]
        self._file = _StateFile(check_offload_dir(offload_dir), lengths)
        cuda = torch.device(device).type == "cuda"
        self._ring = [torch.empty(3 * max(lengths), dtype=torch.float32, pin_memory=cuda) for _ in range(_RING)]
        self._steps = torch.zeros((), dtype=torch.float32)  # AdamW's step count, shared by every bucket
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="sdtune-nvme-read")
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="sdtune-nvme-write")
        super().__init__(params, device=device, dtype=dtype, lr=lr, betas=betas, eps=eps,
                         weight_decay=weight_decay, bucket_mb=bucket_mb, host_weights=host_weights)

    def _keep_master(self, index: int, values: torch.Tensor) -> torch.Tensor:
        """Write the master and zero moments to the file; keep a placeholder the gradient hangs on."""
        n = len(values)
        self._file.write(index, values)
        self._file.write(index, torch.zeros(2 * n, dtype=torch.float32), start=n)
        return torch.zeros((), dtype=torch.float32).expand(n)

    # ------------------------------------------------------------------------------------------------
    # the streamed step

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("NvmeAdamW.step takes no closure")
        self._zero_unused_grads()
        if not self._overflowed():
            self._steps += 1
            self._stream_buckets(self._update)
            self._uploaded()
        self._fresh = set(self._where)

    def _update(self, bucket: _Bucket, state: torch.Tensor) -> bool:
        """One fused AdamW kernel over a bucket's `[master | exp_avg | exp_avg_sq]`; its weights go to the device."""
        master, exp_avg, exp_avg_sq = state.chunk(3)
        adamw_kernel(master, bucket.master.grad, exp_avg, exp_avg_sq, self._steps, self.param_groups[0],
                     getattr(self, "grad_scale", None))
        self._upload_bucket(bucket, master)
        return True  # the state changed: write it back

    def _stream_buckets(self, visit) -> None:
        """Call `visit(bucket, state)` on each bucket's state in a ring buffer, reading one bucket ahead and
        writing back behind (when `visit` returns True)."""
        writes: list[Future | None] = [None] * _RING

        def load(index: int) -> torch.Tensor:
            slot = index % _RING
            if writes[slot] is not None:
                writes[slot].result()  # the buffer is free once its last bucket is on disk
            state = self._ring[slot][:3 * len(self._buckets[index].master)]
            self._file.read(index, state)
            return state

        ahead = self._reader.submit(load, 0)
        for index, bucket in enumerate(self._buckets):
            state = ahead.result()
            if index + 1 < len(self._buckets):
                ahead = self._reader.submit(load, index + 1)
            if visit(bucket, state):
                writes[index % _RING] = self._writer.submit(self._file.write, index, state)
        for write in writes:
            if write is not None:
                write.result()

    def close(self) -> None:
        """Delete the state file (also done when the optimizer is collected or the process exits)."""
        self._reader.shutdown()
        self._writer.shutdown()
        self._file.close()

    # ------------------------------------------------------------------------------------------------
    # checkpoints: the state file is copied beside the checkpoint, the rest is a small dict

    def state_dict(self) -> dict:
        return {**torch.optim.Optimizer.state_dict(self), "nvme_steps": self._steps.item()}

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        self._steps.fill_(state_dict.pop("nvme_steps"))
        torch.optim.Optimizer.load_state_dict(self, state_dict)

    def save_state_files(self, folder: Path) -> None:
        self._file.save(Path(folder) / STATE_FILE)

    def load_state_files(self, folder: Path) -> None:
        self._file.load(Path(folder) / STATE_FILE)
        self._stream_buckets(lambda bucket, state: self._upload_bucket(bucket, state.chunk(3)[0]))
        self._uploaded()

    def master_weights(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        masters = {}

        def keep(bucket: _Bucket, state: torch.Tensor) -> bool:
            master = state.chunk(3)[0]
            for p, offset in zip(bucket.params, bucket.offsets, strict=True):
                masters[p] = master[offset:offset + p.numel()].view(p.shape).clone()
            return False

        self._stream_buckets(keep)
        weights = dict(module.state_dict())
        weights.update({name: masters[p] for name, p in module.named_parameters() if p in masters})
        return weights
