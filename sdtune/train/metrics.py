"""Per-step training metrics, sent to sinks: `metrics.jsonl`, TensorBoard event files, a Weights & Biases run,
a rich progress bar.

The training loop builds one `StepRecord` per optimizer step and hands it to a `MetricsLogger`; which sinks
receive it is the run's choice (`MetricsLogger.for_run` reads `output.tensorboard` and `output.wandb`), so
the loop never knows where its numbers go. `metrics.jsonl` always gets one JSON object per step, flushed at
once, and a resumed run first drops what a killed run logged after its last checkpoint, so the file reads as
one history. Sample grids go to TensorBoard and W&B only. Only rank 0 writes; on other ranks the logger has
no sinks. Nothing heavy is imported here (torch, rich, tensorboard, wandb load when a sink is built).

    with MetricsLogger.for_run(out, cfg.output, resume_step=run.step, progress=ProgressSink(console, steps)) as metrics:
        metrics.log(StepRecord(step=1, loss=0.12, learning_rate=1e-5, grad_norm=0.8, seconds_per_step=0.9,
                               images_per_second=1.1, peak_memory_bytes=6 << 30, skipped_steps=0))
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from sdtune.errors import SdtuneError
from sdtune.util.world import current_rank

if TYPE_CHECKING:
    from PIL.Image import Image
    from rich.console import Console

    from sdtune.config import OutputConfig

TENSORBOARD_MISSING = ("output.tensorboard=true needs tensorboard: pip install 'sdtune[tensorboard]' "
                       "(or set output.tensorboard=false)")
WANDB_MISSING = "output.wandb=true needs wandb: pip install 'sdtune[wandb]' (or set output.wandb=false)"
WANDB_RUN_ID = "wandb-run-id"  # in the run folder: the Weights & Biases run a resumed run continues


@dataclass(frozen=True, kw_only=True)
class StepRecord:
    """What one optimizer step left behind; the loop emits one after every step."""

    step: int  # 1-based: the step just finished
    loss: float
    learning_rate: float
    grad_norm: float | None  # None when the step computed no norm (no clipping, or a skipped step)
    seconds_per_step: float  # mean so far, without the first step (warm-up)
    images_per_second: float
    peak_memory_bytes: int
    skipped_steps: int  # NaN/Inf or fp16-overflow steps so far
    epoch: int = 0  # the epoch (1-based) of the step: a pass over the images, repeats counted
    average_loss: float | None = None  # kohya's avr_loss: the mean loss of the last epoch's steps
    validation_loss: float | None = None  # after steps that evaluate it (output.validate_every)
    ema_validation_loss: float | None = None  # ... and of the EMA weights, with train.ema_decay
    # SDTUNE_PROFILE=1 (`Phases`): the step's seconds waiting for its micro-batches (images, VAE or cache),
    # in forward and backward, and in the optimizer step (the tier's host pass included); of those, the
    # seconds the host waited for an offload tier's worker (host_wait); absent otherwise
    data_seconds: float | None = None
    forward_backward_seconds: float | None = None
    optimizer_seconds: float | None = None
    host_wait_seconds: float | None = None

    def to_dict(self) -> dict:
        """The record as `metrics.jsonl` writes it: the phase seconds only where the step was profiled."""
        fields = dataclasses.asdict(self)
        return {key: value for key, value in fields.items() if key not in PHASE_FIELDS or value is not None}


PHASE_FIELDS = ("data_seconds", "forward_backward_seconds", "optimizer_seconds", "host_wait_seconds")
PROFILE_ENV = "SDTUNE_PROFILE"


class Phases:
    """Seconds spent in each phase of one step (data, forward_backward, optimizer; host_wait, the part of
    those the host waited for an offload tier's worker), with SDTUNE_PROFILE=1;
    `fields()` are the `StepRecord` fields they fill.

    On, the device is synchronized at every phase boundary so that a phase's seconds are its own: CUDA runs
    asynchronously, and without the syncs the GPU's work is billed to whichever phase next waits for it.
    The syncs slow the step a little and change no loss. Off (the default), `phases(name)` is a shared null
    context: no clock is read, no sync made, `seconds` is None.

        phases = Phases.from_env("cuda")
        with phases("data"): ...
        phases.seconds    # {"data": 0.012, ...} or None
    """

    def __init__(self, device: str, on: bool = False):
        self.device, self.on = device, on
        self.seconds: dict[str, float] | None = {} if on else None

    def add(self, name: str, seconds: float) -> None:
        """Seconds of `name` measured elsewhere (the offload tier's waits); ignored when off."""
        if self.on:
            self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def fields(self) -> dict[str, float]:
        """{"<phase>_seconds": seconds} for `StepRecord`; empty when off."""
        return {f"{phase}_seconds": seconds for phase, seconds in (self.seconds or {}).items()}

    @classmethod
    def from_env(cls, device: str) -> Phases:
        return cls(device, on=os.environ.get(PROFILE_ENV, "") not in ("", "0"))

    def __call__(self, name: str) -> contextlib.AbstractContextManager:
        return self._timed(name) if self.on else _OFF

    @contextlib.contextmanager
    def _timed(self, name: str):
        import time

        self._sync()
        started = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started

    def _sync(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()


_OFF = contextlib.nullcontext()


class Sink(Protocol):
    def log(self, record: StepRecord) -> None: ...
    def image(self, tag: str, step: int, image: Image) -> None: ...
    def close(self) -> None: ...


class MetricsLogger:
    """Sends every record and image to each of its sinks; a context manager, and closing twice is harmless."""

    def __init__(self, sinks: list[Sink] | tuple[Sink, ...] = ()):
        self.sinks = tuple(sinks)

    @classmethod
    def for_run(cls, out_dir: str | Path, output_cfg: OutputConfig, *, resume_step: int,
                progress: Sink | None = None, rank: int | None = None) -> MetricsLogger:
        """The sinks of a run in `out_dir`: `metrics.jsonl`, `logs/` when `output.tensorboard`, a Weights & Biases
        run when `output.wandb`, and `progress`.
        `resume_step` is the checkpoint's step (0 for a fresh run). Off rank 0 nothing is opened or written."""
        if (current_rank() if rank is None else rank) != 0:
            return cls()
        out_dir = Path(out_dir)
        sinks: list[Sink] = []
        try:  # TensorBoard and W&B first: if one is missing, that error comes before metrics.jsonl is touched
            if output_cfg.tensorboard:
                sinks.append(TensorBoardSink(out_dir / "logs", resume_step=resume_step))
            if output_cfg.wandb:
                sinks.append(WandbSink(out_dir, output_cfg.wandb_project, resume_step=resume_step))
            sinks.append(JsonlSink(out_dir / "metrics.jsonl", resume_step=resume_step))
        except BaseException:
            cls(sinks).close()
            raise
        return cls([*sinks, *([progress] if progress is not None else [])])

    def log(self, record: StepRecord) -> None:
        for sink in self.sinks:
            sink.log(record)

    def image(self, tag: str, step: int, image: Image) -> None:
        for sink in self.sinks:
            sink.image(tag, step, image)

    def close(self) -> None:
        sinks, self.sinks = self.sinks, ()
        with contextlib.ExitStack() as stack:  # every sink is closed even when one of them raises
            for sink in reversed(sinks):
                stack.callback(sink.close)

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class JsonlSink:
    """One JSON object per record and line (the keys of `StepRecord`; NaN/Inf become null), flushed at once
    so a killed run keeps every step it logged. Images are not written here."""

    def __init__(self, path: str | Path, *, resume_step: int = 0):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step and path.exists():
            _truncate_after(path, resume_step)
            self._file = path.open("a", encoding="utf-8")
        else:
            self._file = path.open("w", encoding="utf-8")

    def log(self, record: StepRecord) -> None:
        row = {key: _json_number(value) for key, value in record.to_dict().items()}
        self._file.write(json.dumps(row, allow_nan=False) + "\n")
        self._file.flush()

    def image(self, tag: str, step: int, image: Image) -> None:
        pass

    def close(self) -> None:
        self._file.close()


def _json_number(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _truncate_after(path: Path, step: int) -> None:
    """Keep the lines of steps up to `step`: later ones (and a line torn by a kill) came from a run that
    stopped after its last checkpoint and are logged again. Atomic, so a second kill loses nothing."""
    kept = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                continue
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)


def check_sinks(*, tensorboard: bool, wandb: bool = False) -> None:
    """Fail with one line when a sink the config asks for cannot be built: before a run loads anything."""
    if tensorboard:
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError as exc:
            raise SdtuneError(TENSORBOARD_MISSING) from exc
    if wandb:
        try:
            import wandb  # noqa: F401
        except ImportError as exc:
            raise SdtuneError(WANDB_MISSING) from exc


def scalars(record: StepRecord) -> dict[str, float]:
    """A record's numbers by the names TensorBoard and W&B chart them under; the absent ones left out."""
    values = {
        "train/loss": record.loss,
        "train/average_loss": record.average_loss,
        "train/epoch": record.epoch,
        "train/learning_rate": record.learning_rate,
        "train/grad_norm": record.grad_norm,
        "train/seconds_per_step": record.seconds_per_step,
        "train/images_per_second": record.images_per_second,
        "train/peak_memory_gib": record.peak_memory_bytes / 2**30,
        "train/skipped_steps": record.skipped_steps,
        "validation/loss": record.validation_loss,
        "validation/ema_loss": record.ema_validation_loss,
        **{f"profile/{key}": getattr(record, key) for key in PHASE_FIELDS},
    }
    return {tag: value for tag, value in values.items() if value is not None}


class TensorBoardSink:
    """Scalars under `train/...` and images (validation grids) as TensorBoard event files in `log_dir`.

    A resumed run purges the events after its checkpoint's step (SummaryWriter's purge_step); a fresh run
    deletes the event files an earlier run left in `log_dir`, as metrics.jsonl starts empty."""

    def __init__(self, log_dir: str | Path, *, resume_step: int = 0):
        check_sinks(tensorboard=True)
        from torch.utils.tensorboard import SummaryWriter

        log_dir = Path(log_dir)
        if not resume_step:
            for stale in log_dir.glob("events.out.tfevents.*"):
                stale.unlink()
        self._writer = SummaryWriter(str(log_dir), purge_step=resume_step + 1 if resume_step else None)

    def log(self, record: StepRecord) -> None:
        for tag, value in scalars(record).items():
            self._writer.add_scalar(tag, value, record.step)
        self._writer.flush()  # like metrics.jsonl: a killed run keeps what it logged

    def image(self, tag: str, step: int, image: Image) -> None:
        import numpy as np

        self._writer.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbSink:
    """A Weights & Biases run in project `project`, named after `out_dir`, its files in OUT/wandb/: the
    scalars of every record (TensorBoard's names) at the record's step, the images (the sample grids), and
    OUT/config.toml (the resolved config, written before the first step) as the run's config.

    WANDB_MODE=offline writes the run to disk only (`wandb sync OUT/wandb/offline-run-*` uploads it later).
    The run's id is kept in OUT/wandb-run-id: a resumed run continues the same W&B run. W&B keeps a
    run's steps increasing, so the steps a killed run logged after its checkpoint keep their first values
    and the resumed run's are dropped: they are the same numbers, a step being a function of (seed, step)."""

    def __init__(self, out_dir: str | Path, project: str, *, resume_step: int = 0):
        check_sinks(tensorboard=False, wandb=True)
        import uuid

        import tomllib
        import wandb

        out_dir = Path(out_dir)
        id_file, config_file = out_dir / WANDB_RUN_ID, out_dir / "config.toml"
        resumed = bool(resume_step) and id_file.is_file()
        run_id = id_file.read_text(encoding="utf-8").strip() if resumed else uuid.uuid4().hex[:8]
        id_file.write_text(run_id + "\n", encoding="utf-8")
        config = tomllib.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        # console="off": the rich progress bar stays on the terminal, not in W&B's captured log
        self._run = wandb.init(project=project, name=out_dir.resolve().name, id=run_id, dir=str(out_dir),
                               config=config, resume="allow" if resumed else "never",
                               settings=wandb.Settings(console="off", quiet=True))
        self._wandb = wandb

    def log(self, record: StepRecord) -> None:
        self._run.log(scalars(record), step=record.step)

    def image(self, tag: str, step: int, image: Image) -> None:
        self._run.log({tag: self._wandb.Image(image.convert("RGB"))}, step=step)

    def close(self) -> None:
        self._run.finish()


class ProgressSink:
    """The progress bar on `console`: `step N/M`, `epoch E/T` (given `epochs`, T), a bar, the step's
    loss and its moving average (kohya's avr_loss), lr, s/step, peak memory, time remaining. It appears
    with the first record (after the data and model checks), starting at that record's step, so a resumed
    run starts at its checkpoint; with no records it never shows."""

    def __init__(self, console: Console, total_steps: int, epochs: int = 0):
        self.console, self.total_steps, self.epochs = console, total_steps, epochs
        self._bar = self._task = None
        self._validation = ""  # the last validation loss, shown until the next

    def log(self, record: StepRecord) -> None:
        if record.validation_loss is not None:
            self._validation = f"  val {record.validation_loss:.4f}"
        epoch = f"epoch {record.epoch}/{self.epochs}  " if self.epochs else ""
        average = f" (avg {record.average_loss:.4f})" if record.average_loss is not None else ""
        stats = (f"{epoch}loss {record.loss:.4f}{average}{self._validation}  lr {record.learning_rate:.2e}  "
                 f"{record.seconds_per_step:.3f} s/step  peak {record.peak_memory_bytes / 2**30:.2f} GiB")
        if self._bar is None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn("step"), MofNCompleteColumn(), BarColumn(),
                                 TextColumn("{task.fields[stats]}"), TimeRemainingColumn(), console=self.console)
            self._task = self._bar.add_task("train", total=self.total_steps, completed=record.step, stats=stats)
            self._bar.start()
        else:
            self._bar.update(self._task, completed=record.step, stats=stats)

    def image(self, tag: str, step: int, image: Image) -> None:
        pass

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
