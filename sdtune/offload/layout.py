"""The offload tiers' flat buckets: how parameters are grouped, what the layout costs in host bytes (the
estimator's host-RAM row), and the arithmetic of one bucket's step (fused AdamW, unscale and clip).

    partition([p.numel() for p in unet.parameters()])    # [range(0, 40), range(40, 71), ...]
    host_bytes(numels, itemsize=2)                       # what OffloadAdamW will allocate, in bytes
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

import torch

BUCKET_MB = 64        # fp32 megabytes after which a bucket closes (so a bucket holds 64 MB or a bit more)
CHUNK = 2**20         # values per pass of the accumulation sum (its norm is summed chunk by chunk)
STEP_CHUNK = 2**16    # values per step chunk: its upcast, AdamW and cast (1.4 MB) stay in a core's L2 cache
MASTER_BYTES = 12     # fp32 master + exp_avg + exp_avg_sq per parameter, in host RAM (cpu tier) or on disk
ACCUMULATION_BYTES = 4  # fp32 host sum of the micro-batches' gradients, with gradient accumulation only
SMALL_PARAM = 4096    # parameters below this many values (biases, norms: 393 of SD1.5's 686) leave together
STATE_FILE = "optimizer_state.bin"  # a checkpoint's host or nvme tier state: [master | exp_avg | exp_avg_sq] a bucket


@dataclass(eq=False)
class Bucket:
    params: list[torch.nn.Parameter]
    offsets: list[int]
    start: int                         # where its values begin in the flat order of all trainable parameters
    device_flat: torch.Tensor          # working-precision weights: on the compute device, or pinned host (host_weights)
    master: torch.Tensor               # fp32 weights on the host (the nvme tier: a placeholder)
    grad: torch.Tensor | None          # fp32 host sum of the micro-batches (gradient accumulation only)
    staging: torch.Tensor | None = None  # host, working precision: gradients arrive here, new weights leave
    pending: set = field(default_factory=set)  # parameters still to receive their gradient in this backward
    norms: list = field(default_factory=list)  # device-side norms of its gradients in this backward
    sq_host: torch.Tensor | None = None  # their squared sum, on the host (step_in_backward's overflow check)
    event: torch.cuda.Event | None = None     # after this bucket's gradient copies (CUDA)
    folds: int = 0                     # micro-batches summed into `grad` since the last step
    stepped: bool = False              # already stepped in this backward (step_in_backward)
    small: list = field(default_factory=list)  # (param, offset, offset in the small buffers) of small params
    small_device: torch.Tensor | None = None  # their gradients gathered on the device, in that order
    small_host: torch.Tensor | None = None    # ... and the one copy of them on the host
    ready: threading.Event | None = None  # overlap_step: set by the worker once this bucket is stepped
    uploaded: torch.cuda.Event | None = None  # overlap_step: after its upload (CUDA)
    ema: torch.Tensor | None = None    # train.ema_decay: the fp32 moving average of `master`, in host RAM

    def gather_small(self, dtype: torch.dtype, device: torch.device) -> None:
        """List the parameters under `SMALL_PARAM` values, whose gradients leave in one copy, and give them
        their device-side gathering buffer."""
        for p, offset in zip(self.params, self.offsets, strict=True):
            if p.numel() < SMALL_PARAM:
                self.small.append((p, offset, sum(q.numel() for q, _, _ in self.small)))
        if self.small:
            self.small_device = torch.empty(sum(p.numel() for p, _, _ in self.small), dtype=dtype, device=device)


def partition(numels: list[int], bucket_mb: int | None = None) -> list[range]:
    """Index ranges of consecutive parameters, each closed once it holds `bucket_mb` of fp32."""
    limit, ranges, start, size = (bucket_mb or BUCKET_MB) * 2**20, [], 0, 0
    for i, n in enumerate(numels):
        size += 4 * n
        if size >= limit:
            ranges.append(range(start, i + 1))
            start, size = i + 1, 0
    return ranges + ([range(start, len(numels))] if start < len(numels) else [])


def host_bytes(numels: list[int], *, itemsize: int, accumulation_steps: int = 1, host_weights: bool = False,
               bucket_mb: int | None = None, building: bool = False) -> int:
    """Host RAM `OffloadAdamW` holds for parameters of `numels` elements; with `building`, at most what it
    holds while it is built, when the fp32 parameters it is given are not yet released."""
    total, small = sum(numels), sum(n for n in numels if n < SMALL_PARAM)
    largest = max((sum(numels[i] for i in r) for r in partition(numels, bucket_mb)), default=0)
    common = ACCUMULATION_BYTES * total * (accumulation_steps > 1)
    common += 4 * min(STEP_CHUNK, largest)  # the step's scratch: one chunk of upcast gradients
    if building:  # the fp32 parameters become the masters (and the host weights, page-locked once all are
        # written) one bucket at a time: never more than both, and one bucket's host weights beside them
        return 4 * total + itemsize * largest * host_weights + common
    return MASTER_BYTES * total + itemsize * (total + small) + itemsize * total * host_weights + common


def adamw_kernel(master: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                 step: torch.Tensor, group: dict, grad_scale: torch.Tensor | None = None) -> None:
    """One AdamW update of `master` in place, by the kernel torch's fused AdamW runs (so results match it
    bit for bit); `step` is the already incremented step count; `grad` is divided by `grad_scale`."""
    beta1, beta2 = group["betas"]
    torch._fused_adamw_([master], [grad], [exp_avg], [exp_avg_sq], [], [step], lr=group["lr"], beta1=beta1,
                        beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"], amsgrad=False,
                        maximize=False, grad_scale=grad_scale, found_inf=None)


def clip_factor(norm: float, max_norm: float) -> float:
    """What clipping multiplies the gradients by: at most 1, so that their norm is at most `max_norm`."""
    return min(1.0, max_norm / (norm + 1e-6)) if max_norm else 1.0


class Scaling:
    """Unscale by the loss scale, then clip: the same fp32 multiplications, in the same order, as
    `GradScaler.unscale_` and `tier.clip_gradients` make on gradients kept on the device."""

    def __init__(self, scale: float = 1.0, factor: float = 1.0):
        self.inv_scale = None if scale == 1.0 else torch.tensor(scale, dtype=torch.float64).reciprocal().float()
        self.factor = None if factor == 1.0 else torch.tensor(factor, dtype=torch.float64).float()

    def apply(self, grad: torch.Tensor) -> None:
        if self.inv_scale is not None:
            grad.mul_(self.inv_scale)
        if self.factor is not None:
            grad.mul_(self.factor)


def chunks(length: int) -> list[slice]:
    return [slice(start, min(start + CHUNK, length)) for start in range(0, length, CHUNK)]


def read_region(fd: int, out: torch.Tensor, offset: int) -> bool:
    """Fill `out` (contiguous, on the host) from the file `fd` at byte `offset`, straight into its memory
    (no mmap, no copy: the page cache is not counted in this process's resident set); False when the file
    ends first."""
    view, done = memoryview(out.numpy()).cast("B"), 0
    while done < len(view):
        count = os.preadv(fd, [view[done:]], offset + done)
        if count == 0:
            return False
        done += count
    return True


def write_region(fd: int, data: torch.Tensor, offset: int) -> None:
    """Write `data` (contiguous, on the host) into the file `fd` at byte `offset`, from its own memory."""
    view, done = memoryview(data.numpy()).cast("B"), 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)
