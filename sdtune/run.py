"""A training run's life, above the loop: the plan (`--preset auto`), the output folder and its lock,
resume, the out-of-memory fallback, the metrics sinks, the export and the summary.

    result = train(TrainRequest(preset="rtx3050", data=Path("images"), out=Path("out")), log=print)

`train` is what `sdtune train` runs. It resolves the plan, locks `--out`, and runs `attempt` once, or,
with `on_oom="fallback"`, again on each next smaller plan after the GPU runs out of memory, continuing
from the newest checkpoint. `attempt` is one try on one plan: prepare, loop, export, summary; it turns
torch's out-of-memory error into `replan.OutOfMemory`, which names the next smaller plan. The loop below
it (`sdtune.train.loop`) knows nothing of plans other than its own.
"""

from __future__ import annotations

import shlex
import shutil
from collections.abc import Callable
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

from sdtune.config import Config, PresetInfo, load_config
from sdtune.errors import SdtuneError
from sdtune.train import store as checkpoint
from sdtune.util import run_folder

Log = Callable[[str], None]


@dataclass(frozen=True)
class TrainRequest:
    """What the user asked `sdtune train` for."""

    preset: str                   # a preset name, a .toml path, or auto
    data: Path
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

    def resume_command(self, preset: str, sets: list[str]) -> str:
        """The `sdtune train` command line that continues this run on `preset` with `sets`, plus --resume."""
        args = ["sdtune", "train", "--preset", preset, "--data", str(self.data),
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


def train(request: TrainRequest, *, log: Log = print, progress: Callable | None = None,
          status: Callable[[str], AbstractContextManager] | None = None) -> dict:
    """Train as `request` says; returns the summary. `progress(total_steps, total_epochs)` makes the
    progress-bar sink; `status(text)` shows `text` while `--preset auto` estimates (a spinner; nothing by default).
    Raises SdtuneError on bad input or when no plan fits, `Stopped` after SIGINT/SIGTERM."""
    from sdtune.estimate.fallback import OutOfMemory
    from sdtune.train.signals import Interrupted
    from sdtune.util.world import World

    world = World.from_env()
    if not world.main:  # rank 0 speaks for the run; the others only fail aloud (their errors name the rank)
        log, progress, status = _silent, None, None
    preset, plan_sets = request.preset, []
    if preset == "auto":
        from sdtune.estimate.auto import pick_plan

        with (status or _quiet)("--preset auto: estimating the memory plans"):
            pick = pick_plan(request.overrides)
        log(pick.reason)
        if pick.warning:
            log(f"warning: {pick.warning}")
        preset, plan_sets = pick.preset, list(pick.extra)
    fallbacks: list[str] = []  # the --set items of the smaller plans that --on-oom fallback moved to
    cfg, info = load_config(preset, [*plan_sets, *request.overrides])
    resume = request.resume
    try:
        while True:
            try:
                return attempt(cfg, info, request.data, request.out, resume=resume, overwrite=request.overwrite,
                               log=log, progress=progress, world=world)
            except OutOfMemory as exc:
                if request.on_oom != "fallback" or exc.fallback is None:
                    raise
                fallbacks += exc.fallback.overrides
                cfg, info = _fall_back(exc, preset, [*plan_sets, *request.overrides, *fallbacks], log)
                resume = True
    except (Interrupted, KeyboardInterrupt) as exc:  # KeyboardInterrupt: Ctrl+C outside the training loop
        command = request.resume_command(preset, [*plan_sets, *request.sets, *fallbacks])
        stopped = exc if isinstance(exc, Interrupted) else "SIGINT: stopped outside the training loop"
        launcher = f" (under the launcher, {world.size} processes)" if world.several else ""
        raise Stopped(f"{stopped}; resume with: {command}{launcher}", getattr(exc, "exit_code", 130)) from None
    finally:
        world.stop()


def _silent(line: str) -> None:
    pass


def _quiet(text: str) -> AbstractContextManager:
    return nullcontext()


def _fall_back(exc, preset: str, overrides: list[str], log: Log) -> tuple[Config, PresetInfo]:
    from sdtune.estimate.fallback import describe

    cfg, info = load_config(preset, overrides)
    sets = " ".join(f"--set {item}" for item in exc.fallback.overrides)
    log(f"{exc.what}; --on-oom fallback ({sets}): continuing from the newest checkpoint on {describe(cfg, info)}")
    return cfg, info


def attempt(cfg: Config, info: PresetInfo, data: Path, out: Path, *, resume: bool = False, overwrite: bool = False,
            log: Log = print, progress: Callable | None = None, world=None) -> dict:
    """One run on one plan, with `out` locked: prepare (resuming on `resume`), loop, export, summary.
    Raises `replan.OutOfMemory` when the GPU runs out of memory, `signals.Interrupted` after a signal.
    Under a launcher (`world`) rank 0 alone locks, checks and writes `out`."""
    from sdtune.train.lock import output_lock
    from sdtune.util.world import World

    out, world = Path(out), world or World()
    with _full_disk(out), output_lock(out, log=log) if world.main else nullcontext():
        outcome = _run(cfg, info, data, out, resume, overwrite, log, progress, world)
    if isinstance(outcome, _OutOfMemoryAt):  # the failed step's tensors are gone with its traceback by now
        from sdtune.estimate.fallback import out_of_memory

        _free_memory()  # before the estimate, and before --on-oom fallback loads the run again
        raise out_of_memory(cfg, info, outcome.step, out)
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


def _run(cfg: Config, info: PresetInfo, data: Path, out: Path, resume: bool, overwrite: bool, log: Log,
         progress: Callable | None, world) -> dict | _OutOfMemoryAt:
    import torch

    from sdtune.train import loop as trainer
    from sdtune.train.metrics import MetricsLogger, check_sinks

    check_sinks(tensorboard=cfg.output.tensorboard)
    clear = _check_out_dir(out, resume, overwrite) if world.main else False
    run = None
    try:
        run = trainer.prepare(cfg, info, str(data), str(out), resume, log, world=world)
        with run:
            if clear:  # only now, with the data and the model checked
                log(f"--overwrite: deleting the previous run's checkpoints in {run_folder.checkpoint_root(out)}")
                shutil.rmtree(run_folder.checkpoint_root(out))
            if world.main:
                (out / "config.toml").write_text(run.config_toml, encoding="utf-8")
                if cfg.output.keep_checkpoints == 0:
                    log("output.keep_checkpoints=0: no resume checkpoints are written; a run stopped before its "
                        "end cannot be resumed")
            if cfg.output.keep_checkpoints == 0:  # nothing could write the model after the run: look now
                _check_export_space(run)
            world.barrier()  # no rank writes a checkpoint before --overwrite has cleared the old ones
            steps = run.cfg.train.max_steps  # train.max_epochs has made it the epochs' steps
            if run.step >= steps:
                log(f"nothing left to train: the checkpoint is at step {run.step} of {steps}")
            if not world.main:
                trainer.loop(run)
                return _export(run, info, log)
            sink = progress(steps, run.epoch_at(steps)) if progress else None
            with MetricsLogger.for_run(out, cfg.output, resume_step=run.step, progress=sink) as metrics:
                trainer.loop(run, metrics)
            return _export(run, info, log)
    except torch.cuda.OutOfMemoryError:  # torch.OutOfMemoryError in torch >= 2.5; the same class
        return _OutOfMemoryAt(None if run is None else run.step)


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


def _export(run, info: PresetInfo, log: Log) -> dict:
    """The diffusers folder (and the single file) from the fp32 trained weights, or a LoRA run's two LoRA
    files; `summary.json`."""
    from sdtune.export import SINGLE_FILE, export_pipeline, export_single_file
    from sdtune.lora.adapter import TEXT_ENCODER_NAMES
    from sdtune.plan import torch_dtype
    from sdtune.train.loop import fp32_weights

    if run.placement.sharded:  # every rank sends its shards; rank 0 exports a plain UNet of them
        from sdtune.train.parallel import unsharded_copy

        weights = fp32_weights(run)
        if run.world.main:
            run.components.unet = unsharded_copy(run.components.unet, weights)
    if not run.world.main:
        run.close()
        return {"preset": info.name, **summary(run)}
    if run.placement.lora is not None:
        return _export_lora(run, info)
    if run.ema is not None:  # the moving average is the model; the raw weights stay in the last checkpoint
        encoders = zip(TEXT_ENCODER_NAMES, run.components.text_encoders, strict=False)
        parts = {"unet": run.components.unet, **dict(encoders)}
        for name, weight in run.ema.weights().items():
            part, _, key = name.partition(".")
            parts[part].get_parameter(key).data = weight
    elif run.tier.host_gradients:  # the masters live in the tier, not in the UNet's working weights
        for name, weight in fp32_weights(run).items():
            run.components.unet.get_parameter(name).data = weight
    run.close()  # the nvme tier's state file: its copy is in the last checkpoint
    output = run.cfg.output
    for module in _trained(run):  # what the diffusers folder holds of them; the single file casts each part itself
        module.to(torch_dtype(output.save_precision))
    with _writing_model(run, _model_bytes(run)):
        export_pipeline(run.components, run.out_dir)
        single = {"written": False, "reason": "output.single_file is false"}
        if output.single_file:
            written = export_single_file(run.components, run.out_dir, precision=output.save_precision)
            for note in written.notes:
                log(f"{SINGLE_FILE}: {note}")
            if written.path is None:
                log(f"{SINGLE_FILE} not written: {written.reason}")
            single = {"written": written.path is not None, "reason": written.reason}
    result = {"preset": info.name, **summary(run), "single_file": single}
    _leave(run, result)
    return result


def _trained(run) -> list:
    """The full fine-tune's trained modules, which the diffusers folder holds in output.save_precision."""
    return [run.components.unet, *(run.components.text_encoders if run.cfg.train.text_encoder_lr else ())]


def _check_export_space(run) -> None:
    """With output.keep_checkpoints=0 no checkpoint could write the model once the export finds the disk
    too full, and every step would be lost: its free space is checked before the first step (every rank
    stops)."""
    from sdtune.util.files import check_space_all_ranks

    check_space_all_ranks(run.world, run.out_dir, _export_bytes(run) if run.world.main else 0, "the trained model",
                          "output.keep_checkpoints=0 keeps no checkpoint to write it from after the run: free "
                          "space there first, choose another --out, or set output.keep_checkpoints=1")


def _export_bytes(run) -> int:
    """Bytes the export needs free: a LoRA run's two files (in fp32 at most), or `_model_bytes`."""
    from sdtune.util.files import tensor_bytes

    if run.placement.lora is not None:
        return 2 * tensor_bytes(run.placement.weights()) + 2**20
    return _model_bytes(run)


def _model_bytes(run) -> int:
    """Bytes the export writes less those of the files it replaces: the diffusers folder (each part in its
    dtype, the trained ones in output.save_precision, cast or not yet) and the single file (every part in
    it)."""
    from sdtune.export import SINGLE_FILE, single_file_bytes
    from sdtune.plan import torch_dtype
    from sdtune.util.files import folder_bytes, tensor_bytes

    parts, trained = [run.components.unet, run.components.vae, *run.components.text_encoders], _trained(run)
    saved = torch_dtype(run.cfg.output.save_precision).itemsize
    folder = sum(tensor_bytes(part.state_dict()) for part in parts if not any(part is t for t in trained))
    folder += sum((saved if t.is_floating_point() else t.element_size()) * t.numel()
                  for part in trained for t in part.state_dict().values())
    single = single_file_bytes(run.components, run.cfg.output.save_precision)
    replaced = sum(folder_bytes(run.out_dir / name) for name in ("unet", "vae", "text_encoder", "text_encoder_2",
                                                                 SINGLE_FILE))
    return folder + (single if run.cfg.output.single_file else 0) + 2**20 - replaced


def _writing_model(run, needed: int):
    """Refuse to start the export without `needed` bytes free, and turn one the disk refuses all the same into
    one line; either way the last checkpoint holds the trained weights and --resume writes the model again."""
    from sdtune.util.files import check_space, disk_errors

    latest = checkpoint.latest_checkpoint(run.out_dir, warn=lambda message: None)
    fix = (f"free space there and run the same command with --resume: it writes the model from {latest}"
           if latest else "free space there first: output.keep_checkpoints=0 keeps no checkpoint to write it from")
    check_space(run.out_dir, needed, "the trained model", fix)
    return disk_errors(run.out_dir, "the trained model", fix, needed)


def _leave(run, result: dict) -> None:
    """`summary.json`, with what the run leaves on disk (`result["disk"]`); then, unless
    output.keep_final_state, the resume checkpoints are deleted (after the summary: a run killed in between
    keeps them)."""
    from sdtune.export import write_json
    from sdtune.util.files import folder_bytes
    from sdtune.util.run_folder import SUMMARY

    root, keep = run_folder.checkpoint_root(run.out_dir), run.cfg.output.keep_final_state
    checkpoints = folder_bytes(root)
    result["disk"] = {"output_bytes": folder_bytes(run.out_dir) - (0 if keep else checkpoints),
                      "checkpoint_bytes": checkpoints, "checkpoints_kept": keep and checkpoints > 0}
    write_json(run.out_dir / SUMMARY, result)
    if not keep and root.exists():
        shutil.rmtree(root)


def _export_lora(run, info: PresetInfo) -> dict:
    from sdtune.export.lora_files import kohya_metadata, save_diffusers, save_kohya

    modules, family = run.placement.lora, run.components.family
    result = {"preset": info.name, **summary(run)}
    with (run.ema.applied() if run.ema is not None else nullcontext(),  # the moving average is the LoRA
          _writing_model(run, _export_bytes(run))):
        files = [save_diffusers(modules, family, run.out_dir),
                 save_kohya(modules, family, run.out_dir, kohya_metadata(run.cfg, run.components, result,
                                                                         len(run.stream.examples)),
                            run.cfg.lora.scale_alpha)]
    run.close()
    result["lora_files"] = [path.name for path in files]
    _leave(run, result)
    return result


def summary(run) -> dict:
    from sdtune.plan import peak_bytes

    plan, train = run.plan, run.cfg.train
    return {
        "method": run.cfg.train.method,
        "model_family": run.components.family.name, "pipeline_class": run.components.family.pipeline_class,
        "steps": run.step, "epoch": run.epoch, "steps_per_epoch": run.steps_per_epoch,
        "final_loss": run.losses[-1] if run.losses else None, "losses": run.losses,
        "seconds": round(run.seconds, 3), "seconds_per_step": round(run.seconds_per_step or 0.0, 4),
        "peak_memory_bytes": peak_bytes(plan),
        "peak_memory_kind": "cuda_max_reserved" if plan.device == "cuda" else "process_max_rss",
        "skipped_steps": run.skipped_steps, "device": plan.device, "precision": plan.precision,
        "attention": plan.attention, "gradient_checkpointing": plan.gradient_checkpointing,
        "optimizer": plan.optimizer, "optimizer_offload": plan.optimizer_offload,
        "param_offload": plan.param_offload, "host_pinning": run.tier.host_pinning, "batch_size": train.batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "processes": run.world.size, "distributed": plan.distributed,
        "global_batch": train.batch_size * train.gradient_accumulation_steps * run.world.size,
    }


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
