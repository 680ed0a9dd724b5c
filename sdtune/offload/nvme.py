"""AdamW whose fp32 master weights and moments live in a file on a fast disk (`optimizer_offload = "nvme"`).

Everything about gradients is `OffloadAdamW`'s: they leave the device during backward into pinned
staging in the working precision (2 bytes a parameter; with gradient accumulation summed in fp32, 4 more),
and their norm decides clipping and the fp16 overflow check before any weight changes. What moves to
disk is the master weight and AdamW's two moments, 12 bytes a parameter, stored bucket after bucket in
one file under `memory.offload_dir` as `[master | exp_avg | exp_avg_sq]`.

A step streams the buckets through a ring of three host buffers: a reader thread loads bucket i+1 while
the fused AdamW kernel updates bucket i and a writer thread stores bucket i-1, so host RAM holds three
buckets of state instead of all of it (pageable: only the staging is DMA'd). Each updated bucket's
weights go to the device as soon as its kernel is done. Reads and writes are `os.preadv`/`os.pwrite`,
which release the GIL.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path

import torch

from sdtune.errors import SdtuneError
from sdtune.offload import layout
from sdtune.offload.layout import STATE_FILE, Bucket, partition
from sdtune.offload.optimizer import OffloadAdamW
from sdtune.offload.pinned import host_empty
from sdtune.util.files import check_space

_FLOAT = 4
RING = 3  # buffers: one being read, one being stepped, one being written


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
        check_space(parent, 3 * _FLOAT * sum(lengths), "the optimizer state (memory.offload_dir)",
                    "free space there or set memory.offload_dir to another disk")
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
        if not layout.read_region(self.fd, out, self.offsets[index] + _FLOAT * start):
            raise SdtuneError(f"{self.path} is shorter than expected: the optimizer state was truncated")

    def write(self, index: int, data: torch.Tensor, start: int = 0) -> None:
        try:
            layout.write_region(self.fd, data, self.offsets[index] + _FLOAT * start)
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

    The optimizer's parameters are zero-stride placeholders, one per bucket (the LR schedule and the
    checkpoint's param groups see them as any optimizer's parameters); no master is in RAM."""

    def __init__(self, params, *, offload_dir: str, bucket_mb: int | None = None, **kwargs):
        params = [p for p in params if p.requires_grad]
        numels = [p.numel() for p in params]
        lengths = [sum(numels[i] for i in r) for r in partition(numels, bucket_mb)]
        self._file = _StateFile(check_offload_dir(offload_dir), lengths)
        self._ring = [host_empty(3 * max(lengths, default=0), torch.float32) for _ in range(RING)]
        self._steps = torch.zeros((), dtype=torch.float32)  # AdamW's step count, shared by every bucket
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="sdtune-nvme-read")
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="sdtune-nvme-write")
        super().__init__(params, bucket_mb=bucket_mb, **{**kwargs, "overlap_step": False})  # steps stream from disk

    @staticmethod
    def host_bytes(numels: list[int], *, itemsize: int, accumulation_steps: int = 1, host_weights: bool = False,
                   bucket_mb: int | None = None, building: bool = False) -> int:
        """Host RAM this tier holds (`OffloadAdamW`'s without the masters and moments, plus the ring); with
        `building`, at most what it holds while the fp32 parameters it is given still exist."""
        largest = max((sum(numels[i] for i in r) for r in partition(numels, bucket_mb)), default=0)
        held = layout.host_bytes(numels, itemsize=itemsize, accumulation_steps=accumulation_steps,
                                    host_weights=host_weights, bucket_mb=bucket_mb, building=building)
        return held - layout.MASTER_BYTES * sum(numels) * (not building) + RING * layout.MASTER_BYTES * largest

    def _keep_master(self, index: int, values: torch.Tensor) -> torch.Tensor:
        """Write the master and zero moments to the file; keep a placeholder of the bucket's length."""
        n = len(values)
        self._file.write(index, values)
        self._file.write(index, torch.zeros(2 * n, dtype=torch.float32), start=n)
        return torch.zeros((), dtype=torch.float32).expand(n)

    # ------------------------------------------------------------------------------------------------
    # the streamed step

    def _allocate_state(self) -> None:
        """The moments are in the file (zeros, written with the masters)."""

    def _step_all(self, scaling) -> None:
        self._steps += 1
        self._stream_buckets(lambda bucket, state: self._update_state(bucket, state, scaling))

    def _update_state(self, bucket: Bucket, state: torch.Tensor, scaling) -> bool:
        """One fused AdamW pass over a bucket's `[master | exp_avg | exp_avg_sq]`; its weights go to the device."""
        self._update(bucket, *state.chunk(3), self._steps, scaling)
        return True  # the state changed: write it back

    def _stream_buckets(self, visit) -> None:
        """Call `visit(bucket, state)` on each bucket's state in a ring buffer, reading one bucket ahead and
        writing back behind (when `visit` returns True)."""
        writes: list[Future | None] = [None] * RING

        def load(index: int) -> torch.Tensor:
            slot = index % RING
            if writes[slot] is not None:
                writes[slot].result()  # the buffer is free once its last bucket is on disk
            state = self._ring[slot][:3 * len(self._buckets[index].master)]
            self._file.read(index, state)
            return state

        ahead = self._reader.submit(load, 0)
        try:
            for index, bucket in enumerate(self._buckets):
                state = ahead.result()
                if index + 1 < len(self._buckets):
                    ahead = self._reader.submit(load, index + 1)
                if visit(bucket, state):
                    writes[index % RING] = self._writer.submit(self._file.write, index, state)
        finally:  # even after an error, nothing may still read into or write from the ring when this returns
            wait([ahead, *(write for write in writes if write is not None)])
        for write in writes:
            if write is not None:
                write.result()

    def close(self) -> None:
        """Delete the state file (also done when the optimizer is collected or the process exits); release the
        ring and `OffloadAdamW.close`'s threads and buffers."""
        super().close()
        self._ring = []
        self._reader.shutdown()
        self._writer.shutdown()
        self._file.close()

    # ------------------------------------------------------------------------------------------------
    # checkpoints: the state file is copied beside the checkpoint, the rest is a small dict

    def state_dict(self) -> dict:
        return {**torch.optim.Optimizer.state_dict(self), "nvme_steps": self._steps.item()}

    def checkpoint_state(self) -> dict:
        return self.state_dict()  # the state is in the file already

    def masters_by_name(self) -> dict:
        """None in RAM: the masters are in the file (`master_weights` streams them out)."""
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        self._steps.fill_(state_dict.pop("nvme_steps"))
        torch.optim.Optimizer.load_state_dict(self, state_dict)

    def save_state_files(self, folder: Path) -> None:
        self._file.save(Path(folder) / STATE_FILE)

    def state_file_bytes(self) -> int:
        return self._file.size

    def load_state_files(self, folder: Path) -> None:
        self._file.load(Path(folder) / STATE_FILE)
        self._stream_buckets(lambda bucket, state: self._publish(bucket, state.chunk(3)[0]))
        self._uploaded()

    def master_weights(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        masters = {}

        def keep(bucket: Bucket, state: torch.Tensor) -> bool:
            master = state.chunk(3)[0]
            for p, offset in zip(bucket.params, bucket.offsets, strict=True):
                masters[p] = master[offset:offset + p.numel()].view(p.shape).clone()
            return False

        self._stream_buckets(keep)
        weights = dict(module.state_dict())
        weights.update({name: masters[p] for name, p in module.named_parameters() if p in masters})
        return weights
