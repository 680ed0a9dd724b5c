"""A run's checkpoints: what `sdtune.train.loop` saves of a `Run` and restores into one on `--resume`.

    save(run)       # OUT/checkpoints/step-N/: the trained weights, the EMA, the text encoder(s), the state
    restore(run)    # the newest checkpoint that verifies, checked against the run's config

The file format, atomicity and verification are `sdtune.train.store`'s; this module decides what of a run
goes in: the trained fp32 weights (the placement's), `ema.safetensors` with `train.ema_decay`,
`text_encoders.safetensors` with `train.text_encoder_lr`, and the counters of `state.json`.
"""

from __future__ import annotations

from pathlib import Path

from sdtune.config import Config
from sdtune.config.toml import from_toml, resume_conflicts
from sdtune.errors import SdtuneError
from sdtune.train import store as checkpoint
from sdtune.train.ema import EMA_FILE

TEXT_ENCODERS_FILE = "text_encoders.safetensors"


def save(run) -> Path | None:
    """Checkpoint `run` at its step (every rank calls it; rank 0 writes, FSDP ranks write their shards); with
    output.keep_checkpoints=0 nothing is written (None)."""
    if run.cfg.output.keep_checkpoints == 0:
        return None
    state = {"losses": run.losses, "skipped_steps": run.skipped_steps, "seconds": run.seconds,
             "ema_updates": run.ema.updates if run.ema is not None else 0}
    sharded = run.placement if run.placement.sharded else None
    weights = run.placement.weights() if run.world.main and sharded is None else {}
    return checkpoint.save_checkpoint(run.out_dir, run.step, weights=weights, tier=run.tier,
                                      lr_schedule=run.lr_schedule, scaler=run.scaler, state=state,
                                      config_toml=run.config_toml, keep=run.cfg.output.keep_checkpoints,
                                      weights_file=run.placement.weights_file, world=run.world, sharded=sharded,
                                      files=_extra_files(run) if run.world.main else {})


def restore(run) -> None:
    """Load the newest checkpoint of `run.out_dir` into the run, if there is one."""
    latest = checkpoint.latest_checkpoint(run.out_dir, warn=run.log)
    if latest is None:
        run.log(f"no checkpoint in {checkpoint.checkpoint_root(run.out_dir)}; starting from step 0")
        return
    saved = _check_resume_config(latest, run.cfg)
    tier = run.tier
    if saved.memory.optimizer_offload != run.cfg.memory.optimizer_offload:  # the state's layout differs
        from sdtune.optim.convert import OtherTierState

        run.log(f"optimizer state: from memory.optimizer_offload={saved.memory.optimizer_offload} "
                f"to {run.cfg.memory.optimizer_offload}")
        tier = OtherTierState(run.tier, run.components.unet, latest / run.placement.weights_file)
    state = checkpoint.load_checkpoint(latest, restore=run.placement.restore, tier=tier, lr_schedule=run.lr_schedule,
                                       scaler=run.scaler, weights_file=run.placement.weights_file, world=run.world,
                                       sharded=run.placement if run.placement.sharded else None,
                                       files=_extra_files(run, restore=True))
    run.step, run.losses = state["step"], state["losses"]
    run.skipped_steps, run.seconds = state["skipped_steps"], state["seconds"]
    if run.ema is not None:
        run.ema.updates = state["ema_updates"]
    run.log(f"resumed from {latest} at step {run.step}")


def _check_resume_config(latest: Path, cfg: Config) -> Config:
    """The checkpoint's config, when `cfg` differs from it only where a resume may differ."""
    saved = from_toml((latest / "config.toml").read_text(encoding="utf-8"), str(latest))
    changed = resume_conflicts(saved, cfg)
    if changed:
        raise SdtuneError(f"--resume with a different plan than {latest} ({'; '.join(changed)}); "
                          "resume with the same settings or start a new --out")
    return saved


def _extra_files(run, restore: bool = False) -> dict:
    """The checkpoint's files beside the trained weights: {file name: weights}, or with `restore` {file name:
    what loads them}: the EMA's, the trained text encoder(s)'."""
    files = {}
    if run.ema is not None:
        files[EMA_FILE] = run.ema.load if restore else run.ema.weights()
    if run.placement.text_encoders:
        files[TEXT_ENCODERS_FILE] = (run.placement.restore_text_encoders if restore
                                     else run.placement.text_encoder_weights())
    return files
