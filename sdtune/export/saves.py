"""Intermediate saves a client loads (kohya's `save_every_n_steps` / `save_every_n_epochs`): every
`output.save_every` steps and every `output.save_every_epochs` epochs, the model as it is at that step goes
into `OUT/saves/step-NNNNNN.safetensors`, apart from the resume state in `checkpoints/` (which only sdtune
reads, and which `output.keep_checkpoints` prunes; saves are never deleted):

- a full fine-tune: the file the export writes as `model.safetensors` (in `output.save_precision`, the
  family's original layout: AUTOMATIC1111, ComfyUI, diffusers' `from_single_file`), when those clients can
  read the model; when they cannot (other sizes than the published ones, such as sdtune-tiny), one line at
  the start says so and no save is written;
- a LoRA run: the file the export writes as `lora.safetensors` (kohya's layout with each module's alpha and
  the `ss_*` / `modelspec.*` metadata: AUTOMATIC1111, ComfyUI, diffusers' `load_lora_weights`).

With `train.ema_decay` a save holds the moving average, as the export does. The run hands this module to
the loop (`sdtune.train.loop.loop(run, metrics, saves=...)`, its `Saves`), which asks it at each step:

    saving = saves.check(run)            # at the loop's start: False when off, or unreadable (said once)
    if saving and saves.due(run):
        saves.write(run)                 # every rank calls it (FSDP gathers the weights); rank 0 writes
"""

from __future__ import annotations

import logging
from contextlib import contextmanager, nullcontext
from pathlib import Path

from sdtune.train.state import Run

logger = logging.getLogger(__name__)

SAVES = "saves"


def path_at(out_dir: Path, step: int) -> Path:
    return Path(out_dir) / SAVES / f"step-{step:06d}.safetensors"


def check(run: Run) -> bool:
    """Whether this run writes saves: one is asked for, and a full fine-tune's model is one the clients
    read (else one line says why none will be written)."""
    from sdtune.export.single_file import unreadable_reason

    out, c = run.cfg.output, run.components
    if not (out.save_every or out.save_every_epochs):
        return False
    reason = "" if run.placement.method.adapter else unreadable_reason(c.unet, c.vae, list(c.text_encoders),
                                                                          c.prediction_type)
    if reason:
        logger.info(f"output.save_every: no saves will be written, as no model.safetensors would be: {reason}")
    return not reason


def due(run: Run) -> bool:
    """Whether the step just finished is one to save at: a multiple of `output.save_every` steps, or the
    step that ends every `output.save_every_epochs`-th pass over the images (`run.passes`)."""
    out, step, every = run.cfg.output, run.step, run.cfg.output.save_every_epochs
    return bool((out.save_every and step % out.save_every == 0)
                or (every and run.passes(step) // every > run.passes(step - 1) // every))


def write(run: Run) -> Path | None:
    """The save of `run.step`: its path on rank 0, None on the other ranks. A disk without room for it is
    one line, on every rank (checked first); a write the disk refuses all the same is one line too; nothing
    half-written stays."""
    from sdtune.util.files import check_space_all_ranks, disk_errors

    path, needed = path_at(run.out_dir, run.step), _bytes(run)
    fix = ("free space there and continue with --resume (from the newest checkpoint), or set "
           "output.save_every=0 and output.save_every_epochs=0")
    check_space_all_ranks(run.world, run.out_dir, needed, f"the save {path.name}", fix)
    with disk_errors(path.parent, f"the save {path.name}", fix, needed):
        if run.placement.method.adapter:
            if run.world.main:
                _write_lora(run, path)
        else:
            _write_model(run, path)
    return path if run.world.main else None


def _bytes(run: Run) -> int:
    """About what a save writes: the LoRA's fp32 weights, or every part of the model in
    output.save_precision."""
    from sdtune.export import single_file_bytes
    from sdtune.util.files import tensor_bytes

    if run.placement.method.adapter:
        return tensor_bytes(run.placement.trained_params())
    return single_file_bytes(run.components, run.cfg.output.save_precision)


def _write_lora(run: Run, path: Path) -> None:
    from sdtune.export.lora_files import kohya_metadata, save_kohya

    metadata = kohya_metadata(run.cfg, run.components, {"steps": run.step, "epoch": run.epoch},
                              len(run.stream.examples))
    path.parent.mkdir(parents=True, exist_ok=True)
    with run.ema.applied() if run.ema is not None else nullcontext():  # the moving average is the LoRA
        save_kohya(run.placement.lora, run.components.family, path.parent, metadata, name=path.name)


def _write_model(run: Run, path: Path) -> None:
    import dataclasses

    from sdtune.export import export_single_file

    components, weights = run.components, _exported_weights(run)  # under FSDP a collective call
    if not run.world.main:
        return
    if run.placement.sharded:  # a plain UNet of the gathered shards, as the export makes
        from sdtune.train.parallel import unsharded_copy

        components = dataclasses.replace(components, unet=unsharded_copy(components.unet, weights))
        weights = {}
    with _holding(components, weights):
        export_single_file(components, path.parent, name=path.name, precision=run.cfg.output.save_precision)


def _exported_weights(run: Run) -> dict:
    """What the export writes where the model's modules do not hold it, as {"<pipeline part>.<name>": tensor}
    (FSDP: the UNet's gathered state dict): the EMA's average, or an offload tier's fp32 masters."""
    if run.ema is not None:
        return run.ema.weights()
    if run.placement.sharded:
        return run.placement.weights()
    if run.tier.host_gradients:
        return {f"unet.{name}": weight for name, weight in run.placement.weights().items()}
    return {}


@contextmanager
def _holding(components, weights: dict):
    """The modules' parameters hold `weights` (no copy), then their own tensors again: training goes on."""
    from sdtune.family.base import TEXT_ENCODER_NAMES

    parts = {"unet": components.unet, **dict(zip(TEXT_ENCODER_NAMES, components.text_encoders, strict=False))}
    params = {f"{part}.{name}": p for part, module in parts.items() for name, p in module.named_parameters()}
    own = {name: params[name].data for name in weights if name in params}
    try:
        for name in own:
            params[name].data = weights[name]
        yield
    finally:
        for name, data in own.items():
            params[name].data = data
