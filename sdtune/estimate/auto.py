"""`--preset auto`: the fastest memory plan that the estimator says fits the detected GPU.

    pick = pick_plan(["train.max_steps=100"])
    cfg, info = load_config(pick.preset, [*pick.extra, "train.max_steps=100"])

A plan is a shipped preset plus extra `--set` overrides (a *candidate*). The candidates are the GPU
presets (those whose `[preset]` names a card) of the model's family that train as the run does
(`train.method`: full fine-tunes get the full presets, LoRA runs the `lora-*` ones, and so do textual
inversions, `PLANS_OF`; what a plan sets that the method cannot use gives way to it when the config
loads, `sdtune.config.rules.GIVE_WAY`), each also with one
lever more: checkpointing turned on where it is off, or weight streaming (`memory.param_offload=cpu`)
where the optimizer is offloaded or a LoRA's base is frozen. Half-precision plans run in the card's half
precision: fp16 on a card without native bf16 (compute capability below 8.0), bf16 on one with it (the
same memory, and bf16 needs no loss scaling; an fp16 preset with bf16 is often another preset's plan, and
then tried once). The user's own overrides go on top of every candidate, so what is estimated is what will
train; plans that come out identical are tried once. They are tried fastest first by `cost` (below), and
the first whose estimated `total` is at most `SAFETY` of the card's memory, and whose host RAM is at most
`SAFETY` of this machine's, is the pick. The nvme optimizer tier needs a folder on a fast disk, which only
the user can name, so a plan with it (`sdxl-8gb`) is a candidate only when the user's overrides name
`memory.offload_dir`: when host RAM is what no plan fits, the error says to ask for it with `--set`.

The family is the model's: `model.pretrained` from the user's overrides (or the `model` argument), read
by `sdtune.family.detect` (a diffusers folder by its pipeline class, a single file by its keys, an
architecture name, the hub repository of a bundled architecture). SDXL models get the `sdxl-*` plans, all
others the SD ones; so does a hub id that is not a bundled architecture's (a name is no architecture: a
repository called "...xl..." may hold anything), and so does no model at all (the SD presets' own); the
reason line then says which architecture was assumed.
A preset's family is its own `model.pretrained`'s.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sdtune.config import Config, MemoryConfig, PresetInfo, load_config, parse_set, preset_names, read_preset
from sdtune.errors import SdtuneError
from sdtune.util.files import GIB

if TYPE_CHECKING:
    from sdtune.estimate import Estimate

logger = logging.getLogger(__name__)

# A plan may use at most this share of the card's memory. The estimate models one process alone on the
# card; the desktop, a browser or a second process hold memory too, and the estimate itself may be a few
# percent off the measured peak. 10% of an 8 GB card is 0.8 GiB.
SAFETY = 0.9


@dataclass(frozen=True)
class Gpu:
    name: str
    total_memory: int  # bytes, torch.cuda.get_device_properties(0).total_memory
    bf16: bool         # native bf16 (compute capability 8.0 or newer)


@dataclass(frozen=True)
class Candidate:
    preset: str
    extra: tuple[str, ...] = ()  # `--set` items applied after the preset, before the user's own

    @property
    def label(self) -> str:
        return " + ".join((self.preset, *self.extra))


@dataclass(frozen=True)
class Pick:
    """What `--preset auto` resolved to: train as if `--preset preset --set extra...` had been given."""

    preset: str
    extra: tuple[str, ...]
    estimate: Estimate | None  # the pick's; None on a machine without CUDA
    reason: str           # one paragraph for the user: the plan, its estimate, the card, what was rejected
    warning: str = ""     # a surprise the user must not miss (the toy model), said after the reason

    @property
    def label(self) -> str:
        return Candidate(self.preset, self.extra).label


def detect_gpu() -> Gpu | None:
    """GPU 0, or None without CUDA. Where torch is not imported yet and no GPU driver is installed
    (`_no_gpu_driver`), None without importing it: `estimate-vram` reading a remembered plan answers at once."""
    if "torch" not in sys.modules and _no_gpu_driver():
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return Gpu(name=props.name, total_memory=int(props.total_memory), bf16=props.major >= 8)


# What a machine that can run CUDA (NVIDIA; ROCm's torch.cuda; WSL's GPU) has, whether or not the driver's
# module is loaded yet: its device nodes, its kernel module's folder, or the tools its driver installs
DRIVER_PATHS = ("/dev/nvidiactl", "/dev/nvidia0", "/proc/driver/nvidia", "/dev/kfd", "/dev/dxg",
                "/dev/nvhost-ctrl-gpu", "/dev/nvgpu", "/etc/nv_tegra_release")  # the last three: Jetson boards
DRIVER_TOOLS = ("nvidia-smi", "nvidia-modprobe", "rocm-smi")


def _no_gpu_driver() -> bool:
    """True where torch.cuda cannot find a GPU: on macOS, or on Linux without any NVIDIA or AMD GPU driver
    (none of `DRIVER_PATHS`, none of `DRIVER_TOOLS` on the PATH). Elsewhere (Windows) False: torch asks."""
    import shutil

    if sys.platform == "darwin":
        return True
    if not sys.platform.startswith("linux"):
        return False
    return not any(os.path.exists(path) for path in DRIVER_PATHS) and not any(map(shutil.which, DRIVER_TOOLS))


def host_ram() -> int | None:
    """This machine's physical memory in bytes, where the OS says (Linux, macOS)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def gpu_presets(family: str = "sd", method: str = "full") -> list[str]:
    """The shipped presets of model `family` ("sd" or "sdxl") sized for a GPU card (`[preset] vram_gib`
    above 0) that train by `method` (`train.method`: "full" or "lora"); for "sd" and "full" all the full SD
    ones but `cpu`."""
    return [name for name in preset_names() if read_preset(name)[1].vram_gib > 0 and preset_family(name) == family
            and load_config(name)[0].train.method == method]


def preset_family(name: str) -> str:
    """"sdxl" or "sd": the family of the model the preset names (its `model.pretrained`)."""
    from sdtune.family import detect

    return detect(load_config(name)[0].model.pretrained).family


def _last_set(overrides: Sequence[str], key: str) -> Any | None:
    """The value the last of `overrides` (`--set` items) gives `key` ("section.name"), or None."""
    section, name = key.split(".", 1)
    named = [parse_set(item)[section][name] for item in overrides if item.split("=", 1)[0].strip() == key]
    return named[-1] if named else None


def run_method(overrides: Sequence[str] = ()) -> str:
    """`train.method` as the last of `overrides` sets it, else "full" (the default)."""
    return _last_set(overrides, "train.method") or "full"


def model_family(overrides: Sequence[str] = (), model: str | None = None) -> str:
    """The family of the model a run trains: `model`, else the last `model.pretrained` of `overrides`, else
    "sd" (the SD presets' default model); `sdtune.family.detect` reads it."""
    from sdtune.family import detect

    return detect(model or _last_set(overrides, "model.pretrained") or "").family


def cost(mem: MemoryConfig) -> int:
    """Slowness rank of a memory plan, 0 fastest: everything on the GPU with nothing recomputed costs 0;
    activation checkpointing (~25-30% more compute), optimizer offload to host RAM (copies and a CPU step),
    weight streaming (every block copied in, twice) each add 1, and the nvme tier 1 more than host RAM."""
    return (int(mem.gradient_checkpointing) + int(mem.optimizer_offload != "none")
            + int(mem.optimizer_offload == "nvme") + int(mem.param_offload != "none"))


# A method without presets of its own trains on another's plans: a textual inversion on the LoRA plans (a
# frozen UNet); the text cache they plan gives way to it (the text encoders run every step).
PLANS_OF = {"embedding": "lora"}


def method_presets(family: str = "sd", method: str = "full") -> list[str]:
    """The GPU presets a run of `method` trains on: its own, or those of the method whose plans it borrows."""
    return gpu_presets(family, PLANS_OF.get(method, method))


def candidates(gpu: Gpu, family: str = "sd", method: str = "full") -> list[Candidate]:
    """Every plan of model `family` training by `method` that `--preset auto` may try on `gpu`, before the
    user's overrides; not yet ordered. Half-precision plans run in the card's half precision: bf16 where it
    has it, else fp16."""
    from sdtune.train.method import method_for

    found, half = [], "bf16" if gpu.bf16 else "fp16"
    for name in method_presets(family, method):
        cfg, _ = load_config(name)
        mem = cfg.memory
        base = (f"memory.precision={half}",) if mem.precision in ("bf16", "fp16") and mem.precision != half else ()
        found.append(Candidate(name, base))
        if not mem.gradient_checkpointing:
            found.append(Candidate(name, (*base, "memory.gradient_checkpointing=true")))
        elif (mem.optimizer_offload != "none" or method_for(cfg).frozen_unet) and mem.param_offload == "none":
            found.append(Candidate(name, (*base, "memory.param_offload=cpu")))  # a LoRA streams its frozen base
    return found


def ordered(gpu: Gpu, overrides: Sequence[str], family: str = "sd") -> list[tuple[Candidate, Config, PresetInfo]]:
    """The candidates of `family` training by the overrides' `train.method` with the user's overrides applied,
    fastest first, each distinct plan once; nvme plans only when the overrides name `memory.offload_dir`.

    Ties in `cost` go to fewer extra overrides. Of candidates that resolve to the same config (rtx3050 and
    rtx3080 differ only in their card), the one with fewer extras and then the card size nearest the GPU's
    keeps its name. A candidate the user's overrides make invalid is left out; if all are, the first error
    is raised."""
    card_gib = gpu.total_memory / GIB
    named_dir = any(item.split("=", 1)[0].strip() == "memory.offload_dir" for item in overrides)
    resolved, errors = [], []
    for cand in candidates(gpu, family, run_method(overrides)):
        try:
            cfg, info = load_config(cand.preset, [*cand.extra, *overrides])
        except SdtuneError as exc:
            errors.append(exc)
            continue
        if cfg.memory.optimizer_offload == "nvme" and not named_dir:
            continue
        resolved.append((cost(cfg.memory), len(cand.extra), abs(info.vram_gib - card_gib), cand, cfg, info))
    if not resolved:
        raise errors[0] if errors else SdtuneError("no GPU preset is shipped; reinstall sdtune")
    resolved.sort(key=lambda row: row[:3])
    result, seen = [], []
    for *_, cand, cfg, info in resolved:
        if cfg not in seen:
            seen.append(cfg)
            result.append((cand, cfg, info))
    return result


def pick_plan(overrides: Sequence[str] = (), model: str | None = None, *, ram: int | None = None) -> Pick:
    """The fastest plan that fits this machine's GPU, with the user's `overrides` (`--set` items, including
    model.pretrained, data.resolution, train.batch_size) on top of each candidate, chosen among the plans
    of the model's family (`model_family`). `model` is passed to the estimator (None: the config's
    model.pretrained, a bundled architecture's hub repository as that architecture, or sd15 for another hub
    id). `ram`: the host RAM in bytes to plan for (`estimate-vram --host-ram`), else this machine's.
    Raises SdtuneError when no plan fits, naming the smallest estimate and the card."""
    gpu = detect_gpu()
    if gpu is None:
        return Pick("cpu", (), None, "no CUDA GPU: the cpu preset", _toy_model_warning(overrides, model))
    budget, ram = SAFETY * gpu.total_memory, ram or host_ram()
    card = f"{gpu.name} ({gpu.total_memory / GIB:.1f} GiB; plans may use {SAFETY:.0%}: {budget / GIB:.1f} GiB)"
    from sdtune.estimate import remembered

    rejected = []
    for cand, cfg, info in ordered(gpu, overrides, model_family(overrides, model)):
        logger.debug(f"auto: estimating {cand.label}")  # below INFO: the CLI shows a spinner instead
        est = remembered(cfg, info, model, device="cuda")
        if est.total <= budget and (ram is None or est.host_ram <= SAFETY * ram):
            return Pick(cand.preset, cand.extra, est, _reason(cand, est, card, rejected) + _assumed(cfg, model))
        rejected.append((cand, est))
    on_card = [row for row in rejected if row[1].total <= budget]
    if on_card:  # the card would do; host RAM is what is short
        smallest, est = min(on_card, key=lambda row: row[1].host_ram)
        raise SdtuneError(f"no memory plan fits this machine's host RAM ({ram / GIB:.1f} GiB; plans may use "
                          f"{SAFETY:.0%}): the smallest, {smallest.label}, needs {est.host_ram / GIB:.1f} GiB; keep "
                          "the optimizer state on disk with --set memory.optimizer_offload=nvme --set "
                          "memory.offload_dir=DIR, or free host memory")
    smallest, est = min(rejected, key=lambda row: row[1].total)
    raise SdtuneError(f"no memory plan fits {card}: the smallest, {smallest.label}, needs "
                      f"{est.total / GIB:.2f} GiB at {cfg.data.resolution} px, batch {cfg.train.batch_size}; "
                      "try a smaller --set data.resolution or a card with more memory")


def _toy_model_warning(overrides: Sequence[str], model: str | None) -> str:
    """Said when no model is named and the cpu preset's own, the bundled toy model, is what will train."""
    if model or _last_set(overrides, "model.pretrained"):
        return ""
    cfg, _ = load_config("cpu")
    return (f"no --model given: --preset auto trains the cpu preset's model, {cfg.model.pretrained}, the "
            f"{cfg.data.resolution}-px toy model bundled with sdtune (coloured shapes, not Stable Diffusion); "
            "pass --model for your own, and a CUDA GPU for Stable Diffusion sizes")


def _assumed(cfg: Config, model: str | None) -> str:
    """Where the estimate could not read the model's architecture, which one it assumed and why."""
    from sdtune.family import assumption

    line = "" if model else assumption(cfg.model.pretrained)
    return f"; {line}" if line else ""


def _reason(cand: Candidate, est, card: str, rejected: list) -> str:
    text = (f"--preset auto: {cand.label} on {card}: it needs {est.total / GIB:.2f} GiB "
            f"(peak reserved {est.peak_reserved / GIB:.2f} GiB + CUDA context) and {est.host_ram / GIB:.1f} GiB "
            "of host RAM")
    if rejected:
        needs = (f"{c.label} {e.total / GIB:.2f} GiB ({e.host_ram / GIB:.1f} GiB host)" for c, e in rejected)
        text += "; faster plans need more: " + ", ".join(needs)
    else:
        text += "; it is the fastest plan"
    return text
