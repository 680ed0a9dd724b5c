"""A run's checkpoints: what `sdtune.train.loop` saves of a `Run` and restores into one on `--resume`.

    save(run)       # OUT/checkpoints/step-N/: the trained weights, the EMA, the text encoder(s), the state
    restore(run)    # the newest checkpoint that verifies, checked against the run's config
    parts(run)      # the run as the checkpoint's named parts ({name: Stateful}, `sdtune.train.store`)

The file format, atomicity and verification are `sdtune.train.store`'s; this module decides what of a run
goes in: the trained fp32 weights (the placement's), `ema.safetensors` with `train.ema_decay`,
`text_encoders.safetensors` with `train.text_encoder_lr`, the tier, LR schedule and scaler, and the
counters of `state.json` (the run's progress and the EMA's updates).
"""

from __future__ import annotations

import logging
from pathlib import Path

from sdtune.config import Config
from sdtune.config.toml import from_toml, resume_conflicts
from sdtune.errors import SdtuneError
from sdtune.train import store
from sdtune.train.ema import EMA_FILE
from sdtune.train.state import Run
from sdtune.train.store import COUNTERS, OPTIMIZER, Part, Stateful

logger = logging.getLogger(__name__)

TEXT_ENCODERS_FILE = "text_encoders.safetensors"


class _Counters:
    """`state.json`'s counters: the run's progress and the EMA's update count (0 without one)."""

    def __init__(self, run: Run):
        self.run = run

    def state_dict(self) -> dict:
        return {**self.run.progress.state_dict(), "ema_updates": self.run.ema.updates if self.run.ema else 0}

    def load_state_dict(self, state: dict) -> None:
        self.run.progress.load_state_dict(state)
        if self.run.ema is not None:
            self.run.ema.updates = state["ema_updates"]


def parts(run: Run, tier: Stateful | None = None) -> dict[str, Stateful]:
    """The run's checkpoint parts by name: the trained weights (in `sharded/` instead under FSDP), the
    EMA's and the trained text encoders' weights, the tier (or `tier`, which stands in for it), the LR
    schedule, the scaler and the counters."""
    placement = run.placement
    weights = {} if placement.sharded else {placement.weights_file: Part(placement.weights, placement.restore)}
    if run.ema is not None:
        weights[EMA_FILE] = Part(run.ema.weights, run.ema.load)
    if placement.text_encoders:
        weights[TEXT_ENCODERS_FILE] = Part(placement.text_encoder_weights, placement.restore_text_encoders)
    return {**weights, OPTIMIZER: tier or run.tier, "lr_schedule": run.lr_schedule, "scaler": run.scaler,
            COUNTERS: _Counters(run)}


def save(run: Run) -> Path | None:
    """Checkpoint `run` at its step (every rank calls it; rank 0 writes, FSDP ranks write their shards); with
    output.keep_checkpoints=0 nothing is written (None)."""
    if run.cfg.output.keep_checkpoints == 0:
        return None
    return store.save_checkpoint(run.out_dir, run.step, parts=parts(run), config_toml=run.config_toml,
                                      keep=run.cfg.output.keep_checkpoints, world=run.world, sharded=_sharded(run))


def restore(run: Run) -> None:
    """Load the newest checkpoint of `run.out_dir` into the run, if there is one."""
    latest = store.latest_checkpoint(run.out_dir)
    if latest is None:
        logger.info(f"no checkpoint in {store.checkpoint_root(run.out_dir)}; starting from step 0")
        return
    saved = _check_resume_config(latest, run.cfg)
    tier = None
    if saved.memory.optimizer_offload != run.cfg.memory.optimizer_offload:  # the state's layout differs
        from sdtune.optim.convert import OtherTierState

        logger.info(f"optimizer state: from memory.optimizer_offload={saved.memory.optimizer_offload} "
                    f"to {run.cfg.memory.optimizer_offload}")
        tier = OtherTierState(run.tier, run.components.unet, latest / run.placement.weights_file)
    store.load_checkpoint(latest, parts=parts(run, tier), world=run.world, sharded=_sharded(run),
                               trained=run.placement.weights_file)
    logger.info(f"resumed from {latest} at step {run.step}")


def _sharded(run: Run):
    """The FSDP-wrapped UNet whose shards the checkpoint's `sharded/` holds; None when not sharded."""
    return run.placement.unet if run.placement.sharded else None


def _check_resume_config(latest: Path, cfg: Config) -> Config:
    """The checkpoint's config, when `cfg` differs from it only where a resume may differ."""
    saved = from_toml((latest / "config.toml").read_text(encoding="utf-8"), str(latest))
    changed = resume_conflicts(saved, cfg)
    if changed:
        raise SdtuneError(f"--resume with a different plan than {latest} ({'; '.join(changed)}); "
                          "resume with the same settings or start a new --out")
    return saved
