"""fp16 loss scaling for the offload tiers, whose gradients are in host memory.

`torch.amp.GradScaler` checks gradients for inf/NaN by running its check over every gradient on the
gradients' device, after copying the scale there with `non_blocking=True`. For host gradients that copy
lands in host memory with nothing waiting for it, so the CPU kernel can read (or the later copy of
`found_inf` can overwrite) the values before they arrive: an overflow can go unseen and AdamW steps
NaN into the masters. It would also be one more pass over all gradients on the host.

`HostGradScaler` keeps GradScaler's scale, growth and state dict, and takes the overflow verdict from
the optimizer instead: `OffloadAdamW` has the gradient norm (taken on the device as gradients leave it,
or while summing micro-batches), which is inf/NaN exactly when a gradient is. The gradients are left
scaled: the optimizer divides by the scale inside its fused AdamW kernel.
"""

from __future__ import annotations

import math

import torch


class HostGradScaler(torch.amp.GradScaler):
    """GradScaler for `OffloadAdamW` and `NvmeAdamW`: `scaler.step(optimizer)` and `scaler.update()` as
    usual; `unscale_` is refused, since these optimizers unscale (and clip) inside their step."""

    def unscale_(self, optimizer) -> None:
        raise RuntimeError("the offload optimizers unscale and clip inside their step; call scaler.step(optimizer)")

    def _unscale_grads_(self, optimizer, inv_scale, found_inf, allow_fp16):
        """The overflow check of `GradScaler.step` (through `_check_inf_per_device`): the optimizer's norm."""
        overflow = not math.isfinite(optimizer.grad_sq_norm())
        return {found_inf.device: torch.full((), float(overflow), dtype=torch.float32, device=found_inf.device)}
