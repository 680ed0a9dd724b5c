"""Host buffers of exact sizes, page-locked only where the GPU copies to or from them.

torch's pinned allocator (`pin_memory=True`) rounds every allocation up to a power of two: 1.6 GiB of
staging takes 2 GiB, and buckets of 63-144 MiB take 64-256 MiB each. Here a buffer is an ordinary host
tensor of exactly the requested size, page-locked in place with `cudaHostRegister` (as OneTrainer
does), so pinned bytes are what the engine asks for, no more. Only DMA staging is pinned: the fp32
masters, moments and gradient sums are read by the CPU alone and stay pageable.

A failed allocation or registration is host RAM running out; it is raised as `HostOutOfMemory`, one
line that names the lever (`memory.optimizer_offload=nvme`) instead of a generic CUDA error.
"""

from __future__ import annotations

import weakref

import torch

from sdtune.errors import HostOutOfMemory

GIB = 2**30
_REGISTER_PORTABLE = 1  # cudaHostRegisterPortable: pinned for every CUDA context


def _exhausted(nbytes: int, what: str, detail: str) -> HostOutOfMemory:
    return HostOutOfMemory(
        f"host RAM exhausted: {what} {nbytes / GIB:.2f} GiB failed ({detail}); free host memory, or keep the "
        "optimizer state on disk with --set memory.optimizer_offload=nvme --set memory.offload_dir=DIR "
        "(`sdtune estimate-vram` shows each plan's host RAM)")


def host_empty(numel: int, dtype: torch.dtype, *, zero: bool = False) -> torch.Tensor:
    """A pageable host tensor of `numel` elements; `HostOutOfMemory` when the allocation fails."""
    try:
        return torch.zeros(numel, dtype=dtype) if zero else torch.empty(numel, dtype=dtype)
    except RuntimeError as exc:  # DefaultCPUAllocator: can't allocate memory
        raise _exhausted(numel * dtype.itemsize, "allocating", str(exc).splitlines()[0][:120]) from None


class PinnedBuffer:
    """`numel` elements of host memory, page-locked for DMA when `pin` (a CUDA run): `.tensor` is the
    buffer; it stays registered while this object lives."""

    def __init__(self, numel: int, dtype: torch.dtype, *, pin: bool):
        self.tensor = host_empty(numel, dtype)
        self.nbytes = numel * dtype.itemsize
        self.pinned = pin and self.nbytes > 0
        if self.pinned:
            code = int(torch.cuda.cudart().cudaHostRegister(self.tensor.data_ptr(), self.nbytes, _REGISTER_PORTABLE))
            if code != 0:
                raise _exhausted(self.nbytes, "page-locking", f"cudaHostRegister returned error {code}")
            # The finalizer holds the tensor: its memory is unregistered before it can be freed.
            weakref.finalize(self, _unregister, self.tensor)


def _unregister(tensor: torch.Tensor) -> None:
    try:
        torch.cuda.cudart().cudaHostUnregister(tensor.data_ptr())
    except Exception:  # at interpreter exit CUDA may be gone already; the OS reclaims the pages
        pass
