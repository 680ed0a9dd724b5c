"""Host buffers of exact sizes, page-locked only where the GPU copies to or from them.

torch's pinned allocator (`pin_memory=True`) rounds every allocation up to a power of two: 1.6 GiB of
staging takes 2 GiB, and buckets of 63-144 MiB take 64-256 MiB each. Here a buffer is an ordinary host
tensor of exactly the requested size, page-locked in place with `cudaHostRegister` (as OneTrainer
does), so pinned bytes are what the engine asks for, no more. Only DMA staging is pinned: the fp32
masters, moments and gradient sums are read by the CPU alone and stay pageable.

CUDA pins whole pages, so each registered range starts and ends on a page boundary inside an allocation
of its own: two small buffers never share a page (registering a page twice fails with error 712). Where
registration is refused (800, 801: some virtualised machines and containers), the buffer comes from
`torch.empty(..., pin_memory=True)` instead, and `PinnedBuffer.how` says which path ran. Host RAM
running out (a failed allocation, error 2) is `HostOutOfMemory`, one line that names the lever
(`memory.optimizer_offload=nvme`); any other CUDA error is reported as itself.
"""

from __future__ import annotations

import ctypes
import mmap
import weakref
from pathlib import Path

import torch

from sdtune.errors import HostOutOfMemory, SdtuneError
from sdtune.util.files import GIB

PAGE = mmap.PAGESIZE
_REGISTER_PORTABLE = 1  # cudaHostRegisterPortable: pinned for every CUDA context
_OUT_OF_MEMORY = 2      # cudaErrorMemoryAllocation
_REFUSED = {800, 801}   # cudaErrorNotPermitted, cudaErrorNotSupported: this machine does not register host memory
_NAMES = {1: "cudaErrorInvalidValue", 2: "cudaErrorMemoryAllocation", 3: "cudaErrorInitializationError",
          35: "cudaErrorInsufficientDriver", 100: "cudaErrorNoDevice", 712: "cudaErrorHostMemoryAlreadyRegistered",
          800: "cudaErrorNotPermitted", 801: "cudaErrorNotSupported"}


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
    buffer; it stays registered while this object lives. `how` is the path that ran: "registered"
    (in place, exact size), "pin_memory" (torch's pinned allocator, where registration is refused) or
    "pageable" (not pinned)."""

    def __init__(self, numel: int, dtype: torch.dtype, *, pin: bool, later: bool = False):
        self.nbytes, self.numel, self.dtype = numel * dtype.itemsize, numel, dtype
        self.how = "pageable"
        if not (pin and self.nbytes > 0):
            self.tensor, self._pinnable = host_empty(numel, dtype), False
            return
        raw = host_empty(self._pages() + PAGE, torch.uint8)  # room to start on a page boundary
        start = -raw.data_ptr() % PAGE
        self.tensor, self._pinnable = raw[start:start + self.nbytes].view(dtype), True
        if not later:  # `later`: pageable (its pages resident only once written) until `pin()`
            self.pin(keep=False)

    def _pages(self) -> int:
        return -(-self.nbytes // PAGE) * PAGE

    def pin(self, keep: bool = True) -> bool:
        """Page-lock the buffer where it is (a buffer made with `later`, once filled: the host weights, written
        while the fp32 parameters they replace are released, so both are never resident whole). True when it
        moved instead, to torch's pinned allocator where registration is refused, with its contents when
        `keep`: views of the old memory must then be made again."""
        if not self._pinnable or self.how != "pageable":
            return False
        cudart = torch.cuda.cudart()
        code = cudart.cudaHostRegister(self.tensor.data_ptr(), self._pages(), _REGISTER_PORTABLE)
        if int(code) == 0:
            self.how = "registered"
            # The finalizer holds the tensor: its memory is unregistered before it can be freed.
            weakref.finalize(self, _unregister, self.tensor)
            return False
        old, self.tensor = self.tensor, None
        clear_cuda_error()
        detail = f"cudaHostRegister returned error {int(code)} ({_describe(cudart, code)})"
        if int(code) == _OUT_OF_MEMORY:
            raise _exhausted(self.nbytes, "page-locking", detail)
        if int(code) not in _REFUSED:
            raise SdtuneError(f"page-locking {self.nbytes / GIB:.2f} GiB of host memory failed: {detail}; that is the "
                              "CUDA driver or runtime failing, not host RAM running out (check the driver with "
                              "nvidia-smi, or train on the CPU with --set memory.device=cpu)")
        if not keep:
            del old
        self.tensor, self.how = _pin_memory(self.numel, self.dtype, detail), "pin_memory"
        if keep:
            self.tensor.copy_(old)
        return True


def _pin_memory(numel: int, dtype: torch.dtype, refused: str) -> torch.Tensor:
    """torch's pinned allocation, where in-place registration was `refused`."""
    try:
        return torch.empty(numel, dtype=dtype, pin_memory=True)
    except RuntimeError as exc:  # torch has consumed the CUDA error already
        first = str(exc).splitlines()[0][:120]
        if "out of memory" not in first.lower():
            raise
        raise _exhausted(numel * dtype.itemsize, "page-locking", f"{refused}; pin_memory: {first}") from None


def _describe(cudart, code) -> str:
    """CUDA's name for error `code` and its own sentence, where the runtime gives one."""
    name = _NAMES.get(int(code), "cudaError")
    try:
        return f"{name}: {cudart.cudaGetErrorString(code)}"
    except Exception:  # a runtime without the binding, or a code it does not know
        return name


def clear_cuda_error() -> None:
    """Consume the error a failed runtime call left pending on this thread: torch checks each kernel launch
    with `cudaGetLastError`, so the next launch would raise it as its own. torch binds no cudaGetLastError;
    it is called in every libcudart this process has mapped (torch's wheels may bundle their own copy)."""
    for path in cudart_paths(_maps()):
        try:
            ctypes.CDLL(path).cudaGetLastError()
        except (OSError, AttributeError):  # not loadable by that path, or not a CUDA runtime after all
            pass


def _maps() -> str:
    try:
        return Path("/proc/self/maps").read_text()
    except OSError:  # not Linux
        return ""


def cudart_paths(maps: str) -> list[str]:
    """The CUDA runtime libraries mapped into this process, from the text of /proc/self/maps."""
    paths = []
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        path = fields[5].removesuffix(" (deleted)").strip() if len(fields) == 6 else ""
        if "libcudart" in Path(path).name and path not in paths:
            paths.append(path)
    return paths


def _unregister(tensor: torch.Tensor) -> None:
    try:
        torch.cuda.cudart().cudaHostUnregister(tensor.data_ptr())
    except Exception:  # at interpreter exit CUDA may be gone already; the OS reclaims the pages
        pass
