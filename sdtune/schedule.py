"""Learning-rate schedules, chosen by the `[train]` keys: linear warm-up, then constant or cosine.

    schedule = make_lr_schedule(optimizer, cfg.train)   # a torch LambdaLR, stepped once per optimizer step
"""

from __future__ import annotations

import math
import warnings

from sdtune.config import TrainConfig


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


def step_schedule(lr_schedule, stepped: bool) -> None:
    """Step the schedule after an optimizer step; after a skipped one, without torch's warning that the
    schedule stepped before the optimizer ever did."""
    if stepped:
        lr_schedule.step()
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        lr_schedule.step()
