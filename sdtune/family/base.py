"""The model-family interface (`Family`), and what it hands the trainer: `Components`, `Conditioning`."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from sdtune.errors import SdtuneError

TEXT_ENCODER_NAMES = ("text_encoder", "text_encoder_2")  # a pipeline's text encoders, in order: SD the first

if TYPE_CHECKING:
    import torch
    from diffusers import AutoencoderKL, SchedulerMixin, UNet2DConditionModel
    from transformers import PreTrainedTokenizerBase


@dataclass
class Components:
    """A pipeline taken apart for training, with the family that knows how to put it back together."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoders: tuple[torch.nn.Module, ...]  # one (SD 1.x/2.x) or two (SDXL), frozen
    tokenizers: tuple[PreTrainedTokenizerBase, ...]  # one per text encoder
    scheduler: SchedulerMixin  # the pipeline's own (sampling) scheduler; training derives a DDPM one from it
    family: Family
    options: dict = field(default_factory=dict)  # pipeline settings the family keeps (force_zeros_for_empty_prompt)
    origin: str = ""          # one line: what was loaded from where (a single file's configs and tokenizers)

    @property
    def text_encoder(self):
        return self.text_encoders[0]

    @property
    def tokenizer(self):
        return self.tokenizers[0]

    @property
    def frozen(self) -> tuple:
        """The modules that do not train: the VAE and the text encoders."""
        return (self.vae, *self.text_encoders)

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.get("prediction_type", "epsilon")

    @property
    def zero_terminal_snr(self) -> bool:
        """Whether the noise schedule's betas are rescaled so its last step is pure noise."""
        return bool(self.scheduler.config.get("rescale_betas_zero_snr", False))


@dataclass
class Conditioning:
    """What the text encoders give the UNet for a batch of captions."""

    hidden: torch.Tensor       # [B, tokens, width]: the cross-attention context
    pooled: torch.Tensor | None = None  # [B, width]: SDXL's pooled embedding of the second encoder; None for SD 1.x/2.x


class Family(ABC):
    """The interface; see `sd.StableDiffusion` and `sdxl.StableDiffusionXL`. A family must say how to take
    its pipeline apart, put it back together and encode captions; the rest has defaults."""

    name: ClassVar[str]
    pipeline_class: ClassVar[str]          # the diffusers pipeline class that loads and samples it

    def pipeline_type(self):
        import diffusers

        return getattr(diffusers, self.pipeline_class)

    def load_options(self) -> dict:
        """Keyword arguments for the pipeline's from_pretrained/from_single_file."""
        return {}

    def load_pipeline(self, source: str, kind: str, config: str = "", **parts):
        """The pipeline from a diffusers folder (`kind="folder"`), a hub id (`"hub"`) or a single file with
        the configs of a diffusers folder (`"single_file"`), in fp32 on the CPU; `parts` are modules used
        as they are instead of being loaded (a random UNet)."""
        pipeline, options = self.pipeline_type(), {**self.load_options(), **parts}
        if kind == "folder":
            return pipeline.from_pretrained(source, local_files_only=True, **options)
        if kind == "single_file":
            try:
                return pipeline.from_single_file(source, config=config, local_files_only=True, **options)
            except (ValueError, KeyError, RuntimeError, OSError) as exc:
                raise SdtuneError(f"could not load {source} with the configs of {config}: {exc}") from None
        try:
            return pipeline.from_pretrained(source, **options)
        except OSError as exc:
            raise SdtuneError(f"could not fetch '{source}' from the Hugging Face hub "
                              f"({str(exc).splitlines()[0]}); download it, or pass a local diffusers folder "
                              "with --model") from None

    def vae_dtype(self, vae, working_dtype):
        """The precision the frozen VAE runs in under a plan of `working_dtype`."""
        return working_dtype

    @abstractmethod
    def components(self, pipe) -> Components:
        """The loaded pipeline taken apart for training."""

    @abstractmethod
    def assemble(self, components: Components):
        """The inference pipeline, sharing `components`' modules."""

    @abstractmethod
    def encode(self, components: Components, captions: list[str], grad: bool = False) -> Conditioning:
        """The text encoders' output for `captions`, as the family's pipeline encodes prompts; with `grad`,
        differentiable (a text-encoder LoRA trains through it)."""

    @abstractmethod
    def encode_tokens(self, encoders: tuple[torch.nn.Module, ...], tokens: list[torch.Tensor],
                      grad: bool = False) -> Conditioning:
        """`encode` past the tokenizers: each encoder's output for its token ids (`[B, 77]`, one tensor per
        encoder), on any device: the meta device too, where the estimator traces it."""

    def added_cond(self, cond: Conditioning, items, device, dtype) -> dict | None:
        """The UNet's `added_cond_kwargs` for a micro-batch of `sdtune.data.Item`s; None where it takes none."""
        return None
