"""The training loop: one explicit loop that accumulates, scales, clips, steps, logs, samples and saves.

    run = prepare(cfg, info, "images/", "out/", resume=False)  # lines: logging.getLogger("sdtune")
    loop(run, metrics)            # metrics: a sdtune.train.metrics.MetricsLogger, one record a step
    result = train_step(run)      # or one optimizer step at a time: its loss, whether it stepped, its phases

`prepare` checks the data and the plan before any model is loaded, places the model for the plan
(`sdtune.train.placement`) and restores the newest checkpoint on `resume`. Each micro-batch's images, noise and
timesteps are a function of (seed, micro-batch index) (`micro_batch_seed`): a resumed run continues exactly.
The micro-batches load through `sdtune.data.batches` (prefetch, broken images); the loss only computes.
`SDTUNE_PROFILE=1` adds each step's phase seconds to its record (`sdtune.train.metrics.Phases`).

What can go wrong mid-run is handled here too: SIGINT/SIGTERM finish the step, save a checkpoint and raise
`Interrupted`; a step whose loss (or, without fp16 loss scaling, gradient norm) is NaN/Inf is skipped, and
`train.max_bad_steps` of them in a row stop the run. Running out of GPU memory raises torch's own
`OutOfMemoryError`: what to do about it is the run's business (`sdtune.run`), not the loop's.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from sdtune.config import Config, PresetInfo, load_config, preset_names
from sdtune.config.toml import to_toml
from sdtune.data import BatchStream, captions, scan_folder
from sdtune.data.batches import MicroBatch, MicroBatches
from sdtune.data.features import Features
from sdtune.errors import SdtuneError
from sdtune.optim.schedule import make_lr_schedule, step_schedule
from sdtune.plan import autocast, peak_bytes, reset_peak, resolve_plan
from sdtune.sample_prompts import prompt_specs
from sdtune.train import objective, store
from sdtune.train.checkpoint import restore as _restore
from sdtune.train.checkpoint import save as _save
from sdtune.train.ema import make_ema
from sdtune.train.method import method_for
from sdtune.train.metrics import Phases, StepRecord
from sdtune.train.placement import place
from sdtune.train.samples import draw_samples
from sdtune.train.signals import Interrupted, StopOnSignal
from sdtune.train.state import Progress, Run, steps_per_epoch
from sdtune.train.validation import validation_set
from sdtune.util.world import World

__all__ = ["Interrupted", "Progress", "Run", "StepResult", "evaluation_mode", "fp32_weights", "loop", "micro_step",
           "prepare", "steps_per_epoch", "train_step"]

logger = logging.getLogger(__name__)


def _scan(data_dir: str | None, cfg: Config, out_dir: str):
    """The training images (the --data folder's, or every data.subsets table's), with every skipped file, the
    counts and the scan's warnings and notes logged. The output, class, validation and mask folders are never
    training images, wherever they are."""
    from sdtune.data.scan import not_training_folders

    exclude = (out_dir, *not_training_folders(cfg.data))
    if cfg.data.subsets:
        scan, data_dir = _scan_subsets(cfg, exclude), f"{len(cfg.data.subsets)} subsets"
    else:
        scan = scan_folder(data_dir, cfg.data, exclude=exclude)
    for note in scan.notes:
        logger.info(f"note: {note}")
    for skip in scan.skipped:
        logger.info(f"skipped {skip.path} ({skip.kind}): {skip.detail}")
    counted = sum(e.repeats for e in scan.examples)
    logger.info(f"{len(scan.examples):,} images from {data_dir}"
                + (f", {counted:,} with repeats" if counted != len(scan.examples) else ""))
    if scan.skipped:
        logger.info(scan.summary())
    for warning in scan.warnings:
        logger.warning(warning)
    return scan


def _scan_subsets(cfg: Config, exclude):
    """The data.subsets tables' images, each subset's counts said; an error when only is_reg ones have any."""
    from sdtune.data.scan import joined, scan_subsets

    scans = scan_subsets(cfg.data, exclude)
    for subset, scan in zip(cfg.data.subsets, scans, strict=True):
        kind = " (is_reg: class images)" if subset.is_reg else ""
        logger.info(f"subset {subset.dir}: {len(scan.examples):,} images x {subset.repeats} repeats{kind}")
    scan = joined(scans)
    if not any(not cfg.data.subsets[e.subset].is_reg for e in scan.examples):
        raise SdtuneError("no usable training images in the data.subsets that are not is_reg (" + ", ".join(
            s.dir for s in cfg.data.subsets if not s.is_reg) + "); `sdtune data check` shows why")
    return scan


def _split_regularisation(cfg: Config, examples: list) -> tuple[list, list]:
    """(training examples, class examples): the is_reg subsets' images are the class images."""
    regs = {i for i, subset in enumerate(cfg.data.subsets) if subset.is_reg}
    if regs and not any(e.subset in regs for e in examples):
        raise SdtuneError("no usable class images in the is_reg data.subsets (" + ", ".join(
            cfg.data.subsets[i].dir for i in sorted(regs)) + "); `sdtune data check` shows why")
    return [e for e in examples if e.subset not in regs], [e for e in examples if e.subset in regs]


def _run_length(cfg: Config, stream: BatchStream) -> Config:
    """`cfg` with train.max_steps from train.max_epochs: the steps whose micro-batches cover that many
    passes, rounded up (the last step may take up to accumulation - 1 batches of the next pass). A warm-up
    longer than the run is cut to it (`TrainConfig.warmup_steps`): said here."""
    train = cfg.train
    batches, accumulation = stream.batches_per_epoch, train.gradient_accumulation_steps
    if train.max_epochs:
        steps = math.ceil(train.max_epochs * batches / accumulation)
        per_epoch = steps_per_epoch(batches, accumulation)
        within = (f"; {batches:,} batches an epoch, {accumulation} a step: a step can end one epoch and begin "
                  "the next") if isinstance(per_epoch, float) else ""
        logger.info(f"train.max_epochs={train.max_epochs}: {steps:,} steps ({per_epoch:,} an epoch{within}); it "
                    f"overrides train.max_steps={train.max_steps}, as kohya's max_train_epochs overrides "
                    "max_train_steps")
        train = dataclasses.replace(train, max_steps=steps)
    if train.lr_warmup_steps > train.max_steps:
        logger.info(f"note: train.lr_warmup_steps={train.lr_warmup_steps} is longer than the run: the learning "
                    f"rate warms up over its {train.max_steps:,} step{'s' if train.max_steps > 1 else ''} instead")
    return dataclasses.replace(cfg, train=train)


def _check_resolution(components, cfg: Config) -> None:
    """A line when the plan trains well below the model's native size (an SD-card plan on SDXL, 512 px),
    naming the shipped presets made for that size that train as this run does (train.method)."""
    native = components.unet.config.sample_size * 2 ** (len(components.vae.config.block_out_channels) - 1)
    if cfg.data.resolution < 0.75 * native:
        fitting = [name for name in preset_names() if (own := load_config(name)[0]).data.resolution == native
                   and own.train.method == cfg.train.method]
        fix = f"use a preset made for {native} px ({', '.join(fitting)}) or " if fitting else ""
        logger.warning(f"the model was trained at {native} px and data.resolution is {cfg.data.resolution}: it "
                       f"would learn to draw at the smaller size; {fix}--set data.resolution={native}")


def _check_caption_lengths(examples, components, data) -> None:
    """A warning when captions are longer than the text encoder reads (their tails would never train)."""
    from sdtune.data.tokens import cut_captions, shortest

    rendered = [(e.image, captions.fixed(e.caption, data)) for e in examples]  # with prefix and suffix
    cut = cut_captions(rendered, shortest(components.tokenizers), components.text.max_token_length)
    if cut.count:
        logger.warning(cut.line())


def prepare(cfg: Config, info: PresetInfo, data_dir: str | None, out_dir: str, resume: bool,
            world: World | None = None) -> Run:
    """Scan the data, resolve the plan, load and place the model, generate missing class images (prior
    preservation), prepare the features; with `resume`, continue from the newest checkpoint in `out_dir`.
    Under a launcher (`world`), every rank does all of it; rank 0 fills the caches first."""
    from diffusers import DDPMScheduler

    from sdtune.family.load import check_source
    from sdtune.family.scratch import load_for_training

    check_source(cfg.model.pretrained, cfg.model.config)  # a wrong --model is said before the data is scanned
    samples = prompt_specs(cfg, logger.warning)  # a bad prompt line too
    world = world or World()
    plan = resolve_plan(cfg, report=True, preset=info, world=world)
    world.start(plan.device)
    with world.main_first():  # the other ranks then find every image in the scan cache
        scan = _scan(data_dir, cfg, out_dir)
        examples, regularisation = _split_regularisation(cfg, scan.examples)
        examples, held_out = validation_set(cfg, examples)
    meta = plan.distributed == "fsdp" and not method_for(cfg).frozen_unet  # each rank reads its shards only
    components = load_for_training(cfg.model, cfg.train.seed, cfg.train, meta_unet=meta)  # with its noise schedule
    if components.origin:  # a single file alone: which configs and tokenizers stand in for a diffusers folder
        logger.info(components.origin)
    _check_resolution(components, cfg)
    components.family.read_text(components, cfg.data.max_token_length, cfg.train.clip_skip)
    if components.text.note():
        logger.info(components.text.note())
    _check_caption_lengths(examples, components, cfg.data)
    placement = place(components, plan, cfg)
    global_batch = cfg.train.batch_size * world.size  # rank r trains on its share of each
    stream = BatchStream(examples, cfg.data, global_batch, cfg.train.seed)
    cfg = _run_length(cfg, stream)
    features = Features(components, cfg.data, plan, text_grad=placement.method.trains_text_encoders)
    run = Run(cfg=cfg, plan=plan, components=components, out_dir=Path(out_dir), config_toml=to_toml(cfg, info),
              features=features, stream=stream, placement=placement, world=world,
              lr_schedule=make_lr_schedule(placement.tier.optimizer, cfg.train),
              scaler=placement.tier.make_scaler(plan.device, enabled=plan.loss_scaling),
              # the model's schedule: its betas rescaled where the scheduler says rescale_betas_zero_snr
              alphas_cumprod=DDPMScheduler.from_config(components.scheduler.config).alphas_cumprod,
              ema=make_ema(placement, cfg.train), validation=held_out, samples=samples)
    sources = [(stream, examples)] + ([(held_out.stream, held_out.examples)] if held_out else [])
    if cfg.prior_preservation:  # drawn by the base model: before the checkpoint's weights are restored
        from sdtune.train.dreambooth import class_config, class_images

        if regularisation:  # is_reg subsets: their own settings and captions (class_tokens)
            examples, data = regularisation, cfg.data
            logger.info(f"prior preservation: {len(examples):,} class images from the is_reg subsets, prior loss "
                        f"weight {cfg.train.prior_loss_weight:g}")
        else:
            examples = class_images(cfg, components, plan, sample_context=lambda: evaluation_mode(run), world=world)
            data = class_config(cfg)
        classes = BatchStream(examples, data, global_batch, cfg.train.seed + 1)
        run = dataclasses.replace(run, class_stream=classes)
        sources.append((classes, examples))
    objective_of(run)  # what only the model decides (a v-scaled loss on an epsilon model) is refused here
    features.prepare(sources, world)  # with caches: encode what is missing (each rank a share), park the encoders
    if resume:
        _restore(run)
    return run


SEED_STRIDE = 1_000_003  # a prime: the seeds of two runs' micro-batches meet only a million batches apart
CLASS_SEED = 2**40  # added for the class half of a micro-batch (prior preservation): its own noise


def micro_batch_seed(seed: int, index: int, salt: int = 0) -> int:
    """The seed of micro-batch `index`'s draws (the VAE's sample, the noise, the timesteps) in a run of
    train.seed `seed`: a function of the two alone, so a resumed run draws what the straight one did."""
    return seed * SEED_STRIDE + index + salt


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step did (`train_step`)."""

    loss: float                 # the global batch's mean loss over the micro-batches (NaN/Inf: skipped)
    stepped: bool               # False: skipped (a NaN/Inf loss or gradient, or an fp16 overflow)
    learning_rate: float        # the rate the step used
    bad: bool                   # counts towards train.max_bad_steps (an fp16 overflow is the scaler's business)
    phases: dict[str, float]    # with SDTUNE_PROFILE=1: StepRecord's "<phase>_seconds" (`Phases`); else empty


def train_step(run: Run) -> StepResult:
    """Optimizer step `run.step + 1`: the EMA's before and after, each micro-batch's forward and backward,
    the loss averaged over the ranks, the tier's step (or a skip) and the LR schedule; `run.progress`
    records it. With SDTUNE_PROFILE=1 the result carries each phase's seconds."""
    started, phases = time.perf_counter(), Phases.from_env(run.plan.device)
    waited = run.tier.host_wait_seconds  # the tier's clock, read anyway: a float, no sync
    accumulation = run.cfg.train.gradient_accumulation_steps
    first, learning_rate = run.step * accumulation, run.optimizer.param_groups[0]["lr"]
    if run.ema is not None:
        run.ema.before_step(run.step + 1)
    step_loss = sum(micro_step(run, first + i, last=i == accumulation - 1, phases=phases)
                    for i in range(accumulation)) / accumulation
    step_loss = run.world.mean(step_loss)  # the global batch's: every rank decides alike
    with phases("optimizer"):
        stepped = optimizer_step(run, math.isfinite(step_loss))
    if run.ema is not None:
        run.ema.after_step(stepped)
    phases.add("host_wait", run.tier.host_wait_seconds - waited)  # inside forward_backward and optimizer
    run.progress.finish_step(step_loss, stepped, time.perf_counter() - started)
    bad = not math.isfinite(step_loss) or not (stepped or run.scaler.is_enabled())
    return StepResult(step_loss, stepped, learning_rate, bad, phases.fields())


def micro_step(run: Run, index: int, last: bool = True, phases: Phases | None = None) -> float:
    """Forward and backward of micro-batch `index`; returns its (unscaled, unweighted-by-accumulation) loss:
    with prior preservation, instance loss + train.prior_loss_weight x class loss, one backward each.
    The loss is read after backward is queued (the host does not wait for the GPU in between), except
    where gradients reach the weights during backward (`step_in_backward`): a NaN/Inf loss skips it.
    Under DDP only the `last` micro-batch's last backward averages the gradients over the ranks."""
    train, phases = run.cfg.train, phases or Phases(run.plan.device)
    halves = [(run.stream, 0, 1.0)]
    if run.class_stream is not None:
        halves.append((run.class_stream, CLASS_SEED, train.prior_loss_weight))
    total = 0.0
    for stream, salt, weight in halves:
        with phases("data"):
            batch = _batches(run, stream).load(index, micro_batch_seed(train.seed, index, salt))
        with phases("forward_backward"):
            value = loss(run, batch)
            if run.tier.step_in_backward and not math.isfinite(value.item()):
                return value.item()
            try:
                scaled = value / train.gradient_accumulation_steps  # the instance half: as without prior preservation
                with run.placement.no_sync(last and stream is halves[-1][0]):
                    run.scaler.scale(scaled if weight == 1.0 else scaled * weight).backward()
            except BaseException:
                run.tier.zero_grad()  # nothing of a half-done backward reaches a later step
                raise
        total += weight * value.item()
    return total


def _batches(run: Run, stream: BatchStream) -> MicroBatches:
    return MicroBatches(stream, run.features, run.world, run.plan.device)


def micro_batch_loss(run: Run, stream: BatchStream, index: int, salt: int = 0):
    """The diffusion loss of this rank's share of micro-batch `index` of `stream` (its draws seeded as
    training seeds them, `salt` added): what `micro_step` takes the backward of."""
    return loss(run, _batches(run, stream).load(index, micro_batch_seed(run.cfg.train.seed, index, salt)))


def loss(run: Run, batch: MicroBatch):
    """The diffusion loss of `batch`, its noise and timesteps drawn by its generator for the whole global
    batch (`sdtune.util.world`), this rank's rows kept; the run's noise and loss knobs (`objective_of`); with
    data.masked_loss each cell weighted by its mask."""
    c, plan, latents = run.components, run.plan, batch.latents
    cond = run.features.text([item.caption for item in batch.items])
    added = c.family.added_cond(cond, batch.items, latents.device, plan.working_dtype)
    goal, shape = objective_of(run), (batch.size, *latents.shape[1:])
    draw = goal.draw(shape, batch.generator, latents.device, latents.dtype).rows(batch.rows)
    return objective.batch_loss(run.placement.model, latents, draw, cond.hidden, added, objective=goal,
                                mask=batch.mask, forward=lambda: autocast(plan))


def objective_of(run: Run) -> objective.Objective:
    """The run's objective: train.*'s noise and loss knobs on the schedule and target it trains with."""
    return objective.Objective.from_config(run.cfg.train, run.alphas_cumprod, run.components.prediction_type)


def optimizer_step(run: Run, finite_loss: bool = True) -> bool:
    """Step the tier (it unscales, clips and checks), or skip the step after a NaN/Inf loss; drop the
    gradients and step the LR schedule either way. False when the step was skipped."""
    stepped = finite_loss and run.tier.step(run.scaler, run.cfg.train.max_grad_norm)
    if not finite_loss:
        run.tier.grad_norm = None
    run.tier.zero_grad()  # the offload tiers: the next backward replaces them
    step_schedule(run.lr_schedule, stepped)
    return stepped


def fp32_weights(run: Run) -> dict:
    """What trains, in fp32, wherever the tier keeps it: the UNet's weights, or the LoRA adapters'."""
    return run.placement.weights()


@contextmanager
def evaluation_mode(run: Run):
    """The model ready to draw images: the trained modules in eval mode (no LoRA dropout), autocast, the
    parked encoders on the device; back to training afterwards."""
    trained = {run.components.unet, *run.placement.modules.values()}  # (a LoRA's modules: the UNet with adapters)
    for module in trained:
        module.eval()
    try:
        with autocast(run.plan), run.features.on_device():
            yield
    finally:
        for module in trained:
            module.train()


def _too_many_bad_steps(run: Run, count: int) -> SdtuneError:
    latest = store.latest_checkpoint(run.out_dir)
    kept = f"the newest checkpoint, {latest}, is kept" if latest else "no checkpoint was written yet"
    return SdtuneError(f"{count} steps in a row had a NaN/Inf loss or gradient, the last at step {run.step}; "
                       f"stopped ({kept}; skipped steps never change the weights). Try a lower "
                       "train.learning_rate, or memory.precision=bf16 or fp32 instead of fp16, in a new run; "
                       "train.max_bad_steps=0 never stops")


class _NoMetrics:
    def log(self, record: StepRecord) -> None:
        pass

    def image(self, tag: str, step: int, image) -> None:
        pass


def _record(run: Run, result: StepResult, validation: dict) -> StepRecord:
    seconds = run.seconds_per_step or 0.0
    images = run.cfg.train.batch_size * run.cfg.train.gradient_accumulation_steps
    return StepRecord(step=run.step, loss=result.loss, learning_rate=result.learning_rate,
                      grad_norm=run.tier.grad_norm, seconds_per_step=seconds,
                      images_per_second=images / seconds if seconds else 0.0, peak_memory_bytes=peak_bytes(run.plan),
                      skipped_steps=run.skipped_steps, epoch=run.epoch, average_loss=run.average_loss,
                      **result.phases, **validation)


class Saves(Protocol):
    """What writes the model a client loads during the run (`sdtune.export.saves`, handed over by the run:
    the loop never imports export)."""

    def check(self, run: Run) -> bool: ...

    def due(self, run: Run) -> bool: ...

    def write(self, run: Run) -> Path: ...


def loop(run: Run, metrics=None, saves: Saves | None = None) -> None:
    """Train from `run.step` to `train.max_steps`, sending `metrics` (a `sdtune.train.metrics.MetricsLogger`, or
    anything with its `log` and `image`) one `StepRecord` after each step and the validation grids; with
    `saves`, the intermediate saves it asks for (`output.save_every`).
    Raises `Interrupted` after SIGINT/SIGTERM (a checkpoint saved) and SdtuneError after
    `train.max_bad_steps` NaN/Inf steps in a row."""
    cfg, metrics, bad_in_a_row = run.cfg, metrics or _NoMetrics(), 0
    reset_peak(run.plan)
    saving = saves is not None and saves.check(run)
    if cfg.output.sample_at_start and run.step == 0:  # the base model's grid, to compare the others with
        logger.info(f"samples: {draw_samples(run, metrics, evaluation_mode(run))}")
    with StopOnSignal() as stop:
        while run.step < cfg.train.max_steps:
            result = train_step(run)
            bad_in_a_row = bad_in_a_row + 1 if result.bad else 0
            due = cfg.output.validate_every and run.step % cfg.output.validate_every == 0
            validation = run.validation.evaluate(run, evaluation_mode(run)) if due else {}
            metrics.log(_record(run, result, validation))
            if cfg.train.max_bad_steps and bad_in_a_row >= cfg.train.max_bad_steps:
                raise _too_many_bad_steps(run, bad_in_a_row)
            if run.world.any(bool(stop.signum)):  # a signal that reached one rank stops all of them here
                raise Interrupted(stop.signum or signal.SIGTERM, run.step, _save(run))
            if cfg.output.sample_every and run.step % cfg.output.sample_every == 0:
                logger.info(f"samples: {draw_samples(run, metrics, evaluation_mode(run))}")
            if saving and saves.due(run):
                logger.info(f"saved {saves.write(run)}")
            every = cfg.output.checkpoint_every
            if (every and run.step % every == 0) or run.step == cfg.train.max_steps:
                _save(run)
