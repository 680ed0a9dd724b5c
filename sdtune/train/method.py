"""The way of training (`train.method`, and whether the text encoders train with it): the one place that
says what trains, how the UNet and encoders are cast for it, which file a checkpoint keeps it in, and
how its weights are read and put back.

    method = method_for(cfg)        # FullFineTune(text_encoders=False), Lora(text_encoders=True), Embedding()
    trained = method.prepare(components, plan, device)   # cast, unfreeze, attach: what trains
    method.trains_text_encoders     # the one answer to "do the text encoders train"
    method.weights_file             # "unet.safetensors" / "lora.safetensors" / "embedding.safetensors"

The trainer (`sdtune.train.placement.place`) and the estimator (on meta-device parts) both call
`prepare`, so the estimate counts what training holds. A new way of training (textual inversion, a LyCORIS
adapter) is one new subclass: `prepare` says what trains, `weights`/`restore` how its checkpoint reads
and writes, `streamed` what a parameter streamer may move (a frozen base only, where adapters train).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Protocol

if TYPE_CHECKING:
    import torch

    from sdtune.config import Config, EmbeddingConfig, LoraConfig
    from sdtune.family.base import Components
    from sdtune.family.meta import MetaModel
    from sdtune.optim.tier import Tier
    from sdtune.plan import Plan


class Placed(Protocol):
    """What a method reads its weights from: a `sdtune.train.placement.Placement`."""

    unet: torch.nn.Module
    tier: Tier
    modules: dict[str, torch.nn.Module]

    @property
    def sharded(self) -> bool: ...


@dataclass
class Trained:
    """What `Method.prepare` made trainable."""

    modules: dict[str, torch.nn.Module]  # by pipeline name ("unet", "text_encoder", ...): where it lives
    params: list[torch.nn.Parameter]     # the optimizer's first group, at train.learning_rate
    text_encoder_params: list[torch.nn.Parameter] = field(default_factory=list)  # at train.text_encoder_lr

    @property
    def all_params(self) -> list[torch.nn.Parameter]:
        return [*self.params, *self.text_encoder_params]


@dataclass(frozen=True)
class Method(ABC):
    """One way of training. `text_encoders`: whether the text encoder(s) train too."""

    text_encoders: bool = False
    weights_file: ClassVar[str]  # the checkpoint file of what trains
    frozen_unet: ClassVar[bool]  # the UNet is a frozen base in the working precision (a streamer moves it all)
    label: ClassVar[str]         # how `sdtune presets` names it
    adapter: ClassVar[bool]      # what a run exports: adapter files for its base (True) or a whole model

    @property
    def trains_text_encoders(self) -> bool:
        return self.text_encoders

    @abstractmethod
    def prepare(self, components: Components | MetaModel, plan: Plan, device: str) -> Trained:
        """Cast the UNet (and the text encoders when they train) as this method trains them, on `device`
        where the plan keeps them there, and make trainable what trains. The frozen parts are cast already."""

    @abstractmethod
    def weights(self, placement: Placed) -> dict:
        """What trains, in fp32, wherever the tier keeps it: what a checkpoint holds."""

    @abstractmethod
    def restore(self, placement: Placed, weights: dict) -> None:
        """Load what `weights` returned back into the trained modules."""

    def streamed(self) -> Callable[[torch.nn.Parameter], bool] | None:
        """Which UNet parameters a `ParamStreamer` moves (None: all of them)."""
        return None


@dataclass(frozen=True)
class FullFineTune(Method):
    """Every UNet weight trains, in fp32 (autocast computes in the working precision); with a host tier
    the fp32 weights stay on the host as the tier's masters. With `train.text_encoder_lr` the text
    encoder(s) train too, in fp32 on the device, in their own parameter group."""

    weights_file: ClassVar[str] = "unet.safetensors"
    frozen_unet: ClassVar[bool] = False
    label: ClassVar[str] = "full"
    adapter: ClassVar[bool] = False

    def prepare(self, components, plan, device) -> Trained:
        import torch

        from sdtune.optim.tier import tier_class

        unet = components.unet
        unet.to(dtype=torch.float32).requires_grad_(True)
        if not tier_class(plan).host_gradients and (unet.device.type != "meta" or device == "meta"):
            unet.to(device)  # a meta-device UNet stays there: FSDP makes each rank's shards (parallel.load_shards)
        encoders = _trained_text_encoders(components, device) if self.text_encoders else {}
        encoder_params = [p for encoder in encoders.values() for p in encoder.parameters()]
        return Trained({"unet": unet, **encoders}, list(unet.parameters()), encoder_params)

    def weights(self, placement) -> dict:
        if placement.sharded:  # gathered: every rank calls, rank 0 gets them
            from sdtune.train.parallel import full_weights

            return full_weights(placement.unet)
        return placement.tier.master_weights(placement.unet)

    def restore(self, placement, weights: dict) -> None:
        placement.unet.load_state_dict(weights)


@dataclass(frozen=True)
class Lora(Method):
    """The UNet is frozen in the working precision and fp32 LoRA adapters (`sdtune.lora.adapter`) train
    on it, and with `lora.text_encoder` on the text encoder(s)' attention; with `lora.init_from` they start
    from that file's weights. A parameter streamer moves the frozen base only; the adapters stay on the
    device."""

    lora: LoraConfig | None = None
    seed: int = 0
    weights_file: ClassVar[str] = "lora.safetensors"
    frozen_unet: ClassVar[bool] = True
    label: ClassVar[str] = "LoRA"
    adapter: ClassVar[bool] = True

    def prepare(self, components, plan, device) -> Trained:
        from sdtune.lora.adapter import attach, trainable

        unet = components.unet
        unet.to(dtype=plan.working_dtype)
        if plan.param_offload != "cpu":
            unet.to(device)
        modules = attach(unet, components.text_encoders, self.lora, seed=self.seed)
        if self.lora.init_from and not next(iter(trainable(unet))).is_meta:  # the estimate's parts hold no values
            from sdtune.lora.adapter import load_file

            loaded = load_file(modules, components.family, self.lora.init_from)
            logging.getLogger(__name__).info(f"lora.init_from: the adapters start from {loaded}; the optimizer "
                                             "state starts fresh and the step at 0 (with --resume the "
                                             "checkpoint's replace them)")
        if plan.param_offload == "cpu":  # the adapters go to the device, the frozen base waits on the host
            for param in trainable(unet):
                param.data = param.data.to(device)
        return Trained(modules, [p for module in modules.values() for p in trainable(module)])

    def weights(self, placement) -> dict:
        from sdtune.lora.adapter import trained_weights

        return trained_weights(placement.modules)

    def restore(self, placement, weights: dict) -> None:
        from sdtune.lora.adapter import restore

        restore(placement.modules, weights)

    def streamed(self):
        return lambda p: not p.requires_grad


@dataclass(frozen=True)
class DoRA(Lora):
    """A LoRA with DoRA (`lora.dora`): peft's weight-decomposed LoRA, a trained magnitude per output row beside
    up @ down. Its own class for its label and its kohya file (`dora_scale`, rescaled for ComfyUI at export);
    everything else is the LoRA's, the algorithm's details in `sdtune.lora.algorithms`."""

    label: ClassVar[str] = "DoRA"


@dataclass(frozen=True)
class LoHa(Lora):
    """LyCORIS' LoHa (`lora.algo = "loha"`) through peft: the update is the Hadamard product of two low-rank
    pairs (~2x LoRA's parameters at a rank). Trained, checkpointed and exported as a LoRA is; its file is the
    kohya/LyCORIS one alone (diffusers loads no LoHa)."""

    label: ClassVar[str] = "LoHa"


@dataclass(frozen=True)
class LoKr(Lora):
    """LyCORIS' LoKr (`lora.algo = "lokr"`) through peft: the update is a Kronecker product, split by
    `lora.factor`; as LoHa, a kohya/LyCORIS file alone."""

    label: ClassVar[str] = "LoKr"


ADAPTERS = {"lora": Lora, "loha": LoHa, "lokr": LoKr}  # lora.algo -> its method (DoRA: lora.dora)


@dataclass(frozen=True)
class Embedding(Method):
    """Textual inversion: only a new word's vectors (`embedding.token`, `sdtune.train.embedding`) train, fp32,
    in each text encoder (both for SDXL); the UNet, the VAE and the rest of the text encoders stay frozen in the
    working precision, and the text encoders run with grad every step. A parameter streamer may move the whole
    UNet."""

    embedding: EmbeddingConfig | None = None
    text_encoders: bool = True  # the encoders run with grad, though only the new vectors train
    weights_file: ClassVar[str] = "embedding.safetensors"
    frozen_unet: ClassVar[bool] = True
    label: ClassVar[str] = "embedding"
    adapter: ClassVar[bool] = True

    def prepare(self, components, plan, device) -> Trained:
        from sdtune.train.embedding import add_token, vectors

        unet = components.unet
        unet.requires_grad_(False)
        unet.to(dtype=plan.working_dtype)
        if plan.param_offload != "cpu":
            unet.to(device)
        modules = add_token(components, self.embedding, device)
        return Trained(modules, list(vectors(modules).values()))

    def weights(self, placement) -> dict:
        from sdtune.train.embedding import vectors

        return vectors(placement.modules)

    def restore(self, placement, weights: dict) -> None:
        from sdtune.train.embedding import load_vectors

        load_vectors(placement.modules, weights)


def method_for(cfg: Config) -> Method:
    """The way `cfg` trains. The text encoders train with `train.text_encoder_lr` > 0 (a full fine-tune's
    whole encoders) or `lora.text_encoder` (a LoRA's adapters on them); the config refuses each with the
    other method."""
    if cfg.train.method == "lora":
        kind = DoRA if cfg.lora.dora else ADAPTERS[cfg.lora.algo]
        return kind(text_encoders=cfg.lora.text_encoder, lora=cfg.lora, seed=cfg.train.seed)
    if cfg.train.method == "embedding":
        return Embedding(embedding=cfg.embedding)
    return FullFineTune(text_encoders=cfg.train.text_encoder_lr > 0)


def _trained_text_encoders(components: Components | MetaModel, device: str) -> dict:
    """The text encoder(s) in fp32 on `device`, trainable (autocast computes in the working precision), by
    pipeline name."""
    import torch

    from sdtune.family.base import TEXT_ENCODER_NAMES

    encoders = dict(zip(TEXT_ENCODER_NAMES, components.text_encoders, strict=False))
    for encoder in encoders.values():
        encoder.to(device, dtype=torch.float32).requires_grad_(True)
        encoder.train()
    return encoders
