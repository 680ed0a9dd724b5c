"""The resolved memory plan: compute device, precision, activation checkpointing, attention backend, tiers.

`resolve_plan` turns the config into concrete choices for this machine and launch (and fails with one
line when the machine cannot do what was asked); `make_plan` does it without asking the machine and
`plan_for_gpus` for a launch of N cards (the estimator plans for GPUs it may not have);
`resolve_attention` and `resolve_mode` (`memory.distributed` for a world of processes) serve both.
A `Plan` composes the `[memory]` section it was made from and reads its keys through.
`sdtune.train.placement` puts the model where the plan says; `autocast` and `peak_bytes` serve the loop.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import resource
import sys
from dataclasses import dataclass

from sdtune.config import Config, MemoryConfig, PresetInfo
from sdtune.config.rules import distributed_refusals
from sdtune.errors import SdtuneError
from sdtune.util.world import World

logger = logging.getLogger(__name__)

_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def torch_dtype(precision: str):
    """torch's dtype of a precision as the config names it ("fp32", "bf16", "fp16": memory.precision,
    output.save_precision)."""
    import torch

    return getattr(torch, _DTYPES[precision])


def _memory_key(name: str) -> property:
    """A read-only view of `memory.NAME`: the plan takes these keys as the config gives them."""
    return property(lambda plan: getattr(plan.memory, name), doc=f"memory.{name}, as configured")


@dataclass(frozen=True)
class Plan:
    """The `[memory]` keys (`memory`) plus the three this machine and launch resolve: `device` ("cuda" or
    "cpu"; `memory.device` may say auto), `attention` ("sdpa" or "xformers") and `distributed` ("none",
    "ddp" or "fsdp"). Every other memory key reads through (`plan.precision` is `plan.memory.precision`)."""

    memory: MemoryConfig
    device: str
    attention: str
    distributed: str = "none"

    precision = _memory_key("precision")                            # "fp32", "bf16" or "fp16"
    gradient_checkpointing = _memory_key("gradient_checkpointing")
    optimizer = _memory_key("optimizer")                            # "adamw", "adamw8bit", ...
    fused_backward = _memory_key("fused_backward")                  # each weight stepped during backward
    optimizer_offload = _memory_key("optimizer_offload")            # "none", "cpu" or "nvme"
    offload_dir = _memory_key("offload_dir")                        # folder of the nvme tier's state file
    param_offload = _memory_key("param_offload")                    # "none" or "cpu": weights streamed
    param_prefetch_blocks = _memory_key("param_prefetch_blocks")    # blocks copied ahead of use

    @property
    def working_dtype(self):
        return torch_dtype(self.precision)

    @property
    def loss_scaling(self) -> bool:
        return self.precision == "fp16"


def _native_bf16() -> bool:
    """bf16 in hardware (Ampere or newer); torch's own check also accepts slow emulation on older cards."""
    import torch

    return torch.cuda.get_device_capability() >= (8, 0)


def _xformers_installed() -> bool:
    return importlib.util.find_spec("xformers") is not None


_PROBE_DEVICE = "cuda"  # tests point it at the CPU, where a fake xformers runs


@functools.cache
def _xformers_fails() -> str | None:
    """Why xformers cannot train here (its error's first line), or None when one tiny attention call runs
    forward and backward on the GPU. A wheel built for another torch or CUDA often imports (with a
    warning) and fails only at its first call: here, not deep inside diffusers at step 1."""
    try:
        import torch
        import xformers.ops

        # [batch, tokens, heads, head dim]; 40 is SD 1.x's head dim
        q = torch.randn(1, 8, 1, 40, device=_PROBE_DEVICE, dtype=torch.float16, requires_grad=True)
        xformers.ops.memory_efficient_attention(q, q, q).float().sum().backward()
        q.grad.float().sum().item()  # waits for the kernels, so a launch failure surfaces here
    except Exception as exc:
        lines = str(exc).strip().splitlines()
        return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return None


def resolve_attention(requested: str, device: str, report: bool = False) -> str:
    """`memory.attention` as the backend this machine runs: "sdpa" or "xformers".

    "auto" takes xformers only where it runs (a probe on the visible GPU, once per process), else SDPA,
    with one log line (on `report`) when an installed xformers fails. An explicit "xformers" that cannot run is one
    SdtuneError. Planning for a GPU this machine lacks (the estimator on device "cuda"), the probe cannot
    run: "auto" means SDPA there and an explicit "xformers" is taken at its word."""
    import torch

    if requested == "sdpa":
        return "sdpa"
    on_gpu = device == "cuda" and torch.cuda.is_available()
    fix = f"reinstall xformers built for this torch ({torch.__version__})"
    if requested == "auto":
        if not on_gpu or not _xformers_installed():
            return "sdpa"
        why = _xformers_fails()
        if why and report:
            logger.info(f"attention: xformers not used, SDPA instead ({why}); {fix}, "
                        "or set memory.attention=sdpa to silence this")
        return "sdpa" if why else "xformers"
    if device == "cuda" and not on_gpu:
        return "xformers"
    if not _xformers_installed():
        raise SdtuneError("memory.attention=xformers but xformers is not installed; "
                          "pip install 'sdtune[xformers]' or set memory.attention=sdpa")
    if device != "cuda":
        raise SdtuneError("memory.attention=xformers needs a CUDA GPU; set memory.attention=sdpa on the CPU")
    why = _xformers_fails()
    if why:
        raise SdtuneError(f"memory.attention=xformers but xformers fails on this GPU ({why}); "
                          f"{fix}, or set memory.attention=sdpa")
    return "xformers"


def resolve_plan(config: Config | MemoryConfig, report: bool = False,
                 preset: PresetInfo | None = None, world: World | None = None) -> Plan:
    """The plan of `config` on this machine and launch; on `report`, a log line says each choice "auto" could not
    make as asked. Given a whole `Config`, `distributed` is resolved too (`resolve_mode` under `world`,
    by default the launcher's); a `[memory]` section alone plans one process.

    Without CUDA, `memory.device=auto` falls back to the CPU only for a plan that names no card: a GPU
    preset (`preset.vram_gib` above 0) on the CPU would run some 100 times slower without a word, so it is
    refused, as `memory.device=cuda` is, with why CUDA is missing and how to ask for the CPU."""
    import torch

    mem = config.memory if isinstance(config, Config) else config
    has_cuda = torch.cuda.is_available()
    if not has_cuda and mem.device != "cpu":
        if mem.device == "cuda" or (preset is not None and preset.vram_gib > 0):
            asked = ("memory.device=cuda" if mem.device == "cuda"
                     else f"--preset {preset.name} is a GPU plan ({preset.card}, {preset.vram_gib:g} GB)")
            raise SdtuneError(f"{asked} but CUDA was not found: {no_cuda_reason()}; to train on the CPU on "
                              "purpose, use --preset cpu or --set memory.device=cpu")
        if report:
            logger.info("memory.device=auto: no CUDA GPU, training on the CPU")
    device = "cuda" if has_cuda and mem.device != "cpu" else "cpu"
    if mem.precision == "bf16" and device == "cuda" and not _native_bf16():
        raise SdtuneError(f"memory.precision=bf16 but {torch.cuda.get_device_name()} has no bf16; "
                          "use --set memory.precision=fp16 (or the rtx2070 preset)")
    attention = resolve_attention(mem.attention, device, report)
    if mem.optimizer_offload == "nvme":
        from sdtune.offload.nvme import check_offload_dir

        check_offload_dir(mem.offload_dir)  # before any model is loaded; free space is checked once sizes are known
    distributed = "none"
    if isinstance(config, Config):
        distributed = resolve_mode(config, World.from_env() if world is None else world)
    return make_plan(mem, device, attention, distributed)


def no_cuda_reason() -> str:
    """Why `torch.cuda.is_available()` is False, in the words of the fix: a CPU-only torch, or a driver."""
    import torch

    hip = getattr(torch.version, "hip", None)  # a ROCm build answers through torch.cuda too
    if torch.version.cuda is None and hip is None:
        return (f"this torch ({torch.__version__}) is a CPU-only build (torch.version.cuda is None); install a "
                "CUDA build of torch (pytorch.org/get-started)")
    build, smi = (f"CUDA {torch.version.cuda}", "nvidia-smi") if torch.version.cuda else (f"ROCm {hip}", "rocm-smi")
    return (f"this torch is built for {build} but torch.cuda.is_available() is False: no GPU driver is "
            f"loaded, it is too old for that {build.split()[0]}, or CUDA_VISIBLE_DEVICES hides the GPU "
            f"(`{smi}` tells)")


def make_plan(mem: MemoryConfig, device: str, attention: str, distributed: str = "none") -> Plan:
    """The plan of `mem` on `device` without asking the machine anything (the estimator plans for a GPU
    it does not have); `resolve_plan` checks the machine first."""
    return Plan(memory=mem, device=device, attention=attention, distributed=distributed)


def resolve_mode(cfg: Config, world: World) -> str:
    """What `memory.distributed` means for this launch: "none", "ddp" or "fsdp"; SdtuneError when the plan
    cannot run that way (the static rules: `sdtune.config.rules.distributed_refusals`)."""
    requested = cfg.memory.distributed
    mode = "ddp" if requested == "auto" else requested
    if world.several and mode == "none":
        raise SdtuneError(f"the launcher started {world.size} processes but memory.distributed=none; set "
                          "memory.distributed=ddp or fsdp, or start one process")
    if mode != "none" and (world.several or requested != "auto"):
        rules = distributed_refusals(cfg, mode, "memory.distributed" + (" (auto)" if requested == "auto" else ""))
        if rules:
            raise SdtuneError(rules[0])
    return mode if world.several else "none"


def plan_for_gpus(cfg: Config, device: str, gpus: int = 1) -> Plan:
    """The plan the estimator sizes: `cfg` on `device` over `gpus` cards of a launch it does not run (the
    attention is what "auto" would take there; `distributed` is resolved as `gpus` processes would)."""
    attention = resolve_attention(cfg.memory.attention, device)
    distributed = resolve_mode(cfg, World(size=gpus)) if gpus > 1 else "none"  # one card: nothing to refuse
    return make_plan(cfg.memory, device, attention, distributed)


def autocast(plan: Plan):
    """The mixed-precision context of a forward pass; a no-op in fp32."""
    import torch

    if plan.precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=plan.device, dtype=plan.working_dtype)


def reset_peak(plan: Plan) -> None:
    import torch

    if plan.device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_bytes(plan: Plan) -> int:
    """Peak GPU memory reserved by torch on CUDA; on the CPU, the process's peak resident set size."""
    import torch

    if plan.device == "cuda":
        return torch.cuda.max_memory_reserved()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024
