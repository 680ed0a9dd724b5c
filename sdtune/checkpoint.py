"""Resumable checkpoints: `OUT/checkpoints/step-NNNNNN/`, written whole or not at all.

A checkpoint holds the UNet's fp32 master weights (`unet.safetensors`), the optimizer, LR schedule and
loss-scaler state plus the torch RNG (`training_state.pt`, read back with `weights_only=True`; the nvme
offload tier adds its state file, `optimizer_state.bin`), the
resolved config (`config.toml`), and `state.json` (step, losses, python RNG), written last. It is built
under a temporary name and renamed into place, so a killed run never leaves a half checkpoint as the
newest. The last `keep` checkpoints are kept.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

from sdtune.errors import SdtuneError

CHECKPOINTS = "checkpoints"
STATE = "state.json"


def checkpoint_root(out_dir: Path) -> Path:
    return Path(out_dir) / CHECKPOINTS


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp") and (p / STATE).is_file()]
    return sorted(done, key=lambda p: p.name)


def latest_checkpoint(out_dir: Path) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def save_checkpoint(out_dir: Path, step: int, *, weights: dict, optimizer, lr_schedule, scaler, state: dict,
                    config_toml: str, keep: int) -> Path:
    import torch
    from safetensors.torch import save_file

    final = checkpoint_root(out_dir) / f"step-{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().float().contiguous().cpu() for k, v in weights.items()}, tmp / "unet.safetensors")
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save({"optimizer": optimizer.state_dict(), "lr_schedule": lr_schedule.state_dict(),
                "scaler": scaler.state_dict(), "rng": rng}, tmp / "training_state.pt")
    if hasattr(optimizer, "save_state_files"):  # optimizer state kept in files (the nvme tier)
        optimizer.save_state_files(tmp)
    (tmp / "config.toml").write_text(config_toml, encoding="utf-8")
    python_rng = random.getstate()
    payload = {**state, "step": step, "python_rng": [python_rng[0], list(python_rng[1]), python_rng[2]]}
    (tmp / STATE).write_text(json.dumps(payload))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(out_dir)[:-keep]:
        shutil.rmtree(old)
    return final


def load_checkpoint(path: Path, *, unet, optimizer, lr_schedule, scaler) -> dict:
    """Restore everything `save_checkpoint` wrote into the live objects; return the saved `state.json`."""
    import torch
    from safetensors.torch import load_file

    try:
        weights = load_file(path / "unet.safetensors")
        training = torch.load(path / "training_state.pt", map_location="cpu", weights_only=True)
        state = json.loads((path / STATE).read_text())
    except (OSError, RuntimeError, ValueError) as exc:
        raise SdtuneError(f"checkpoint {path} is unreadable ({exc}); delete it to resume from an older one") from None
    unet.load_state_dict(weights)
    optimizer.load_state_dict(training["optimizer"])
    if hasattr(optimizer, "load_state_files"):
        optimizer.load_state_files(path)
    lr_schedule.load_state_dict(training["lr_schedule"])
    scaler.load_state_dict(training["scaler"])
    torch.set_rng_state(training["rng"]["torch"])
    if "cuda" in training["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(training["rng"]["cuda"])
    version, internal, gauss = state.pop("python_rng")
    random.setstate((version, tuple(internal), gauss))
    return state
