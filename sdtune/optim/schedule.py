"""Learning-rate schedules, chosen by the `[train]` keys: the six curves of diffusers' `get_scheduler`, with
its formulas, so a run here and a diffusers script with the same numbers train at the same learning rates.

    schedule = make_lr_schedule(optimizer, cfg.train)   # a torch LambdaLR, stepped once per optimizer step

Every curve starts with diffusers' linear warm-up, lr x step / lr_warmup_steps (so 0 at step 0). One rule is
sdtune's own: `constant` with `lr_warmup_steps > 0` warms up too, i.e. it is `constant_with_warmup` (diffusers'
`constant` ignores the warm-up steps). After the warm-up, with progress p running 0 -> 1 over the remaining
steps up to `max_steps`: constant 1; linear 1 - p; cosine half a cosine to 0; cosine_with_restarts
`lr_num_cycles` such half-cosines, each restarting at 1; polynomial (1 - p) ** lr_power from the group's lr down
to 1e-7 (an absolute lr, as in diffusers, so its factor depends on each param group's own lr). A warm-up longer
than the run is cut to the run (`TrainConfig.warmup_steps`; the trainer says so).
"""

from __future__ import annotations

import math
import warnings

from sdtune.config import TrainConfig
from sdtune.errors import SdtuneError

POLYNOMIAL_LR_END = 1e-7  # diffusers' default lr_end, where the polynomial decay ends


def _progress(step: int, train: TrainConfig) -> float:
    """Fraction of the after-warm-up steps done: 0 at the end of the warm-up, 1 at max_steps."""
    return (step - train.warmup_steps) / max(1, train.max_steps - train.warmup_steps)


def _polynomial(step: int, train: TrainConfig, base_lr: float) -> float:
    if step > train.max_steps:
        return POLYNOMIAL_LR_END / base_lr
    decayed = (base_lr - POLYNOMIAL_LR_END) * (1 - _progress(step, train)) ** train.lr_power + POLYNOMIAL_LR_END
    return decayed / base_lr


def _cosine_with_restarts(step: int, train: TrainConfig, base_lr: float) -> float:
    progress = _progress(step, train)
    if progress >= 1.0:
        return 0.0
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((float(train.lr_num_cycles) * progress) % 1.0))))


# The curve after warm-up, as a multiplier of the group's initial lr. The arithmetic follows diffusers'
# `diffusers/optimization.py` operation by operation, so the lrs agree to the last bit.
SHAPES = {
    "constant": lambda step, train, base_lr: 1.0,
    "constant_with_warmup": lambda step, train, base_lr: 1.0,
    "linear": lambda step, train, base_lr: max(
        0.0, (train.max_steps - step) / max(1, train.max_steps - train.warmup_steps)),
    "cosine": lambda step, train, base_lr: max(0.0, 0.5 * (1.0 + math.cos(math.pi * _progress(step, train)))),
    "cosine_with_restarts": _cosine_with_restarts,
    "polynomial": _polynomial,
}


def lr_factor(step: int, train: TrainConfig, base_lr: float | None = None) -> float:
    """Multiplier of a param group's initial lr `base_lr` (default `train.learning_rate`) at optimizer step
    `step`: the linear warm-up, then `train.lr_scheduler`'s curve. Only polynomial depends on `base_lr`."""
    if step < train.warmup_steps:
        return step / max(1, train.warmup_steps)
    return SHAPES[train.lr_scheduler](step, train, train.learning_rate if base_lr is None else base_lr)


def make_lr_schedule(optimizer, train: TrainConfig):
    """A LambdaLR over every param group of `optimizer`, each scaled from its own initial lr (e.g. a text
    encoder group at `train.text_encoder_lr`)."""
    import torch

    base_lrs = [group.get("initial_lr", group["lr"]) for group in optimizer.param_groups]
    if train.lr_scheduler == "polynomial" and min(base_lrs) <= POLYNOMIAL_LR_END:
        raise SdtuneError(f"train.lr_scheduler=polynomial decays to {POLYNOMIAL_LR_END}, which is not below the "
                          f"learning rate {min(base_lrs)}: raise the learning rate or pick another lr_scheduler")

    def group_factor(base_lr: float):
        return lambda step: lr_factor(step, train, base_lr)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, [group_factor(lr) for lr in base_lrs])


def step_schedule(lr_schedule, stepped: bool) -> None:
    """Step the schedule after an optimizer step; after a skipped one, without torch's warning that the
    schedule stepped before the optimizer ever did."""
    if stepped:
        lr_schedule.step()
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        lr_schedule.step()
