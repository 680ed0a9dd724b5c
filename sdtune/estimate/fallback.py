"""The next smaller memory plan after the GPU runs out of memory, and the error that names it.

    fallback = next_smaller(cfg, info)   # None when no lever is left to pull
    fallback.overrides                   # ("memory.gradient_checkpointing=true",): --set items
    describe(dataclasses.replace(cfg, memory=fallback.memory), info)   # "rtx4090 (bf16, ...)"

The smaller plans are those `--preset auto` orders (`auto.candidates` of the run's `train.method`,
ranked by `auto.cost`): of each candidate only its memory levers are taken, added to the run's own plan,
so the training itself (model, data, recipe, precision, optimizer) stays what it was. The next smaller
plan is the cheapest by `auto.cost` that pulls at least one lever more.

A fallback resumes the run's checkpoint on the smaller plan: the levers it pulls are those `--resume` may
change (`resume=NEUTRAL` in sdtune/config/sections.py; the optimizer's state moves between the in-device AdamW
and the host-RAM tier by `offload.convert`), so results match the unchanged run to float rounding.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from sdtune.config import Config, MemoryConfig, PresetInfo
from sdtune.errors import SdtuneError
from sdtune.util.files import GIB

LEVERS = ("gradient_checkpointing", "optimizer_offload", "param_offload")  # what a smaller plan may pull


@dataclass(frozen=True)
class Fallback:
    overrides: tuple[str, ...]   # the `--set` items that turn the run's plan into this one
    memory: MemoryConfig         # the plan they make


class OutOfMemory(SdtuneError):
    """The GPU ran out of memory after `step` steps (None: while loading); `what` says so in a few words
    (where, the plan, its estimate); `fallback` is the next smaller plan, None when there is none."""

    def __init__(self, message: str, what: str, step: int | None, fallback: Fallback | None):
        super().__init__(message)
        self.what, self.step, self.fallback = what, step, fallback


def _pulled(mem: MemoryConfig, other: MemoryConfig) -> MemoryConfig | None:
    """`mem` with every lever that `other` pulls pulled too (none released), or None when invalid."""
    try:
        return dataclasses.replace(
            mem, gradient_checkpointing=mem.gradient_checkpointing or other.gradient_checkpointing,
            optimizer_offload=mem.optimizer_offload if mem.optimizer_offload != "none" else other.optimizer_offload,
            param_offload=mem.param_offload if mem.param_offload != "none" else other.param_offload)
    except SdtuneError:  # e.g. an offload tier for memory.optimizer=adamw8bit
        return None


def _set_item(key: str, value) -> str:
    return f"memory.{key}={str(value).lower() if isinstance(value, bool) else value}"


def next_smaller(cfg: Config, info: PresetInfo) -> Fallback | None:
    """The next plan in `--preset auto`'s order that needs less memory than `cfg`'s and trains the same."""
    from sdtune.config import load_config
    from sdtune.estimate.auto import Gpu, candidates, cost

    mem = cfg.memory
    found = []
    # only the levers are used: the card and the family do not matter, the method does (LoRA refuses offload)
    for cand in candidates(Gpu("", 0, bf16=True), method=cfg.train.method):
        smaller = _pulled(mem, load_config(cand.preset, cand.extra)[0].memory)
        if smaller is not None and cost(smaller) > cost(mem):
            changed = tuple(_set_item(key, getattr(smaller, key)) for key in LEVERS
                            if getattr(smaller, key) != getattr(mem, key))
            found.append((cost(smaller), len(changed), changed, smaller))
    if not found:
        return None
    _, _, changed, smaller = min(found, key=lambda row: row[:3])
    return Fallback(changed, smaller)


def describe(cfg: Config, info: PresetInfo) -> str:
    """The plan's name and its memory levers, for a message."""
    m = cfg.memory
    return (f"{info.name} ({m.precision}, gradient_checkpointing {'on' if m.gradient_checkpointing else 'off'}, "
            f"optimizer_offload {m.optimizer_offload}, param_offload {m.param_offload}, "
            f"{cfg.data.resolution} px x batch {cfg.train.batch_size})")


def estimated(cfg: Config, info: PresetInfo) -> str:
    """"estimated N GiB" by `sdtune.estimate`, or why there is no figure; never raises."""
    try:
        from sdtune.estimate import estimate

        total = estimate(cfg, info).total
    except Exception as exc:  # a message about a failure must not fail itself
        return f"no estimate: {type(exc).__name__}"
    return f"estimated {total / GIB:.2f} GiB"


def out_of_memory(cfg: Config, info: PresetInfo, step: int | None, out_dir: Path) -> OutOfMemory:
    """The error for running out of GPU memory after `step` steps (None: while loading the run): the plan,
    its estimate, the next smaller plan and how to continue on it."""
    import torch

    from sdtune.train.store import latest_checkpoint

    where = "while loading the model" if step is None else f"in step {step + 1}"
    card = ""
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        card = f" of {props.name} ({props.total_memory / GIB:.1f} GiB)"
    text = f"out of GPU memory{card} {where} under {describe(cfg, info)}, {estimated(cfg, info)}"
    fallback = next_smaller(cfg, info)
    if fallback is None:
        return OutOfMemory(f"{text}; no smaller plan trains the same: lower data.resolution or train.batch_size "
                           "(raise train.gradient_accumulation_steps to keep the effective batch) in a new run, "
                           "or close other programs that use the GPU", text, step, None)
    smaller = dataclasses.replace(cfg, memory=fallback.memory)
    latest = latest_checkpoint(out_dir, report=False)
    start = f"from {latest}" if latest else "from step 0 (no checkpoint yet)"
    sets = " ".join(f"--set {item}" for item in fallback.overrides)
    return OutOfMemory(f"{text}; the next smaller plan is {describe(smaller, info)}, {estimated(smaller, info)}: "
                       f"run the same command with --on-oom fallback, or with {sets} --resume, to continue {start}",
                       text, step, fallback)
