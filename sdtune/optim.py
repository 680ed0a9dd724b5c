"""Optimizer and learning-rate schedule factories, chosen by `[memory] optimizer` and `[train]` keys."""

from __future__ import annotations

import math

from sdtune.config import TrainConfig
from sdtune.errors import SdtuneError


def make_optimizer(params, train: TrainConfig, plan, model=None):
    """AdamW with torch's fused kernel (foreach where fused is unavailable), bitsandbytes' AdamW8bit, or
    AdamW offloaded to host RAM or to disk, as the plan says. `model`, the module that owns `params`,
    lets the host-RAM tier overlap its step with the next forward."""
    import torch

    params = [p for p in params if p.requires_grad]
    kwargs = dict(lr=train.learning_rate, betas=(train.adam_beta1, train.adam_beta2),
                  eps=train.adam_epsilon, weight_decay=train.weight_decay)
    name = plan.optimizer
    if plan.optimizer_offload != "none":
        from sdtune.offload import NvmeAdamW, OffloadAdamW

        accumulation = train.gradient_accumulation_steps
        kwargs.update(device=plan.device, dtype=plan.working_dtype, host_weights=plan.param_offload == "cpu",
                      max_grad_norm=train.max_grad_norm, accumulation_steps=accumulation, model=model)
        if plan.optimizer_offload == "nvme":
            return NvmeAdamW(params, offload_dir=plan.offload_dir, **kwargs)
        # Each bucket can step as soon as its gradients are in, unless clipping, fp16 overflow checks or
        # accumulation need every gradient (of every micro-batch) first.
        eager = not train.max_grad_norm and not plan.loss_scaling and accumulation == 1
        return OffloadAdamW(params, step_in_backward=eager, **kwargs)
    if name == "adamw":
        try:
            return torch.optim.AdamW(params, fused=True, **kwargs)
        except (RuntimeError, TypeError):  # fused needs a recent torch for the CPU; foreach works everywhere
            return torch.optim.AdamW(params, foreach=True, **kwargs)
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise SdtuneError(f"memory.optimizer=adamw8bit needs bitsandbytes ({exc}); "
                              "pip install bitsandbytes or set memory.optimizer=adamw") from None
        return bnb.optim.AdamW8bit(params, **kwargs)
    raise SdtuneError(f"unknown memory.optimizer {name!r}")


def host_gradients(optimizer) -> bool:
    """The optimizer is an offload tier: its gradients are in host memory, and it checks, unscales and
    clips them itself (on the device-side norm), so the loop must not run GradScaler.unscale_ or clipping."""
    from sdtune.offload import OffloadAdamW

    return isinstance(optimizer, OffloadAdamW)


def make_scaler(plan, optimizer, **kwargs):
    """fp16 dynamic loss scaling (disabled for bf16/fp32): `torch.amp.GradScaler`, or for an offload tier
    `HostGradScaler`, which takes the overflow verdict from the tier. `kwargs` go to the scaler."""
    import torch

    from sdtune.offload.scaler import HostGradScaler

    kind = HostGradScaler if host_gradients(optimizer) else torch.amp.GradScaler
    return kind(plan.device, enabled=plan.loss_scaling, **kwargs)


def clip_gradients(optimizer, max_norm: float):
    """Scale the gradients of `optimizer`'s parameters so that their global L2 norm is at most `max_norm`
    (0: only measure it); returns the norm before clipping, None without gradients.

    Unlike `torch.nn.utils.clip_grad_norm_`, the norm is accumulated in float64: the same gradients give
    the same factor however they are grouped into tensors, so offloaded flat buckets and per-parameter
    gradients are clipped identically (an fp32 sum over millions of elements differs by ~1e-5)."""
    import torch

    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not grads:
        return None
    norms = [torch.linalg.vector_norm(g, dtype=torch.float64).to(grads[0].device) for g in grads]
    total = torch.linalg.vector_norm(torch.stack(norms))
    if not max_norm:
        return total
    factor = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(factor.to(g.device, g.dtype))
    return total


def lr_factor(step: int, train: TrainConfig) -> float:
    """Multiplier of the peak learning rate at optimizer step `step`: linear warmup, then constant or cosine."""
    warmup = train.lr_warmup_steps
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if train.lr_scheduler == "constant":
        return 1.0
    progress = (step - warmup) / max(1, train.max_steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_lr_schedule(optimizer, train: TrainConfig):
    import torch

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, train))
