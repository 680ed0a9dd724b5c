"""The run's state, typed: what `sdtune.train.loop.prepare` builds once (`Run`, immutable) and what the
steps change (`Progress`, which checkpoints).

    run = prepare(...)          # Run: config, plan, model parts, placement, streams, schedule, scaler, ...
    run.progress.step           # Progress: step, losses, skipped steps, seconds (run.step reads it too)
    run.progress.state_dict()   # the counters of a checkpoint's state.json

A test that needs another scaler takes `dataclasses.replace(run, scaler=...)`: the parts stay
shared, the progress too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sdtune.config import Config
from sdtune.data import BatchStream
from sdtune.data.features import Features
from sdtune.plan import Plan
from sdtune.train.placement import Placement
from sdtune.util.world import World

if TYPE_CHECKING:
    import torch

    from sdtune.family.base import Components
    from sdtune.optim.tier import Tier
    from sdtune.sample_prompts import PromptSpec
    from sdtune.train.ema import EMA
    from sdtune.train.validation import Validation


@dataclass
class Progress:
    """What the steps change: the step count, each step's loss, the skipped steps and the seconds spent."""

    step: int = 0
    losses: list[float] = field(default_factory=list)
    skipped_steps: int = 0
    seconds: float = 0.0
    step_times: list[float] = field(default_factory=list)  # this process's steps, for seconds per step

    def state_dict(self) -> dict:
        """What `state.json` keeps (its `step` is the checkpoint's own); step times are this process's."""
        return {"losses": self.losses, "skipped_steps": self.skipped_steps, "seconds": self.seconds}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.losses = state["step"], state["losses"]
        self.skipped_steps, self.seconds = state["skipped_steps"], state["seconds"]

    def finish_step(self, loss: float, stepped: bool, seconds: float) -> None:
        self.step += 1
        self.losses.append(loss)
        self.skipped_steps += not stepped
        self.step_times.append(seconds)
        self.seconds += seconds

    @property
    def seconds_per_step(self) -> float | None:
        """Mean seconds per step without the first step this process ran, which pays for warm-up
        (allocator, kernels, caches); a run resumed with nothing left to do reports its whole mean."""
        times = self.step_times
        if len(times) > 1:
            return sum(times[1:]) / (len(times) - 1)
        if times:
            return times[0]
        return self.seconds / self.step if self.step else None


def steps_per_epoch(batches: int, accumulation: int) -> int | float:
    """Optimizer steps of one pass of `batches` micro-batches: a whole number where accumulation divides it."""
    return batches // accumulation if batches % accumulation == 0 else round(batches / accumulation, 4)


@dataclass(frozen=True)
class Run:
    """Everything the loop touches, built once by `prepare`; `progress` is what the steps change."""

    cfg: Config
    plan: Plan
    components: Components
    stream: BatchStream
    placement: Placement
    lr_schedule: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    alphas_cumprod: torch.Tensor
    out_dir: Path
    config_toml: str
    features: Features  # latents and text embeddings, encoded or from the caches
    class_stream: BatchStream | None = None  # prior preservation: the class images' batches
    ema: EMA | None = None  # train.ema_decay: the moving average of the trained weights (sdtune.train.ema)
    validation: Validation | None = None  # data.validation_dir or validation_split: the held-out set
    world: World = field(default_factory=World)  # this process among the launched ones
    progress: Progress = field(default_factory=Progress)
    samples: tuple[PromptSpec, ...] = ()  # the sample prompts with their settings, parsed at the start

    # the progress, read where a run is read (the checkpoint and the loop change it through `progress`)
    @property
    def step(self) -> int:
        return self.progress.step

    @property
    def losses(self) -> list[float]:
        return self.progress.losses

    @property
    def skipped_steps(self) -> int:
        return self.progress.skipped_steps

    @property
    def seconds(self) -> float:
        return self.progress.seconds

    @property
    def step_times(self) -> list[float]:
        return self.progress.step_times

    @property
    def seconds_per_step(self) -> float | None:
        return self.progress.seconds_per_step

    @property
    def tier(self) -> Tier:
        return self.placement.tier

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.placement.tier.optimizer

    @property
    def epoch(self) -> int:
        """The epoch (1-based) of the last step finished (`epoch_at`); 0 before the first step."""
        return self.epoch_at(self.step)

    def epoch_at(self, step: int) -> int:
        """The epoch of step `step`: the pass over the images (repeats counted) its first micro-batch is in.
        The batch stream runs on from one pass into the next, so with accumulation a step can end one pass
        and begin the next: it belongs to the pass it ends (when the accumulation is at most a pass)."""
        return (step - 1) * self._accumulation // self.stream.batches_per_epoch + 1 if step > 0 else 0

    def passes(self, step: int) -> int:
        """Whole passes over the images after `step` steps."""
        return step * self._accumulation // self.stream.batches_per_epoch

    @property
    def steps_per_epoch(self) -> int | float:
        """Optimizer steps of one pass: the epoch's micro-batches over the accumulation (2.5 for 5 and 2)."""
        return steps_per_epoch(self.stream.batches_per_epoch, self._accumulation)

    @property
    def average_loss(self) -> float | None:
        """kohya's avr_loss over the last epoch's steps (`average_loss`)."""
        return average_loss(self.losses, math.ceil(self.steps_per_epoch))

    @property
    def _accumulation(self) -> int:
        return self.cfg.train.gradient_accumulation_steps

    def close(self) -> None:
        """Release the optimizer tier's threads and files (the nvme tier's state file)."""
        self.placement.close()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def average_loss(losses: list[float], window: int) -> float | None:
    """kohya's avr_loss: the mean of the last `window` (an epoch's) step losses, of all of them during the
    first epoch; steps skipped for a NaN/Inf loss are left out. None before a finite loss."""
    finite = [value for value in losses[-window:] if math.isfinite(value)]
    return math.fsum(finite) / len(finite) if finite else None
