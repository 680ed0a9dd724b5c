"""Resumable checkpoints: `OUT/checkpoints/step-NNNNNN/`, written whole or not at all.

A checkpoint holds what trains, in fp32: the UNet's master weights (`unet.safetensors`) or, with
`train.method=lora`, only the LoRA adapters (`lora.safetensors`, the base is not copied); with
`train.ema_decay` their moving average (`ema.safetensors`), with `train.text_encoder_lr` the text
encoder(s) (`text_encoders.safetensors`); the optimizer, LR schedule and
loss-scaler state plus the torch RNG (`training_state.pt`, read back with `weights_only=True`; the cpu and
nvme offload tiers keep their masters and moments in `optimizer_state.bin`, which the cpu tier reads back
straight into its buffers, so that resuming needs no more RAM than training), the resolved config
(`config.toml`), and
`state.json` (step, losses, python and numpy RNG, and a manifest of every other file's size and sha256),
written last. It is built under a temporary name, flushed to disk (fsync) and renamed into place, so a
killed run never leaves a half checkpoint as the newest; one damaged later (a bad disk, a copy cut
short) fails its manifest and the one before it is used, with a warning. The last `keep` are kept.

What goes in is a `{name: Stateful}` of parts, as torchtitan's checkpointer takes them; the name says
where a part lands (the format above is fixed, so the names are too):

    save_checkpoint(out, 40, parts={"unet.safetensors": weights, "optimizer": tier, "lr_schedule": schedule,
                                    "scaler": scaler, "state": counters}, config_toml=text, keep=2)
    load_checkpoint(latest_checkpoint(out), parts=same_names)
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from sdtune.errors import SdtuneError
from sdtune.util.files import check_space_all_ranks, disk_errors, save_safetensors, sha256_file, sync, tensor_bytes
from sdtune.util.run_folder import STATE, checkpoint_root, list_checkpoints
from sdtune.util.world import World

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    import torch

    from sdtune.optim.tier import Tier

OPTIMIZER = "optimizer"  # the tier: its state in training_state.pt (or sharded/), its own files, its masters
TRAINING = ("lr_schedule", "scaler")  # the other parts training_state.pt holds, by these names
COUNTERS = "state"  # the counters of state.json (step, losses, ...)
WEIGHTS_SUFFIX = ".safetensors"  # a part named like this is a file of fp32 weights


class Stateful(Protocol):
    """A named part of a checkpoint, as torch.distributed.checkpoint's `Stateful` (torchtitan's shape)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass(frozen=True)
class Part:
    """A `Stateful` of two callables: a placement's `weights` and `restore`, say."""

    save: Callable[[], dict]
    load: Callable[[dict], None]

    def state_dict(self) -> dict:
        return self.save()

    def load_state_dict(self, state: dict) -> None:
        self.load(state)


def verify(path: Path) -> str | None:
    """What is wrong with checkpoint `path` (a missing, resized or altered file), or None when it is whole."""
    try:
        manifest = json.loads((path / STATE).read_text())["manifest"]
    except (OSError, ValueError, KeyError) as exc:
        return f"no readable manifest ({exc})"
    for name, expected in manifest.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != expected["bytes"]:
            return f"{name} has {file.stat().st_size} bytes, not {expected['bytes']}"
        if sha256_file(file) != expected["sha256"]:
            return f"{name} does not match its checksum"
    return None


def latest_checkpoint(out_dir: Path, report: bool = True) -> Path | None:
    """The newest checkpoint that verifies; each newer one that does not is passed over (and, on `report`,
    logged as a warning)."""
    for path in reversed(list_checkpoints(out_dir)):
        problem = verify(path)
        if problem is None:
            return path
        if report:
            logger.warning(f"checkpoint {path} is damaged ({problem}); using the one before it")
    return None


def save_checkpoint(out_dir: Path, step: int, *, parts: Mapping[str, Stateful], config_toml: str, keep: int,
                    world: World | None = None, sharded: torch.nn.Module | None = None) -> Path:
    """Write checkpoint `step` of `parts` whole or not at all. Refused with one line, before anything is
    written, when the disk has less free than it will take (the larger of its estimate and the previous
    checkpoint's size); a write the OS refuses all the same (a full disk) removes the half-written folder and
    is one line saying which folder, how much it needs, how much is free and that the previous checkpoint is
    intact. Folders of earlier unfinished writes (`step-N.tmp`) are removed first, and with `keep` >= 2 the
    oldest checkpoint beyond `keep - 1` too (the disk holds `keep` at most).

    Several processes (`world`) all call it: every rank's torch RNG goes into rank 0's files; with
    `sharded` (an FSDP-wrapped UNet) every rank first writes its and the optimizer's shards into `sharded/`
    (torch.distributed.checkpoint); rank 0 then writes the rest and `state.json`, whose manifest covers every
    rank's files, and renames the folder into place. No rank goes on before."""
    world = world or World()
    root = checkpoint_root(out_dir)
    final = root / f"step-{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    previous = latest_checkpoint(out_dir, report=False) if world.main else None
    rngs = world.gather(_rng_state())
    kept = f"{previous.name} is intact" if previous else "no earlier checkpoint exists"
    fix = f"{kept}; free space there and continue with --resume"
    needed, tier = 0, parts[OPTIMIZER]
    if world.main:
        _remove_unfinished(root)
        _prune_before(out_dir, previous, keep)
        state = {**parts[COUNTERS].state_dict(), "world_size": world.size}
        files = {name: part.state_dict() for name, part in parts.items() if name.endswith(WEIGHTS_SUFFIX)}
        training = _training_state(parts, rngs, optimizer=sharded is None)
        needed = max(_estimate(files, training, tier, state, config_toml), _size(previous))
    check_space_all_ranks(world, root, needed, f"checkpoint {final.name}", fix)  # none waits at a barrier
    def remove_tmp() -> None:
        shutil.rmtree(tmp, ignore_errors=True)

    with disk_errors(root, f"checkpoint {final.name}", fix, needed, cleanup=remove_tmp):
        if world.main:
            tmp.mkdir(parents=True)
        if sharded is not None:
            from sdtune.train.parallel import SHARDED, save_sharded

            world.barrier()
            save_sharded(tmp / SHARDED, sharded, tier.optimizer)
            world.barrier()
        if world.main:
            _write_files(tmp, step, _Contents(files, training, tier, state, config_toml))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            sync(final.parent)
    if world.main:
        for old in list_checkpoints(out_dir)[:-keep]:
            shutil.rmtree(old)
    world.barrier()
    return final


def _prune_before(out_dir: Path, previous: Path | None, keep: int) -> None:
    """Make room before writing: of `keep` checkpoints, the oldest goes now rather than after the new one is
    written, so that the disk holds `keep` checkpoints at most, not `keep + 1`. Only checkpoints older than
    `previous` (the newest that verifies), so that a failed write still leaves it."""
    if previous is None or keep < 2:
        return
    for old in list_checkpoints(out_dir)[:-(keep - 1)]:
        if old.name < previous.name:
            shutil.rmtree(old)


def _remove_unfinished(root: Path) -> None:
    """Delete the `step-N.tmp` folders a killed or failed write left: they only hold the disk."""
    for unfinished in root.glob("step-*.tmp"):
        shutil.rmtree(unfinished, ignore_errors=True)


def _estimate(files: dict[str, dict], training: dict, tier, state: dict, config_toml: str) -> int:
    """Bytes the checkpoint will take: its fp32 weights, the training state's tensors, the tier's files, and
    a margin for the rest (headers, pickling, the config and `state.json`)."""
    weights = sum(4 * tensor.numel() for tensors in files.values() for tensor in tensors.values())
    small = len(config_toml) + len(json.dumps(state, default=str)) + 2**20
    return weights + tensor_bytes(training) + tier.file_bytes() + small


def _size(checkpoint: Path | None) -> int:
    """The bytes of a checkpoint as its manifest lists them (0 for none): the next one is as large."""
    if checkpoint is None:
        return 0
    manifest = json.loads((checkpoint / STATE).read_text())["manifest"]
    return sum(entry["bytes"] for entry in manifest.values())


def _check_world(path: Path, saved: int, size: int) -> None:
    """Resume on the world size that wrote the checkpoint: its data shares, RNG streams and (FSDP) shards
    are laid out for it."""
    if saved != size:
        processes = "1 process" if saved == 1 else f"{saved} processes"
        raise SdtuneError(f"checkpoint {path} was written by {processes} and this run has {size}; resume it with "
                          f"{processes} (torchrun --nproc-per-node ...), or start a new --out")


def _rng_state() -> dict:
    import torch

    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def _training_state(parts: Mapping[str, Stateful], rngs: list, optimizer: bool = True) -> dict:
    """What `training_state.pt` holds; `optimizer` false: the AdamW state is in `sharded/` already."""
    training = {name: parts[name].state_dict() for name in TRAINING} | {"rng": rngs[0]}
    if len(rngs) > 1:
        training["rank_rng"] = rngs
    if optimizer:
        training[OPTIMIZER] = parts[OPTIMIZER].state_dict()
    return training


@dataclass(frozen=True)
class _Contents:
    """What rank 0 writes into the folder, `state.json` last."""

    files: dict[str, dict]   # {file name: fp32 weights}
    training: dict           # training_state.pt
    tier: Tier               # its own files (the nvme tier's state)
    state: dict              # state.json's counters
    config_toml: str


def _write_files(folder: Path, step: int, contents: _Contents) -> None:
    """Rank 0's files: the fp32 weights, the training state, the tier's files, and `state.json` last."""
    import numpy as np
    import torch
    for name, weights in contents.files.items():
        save_safetensors({k: v.detach().float().contiguous().cpu() for k, v in weights.items()}, folder / name)
    with open(folder / "training_state.pt", "wb") as file:  # a file object: a failed write keeps its OSError
        torch.save(contents.training, file)
    contents.tier.save_files(folder)  # optimizer state kept in files (the nvme tier)
    (folder / "config.toml").write_text(contents.config_toml, encoding="utf-8")
    manifest = {}
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        sync(file)
        manifest[file.relative_to(folder).as_posix()] = {"bytes": file.stat().st_size, "sha256": sha256_file(file)}
    python_rng = random.getstate()
    numpy_rng = np.random.get_state()
    payload = {**contents.state, "step": step, "python_rng": [python_rng[0], list(python_rng[1]), python_rng[2]],
               "numpy_rng": [numpy_rng[0], numpy_rng[1].tolist(), *numpy_rng[2:]], "manifest": manifest}
    (folder / STATE).write_text(json.dumps(payload))  # last: its presence marks the checkpoint complete
    sync(folder / STATE)
    sync(folder)


def load_checkpoint(path: Path, *, parts: Mapping[str, Stateful], world: World | None = None,
                    sharded: torch.nn.Module | None = None, trained: str = "unet.safetensors") -> dict:
    """Restore everything `save_checkpoint` wrote into `parts` (with `sharded`, each rank's shards into it);
    return the saved `state.json`. A checkpoint resumes on the number of processes that wrote it
    (SdtuneError otherwise). `training_state.pt` is read with `weights_only=True`: a tampered file cannot
    run code.

    Resuming fits where training fits: the tier reads its state into the buffers it trains with (the host
    tier's file straight into its buckets), weights it restored that way are not read again from the
    `trained` weights file, and each file is read only once what was read before it is in place and freed."""
    import torch

    world, tier = world or World(), parts[OPTIMIZER]
    state = _read(path, STATE, lambda file: json.loads(file.read_text()))
    _check_world(path, state.get("world_size", 1), world.size)
    training = _read(path, "training_state.pt",
                     lambda file: torch.load(file, map_location="cpu", weights_only=True))
    if sharded is None:
        tier.load_state_dict(training.pop(OPTIMIZER))
    else:
        from sdtune.train.parallel import SHARDED, load_sharded

        load_sharded(path / SHARDED, sharded, tier.optimizer)
    tier.load_files(path)
    for name, part in parts.items():
        if name.endswith(WEIGHTS_SUFFIX):
            reusable = tier.restored_weights() if name == trained else {}  # the others: read whole
            part.load_state_dict(_read(path, name, lambda file, kept=reusable: _weights(file, kept)))
    for name in TRAINING:
        parts[name].load_state_dict(training[name])
    _set_rng(training["rank_rng"][world.rank] if "rank_rng" in training else training["rng"], state)
    if COUNTERS in parts:
        parts[COUNTERS].load_state_dict(state)
    return state


def _set_rng(rng: dict, state: dict) -> None:
    """The torch, CUDA, python and numpy generators as the checkpoint left them (popped from `state`)."""
    import numpy as np
    import torch

    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    version, internal, gauss = state.pop("python_rng")
    random.setstate((version, tuple(internal), gauss))
    if "numpy_rng" in state:
        kind, keys, *rest = state.pop("numpy_rng")
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    state.pop("manifest", None)


def _read(path: Path, name: str, reader: Callable[[Path], object]):
    """`reader(path / name)`; a file that cannot be read is one line naming the checkpoint."""
    try:
        return reader(path / name)
    except pickle.UnpicklingError:
        raise SdtuneError(f"checkpoint {path} is unreadable ({name} holds objects other than tensors and plain "
                          "data; sdtune never unpickles code); delete it to resume from an older one") from None
    except (OSError, RuntimeError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SdtuneError(f"checkpoint {path} is unreadable ({first}); delete it to resume from an older one") from None


def _weights(file: Path, restored: dict) -> dict:
    """The tensors of the safetensors `file`; one that `restored` holds already (by name, fp32, of its shape:
    the tier's masters, which the file was written from) is taken from there instead of being read twice."""
    import torch
    from safetensors import safe_open

    weights = {}
    with safe_open(file, framework="pt") as f:
        for key in f.keys():
            kept, stored = restored.get(key), f.get_slice(key)
            same = kept is not None and kept.dtype == torch.float32 and stored.get_dtype() == "F32"
            weights[key] = kept if same and list(kept.shape) == stored.get_shape() else f.get_tensor(key)
    return weights
