"""sdtune's LR schedules give diffusers' `get_scheduler` learning rates at every step, for every curve."""

import pytest
import torch
from diffusers.optimization import get_scheduler

from sdtune.config import TrainConfig
from sdtune.errors import SdtuneError
from sdtune.optim.schedule import make_lr_schedule

STEPS, WARMUP = 50, 7
CASES = [(name, {}) for name in ("constant", "constant_with_warmup", "linear", "cosine")] + [
    ("cosine_with_restarts", {"lr_num_cycles": 1}), ("cosine_with_restarts", {"lr_num_cycles": 3}),
    ("polynomial", {"lr_power": 1.0}), ("polynomial", {"lr_power": 2.0})]


def _optimizer(*lrs: float) -> torch.optim.Optimizer:
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in lrs]
    return torch.optim.SGD(groups, lr=lrs[0])


def _lrs(schedule, steps: int = STEPS + 3) -> list[list[float]]:
    """Each group's lr at steps 0..steps-1 (a few past max_steps too), stepping as training does."""
    seen = []
    for _ in range(steps):
        seen.append([group["lr"] for group in schedule.optimizer.param_groups])
        schedule.optimizer.step()
        schedule.step()
    return seen


def _diffusers(name: str, train: TrainConfig, lr: float) -> list[float]:
    # sdtune's own rule: constant with warm-up steps is constant_with_warmup
    name = "constant_with_warmup" if name == "constant" and train.lr_warmup_steps else name
    schedule = get_scheduler(name, _optimizer(lr), num_warmup_steps=train.lr_warmup_steps,
                             num_training_steps=train.max_steps, num_cycles=train.lr_num_cycles,
                             power=train.lr_power)
    return [lrs[0] for lrs in _lrs(schedule)]


@pytest.mark.parametrize("warmup", [0, WARMUP])
@pytest.mark.parametrize(("name", "keys"), CASES)
def test_every_schedule_matches_diffusers_at_every_step(name, keys, warmup):
    train = TrainConfig(lr_scheduler=name, max_steps=STEPS, lr_warmup_steps=warmup, learning_rate=1e-3, **keys)
    ours = [lrs[0] for lrs in _lrs(make_lr_schedule(_optimizer(1e-3), train))]
    assert ours == pytest.approx(_diffusers(name, train, 1e-3), rel=1e-12, abs=0)
    assert ours[0] == (0.0 if warmup else 1e-3)


@pytest.mark.parametrize("name", ["cosine", "polynomial"])
def test_each_param_group_follows_diffusers_from_its_own_lr(name):
    """A text-encoder group at another lr gets diffusers' curve for that lr (polynomial's end lr is absolute)."""
    train = TrainConfig(lr_scheduler=name, max_steps=STEPS, lr_warmup_steps=WARMUP, learning_rate=1e-3, lr_power=2.0)
    ours = _lrs(make_lr_schedule(_optimizer(1e-3, 4e-5), train))
    for group, lr in enumerate((1e-3, 4e-5)):
        assert [lrs[group] for lrs in ours] == pytest.approx(_diffusers(name, train, lr), rel=1e-12, abs=0)


def test_a_resumed_schedule_continues_where_it_stopped():
    train = TrainConfig(lr_scheduler="cosine_with_restarts", max_steps=STEPS, lr_warmup_steps=WARMUP, lr_num_cycles=3)
    whole = _lrs(make_lr_schedule(_optimizer(1e-3, 4e-5), train))
    first = make_lr_schedule(_optimizer(1e-3, 4e-5), train)
    _lrs(first, 20)
    resumed = make_lr_schedule(_optimizer(1e-3, 4e-5), train)
    resumed.load_state_dict(first.state_dict())
    for group, lr in zip(resumed.optimizer.param_groups, resumed.get_last_lr(), strict=True):
        group["lr"] = lr  # as the restored optimizer state would
    assert _lrs(resumed, STEPS + 3 - 20) == whole[20:]


def test_polynomial_needs_a_learning_rate_above_its_end():
    train = TrainConfig(lr_scheduler="polynomial", max_steps=STEPS, learning_rate=1e-7)
    with pytest.raises(SdtuneError, match="polynomial"):
        make_lr_schedule(_optimizer(1e-7), train)
