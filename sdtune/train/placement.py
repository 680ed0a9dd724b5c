"""Where the model lives under a memory plan: the one place that puts the working weights, the weight
streamer and the optimizer tier together.

    placed = place(components, plan, cfg)   # placed.tier, placed.streamer (None without streaming)
    placed.weights()                        # what trains, in fp32: what a checkpoint holds
    placed.close()                          # the tier's threads and files

The frozen VAE and text encoder(s) go to the compute device in the working precision (SDXL's VAE stays
fp32 under fp16, where it overflows: `Family.vae_dtype`). The trainable UNet
is fp32: with the in-device tier it moves to the device as it is (autocast computes in half precision);
with a host tier its fp32 weights stay on the host, where the tier takes them as its masters and puts
working-precision copies on the device, or, with `param_offload=cpu`, in host memory for `ParamStreamer`
to bring to the device block by block (built after the tier, which owns those host weights).

With `train.method = "lora"` the whole UNet is frozen like the rest, in the working precision on the
device, and only the fp32 LoRA adapters (`sdtune.lora.adapter`) train, with the in-device tier (the
config refuses optimizer offload for LoRA). With `param_offload=cpu` the frozen UNet stays in one host
buffer and `ParamStreamer` streams only it; the adapters stay on the device.

Several processes (`plan.distributed`, `sdtune.train.parallel`): with `ddp` the loss calls the UNet under
DistributedDataParallel (`Placement.model`); with `fsdp` the fp32 UNet is sharded in place before the
optimizer is built over its shards, and `weights()` gathers them (every rank calls it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sdtune.config import Config
from sdtune.optim.tier import Tier, make_tier, tier_class
from sdtune.plan import Plan


@dataclass
class Placement:
    tier: Tier
    unet: Any
    streamer: Any = None  # ParamStreamer with param_offload=cpu
    lora: dict | None = None  # train.method=lora: {pipeline name: module with an adapter}
    host_frozen: Any = None   # a streamed LoRA's frozen UNet weights: the host buffer they live in
    model: Any = None         # what the loss calls: the UNet, or the UNet under DDP
    distributed: str = "none"  # the plan's: "none", "ddp" or "fsdp"
    text_encoders: dict | None = None  # train.text_encoder_lr: {pipeline name: text encoder}, trained in fp32
    closed: bool = False

    def __post_init__(self):
        if self.model is None:
            self.model = self.unet

    @property
    def sharded(self) -> bool:
        """memory.distributed=fsdp: the UNet's weights are split over the ranks (checkpointed per rank)."""
        return self.distributed == "fsdp"

    def no_sync(self, sync: bool):
        """Around a backward pass: with DDP and `sync` false, keep its gradients on this rank (the last
        backward of an optimizer step averages everything accumulated)."""
        from contextlib import nullcontext

        return nullcontext() if sync or self.model is self.unet else self.model.no_sync()

    @property
    def weights_file(self) -> str:
        """The checkpoint file of what trains."""
        return "unet.safetensors" if self.lora is None else "lora.safetensors"

    def weights(self) -> dict:
        """What trains, in fp32, wherever the tier keeps it: the UNet's weights, or the LoRA adapters'."""
        if self.lora is None and self.sharded:  # gathered: every rank calls, rank 0 gets them
            from sdtune.train.parallel import full_weights

            return full_weights(self.unet)
        if self.lora is None:
            return self.tier.master_weights(self.unet)
        from sdtune.lora.adapter import trained_weights

        return trained_weights(self.lora)

    def trained_params(self) -> dict:
        """Every trained parameter, the tensors themselves, as "<pipeline part>.<name>"."""
        from sdtune.lora.adapter import trained_weights

        return trained_weights(self.lora or {"unet": self.unet, **(self.text_encoders or {})})

    def text_encoder_weights(self) -> dict:
        """The trained text encoder(s)' fp32 weights as "<pipeline part>.<name>" (empty when they are frozen)."""
        return {name: p for name, p in self.trained_params().items() if not name.startswith("unet.")}

    def restore_text_encoders(self, weights: dict) -> None:
        import torch

        with torch.no_grad():
            for name, p in self.text_encoder_weights().items():
                p.copy_(weights[name])

    def restore(self, weights: dict) -> None:
        """Load what `weights` returned (a checkpoint's) back into the trained modules."""
        if self.lora is None:
            self.unet.load_state_dict(weights)
            return
        from sdtune.lora.adapter import restore

        restore(self.lora, weights)

    def close(self) -> None:
        """Release the tier's threads and files; once, however often it is called."""
        if not self.closed:
            self.closed = True
            self.tier.close()


def place(components, plan: Plan, cfg: Config) -> Placement:
    """Cast and place every part as `plan` says, switch on checkpointing and the attention backend, freeze
    the VAE and text encoder(s), and build the optimizer tier (and the streamer) over what trains."""
    import torch

    unet, lora = components.unet, cfg.train.method == "lora"
    for frozen in components.frozen:
        frozen.requires_grad_(False)
        frozen.eval()
        frozen.to(plan.device, dtype=plan.working_dtype)
    text_encoders = _trained_text_encoders(components, plan) if cfg.train.text_encoder_lr else None
    components.vae.to(dtype=components.family.vae_dtype(components.vae, plan.working_dtype))  # SDXL's: fp32 in fp16
    host_frozen = None
    if lora:
        from sdtune.lora.adapter import attach, trainable

        unet.to(dtype=plan.working_dtype)
        if plan.param_offload != "cpu":
            unet.to(plan.device)
        modules = attach(unet, components.text_encoders, cfg.lora, seed=cfg.train.seed)
        if plan.param_offload == "cpu":  # the adapters go to the device, the frozen base waits on the host
            for param in trainable(unet):
                param.data = param.data.to(plan.device)
            host_frozen = _host_frozen(unet, plan)
        params = [p for module in modules.values() for p in trainable(module)]
    else:
        unet.to(dtype=torch.float32).requires_grad_(True)
        if not tier_class(plan).host_gradients:
            unet.to(plan.device)
        modules, params = None, list(unet.parameters())
    _configure(unet, plan)
    if plan.distributed == "fsdp":  # before the optimizer: it steps the shards
        from sdtune.train.parallel import shard

        shard(unet, plan)
        params = list(unet.parameters())
    tier = make_tier(params, cfg.train, plan, model=unet, backward_passes=2 if cfg.prior_preservation else 1)
    if text_encoders:  # their own learning rate, which the LR schedule scales as the UNet's
        encoder_params = [p for encoder in text_encoders.values() for p in encoder.parameters()]
        tier.optimizer.add_param_group({"params": encoder_params, "lr": cfg.train.text_encoder_lr})
    if plan.distributed == "ddp":
        from sdtune.train.parallel import wrap_ddp

        return Placement(tier, unet, lora=modules, model=wrap_ddp(unet, plan.device), distributed="ddp")
    if plan.param_offload != "cpu":
        return Placement(tier, unet, lora=modules, distributed=plan.distributed, text_encoders=text_encoders)
    from sdtune.offload import ParamStreamer

    select = (lambda p: not p.requires_grad) if lora else None  # a LoRA streams the frozen base only
    streamer = ParamStreamer(unet, plan.device, tier.optimizer, prefetch_blocks=plan.param_prefetch_blocks,
                             select=select)
    return Placement(tier, unet, streamer, lora=modules, host_frozen=host_frozen)


def _trained_text_encoders(components, plan: Plan) -> dict:
    """`train.text_encoder_lr`: the text encoder(s) in fp32 on the device, trainable (autocast computes in the
    working precision), by pipeline name."""
    import torch

    from sdtune.lora.adapter import TEXT_ENCODER_NAMES

    encoders = dict(zip(TEXT_ENCODER_NAMES, components.text_encoders, strict=False))
    for encoder in encoders.values():
        encoder.to(plan.device, dtype=torch.float32).requires_grad_(True)
        encoder.train()
    return encoders


def _host_frozen(unet, plan: Plan):
    """The frozen UNet's weights moved into one host buffer in module order (page-locked for a CUDA run),
    so that the streamer copies each block's weights in a run or two: the buffer, kept by the placement."""
    from sdtune.offload.pinned import PinnedBuffer

    frozen = [p for p in unet.parameters() if not p.requires_grad]
    buffer = PinnedBuffer(sum(p.numel() for p in frozen), plan.working_dtype, pin=plan.device == "cuda")
    offset = 0
    for param in frozen:
        home = buffer.tensor[offset:offset + param.numel()].view(param.shape)
        home.copy_(param.data)
        param.data = home
        offset += param.numel()
    return buffer


def _configure(unet, plan: Plan) -> None:
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.train()
    if plan.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if plan.attention == "xformers":
        unet.enable_xformers_memory_efficient_attention()
    else:
        unet.set_attn_processor(AttnProcessor2_0())
