"""Per-card figures for several GPUs (`sdtune estimate-vram --gpus N`): DDP and FSDP2 plans.

    card = per_card(single, cfg, unet, plan, gpus=4)   # the one-card trace, as each of 4 cards holds it

- **ddp**: every card holds what one card holds for `train.batch_size` (its share of the global batch):
  the figures are the one-card trace's. DDP's gradient buckets are the gradients themselves
  (`gradient_as_bucket_view`), so nothing is added.
- **fsdp**: the step is traced with the UNet in the compute precision (FSDP2's mixed-precision policy
  gathers bf16 weights, so autocast casts nothing) for the activations and temporaries; the UNet's weights,
  gradients and AdamW state are then counted as FSDP2 holds them: each card keeps 1/N of the fp32 weights,
  gradients and AdamW moments, plus two gathered units (`sdtune.train.parallel.shard_units`: the one running
  and the one prefetched) in the compute precision and one unit's unsharded gradient (and its fp32 copy
  for the reduce-scatter); of the gradient shards, the share the one-card trace had made by its peak.
  With `memory.optimizer_offload=cpu` (FSDP2's CPUOffloadPolicy) the shards, their gradients and AdamW
  state are in host RAM instead.

Host RAM is per process, so a node running N processes needs N times the figure: under ddp each process
loads the whole model before it replicates it; under fsdp a rank reads only its shards of a trained UNet
(`sdtune.train.parallel.load_shards`; `sdtune.estimate._unet_share`) beside the whole frozen parts.
"""

from __future__ import annotations

import dataclasses


def per_card(single, cfg, unet, plan, gpus: int):
    """`single` (an `Estimate` of one card) as each of `gpus` cards holds it under `plan.distributed`."""
    notes = (*single.notes, f"{gpus} processes ({plan.distributed}): the figures are per card; host RAM is "
                            "per process, N times on a node of N")
    if plan.distributed != "fsdp":
        return dataclasses.replace(single, notes=notes, gpus=gpus, distributed=plan.distributed)
    from sdtune.optim.tier import Tier
    from sdtune.train.parallel import shard_units

    sizes = _own_sizes(unet, shard_units(unet))
    largest, compute = max(sizes), plan.working_dtype.itemsize
    shards = {"weights": 4 * sum(sizes), "gradients": 4 * sum(sizes),
              "optimizer_state": Tier.footprint([(n,) for n in sizes], itemsize=compute).device}
    shards = {key: -(-value // gpus) for key, value in shards.items()}  # each card's share
    offloaded = plan.optimizer_offload == "cpu"
    c = dict(single.categories)
    c["weights"] = 2 * largest * compute + (0 if offloaded else shards["weights"])  # the unit running + the next
    alive = min(1.0, c["gradients"] / (sum(sizes) * compute))  # the share of gradients made by the traced peak
    c["gradients"] = largest * (compute + 4) + (0 if offloaded else int(alive * shards["gradients"]))
    c["optimizer_state"] = 0 if offloaded else shards["optimizer_state"]
    allocated = sum(c[key] for key in ("weights", "frozen", "gradients", "optimizer_state", "activations",
                                       "temporaries"))
    overhead = int(allocated * single.categories["allocator_overhead"] / max(1, single.peak_allocated))
    c["allocator_overhead"] = overhead
    host = single.host_ram + (sum(shards.values()) if offloaded else 0)
    return dataclasses.replace(single, categories=c, peak_allocated=allocated, peak_reserved=allocated + overhead,
                               total=allocated + overhead + c["cuda_context"], host_ram=host, notes=notes,
                               gpus=gpus, distributed="fsdp")

def _own_sizes(unet, units: list) -> list[int]:
    """Parameters each unit gathers: its own, not those of the units inside it; the root's last."""
    owner = {}
    for unit in [*units, unet]:  # innermost first: a parameter belongs to the first unit that holds it
        for param in unit.parameters():
            owner.setdefault(id(param), id(unit))
    sizes = dict.fromkeys(map(id, [*units, unet]), 0)
    for param in unet.parameters():
        sizes[owner[id(param)]] += param.numel()
    return list(sizes.values())
