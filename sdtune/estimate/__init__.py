"""VRAM and host-RAM estimate of a memory plan, from a trace of one real training step on the meta device.

    cfg, info = load_config("rtx3050")
    estimate(cfg, info, "sd15").total      # bytes the card must hold; no GPU, no weights, a few seconds

The real architecture is built on the meta device (shapes, no memory) and one step runs through the
trainer's own code (`sdtune.estimate.trace`) under the plan the trainer gets (`sdtune.plan.make_plan`):
the placement's casts and adapters (`sdtune.train.placement.cast_parts`, per `sdtune.train.method`), the
VAE and the family's own text encoding of a batch, and the one objective (`sdtune.train.objective`)
forward and backward with the plan's precision, checkpointing and attention, and with its optimizer
tier's gradient handling (`OffloadAdamW` sends each gradient to the host as it is produced) or parameter
streaming (the real `ParamStreamer`). `memtrack.MemoryTracker` follows every storage by category; the
peak and what made it up are the estimate. Then what the meta device cannot show is added:

- Attention runs as CUDA's flash / memory-efficient kernels (and xformers) do: they keep q, k, v, the
  output and a log-sum-exp for backward, never the L x L score matrix a CPU math kernel materialises
  (512 MiB per attention at 64x64 latents). `sdtune.estimate.cuda` stands in for them.
- Autocast: traced on meta, torch's autocast does nothing, so `CudaSemantics` (the same module)
  applies CUDA autocast's rules at the function level: convolutions, linears, matmuls and attention in
  the working precision (fp32 weights cast once per forward and cached, as autocast's weight cache
  does), norms and softmax in fp32.
- The optimizer's state is counted by its tier's byte model (`Tier.footprint` in sdtune/optim/tier.py:
  fused AdamW 8 bytes a parameter, AdamW8bit 2 plus block scales, Adafactor its factored second moment,
  Prodigy 16, Lion 4, the host tiers' buckets and rings; the EMA's fp32 copy), not traced; the
  per-tensor steps' temporaries (two copies of the largest parameter, at most) are counted with it.
- The CUDA caching allocator reserves more than it hands out (512-byte rounding, 2 MiB and 20 MiB
  segments, fragmentation): `ALLOCATOR_SLACK` of the peak plus `ALLOCATOR_POOLS`. cuBLAS's workspace
  comes from that allocator too. The CUDA context (`CUDA_CONTEXT`) is outside torch's reserved memory.
These constants are a model to be checked against `torch.cuda.max_memory_reserved()` on a real GPU
(`pytest -m gpu tests/gpu/test_estimate_matches.py`, `bench/gpu_plans.py`).
"""

from __future__ import annotations

import dataclasses
import functools
import re
import time
from dataclasses import dataclass, field

from sdtune.config import Config, PresetInfo
from sdtune.family import archs, assumed_architecture, assumption
from sdtune.util.files import GIB

CUDA_CONTEXT = int(0.40 * GIB)   # driver context and kernel images: 0.3-0.45 GB on recent cards
CUBLAS_WORKSPACE = 32 * 2**20    # cuBLAS keeps up to 32 MiB per handle and stream, from torch's allocator
ALLOCATOR_SLACK = 0.08           # share of the peak the caching allocator reserves beyond it (rounding, splits)
ALLOCATOR_POOLS = 40 * 2**20     # the partly used 2 MiB small-block and 20 MiB large-buffer segments
CATEGORIES = ("weights", "frozen", "gradients", "optimizer_state", "activations", "temporaries")


@dataclass(frozen=True)
class Estimate:
    model: str
    preset: str
    resolution: int
    batch_size: int
    device: str
    categories: dict[str, int]   # bytes on the GPU at the peak, CATEGORIES then allocator_overhead, cuda_context
    peak_allocated: int          # the first six categories
    peak_reserved: int           # plus allocator overhead: comparable with torch.cuda.max_memory_reserved()
    total: int                   # plus the CUDA context: what the card must hold
    host_ram: int                # host memory for the model and the offloaded state (not Python/torch itself)
    disk: int                    # bytes in memory.offload_dir
    card_gib: float              # the preset's card, 0 when it names none
    seconds: float = 0.0
    notes: tuple[str, ...] = field(default=())
    milestones: dict[str, dict[str, int]] = field(default_factory=dict)  # bytes by category at forward_end
                                                                          # and backward_end (UNet only)
    gpus: int = 1                # the figures are per card of this many (sdtune.estimate.per_card)
    distributed: str = "none"    # how they share the work: "none", "ddp" or "fsdp"

    @property
    def fits(self) -> bool | None:
        return None if not self.card_gib else self.total <= self.card_gib * GIB

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "notes": list(self.notes), "fits": self.fits}


def remembered(cfg: Config, info: PresetInfo, model: str | None = None, **options) -> Estimate:
    """`estimate(cfg, info, model, **options)`, kept in the cache folder (`~/.cache/sdtune/estimates`) under a
    digest of the resolved plan, the model, the options, every file of sdtune itself and the libraries'
    versions: `sdtune presets` traces the twelve plans once (about 25 s on 2 cores) and then lists them at
    once, and `sdtune estimate-vram` answers a plan it traced before in well under a second (reading it back
    imports neither torch nor diffusers), until sdtune, a library or the plan changes. Only a bundled architecture
    (`archs.ARCHS`, by name or as a preset's default model) is remembered: a local folder or file is traced
    every time, since its configs could change under the same path."""
    import hashlib
    import json

    if (model or assumed_architecture(cfg.model.pretrained)[0]) not in archs.ARCHS:
        return estimate(cfg, info, model, **options)
    from sdtune.config.toml import to_toml
    from sdtune.util.files import cache_root, write_text  # not sdtune.data's: its images' libraries cost a hit 0.1 s

    started = time.perf_counter()
    asked = json.dumps([model, sorted(options.items())]).encode()
    digest = hashlib.sha256(to_toml(cfg, info).encode() + asked + _code_digest().encode()).hexdigest()
    path = cache_root("") / "estimates" / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', info.name)}-{digest[:32]}.json"
    try:  # a file cut short (a full disk, a copy of the cache folder) or unreadable: traced again
        saved = json.loads(path.read_text(encoding="utf-8"))
        saved.pop("fits")
        seconds = round(time.perf_counter() - started, 2)  # what this answer took, not the trace it remembers
        return Estimate(**{**saved, "notes": tuple(saved["notes"]), "seconds": seconds})
    except (OSError, ValueError, TypeError, KeyError, AttributeError):  # not there (the usual miss), or unusable
        pass
    result = estimate(cfg, info, model, **options)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps(result.to_dict()))
    except OSError:  # a cache that cannot be written costs the next listing its time, nothing else
        pass
    return result


@functools.cache
def _code_digest() -> str:
    """A digest of every file of sdtune itself and of the versions of the libraries an estimate traces."""
    import hashlib
    from importlib import metadata
    from pathlib import Path

    digest, package = hashlib.sha256(), Path(__file__).parent.parent
    for path in sorted(package.rglob("*")):
        if path.suffix in (".py", ".json", ".toml"):
            digest.update(path.relative_to(package).as_posix().encode() + path.read_bytes())
    for name in ("torch", "diffusers", "transformers", "peft", "bitsandbytes"):  # peft: LoRA plans; bnb: 8-bit
        try:
            digest.update(f"{name} {metadata.version(name)};".encode())
        except metadata.PackageNotFoundError:
            digest.update(f"{name} -;".encode())
    return digest.hexdigest()


def estimate(cfg: Config, info: PresetInfo, model: str | None = None, *, device: str | None = None,
             frozen_on_device: bool = True, gpus: int = 1) -> Estimate:
    """Estimate the memory of training `model` (None: the config's model; for a hub id its architecture, the
    default one where assumed) with `cfg`'s plan on `device`: "cuda", or "cpu" for a CPU run (no CUDA
    constants; also how the trace is checked against a measured CPU step); None takes "cpu" for
    `memory.device=cpu` plans, else "cuda".
    `frozen_on_device=False` leaves the VAE and text encoder(s) off the GPU, as with latents and text
    embeddings cached beforehand: parked in host RAM in the working precision, as the trainer parks them.
    `gpus` > 1: per-card figures of the plan's `memory.distributed` over that many (`sdtune.estimate.per_card`);
    SdtuneError when the plan cannot run that way."""
    import torch

    from sdtune.estimate import trace
    from sdtune.estimate.memtrack import MemoryTracker
    from sdtune.plan import plan_for_gpus
    from sdtune.train.method import method_for

    started = time.perf_counter()
    device = device or ("cpu" if cfg.memory.device == "cpu" else "cuda")
    parts = _meta_parts(cfg, model)
    parked, vae = [], parts.vae  # parked: encoders whose outputs are cached leave the GPU before step 1
    if not frozen_on_device or cfg.data.cache_latents:
        parked.append(parts.vae)
        parts = dataclasses.replace(parts, vae=None)
    if not frozen_on_device or cfg.data.cache_text:
        parked.extend(parts.text_encoders)
        parts = dataclasses.replace(parts, text_encoders=())
    tracker, plan, method = MemoryTracker("meta"), plan_for_gpus(cfg, device, gpus), method_for(cfg)
    trained = trace.place(parts, plan, method, tracker)
    footprint = _footprint(trained.all_params, plan, cfg)
    state = torch.empty(footprint.device, dtype=torch.uint8, device="meta")  # from step 2 on: through the encoding too
    tracker.add([state], "optimizer_state")
    cond = trace.encode(parts, plan, cfg, tracker, grad=method.trains_text_encoders)
    milestones = trace.step(parts, plan, cfg, method, tracker, cond, trained)
    at_peak = {name: max(0, tracker.at_peak.get(name, 0)) for name in CATEGORIES}
    allocated = sum(at_peak.values())
    overhead = int(allocated * ALLOCATOR_SLACK) + ALLOCATOR_POOLS + CUBLAS_WORKSPACE if device == "cuda" else 0
    context = CUDA_CONTEXT if device == "cuda" else 0
    total = allocated + overhead + context
    result = Estimate(model=parts.label, preset=info.name, resolution=cfg.data.resolution,
                      batch_size=cfg.train.batch_size, device=device,
                      categories={**at_peak, "allocator_overhead": overhead, "cuda_context": context},
                      peak_allocated=allocated, peak_reserved=allocated + overhead, total=total,
                      host_ram=_host_ram(parts, vae, parked, plan, footprint, method, trained.all_params,
                                         _unet_share(cfg, plan, method, gpus)),
                      disk=footprint.disk, card_gib=info.vram_gib, seconds=round(time.perf_counter() - started, 2),
                      milestones=milestones, notes=_assumed(cfg, model))
    if gpus > 1:
        from sdtune.estimate.per_card import per_card

        result = per_card(result, cfg, parts.unet, plan, gpus)
    return result


def _meta_parts(cfg: Config, model: str | None):
    """`model` (None: the config's, or its architecture for a hub id) on the meta device; with
    `model.init=random` and `model.architecture`, that UNet on the base's encoders."""
    from sdtune.family.meta import meta_model

    source = model or cfg.model.pretrained
    if not model:  # a preset's default model, a hub id: its architecture suffices (assumed where unknown)
        source, _ = assumed_architecture(source)
    parts = meta_model(source)
    if cfg.model.init == "random" and cfg.model.architecture:  # pretraining another UNet on the base's encoders
        from sdtune.family.scratch import check_fits, unet_config_dir

        folder = unet_config_dir(cfg.model.architecture, source)
        parts = dataclasses.replace(parts, unet=archs.build_part(folder, "diffusers", "UNet2DConditionModel"))
        check_fits(parts, cfg.model.architecture)
    return parts


def _assumed(cfg: Config, model: str | None) -> tuple[str, ...]:
    """A note where the architecture was assumed, not read (no model, or a hub id of no bundled one)."""
    line = "" if model else assumption(cfg.model.pretrained)
    return (line,) if line else ()


def _footprint(trained: list, plan, cfg: Config):
    """The optimizer tier's bytes on the device, the host and the disk over what trains, by the tier's own
    byte model; prior preservation's two backward passes a micro-batch count as accumulation, as the
    trainer builds the tier."""
    from sdtune.optim.tier import tier_class

    passes = cfg.train.gradient_accumulation_steps * (2 if cfg.prior_preservation else 1)
    return tier_class(plan).footprint([p.shape for p in trained], itemsize=plan.working_dtype.itemsize,
                                      host_weights=plan.param_offload == "cpu", accumulation_steps=passes,
                                      ema=cfg.train.ema_decay > 0)


def _unet_share(cfg: Config, plan, method, gpus: int) -> float:
    """The share of the fp32 UNet a process loads: under fsdp a rank of a trained, pretrained UNet reads only
    its shards (`sdtune.train.parallel.load_shards`); otherwise all of it. A UNet without .safetensors weights
    loads whole on every rank even then (`sdtune.family.load`): the figure is low by (N-1)/N of it there."""
    meta = plan.distributed == "fsdp" and not method.frozen_unet and cfg.model.init != "random"
    return 1 / gpus if meta else 1.0


def _host_ram(parts, vae, parked: list, plan, footprint, method, trained: list, unet_share: float = 1.0) -> int:
    """Host bytes, whichever is most: the fp32 pipeline while it loads (`unet_share` of its UNet); what
    training holds there, the optimizer tier's state, the parked (cached) encoders in the working precision,
    and a streamed LoRA's frozen UNet in the working precision; or, resuming an optimizer that keeps its
    state on the GPU, that state, which `training_state.pt` brings into host RAM whole before it moves to the
    device (AdamW's 8 bytes a parameter: more than loading SD1.5 takes). The host tiers read their state file straight
    into their buffers, so resuming them needs no more than training (bench/resume_memory.py)."""
    from sdtune.optim.tier import tier_class

    def numel(module) -> int:
        return sum(p.numel() for p in module.parameters())

    parked = [m for m in parked if m is not None]
    loading = 4 * (int(numel(parts.unet) * unet_share) + sum(numel(m) for m in (*parts.frozen, *parked)))
    working = plan.working_dtype
    held = sum(numel(m) * (parts.family.vae_dtype(m, working) if m is vae else working).itemsize for m in parked)
    if method.frozen_unet and plan.param_offload == "cpu":
        held += sum(p.numel() for p in parts.unet.parameters() if not p.requires_grad) * plan.working_dtype.itemsize
    tier, resume = tier_class(plan), 0
    if plan.device != "cpu" and not tier.host_gradients and plan.distributed != "fsdp":  # fsdp: each rank its shards
        resume = tier.state_bytes([p.shape for p in trained]) + held
    return max(loading, footprint.host + held, resume)
