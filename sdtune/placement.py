"""Where the model lives under a memory plan: the one place that puts the working weights, the weight
streamer and the optimizer tier together.

    placed = place(components, plan, cfg.train)   # placed.tier, placed.streamer (None without streaming)
    ...
    placed.close()                                # the tier's threads and files

The frozen VAE and text encoder(s) go to the compute device in the working precision (SDXL's VAE stays
fp32 under fp16, where it overflows: `Family.vae_dtype`). The trainable UNet
is fp32: with the in-device tier it moves to the device as it is (autocast computes in half precision);
with a host tier its fp32 weights stay on the host, where the tier takes them as its masters and puts
working-precision copies on the device, or, with `param_offload=cpu`, in host memory for `ParamStreamer`
to bring to the device block by block (built after the tier, which owns those host weights).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sdtune.config import TrainConfig
from sdtune.memory import Plan
from sdtune.offload.tier import Tier, make_tier, tier_class


@dataclass
class Placement:
    tier: Tier
    streamer: Any = None  # ParamStreamer with param_offload=cpu
    closed: bool = False

    def close(self) -> None:
        """Release the tier's threads and files; once, however often it is called."""
        if not self.closed:
            self.closed = True
            self.tier.close()


def place(components, plan: Plan, train: TrainConfig) -> Placement:
    """Cast and place every part as `plan` says, switch on checkpointing and the attention backend, freeze
    the VAE and text encoder(s), and build the optimizer tier (and the streamer) over the UNet."""
    import torch

    unet = components.unet.to(dtype=torch.float32)
    if not tier_class(plan).host_gradients:
        unet.to(plan.device)
    _configure(unet, plan)
    for frozen in components.frozen:
        frozen.requires_grad_(False)
        frozen.eval()
        frozen.to(plan.device, dtype=plan.working_dtype)
    components.vae.to(dtype=components.family.vae_dtype(components.vae, plan.working_dtype))  # SDXL's: fp32 in fp16
    tier = make_tier(unet.parameters(), train, plan, model=unet)
    if plan.param_offload != "cpu":
        return Placement(tier)
    from sdtune.offload import ParamStreamer

    return Placement(tier, ParamStreamer(unet, plan.device, tier.optimizer, prefetch_blocks=plan.param_prefetch_blocks))


def _configure(unet, plan: Plan) -> None:
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.requires_grad_(True)
    unet.train()
    if plan.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if plan.attention == "xformers":
        unet.enable_xformers_memory_efficient_attention()
    else:
        unet.set_attn_processor(AttnProcessor2_0())
