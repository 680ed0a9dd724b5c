"""How a run spreads over several processes (`memory.distributed`): the rules, DDP, FSDP2, sharded state.

    plan.distributed                    # "none", "ddp" or "fsdp": what this launch runs (sdtune.plan)
    model = wrap_ddp(unet, plan)        # ddp: every rank holds the whole model, gradients are averaged
    shard(unet, plan)                   # fsdp: weights, gradients and AdamW state split over the ranks

- **ddp** (`torch.nn.parallel.DistributedDataParallel`): for plans that fit each card. Every lever of a
  single card combines with it except sdtune's own offload tiers: `memory.optimizer_offload=cpu|nvme`
  and `memory.param_offload=cpu` take each gradient in backward as it is produced, before DDP has
  averaged it over the ranks.
- **fsdp** (`torch.distributed.fsdp.fully_shard`, FSDP2, the ZeRO-3 equivalent): each UNet block is one
  unit whose fp32 weights, gradients and AdamW state are split over the ranks and gathered for its
  forward and backward only (`shard_units`). `memory.precision=bf16` is FSDP2's mixed-precision policy (bf16 compute,
  fp32 gradient reduction); `memory.optimizer_offload=cpu` is its `CPUOffloadPolicy` (the shards and the
  AdamW step in host RAM). Refused with it: fp16 (loss scaling over shards), any `memory.optimizer` but
  adamw (8-bit blocks, Adafactor's factored moment, Prodigy's step size would be taken per shard),
  `memory.optimizer_offload=nvme`, `memory.param_offload` (FSDP2 already gathers one block at a time)
  and `train.method=lora` (a LoRA's few MB train replicated: use ddp).
  Loading: every rank builds the UNet on the meta device (`sdtune.family.load`, `meta_unet`), shards it,
  and reads only its rows from the model's .safetensors file(s) (`load_shards`): a rank holds 1/N of the
  fp32 UNet in host RAM and on its card, never the whole. The frozen VAE and text encoder(s) are whole on
  every rank (each encodes its share of the batch); the EMA is refused under fsdp (it would be a whole
  copy). A UNet without safetensors weights and `model.init=random` (every rank draws the same whole
  UNet) load whole and are then sharded, as before. A resumed run reads its shards from `sharded/` after.
- A LoRA's text-encoder adapters (`lora.text_encoder`) are not under DDP: refused with several processes,
  and so is `memory.fused_backward` (it steps each weight before its gradient is averaged).

Refusals are one SdtuneError naming both keys (the rules: `sdtune.config.rules`, applied by
`sdtune.plan.resolve_mode`, which `resolve_plan` calls); explicit `ddp`/`fsdp` are checked in a single process
too, so a config that starts on one card starts under torchrun. `auto` (the default) is ddp when the
launcher started several processes, and nothing otherwise.
"""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def wrap_ddp(unet, device: str):
    """The UNet under DDP: the module the loss calls (the UNet itself stays the one saved and sampled)."""
    import torch
    from torch.nn.parallel import DistributedDataParallel

    ids = [torch.cuda.current_device()] if device == "cuda" else None
    return DistributedDataParallel(unet, device_ids=ids, gradient_as_bucket_view=True)


def _fully_shard():
    try:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
    return fully_shard, MixedPrecisionPolicy, CPUOffloadPolicy


UNIT_CLASSES = ("ResnetBlock2D", "BasicTransformerBlock")  # SDXL's innermost attention holds 10 of the latter


def shard_units(unet) -> list:
    """FSDP2's units, innermost first: every ResNet block and transformer layer, then each down, mid and up
    block (its samplers and projections); the root (the rest) is one more. A unit's weights are gathered
    only while it runs, so the largest unit sets what gathering costs."""
    blocks = [*unet.down_blocks, *([unet.mid_block] if unet.mid_block is not None else []), *unet.up_blocks]
    layers = [m for block in blocks for m in block.modules() if type(m).__name__ in UNIT_CLASSES]
    return [*layers, *blocks]


def shard(unet, plan, weights=None) -> None:
    """Split the fp32 UNet over the ranks in place, block by block, under the plan's precision and offload;
    a UNet built on the meta device is then made on this rank's device and filled with its rows of `weights`
    (`load_shards`)."""
    import torch

    fully_shard, MixedPrecisionPolicy, CPUOffloadPolicy = _fully_shard()
    options = {}
    if plan.precision == "bf16":
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if plan.optimizer_offload == "cpu":
        options["offload_policy"] = CPUOffloadPolicy(pin_memory=plan.device == "cuda")
    for unit in shard_units(unet):
        fully_shard(unit, **options)
    fully_shard(unet, **options)
    if weights is not None:
        load_shards(unet, weights, "cpu" if plan.optimizer_offload == "cpu" else plan.device)


def load_shards(unet, weights, device: str) -> None:
    """Make the sharded, meta-device UNet's shards on `device` (`to_empty`: this rank's rows only) and read
    each from `weights` (`sdtune.family.slices.UnetWeights`): no rank ever holds the whole UNet, in host RAM
    or on its card. Rank 0 says what each rank read."""
    import torch

    unet.to_empty(device=device)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            local = param.to_local()
            start = first_row(param)
            local.copy_(weights.read(name, start, start + (local.shape[0] if local.dim() else 1)).view(local.shape))
    weights.close()
    _report(weights, sum(p.numel() for p in unet.parameters()))


def first_row(param) -> int:
    """The first row (of dimension 0) of `param`'s global tensor that this rank's shard holds: FSDP2 splits
    dimension 0 as `torch.chunk` does (ceil(rows / ranks) each, the last ones shorter or empty)."""
    from torch.distributed.tensor import Shard

    if tuple(param.placements) != (Shard(0),):
        # FSDP2 shards every parameter along dimension 0 (its `shard_placement_fn` is left unset): another
        # placement means a torch that changed that, and reading rows would load the wrong slices
        raise RuntimeError(f"FSDP2 placed a weight as {param.placements}, not Shard(0) as this torch's FSDP2 is "
                           "expected to; sdtune's shard load reads rows of dimension 0 only")
    rows, ranks = (param.shape[0] if param.dim() else 1), param.device_mesh.size()
    return min(param.device_mesh.get_local_rank() * -(-rows // ranks), rows)


def _report(weights, total: int) -> None:
    from sdtune.util.world import World

    shares = World.from_env().gather(weights.elements)
    if shares is not None:
        files = ", ".join(path.name for path in weights.files)
        each = ", ".join(f"rank {rank} {read / total:.1%}" for rank, read in enumerate(shares))
        logger.info(f"memory.distributed=fsdp: the UNet was built on the meta device and each rank read only its "
                    f"shards of its {4 * total / 1e9:.2f} GB (fp32) from {files} ({each})")


def is_sharded(module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def full_weights(unet) -> dict:
    """The whole fp32 UNet state, gathered to host RAM on rank 0 (empty elsewhere); every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(unet, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def unsharded_copy(unet, weights: dict):
    """A plain (unsharded) module of `unet`'s class and config holding `weights`: what rank 0 exports."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import FSDPModule
    import torch

    kind = next(c for c in type(unet).__mro__ if not issubclass(c, FSDPModule))  # fully_shard subclasses it
    with torch.device("meta"):  # no random weights drawn to be overwritten: the module takes `weights` as they are
        plain = kind.from_config(unet.config)
    plain.load_state_dict(weights, assign=True)
    return plain


SHARDED = "sharded"  # the checkpoint's subfolder of torch.distributed.checkpoint files


def save_sharded(folder: Path, unet, optimizer) -> None:
    """Every rank writes its shards of the weights and AdamW state into `folder` (a collective call;
    torch.distributed.checkpoint writes its `.metadata` once every rank's files are done)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, optim = get_state_dict(unet, optimizer)
    dcp.save({"model": model, "optimizer": optim}, checkpoint_id=str(folder))


def load_sharded(folder: Path, unet, optimizer) -> None:
    """Read `save_sharded`'s files back into the sharded UNet and its optimizer (every rank, its shards)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model, optim = get_state_dict(unet, optimizer)
    state = {"model": model, "optimizer": optim}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(unet, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
