"""Where the model lives under a memory plan: the one place that puts the working weights, the weight
streamer and the optimizer tier together.

    placed = place(components, plan, cfg)   # placed.tier, placed.streamer (None without streaming)
    placed.weights()                        # what trains, in fp32: what a checkpoint holds
    placed.close()                          # the tier's threads and files

What trains, and how it is cast, is the method's (`sdtune.train.method`); `cast_parts`, `configure` and
`stream` are the steps the estimator also runs, on meta-device parts (`sdtune.estimate.trace`), so that
its figures are those of this placement; the tier and the host buffers are built here only.

The frozen VAE and text encoder(s) go to the compute device in the working precision (SDXL's VAE stays
fp32 under fp16, where it overflows: `Family.vae_dtype`). The trainable UNet
is fp32: with the in-device tier it moves to the device as it is (autocast computes in half precision);
with a host tier its fp32 weights stay on the host, where the tier takes them as its masters and puts
working-precision copies on the device, or, with `param_offload=cpu`, in host memory for `ParamStreamer`
to bring to the device block by block (built after the tier, which owns those host weights).

With `train.method = "lora"` the whole UNet is frozen like the rest, in the working precision on the
device, and only the fp32 LoRA adapters (`sdtune.lora.adapter`) train, with the in-device tier (the
config refuses optimizer offload for LoRA). With `param_offload=cpu` the frozen UNet stays in one host
buffer and `ParamStreamer` streams only it; the adapters stay on the device. A textual inversion
(`train.method = "embedding"`) places the UNet as a LoRA does and leaves the text encoders frozen on the
device; only its new word's fp32 vectors train (`sdtune.train.embedding`).

Several processes (`plan.distributed`, `sdtune.train.parallel`): with `ddp` the loss calls the UNet under
DistributedDataParallel (`Placement.model`); with `fsdp` the fp32 UNet is sharded in place before the
optimizer is built over its shards (a UNet loaded on the meta device gets each rank's rows only:
`sdtune.train.parallel.load_shards`), and `weights()` gathers them (every rank calls it).

With `memory.compile=blocks` the UNet's transformer layers are compiled last (`sdtune.train.compile`), as
LoRA, checkpointing and the attention backend left them; the first optimizer step logs what it compiled.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sdtune.config import Config
from sdtune.optim.tier import Tier, make_tier
from sdtune.plan import Plan
from sdtune.train.method import Method, Trained, method_for

if TYPE_CHECKING:
    import torch

    from sdtune.family.base import Components
    from sdtune.family.meta import MetaModel
    from sdtune.offload import ParamStreamer
    from sdtune.offload.pinned import PinnedBuffer
    from sdtune.train.compile import CompiledBlocks

Label = Callable[[list, str], None]  # (tensors, category): the estimator's tracker counts what is placed


@dataclass
class Placement:
    method: Method
    tier: Tier
    unet: torch.nn.Module
    modules: dict[str, torch.nn.Module] = field(default_factory=dict)  # what trains, by pipeline name
    streamer: ParamStreamer | None = None      # with param_offload=cpu
    host_frozen: PinnedBuffer | None = None    # a streamed LoRA's frozen UNet weights: the host buffer they live in
    model: torch.nn.Module | None = None       # what the loss calls: the UNet, or the UNet under DDP
    distributed: str = "none"  # the plan's: "none", "ddp" or "fsdp"
    closed: bool = False
    compiled: CompiledBlocks | None = None     # with memory.compile=blocks

    def __post_init__(self):
        if self.model is None:
            self.model = self.unet

    @property
    def lora(self) -> dict[str, torch.nn.Module] | None:
        """An adapter method's {pipeline name: module with an adapter}; None for a full fine-tune."""
        return self.modules if self.method.adapter else None

    @property
    def text_encoders(self) -> dict[str, torch.nn.Module] | None:
        """train.text_encoder_lr: {pipeline name: text encoder}, trained whole in fp32 (None otherwise; a
        LoRA's text-encoder adapters are in `lora`)."""
        if self.method.adapter:  # a LoRA's text-encoder adapters are in `lora`
            return None
        return {name: module for name, module in self.modules.items() if name != "unet"} or None

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
        return self.method.weights_file

    def weights(self) -> dict:
        """What trains, in fp32, wherever the tier keeps it: the UNet's weights, or the LoRA adapters'."""
        return self.method.weights(self)

    def trained_params(self) -> dict:
        """Every trained parameter, the tensors themselves, as "<pipeline part>.<name>"."""
        from sdtune.lora.adapter import trained_weights

        return trained_weights(self.modules)

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
        self.method.restore(self, weights)

    def close(self) -> None:
        """Release the tier's threads and files; once, however often it is called."""
        if not self.closed:
            self.closed = True
            self.tier.close()


def place(components: Components, plan: Plan, cfg: Config) -> Placement:
    """Cast and place every part as `plan` says, switch on checkpointing and the attention backend, freeze
    the VAE and text encoder(s), and build the optimizer tier (and the streamer) over what trains."""
    method = method_for(cfg)
    unet, trained = components.unet, cast_parts(components, plan, method, plan.device)
    host_frozen = _host_frozen(unet, plan) if method.frozen_unet and plan.param_offload == "cpu" else None
    configure(unet, plan)
    params = trained.params
    if plan.distributed == "fsdp":  # before the optimizer: it steps the shards
        from sdtune.train.parallel import shard

        shard(unet, plan, components.unet_weights)
        params = list(unet.parameters())
    tier = make_tier(params, cfg.train, plan, model=unet, backward_passes=2 if cfg.prior_preservation else 1)
    if trained.text_encoder_params:  # their own learning rate, which the LR schedule scales as the UNet's
        tier.optimizer.add_param_group({"params": trained.text_encoder_params, "lr": cfg.train.text_encoder_lr})
    model = unet
    if plan.distributed == "ddp":
        from sdtune.train.parallel import wrap_ddp

        model = wrap_ddp(unet, plan.device)
    streamer = stream(unet, method, plan, plan.device, tier.optimizer) if plan.param_offload == "cpu" else None
    compiled = _compile(unet, tier) if cfg.memory.compile == "blocks" else None
    return Placement(method, tier, unet, trained.modules, streamer, host_frozen, model, plan.distributed,
                     compiled=compiled)


def _compile(unet, tier: Tier) -> CompiledBlocks:
    """memory.compile=blocks, last: the blocks as LoRA, checkpointing and the attention backend left them;
    what the first optimizer step compiled is logged after it."""
    from sdtune.train.compile import compile_blocks

    compiled = compile_blocks(unet)
    tier.optimizer.register_step_post_hook(lambda optimizer, args, kwargs: compiled.report())
    return compiled


def cast_parts(components: Components | MetaModel, plan: Plan, method: Method, device: str,
               label: Label | None = None) -> Trained:
    """Freeze the VAE and text encoder(s) and cast them to `device` in the working precision (the VAE as
    its family says: SDXL's stays fp32 under fp16), then cast what trains as `method` does; returns it.
    `label(tensors, category)` hears of every weight this leaves on `device`, as "frozen" or "weights"
    (the estimator's tracker, on meta-device parts): not the UNet's a host tier or a streamer keeps."""
    from sdtune.optim.tier import tier_class

    for frozen in components.frozen:
        frozen.requires_grad_(False)
        frozen.eval()
        frozen.to(device, dtype=plan.working_dtype)
    if components.vae is not None:
        components.vae.to(dtype=components.family.vae_dtype(components.vae, plan.working_dtype))
    trained = method.prepare(components, plan, device)
    if label is not None:
        streamed = plan.param_offload == "cpu"  # what is streamed is counted as the streamer copies it in
        for module in components.frozen:
            label([p for p in module.parameters() if not p.requires_grad], "frozen")
        if not streamed:
            label([p for p in components.unet.parameters() if not p.requires_grad], "frozen")  # a LoRA's base
        on_host = streamed or tier_class(plan).host_gradients  # a full fine-tune's UNet, a host tier's masters
        label([p for p in trained.params if method.frozen_unet or not on_host], "weights")
        label(trained.text_encoder_params, "weights")
    return trained


def stream(unet: torch.nn.Module, method: Method, plan: Plan, device: str, optimizer=None,
           on_copy: Callable | None = None) -> ParamStreamer:
    """The `ParamStreamer` that brings the UNet's host weights to `device` block by block (what `method`
    streams: a LoRA its frozen base only); `on_copy` hears of each device buffer (the estimator's)."""
    from sdtune.offload import ParamStreamer

    return ParamStreamer(unet, device, optimizer, prefetch_blocks=plan.param_prefetch_blocks, on_copy=on_copy,
                         select=method.streamed())


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


def configure(unet, plan: Plan, checkpoint: Callable | None = None) -> None:
    """Training mode, activation checkpointing (through `checkpoint` where given: the estimator's, without
    the RNG bookkeeping the meta device lacks) and the plan's attention backend."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.train()
    if plan.gradient_checkpointing:
        unet.enable_gradient_checkpointing(checkpoint)
    if plan.attention == "xformers":
        unet.enable_xformers_memory_efficient_attention()
    else:
        unet.set_attn_processor(AttnProcessor2_0())
