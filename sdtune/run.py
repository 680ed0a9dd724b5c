"""A training run's life, above the loop: the plan (`--preset auto`), the output folder and its lock,
resume, the out-of-memory fallback and the metrics sinks; the export and the summary are
`sdtune.export.run_output`'s.

    result = train(TrainRequest(preset="rtx3050", data=Path("images"), out=Path("out")))

`train` is what `sdtune train` runs. It resolves the plan, locks `--out`, and runs `attempt` once, or,
with `on_oom="fallback"`, again on each next smaller plan after the GPU runs out of memory, continuing
from the newest checkpoint. `attempt` is one try on one plan: prepare, loop, export, summary; it turns
torch's out-of-memory error into `sdtune.estimate.fallback.OutOfMemory`, which names the next smaller
plan. The loop below it (`sdtune.train.loop`) knows nothing of plans other than its own.

What a run says (the data counts, the plan's notes, warnings, saves) goes to `logging.getLogger("sdtune")`
at INFO and WARNING, one record a line. `sdtune train` prints it (rank 0 only); as a library it is
silent until the caller configures logging, e.g. `logging.basicConfig(level=logging.INFO)`.
"""

from __future__ import annotations

import logging
import shlex
import shutil
from collections.abc import Callable
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sdtune.config import Config, PresetInfo, load_config
from sdtune.errors import SdtuneError
from sdtune.util import run_folder
from sdtune.util.world import World

if TYPE_CHECKING:
    from sdtune.train.state import Run

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainRequest:
    """What the user asked `sdtune train` for."""

    preset: str                   # a preset name, a .toml path, or auto
    data: Path | None             # a folder of images, kohya's dataset config (.toml), or None: data.subsets
    out: Path = Path("out")
    model: str | None = None      # model.pretrained
    max_steps: int | None = None  # train.max_steps
    sets: tuple[str, ...] = ()    # --set items, in order
    resume: bool = False
    overwrite: bool = False
    on_oom: str = "stop"          # or "fallback": continue on the next smaller plan

    @property
    def overrides(self) -> list[str]:
        return [*([f"model.pretrained={self.model}"] if self.model else []),
                *([f"train.max_steps={self.max_steps}"] if self.max_steps else []), *self.sets]

    @property
    def dataset(self) -> Path | None:
        """--data as kohya's dataset config file (`sdtune.config.dataset_toml`), else None."""
        if self.data is not None and self.data.suffix.lower() == ".toml" and not self.data.exists():
            raise SdtuneError(f"--data {self.data}: that dataset config does not exist (relative paths are read from "
                              f"the current folder, {Path.cwd()})")
        if self.data is None or not self.data.is_file():
            return None
        if self.data.suffix.lower() != ".toml":
            raise SdtuneError(f"--data {self.data} is a file: give a folder of images or kohya's dataset config "
                              "(a .toml file)")
        return self.data

    def folder(self, cfg: Config) -> Path | None:
        """The --data folder, or None where data.subsets name the images (a dataset config, or the config's
        [[data.subsets]])."""
        if self.dataset is not None:
            return None
        if cfg.data.subsets and self.data is not None:
            raise SdtuneError(f"--data {self.data} and the config's [[data.subsets]] both name the training images: "
                              "leave out --data, or the subsets")
        if not cfg.data.subsets and self.data is None:
            raise SdtuneError("no training images: pass --data with a folder of images or kohya's dataset config "
                              "(.toml), or give the config [[data.subsets]]")
        return self.data

    def resume_command(self, preset: str, sets: list[str]) -> str:
        """The `sdtune train` command line that continues this run on `preset` with `sets`, plus --resume."""
        args = ["sdtune", "train", "--preset", preset, *(["--data", str(self.data)] if self.data else []),
                *(["--model", self.model] if self.model else []), "--out", str(self.out),
                *(["--max-steps", str(self.max_steps)] if self.max_steps else [])]
        for item in sets:
            args += ["--set", item]
        return shlex.join([*args, "--resume"])


class Stopped(Exception):
    """SIGINT or SIGTERM stopped the run; the message says how to resume it; `exit_code` is the shell's."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def train(request: TrainRequest, *, progress: Callable | None = None,
          status: Callable[[str], AbstractContextManager] | None = None) -> dict:
    """Train as `request` says; returns the summary. `progress(total_steps, total_epochs)` makes the
    progress-bar sink; `status(text)` shows `text` while `--preset auto` estimates (a spinner; nothing by default).
    Raises SdtuneError on bad input or when no plan fits, `Stopped` after SIGINT/SIGTERM."""
    from sdtune.estimate.fallback import OutOfMemory
    from sdtune.train.signals import Interrupted

    world = World.from_env()
    if not world.main:  # rank 0 shows the progress; the CLI's rank filter keeps the other ranks' lines back
        progress, status = None, None
    preset, plan_sets = request.preset, []
    if preset == "auto":
        from sdtune.config.dataset_toml import dataset_sets
        from sdtune.estimate.auto import pick_plan

        planned = [*(dataset_sets(request.dataset) if request.dataset else []), *request.overrides]
        with (status or _quiet)("--preset auto: estimating the memory plans"):
            pick = pick_plan(planned)  # for the dataset config's resolution and batch size too
        logger.info(pick.reason)
        if pick.warning:
            logger.warning(pick.warning)
        preset, plan_sets = pick.preset, list(pick.extra)
    fallbacks: list[str] = []  # the --set items of the smaller plans that --on-oom fallback moved to
    cfg, info = load_config(preset, [*plan_sets, *request.overrides], dataset=request.dataset)
    folder, resume = request.folder(cfg), request.resume
    try:
        while True:
            try:
                return attempt(cfg, info, folder, request.out, resume=resume, overwrite=request.overwrite,
                               progress=progress, world=world)
            except OutOfMemory as exc:
                if request.on_oom != "fallback" or exc.fallback is None:
                    raise
                fallbacks += exc.fallback.overrides
                overrides = [*plan_sets, *request.overrides, *fallbacks]
                cfg, info = _fall_back(exc, preset, overrides, request.dataset)
                resume = True
    except (Interrupted, KeyboardInterrupt) as exc:  # KeyboardInterrupt: Ctrl+C outside the training loop
        command = request.resume_command(preset, [*plan_sets, *request.sets, *fallbacks])
        stopped = exc if isinstance(exc, Interrupted) else "SIGINT: stopped outside the training loop"
        launcher = f" (under the launcher, {world.size} processes)" if world.several else ""
        raise Stopped(f"{stopped}; resume with: {command}{launcher}", getattr(exc, "exit_code", 130)) from None
    finally:
        world.stop()


def _quiet(text: str) -> AbstractContextManager:
    return nullcontext()


def _fall_back(exc, preset: str, overrides: list[str], dataset: Path | None) -> tuple[Config, PresetInfo]:
    from sdtune.estimate.fallback import describe

    cfg, info = load_config(preset, overrides, dataset=dataset)
    sets = " ".join(f"--set {item}" for item in exc.fallback.overrides)
    logger.info(f"{exc.what}; --on-oom fallback ({sets}): continuing from the newest checkpoint on "
                f"{describe(cfg, info)}")
    return cfg, info


@dataclass(frozen=True)
class _Attempt:
    """One try on one plan, as `attempt` was asked for it."""

    cfg: Config
    info: PresetInfo
    data: Path | None
    out: Path
    resume: bool
    overwrite: bool
    progress: Callable | None
    world: World


def attempt(cfg: Config, info: PresetInfo, data: Path | None, out: Path, *, resume: bool = False,
            overwrite: bool = False, progress: Callable | None = None, world: World | None = None) -> dict:
    """One run on one plan, with `out` locked: prepare (resuming on `resume`), loop, export, summary.
    Raises `sdtune.estimate.fallback.OutOfMemory` when the GPU runs out of memory,
    `sdtune.train.signals.Interrupted` after a signal.
    Under a launcher (`world`) rank 0 alone locks, checks and writes `out`."""
    from sdtune.train.lock import output_lock

    request = _Attempt(cfg, info, data, Path(out), resume, overwrite, progress, world or World())
    with _full_disk(request.out), output_lock(request.out) if request.world.main else nullcontext():
        outcome = _run(request)
    if isinstance(outcome, _OutOfMemoryAt):  # the failed step's tensors are gone with its traceback by now
        from sdtune.estimate.fallback import out_of_memory

        _free_memory()  # before the estimate, and before --on-oom fallback loads the run again
        raise out_of_memory(cfg, info, outcome.step, request.out)
    return outcome


@contextmanager
def _full_disk(out: Path):
    """A full disk under the writes that do not say so themselves (the metrics, the samples, config.toml):
    one line; the checkpoints, caches and export name what they needed."""
    from sdtune.util.files import DISK_FULL, os_errno, write_failure

    try:
        yield
    except Exception as exc:
        number = os_errno(exc)
        if isinstance(exc, SdtuneError) or number not in DISK_FULL:
            raise
        raise SdtuneError(write_failure(out, "", number, "free space there and continue with --resume")) from None


@dataclass(frozen=True)
class _OutOfMemoryAt:
    step: int | None  # steps done when torch ran out of GPU memory; None: while loading


def _run(request: _Attempt) -> dict | _OutOfMemoryAt:
    import torch

    from sdtune.train import loop as trainer
    from sdtune.train.metrics import check_sinks

    cfg, out, world = request.cfg, request.out, request.world
    check_sinks(tensorboard=cfg.output.tensorboard, wandb=cfg.output.wandb)
    clear = _check_out_dir(out, request.resume, request.overwrite) if world.main else False
    run = None
    try:
        data = None if request.data is None else str(request.data)
        run = trainer.prepare(cfg, request.info, data, str(out), request.resume, world=world)
        with run:
            _start(run, clear)
            return _train_and_export(run, request)
    except torch.cuda.OutOfMemoryError:  # torch.OutOfMemoryError in torch >= 2.5; the same class
        return _OutOfMemoryAt(None if run is None else run.step)


def _start(run: Run, clear: bool) -> None:
    """What comes between preparing the run and its first step: --overwrite's deletion, config.toml, the
    export's room with output.keep_checkpoints=0, and every rank waiting for rank 0."""
    from sdtune.export.run_output import check_export_space

    out, world, keep = run.out_dir, run.world, run.cfg.output.keep_checkpoints
    if clear:  # only now, with the data and the model checked
        logger.info(f"--overwrite: deleting the previous run's checkpoints in {run_folder.checkpoint_root(out)}")
        shutil.rmtree(run_folder.checkpoint_root(out))
    if world.main:
        (out / "config.toml").write_text(run.config_toml, encoding="utf-8")
        if keep == 0:
            logger.info("output.keep_checkpoints=0: no resume checkpoints are written; a run stopped before "
                        "its end cannot be resumed")
    if keep == 0:  # nothing could write the model after the run: look now
        check_export_space(run)
    world.barrier()  # no rank writes a checkpoint before --overwrite has cleared the old ones


def _train_and_export(run: Run, request: _Attempt) -> dict:
    """The loop, its metrics sinks on rank 0, then the export; the summary."""
    from sdtune.export import saves
    from sdtune.export.run_output import export_run
    from sdtune.train import loop as trainer
    from sdtune.train.metrics import MetricsLogger

    steps = run.cfg.train.max_steps  # train.max_epochs has made it the epochs' steps
    if run.step >= steps:
        logger.info(f"nothing left to train: the checkpoint is at step {run.step} of {steps}")
    if not run.world.main:
        trainer.loop(run, saves=saves)
        return export_run(run, request.info.name)
    sink = request.progress(steps, run.epoch_at(steps)) if request.progress else None
    with MetricsLogger.for_run(run.out_dir, run.cfg.output, resume_step=run.step, progress=sink) as metrics:
        trainer.loop(run, metrics, saves)
    return export_run(run, request.info.name)


def _check_out_dir(out: Path, resume: bool, overwrite: bool) -> bool:
    """A fresh run's --out must be new, empty or an sdtune output folder without checkpoints that did not
    finish; --overwrite lets it write into any folder. True when a previous run's checkpoints are to be
    deleted (--overwrite), so that none of them is taken for this run's."""
    from sdtune.train.lock import LOCK_NAME

    # a finished run whose resume checkpoints were deleted (output.keep_final_state=false): its model is
    # all there is, and neither a fresh run nor --resume (which would start over) may replace it unasked
    finished = run_folder.is_finished_run(out)
    if resume and finished and not overwrite:
        raise SdtuneError(f"{out} holds a finished run whose resume checkpoints were deleted "
                          "(output.keep_final_state=false), so there is nothing to resume; choose another --out, "
                          "or pass --overwrite without --resume to train it again")
    if resume or not any(p.name != LOCK_NAME for p in out.iterdir()):
        return False
    if overwrite:
        return run_folder.checkpoint_root(out).exists()
    if run_folder.list_checkpoints(out):
        raise SdtuneError(f"{out} already holds a run; pass --resume to continue it, --overwrite to start "
                          "over (deletes its checkpoints), or choose another --out")
    if finished:
        raise SdtuneError(f"{out} holds a finished run; choose another --out, or pass --overwrite to replace it")
    if not run_folder.is_run_folder(out):  # a config.toml alone may be the user's own (kohya's): it is replaced
        raise SdtuneError(f"{out} exists, is not empty and is not an sdtune output folder; choose another --out, "
                          "or pass --overwrite to write into it (files of the same names are replaced)")
    return False


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
