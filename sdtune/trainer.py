"""The training loop: one explicit loop that accumulates, scales, clips, steps, logs, samples and saves.

    sdtune train --preset cpu --data images/ --model tiny-sd/ --out out/ --max-steps 20

`train()` checks the data and the plan before any model is loaded, then runs the loop. Each micro-batch's
images, noise and timesteps are a function of (seed, micro-batch index), so a run resumed from a
checkpoint continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdtune import checkpoint, loss
from sdtune.config import Config, PresetInfo, from_toml, to_toml
from sdtune.data import BatchStream, ImageFailed, scan_folder
from sdtune.data.features import Features
from sdtune.errors import SdtuneError
from sdtune.memory import Plan, apply_plan, autocast, peak_bytes, reset_peak, resolve_plan
from sdtune.optim import clip_gradients

# Keys that may change between a run and its --resume: how long to train and what to write.
RESUMABLE_CHANGES = ("train.max_steps", "output.")


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


def _check_out_dir(out_dir: Path, resume: bool) -> None:
    if resume or not out_dir.exists() or not any(out_dir.iterdir()):
        return
    if checkpoint.list_checkpoints(out_dir):
        raise SdtuneError(f"{out_dir} already holds a run; pass --resume to continue it or choose another --out")
    if not (out_dir / "config.toml").is_file():
        raise SdtuneError(f"{out_dir} exists and is not an sdtune output folder; choose another --out")


def _check_resume_config(saved_toml: str, cfg: Config, source: Path) -> None:
    saved, now = dataclasses.asdict(from_toml(saved_toml, str(source))), dataclasses.asdict(cfg)
    changed = [f"{section}.{key}: {value!r} -> {now[section][key]!r}"
               for section, values in saved.items() for key, value in values.items()
               if value != now[section][key] and not f"{section}.{key}".startswith(RESUMABLE_CHANGES)]
    if changed:
        raise SdtuneError(f"--resume with a different plan than {source} ({'; '.join(changed)}); "
                          "resume with the same settings or start a new --out")


def _restore(run: Run) -> None:
    """Load the newest checkpoint of `run.out_dir` into the run, if there is one."""
    latest = checkpoint.latest_checkpoint(run.out_dir)
    if latest is None:
        run.log(f"no checkpoint in {checkpoint.checkpoint_root(run.out_dir)}; starting from step 0")
        return
    _check_resume_config((latest / "config.toml").read_text(encoding="utf-8"), run.cfg, latest)
    state = checkpoint.load_checkpoint(latest, unet=run.components.unet, optimizer=run.optimizer,
                                       lr_schedule=run.lr_schedule, scaler=run.scaler)
    run.step, run.losses = state["step"], state["losses"]
    run.skipped_steps, run.seconds = state["skipped_steps"], state["seconds"]
    run.log(f"resumed from {latest} at step {run.step}")


def prepare(cfg: Config, info: PresetInfo, data_dir: str, out_dir: str, resume: bool,
            log: Callable[[str], None]) -> Run:
    import torch
    from diffusers import DDPMScheduler

    from sdtune.models import load_components
    from sdtune.optim import make_lr_schedule, make_optimizer

    out = Path(out_dir)
    _check_out_dir(out, resume)
    scan = scan_folder(data_dir, cfg.data)
    for skip in scan.skipped:
        log(f"skipped {skip.path} ({skip.kind}): {skip.detail}")
    counted = sum(e.repeats for e in scan.examples)
    log(f"{len(scan.examples):,} images from {data_dir}"
        + (f", {counted:,} with repeats" if counted != len(scan.examples) else ""))
    if scan.skipped:
        log(scan.summary())
    plan = resolve_plan(cfg.memory)
    components = load_components(cfg.model.pretrained, cfg.model.config)
    apply_plan(plan, components)
    optimizer = make_optimizer(components.unet.parameters(), cfg.train, plan)
    streamer = None
    if plan.param_offload == "cpu":  # after the optimizer: it put the working weights in host memory
        from sdtune.offload import ParamStreamer

        streamer = ParamStreamer(components.unet, plan.device, optimizer)
    stream = BatchStream(scan.examples, cfg.data, cfg.train.batch_size, cfg.train.seed, warn=log)
    features = Features(components, cfg.data, plan, log)
    features.prepare(stream, scan.examples)  # with caches: encode what is missing, then park the encoders
    run = Run(cfg=cfg, plan=plan, components=components, out_dir=out, config_toml=to_toml(cfg, info), log=log,
              features=features, streamer=streamer, stream=stream,
              optimizer=optimizer, lr_schedule=make_lr_schedule(optimizer, cfg.train),
              scaler=torch.amp.GradScaler(plan.device, enabled=plan.loss_scaling),
              alphas_cumprod=DDPMScheduler.from_config(components.scheduler.config).alphas_cumprod)
    if resume:
        _restore(run)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.toml").write_text(run.config_toml, encoding="utf-8")
    return run


def _micro_step(run: Run, index: int) -> float:
    """Forward and backward of micro-batch `index`; returns its (unscaled, unweighted-by-accumulation) loss."""
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
    run.scaler.scale(value / train.gradient_accumulation_steps).backward()
    return value.item()


def _optimizer_step(run: Run) -> bool:
    """Unscale, clip, step, update the scale; False when fp16 overflow made the scaler skip the step."""
    run.scaler.unscale_(run.optimizer)
    if run.cfg.train.max_grad_norm:  # over the optimizer's parameters: the UNet's, or their offloaded masters
        clip_gradients(run.optimizer, run.cfg.train.max_grad_norm)
    scale = run.scaler.get_scale()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.lr_schedule.step()
    return not (run.scaler.is_enabled() and run.scaler.get_scale() < scale)


def _fp32_weights(run: Run) -> dict:
    """The UNet's trained weights in fp32: its own parameters, or the offload optimizer's masters."""
    unet = run.components.unet
    return run.optimizer.master_weights(unet) if hasattr(run.optimizer, "master_weights") else unet.state_dict()


def _save(run: Run) -> None:
    state = {"losses": run.losses, "skipped_steps": run.skipped_steps, "seconds": run.seconds}
    checkpoint.save_checkpoint(run.out_dir, run.step, weights=_fp32_weights(run), optimizer=run.optimizer,
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


def loop(run: Run, progress: Callable[[Run, float], None]) -> float:
    """Train from `run.step` to `train.max_steps`, calling `progress(run, seconds_per_step)` after each
    step; returns the mean seconds per step."""
    cfg = run.cfg
    accumulation, step_times = cfg.train.gradient_accumulation_steps, []
    reset_peak(run.plan)
    while run.step < cfg.train.max_steps:
        started = time.perf_counter()
        first = run.step * accumulation
        step_loss = sum(_micro_step(run, first + i) for i in range(accumulation)) / accumulation
        if not _optimizer_step(run):
            run.skipped_steps += 1
        run.step += 1
        run.losses.append(step_loss)
        step_times.append(time.perf_counter() - started)
        run.seconds += step_times[-1]
        progress(run, _mean_step_time(step_times))
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


def train(cfg: Config, info: PresetInfo, data_dir: str, out_dir: str, *, resume: bool = False,
          log: Callable[[str], None] = print, progress: Callable[[Run, float], None] | None = None) -> dict:
    """Prepare, loop, export the diffusers folder and write `summary.json`; returns the summary."""
    from sdtune.export import SUMMARY, export_pipeline, export_single_file, write_json

    run = prepare(cfg, info, data_dir, out_dir, resume, log)
    seconds_per_step = loop(run, progress or (lambda run, sps: None))
    if hasattr(run.optimizer, "master_weights"):  # export the fp32 masters, not the device copies
        for name, weight in run.optimizer.master_weights(run.components.unet).items():
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
