"""The training loop: one explicit loop that accumulates, scales, clips, steps, logs, samples and saves.

    sdtune train --preset cpu --data images/ --model tiny-sd/ --out out/ --max-steps 20

`train()` checks the data and the plan before any model is loaded, then runs the loop. Each micro-batch's
images, noise and timesteps are a function of (seed, micro-batch index): a resumed run continues exactly.

What can go wrong mid-run is handled here too: SIGINT/SIGTERM finish the step, save a checkpoint and raise
`Interrupted`; a step whose loss (or, without fp16 loss scaling, gradient norm) is NaN/Inf is skipped, and
`train.max_bad_steps` of them in a row stop the run; running out of GPU memory raises `replan.OutOfMemory`,
which names the next smaller plan (`sdtune train --on-oom fallback` continues on it).
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdtune import checkpoint, loss, replan
from sdtune.config import Config, PresetInfo, from_toml, to_toml
from sdtune.data import BatchStream, ImageFailed, scan_folder
from sdtune.data.features import Features
from sdtune.errors import SdtuneError
from sdtune.memory import Plan, apply_plan, autocast, peak_bytes, reset_peak, resolve_plan
from sdtune.optim import clip_gradients, host_gradients

# Keys that may change between a run and its --resume: how long to train, when to give up on NaN, what to
# write; and the memory levers that leave the math alone (`replan.may_change_on_resume`).
RESUMABLE_CHANGES = ("train.max_steps", "train.max_bad_steps", "output.")


class Interrupted(Exception):
    """SIGINT or SIGTERM stopped the run after step `step`, saved as checkpoint `saved`."""

    def __init__(self, signum: int, step: int, saved: Path):
        super().__init__(f"{signal.Signals(signum).name}: stopped after step {step}, checkpoint saved in {saved}")
        self.step, self.saved = step, saved
        self.exit_code = 128 + signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


@dataclass
class Run:
    """Everything the loop touches, built once by `prepare`."""

    cfg: Config
    plan: Plan
    components: Any
    stream: BatchStream
    optimizer: Any
    lr_schedule: Any
    scaler: Any
    alphas_cumprod: Any
    out_dir: Path
    config_toml: str
    log: Callable[[str], None]
    features: Any = None  # latents and text embeddings, encoded or from the caches
    streamer: Any = None  # the ParamStreamer when memory.param_offload=cpu
    step: int = 0
    losses: list[float] = field(default_factory=list)
    skipped_steps: int = 0
    seconds: float = 0.0


def _check_out_dir(out_dir: Path, resume: bool, overwrite: bool) -> bool:
    """A fresh run's --out must be new, empty or an sdtune output folder without checkpoints; --overwrite
    lets it write into any folder. True when a previous run's checkpoints are to be deleted (--overwrite),
    so that none of them is taken for this run's."""
    if resume or not out_dir.exists() or not any(out_dir.iterdir()):
        return False
    if overwrite:
        return checkpoint.checkpoint_root(out_dir).exists()
    if checkpoint.list_checkpoints(out_dir):
        raise SdtuneError(f"{out_dir} already holds a run; pass --resume to continue it, --overwrite to start "
                          "over (deletes its checkpoints), or choose another --out")
    if not (out_dir / "config.toml").is_file():
        raise SdtuneError(f"{out_dir} exists, is not empty and is not an sdtune output folder; choose another --out, "
                          "or pass --overwrite to write into it (files of the same names are replaced)")
    return False


def _check_resume_config(saved_toml: str, cfg: Config, source: Path) -> Config:
    """The checkpoint's config, when `cfg` differs from it only where a resume may differ."""
    saved_cfg = from_toml(saved_toml, str(source))
    saved, now = dataclasses.asdict(saved_cfg), dataclasses.asdict(cfg)
    changed = [f"{section}.{key}: {value!r} -> {now[section][key]!r}"
               for section, values in saved.items() for key, value in values.items()
               if value != now[section][key] and not f"{section}.{key}".startswith(RESUMABLE_CHANGES)
               and not replan.may_change_on_resume(f"{section}.{key}", value, now[section][key])]
    if changed:
        raise SdtuneError(f"--resume with a different plan than {source} ({'; '.join(changed)}); "
                          "resume with the same settings or start a new --out")
    return saved_cfg


def _restore(run: Run) -> None:
    """Load the newest checkpoint of `run.out_dir` into the run, if there is one."""
    latest = checkpoint.latest_checkpoint(run.out_dir, warn=run.log)
    if latest is None:
        run.log(f"no checkpoint in {checkpoint.checkpoint_root(run.out_dir)}; starting from step 0")
        return
    saved = _check_resume_config((latest / "config.toml").read_text(encoding="utf-8"), run.cfg, latest)
    optimizer = run.optimizer
    if saved.memory.optimizer_offload != run.cfg.memory.optimizer_offload:  # the state's layout differs
        run.log(f"optimizer state: from memory.optimizer_offload={saved.memory.optimizer_offload} "
                f"to {run.cfg.memory.optimizer_offload}")
        optimizer = replan.OtherTierState(run.optimizer, run.components.unet, latest / "unet.safetensors")
    state = checkpoint.load_checkpoint(latest, unet=run.components.unet, optimizer=optimizer,
                                       lr_schedule=run.lr_schedule, scaler=run.scaler)
    run.step, run.losses = state["step"], state["losses"]
    run.skipped_steps, run.seconds = state["skipped_steps"], state["seconds"]
    run.log(f"resumed from {latest} at step {run.step}")


def prepare(cfg: Config, info: PresetInfo, data_dir: str, out_dir: str, resume: bool,
            log: Callable[[str], None], overwrite: bool = False) -> Run:
    from diffusers import DDPMScheduler

    from sdtune.models import load_components
    from sdtune.optim import make_lr_schedule, make_optimizer, make_scaler

    out = Path(out_dir)
    clear = _check_out_dir(out, resume, overwrite)
    scan = scan_folder(data_dir, cfg.data)
    for skip in scan.skipped:
        log(f"skipped {skip.path} ({skip.kind}): {skip.detail}")
    counted = sum(e.repeats for e in scan.examples)
    log(f"{len(scan.examples):,} images from {data_dir}"
        + (f", {counted:,} with repeats" if counted != len(scan.examples) else ""))
    if scan.skipped:
        log(scan.summary())
    plan = resolve_plan(cfg.memory, log)
    components = load_components(cfg.model.pretrained, cfg.model.config)
    apply_plan(plan, components)
    optimizer = make_optimizer(components.unet.parameters(), cfg.train, plan, model=components.unet)
    streamer = None
    if plan.param_offload == "cpu":  # after the optimizer: it put the working weights in host memory
        from sdtune.offload import ParamStreamer

        streamer = ParamStreamer(components.unet, plan.device, optimizer,
                                 prefetch_blocks=cfg.memory.param_prefetch_blocks)
    stream = BatchStream(scan.examples, cfg.data, cfg.train.batch_size, cfg.train.seed, warn=log)
    features = Features(components, cfg.data, plan, log)
    features.prepare(stream, scan.examples)  # with caches: encode what is missing, then park the encoders
    run = Run(cfg=cfg, plan=plan, components=components, out_dir=out, config_toml=to_toml(cfg, info), log=log,
              features=features, streamer=streamer, stream=stream,
              optimizer=optimizer, lr_schedule=make_lr_schedule(optimizer, cfg.train),
              scaler=make_scaler(plan, optimizer),
              alphas_cumprod=DDPMScheduler.from_config(components.scheduler.config).alphas_cumprod)
    if resume:
        _restore(run)
    if clear:  # only now, with the data and the model checked
        log(f"--overwrite: deleting the previous run's checkpoints in {checkpoint.checkpoint_root(out)}")
        shutil.rmtree(checkpoint.checkpoint_root(out))
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.toml").write_text(run.config_toml, encoding="utf-8")
    return run


def _micro_step(run: Run, index: int) -> float:
    """Forward and backward of micro-batch `index`; returns its (unscaled, unweighted-by-accumulation) loss.
    The loss is read after backward is queued (the host does not wait for the GPU in between), except
    where gradients reach the weights during backward (`step_in_backward`): a NaN/Inf loss skips it."""
    import torch

    c, plan, train = run.components, run.plan, run.cfg.train
    while True:
        items = run.stream.items(index)
        generator = torch.Generator(plan.device).manual_seed(train.seed * 1_000_003 + index)
        try:
            latents = run.features.latents(run.stream, items, generator)
            break
        except ImageFailed:
            continue  # reported once by the stream, which now substitutes another image of the bucket
    text = run.features.text([item.caption for item in items])
    noise = loss.sample_noise(latents, generator, train.noise_offset)
    timesteps = loss.sample_timesteps(len(latents), len(run.alphas_cumprod), generator, latents.device)
    noisy = loss.add_noise(latents, noise, timesteps, run.alphas_cumprod)
    with autocast(plan):
        prediction = c.unet(noisy, timesteps, text).sample
    target = loss.target(c.prediction_type, latents, noise, timesteps, run.alphas_cumprod)
    weights = (loss.min_snr_weights(timesteps, run.alphas_cumprod, train.snr_gamma, c.prediction_type)
               if train.snr_gamma else None)
    value = loss.diffusion_loss(prediction, target, weights)
    if host_gradients(run.optimizer) and run.optimizer.step_in_backward and not math.isfinite(value.item()):
        return value.item()
    try:
        run.scaler.scale(value / train.gradient_accumulation_steps).backward()
    except BaseException:
        run.optimizer.zero_grad(set_to_none=True)  # nothing of a half-done backward reaches a later step
        raise
    return value.item()


def _skip_step(run: Run) -> bool:
    """Drop the step's gradients (the offload tiers: the next backward replaces them) and step on; False."""
    import warnings

    run.optimizer.zero_grad(set_to_none=True)
    with warnings.catch_warnings():  # torch warns when the schedule steps before the optimizer ever has
        warnings.simplefilter("ignore", UserWarning)
        run.lr_schedule.step()
    return False


def _optimizer_step(run: Run) -> bool:
    """Unscale, clip, step, update the scale; False when the step was skipped: fp16 overflow (the scaler
    skips it), or without loss scaling a NaN/Inf gradient norm. An offload tier does the unscaling,
    clipping and overflow check inside its step, from the norm it took as the gradients left the GPU."""
    optimizer, scaler = run.optimizer, run.scaler
    if not host_gradients(optimizer):
        scaler.unscale_(optimizer)
        max_norm = run.cfg.train.max_grad_norm
        if max_norm or not scaler.is_enabled():  # the norm, clipped or not, finds inf/NaN without loss scaling
            norm = clip_gradients(optimizer, max_norm)
            if norm is not None and not scaler.is_enabled() and not math.isfinite(norm.item()):
                return _skip_step(run)
    scale = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    skipped = host_gradients(optimizer) and optimizer.skipped
    optimizer.zero_grad(set_to_none=True)
    run.lr_schedule.step()
    return not (skipped or (scaler.is_enabled() and scaler.get_scale() < scale))


def _fp32_weights(run: Run) -> dict:
    """The UNet's trained weights in fp32: its own parameters, or the offload optimizer's masters."""
    unet = run.components.unet
    return run.optimizer.master_weights(unet) if host_gradients(run.optimizer) else unet.state_dict()


def _save(run: Run) -> Path:
    state = {"losses": run.losses, "skipped_steps": run.skipped_steps, "seconds": run.seconds}
    return checkpoint.save_checkpoint(run.out_dir, run.step, weights=_fp32_weights(run), optimizer=run.optimizer,
                               lr_schedule=run.lr_schedule, scaler=run.scaler, state=state,
                               config_toml=run.config_toml, keep=run.cfg.output.keep_checkpoints)


def _sample(run: Run) -> Path:
    from sdtune.models import assemble_pipeline
    from sdtune.sample import generate, make_grid

    unet, out = run.components.unet, run.cfg.output
    unet.eval()
    with autocast(run.plan), run.features.on_device():
        prompts = list(out.sample_prompts)
        images = generate(assemble_pipeline(run.components), prompts, [run.cfg.train.seed] * len(prompts),
                          steps=out.sample_steps)
    unet.train()
    path = run.out_dir / "samples" / f"step-{run.step:06d}.png"
    path.parent.mkdir(exist_ok=True)
    make_grid(images).save(path)
    return path


def _mean_step_time(times: list[float]) -> float:
    """Seconds per step without the first step, which pays for warm-up (allocator, kernels, caches)."""
    return sum(times[1:]) / (len(times) - 1) if len(times) > 1 else (times[0] if times else 0.0)


class _StopOnSignal:
    """While the loop runs, SIGINT and SIGTERM ask it to stop after the current step (`signum` is set); a
    second signal is reported and ignored. The handlers before it come back on exit. Signals can only be
    handled in the main thread: elsewhere nothing is installed."""

    def __init__(self, log: Callable[[str], None]):
        self.log, self.signum, self.previous = log, None, {}

    def __enter__(self) -> _StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum = signum
            self.log(f"{name}: finishing this step, then saving a checkpoint")
        else:
            self.log(f"{name} ignored: already stopping and saving a checkpoint (a checkpoint is written whole "
                     "or not at all, so killing the process loses at most the steps since the last one)")


def _too_many_bad_steps(run: Run, count: int) -> SdtuneError:
    latest = checkpoint.latest_checkpoint(run.out_dir, warn=run.log)
    kept = f"the newest checkpoint, {latest}, is kept" if latest else "no checkpoint was written yet"
    return SdtuneError(f"{count} steps in a row had a NaN/Inf loss or gradient, the last at step {run.step}; "
                       f"stopped ({kept}; skipped steps never change the weights). Try a lower "
                       "train.learning_rate, or memory.precision=bf16 or fp32 instead of fp16, in a new run; "
                       "train.max_bad_steps=0 never stops")


def loop(run: Run, progress: Callable[[Run, float], None]) -> float:
    """Train from `run.step` to `train.max_steps`, calling `progress(run, seconds_per_step)` after each
    step; returns the mean seconds per step. Raises `Interrupted` after SIGINT/SIGTERM (a checkpoint saved)
    and SdtuneError after `train.max_bad_steps` NaN/Inf steps in a row."""
    cfg = run.cfg
    accumulation, step_times, bad_in_a_row = cfg.train.gradient_accumulation_steps, [], 0
    reset_peak(run.plan)
    with _StopOnSignal(run.log) as stop:
        while run.step < cfg.train.max_steps:
            started = time.perf_counter()
            first = run.step * accumulation
            step_loss = sum(_micro_step(run, first + i) for i in range(accumulation)) / accumulation
            finite = math.isfinite(step_loss)
            stepped = _optimizer_step(run) if finite else _skip_step(run)
            run.skipped_steps += not stepped
            bad = not finite or not (stepped or run.scaler.is_enabled())  # fp16 overflow: the scaler's business
            bad_in_a_row = bad_in_a_row + 1 if bad else 0
            run.step += 1
            run.losses.append(step_loss)
            step_times.append(time.perf_counter() - started)
            run.seconds += step_times[-1]
            progress(run, _mean_step_time(step_times))
            if cfg.train.max_bad_steps and bad_in_a_row >= cfg.train.max_bad_steps:
                raise _too_many_bad_steps(run, bad_in_a_row)
            if stop.signum:
                raise Interrupted(stop.signum, run.step, _save(run))
            if cfg.output.sample_every and run.step % cfg.output.sample_every == 0:
                run.log(f"samples: {_sample(run)}")
            every = cfg.output.checkpoint_every
            if (every and run.step % every == 0) or run.step == cfg.train.max_steps:
                _save(run)
    return _mean_step_time(step_times)


def summary(run: Run, seconds_per_step: float) -> dict:
    return {
        "steps": run.step, "final_loss": run.losses[-1] if run.losses else None, "losses": run.losses,
        "seconds": round(run.seconds, 3), "seconds_per_step": round(seconds_per_step, 4),
        "peak_memory_bytes": peak_bytes(run.plan),
        "peak_memory_kind": "cuda_max_reserved" if run.plan.device == "cuda" else "process_max_rss",
        "skipped_steps": run.skipped_steps, "device": run.plan.device, "precision": run.plan.precision,
        "attention": run.plan.attention, "gradient_checkpointing": run.plan.gradient_checkpointing,
        "optimizer": run.cfg.memory.optimizer, "optimizer_offload": run.plan.optimizer_offload,
        "param_offload": run.plan.param_offload,
        "batch_size": run.cfg.train.batch_size,
        "gradient_accumulation_steps": run.cfg.train.gradient_accumulation_steps,
    }


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def train(cfg: Config, info: PresetInfo, data_dir: str, out_dir: str, *, resume: bool = False,
          overwrite: bool = False, log: Callable[[str], None] = print,
          progress: Callable[[Run, float], None] | None = None) -> dict:
    """Prepare, loop, export the diffusers folder and write `summary.json`; returns the summary. Raises
    `replan.OutOfMemory` when the GPU runs out of memory, `Interrupted` after SIGINT/SIGTERM."""
    import torch

    from sdtune.export import SUMMARY, export_pipeline, export_single_file, write_json

    run, out_of_memory = None, False
    try:
        run = prepare(cfg, info, data_dir, out_dir, resume, log, overwrite)
        seconds_per_step = loop(run, progress or (lambda run, sps: None))
    except torch.cuda.OutOfMemoryError:  # torch.OutOfMemoryError in torch >= 2.5; the same class
        out_of_memory = True  # raised below, once this block has dropped the error (its traceback holds the step)
    if out_of_memory:
        step = None if run is None else run.step
        if run is not None and hasattr(run.optimizer, "close"):  # the nvme tier's threads and state file
            run.optimizer.close()
        run = None
        _free_memory()  # before the estimate, and before --on-oom fallback loads the run again
        raise replan.out_of_memory(cfg, info, step, Path(out_dir))
    if host_gradients(run.optimizer):  # export the fp32 masters, not the device copies
        for name, weight in _fp32_weights(run).items():
            run.components.unet.get_parameter(name).data = weight
    if hasattr(run.optimizer, "close"):  # the nvme tier's state file: its copy is in the last checkpoint
        run.optimizer.close()
    export_pipeline(run.components, run.out_dir)
    if cfg.output.single_file:
        try:
            export_single_file(run.components, run.out_dir)
        except ValueError as exc:
            log(f"single-file checkpoint not written: {exc}")
    result = {"preset": info.name, **summary(run, seconds_per_step)}
    write_json(run.out_dir / SUMMARY, result)
    return result
