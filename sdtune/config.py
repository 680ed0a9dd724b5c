"""Run configuration: frozen dataclasses, preset overlays, `--set` overrides, validation, TOML dump.

A preset (`sdtune/presets/NAME.toml`, or any path to a `.toml` file) overlays the defaults below with
the sections `[model] [data] [train] [lora] [memory] [output]`, plus a `[preset]` table that describes the card
it is for. `--set section.key=value` overrides are applied last. Every field's docstring (its `doc`
metadata) is both the schema's help and the comment written beside the key in `config.toml`.

    cfg, info = load_config("rtx3050", ["train.max_steps=100"])
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import tomllib

from sdtune.errors import SdtuneError

PRESET_DIR = Path(__file__).parent / "presets"
SECTIONS = ("model", "data", "train", "lora", "memory", "output")


# What `--resume` may change of a key, declared beside it (`doc(..., resume=...)`): FIXED, the default
# (the training's numbers depend on it); FREE (how long to train, when to give up, what to write); NEUTRAL
# (a memory lever that leaves the math alone: results match the unchanged run to float rounding); or a
# function of the old and new values.
FIXED, FREE, NEUTRAL = "fixed", "free", "neutral"


def doc(text: str, default, resume=FIXED):
    return field(default=default, metadata={"doc": text, "resume": resume})


def _not_nvme(old: str, new: str) -> bool:
    """optimizer_offload may move between none and cpu, whose AdamW state converts; the nvme tier's
    state file is laid out for its own buckets."""
    return "nvme" not in (old, new)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise SdtuneError(message)


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    pretrained: str = doc("diffusers folder, single-file .safetensors checkpoint, or hub id", "")
    config: str = doc("diffusers folder whose configs and tokenizer a single-file checkpoint uses", "")
    init: Literal["pretrained", "random"] = doc(
        "the UNet's starting weights: the base model's, or random (pretraining from scratch; the VAE and text "
        "encoders stay the base model's)", "pretrained")
    architecture: str = doc("with init=random: the UNet's architecture, a bundled name (sd15, sd21, sdxl) or a "
                            "folder with its config.json; empty: the base model's", "")

    def __post_init__(self):
        _require(not (self.architecture and self.init != "random"), "model.architecture is set but model.init "
                 "is pretrained: set model.init=random to train it from scratch, or clear model.architecture")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    resolution: int = doc("training size: buckets hold at most resolution x resolution pixels", 512)
    buckets: bool = doc("aspect-ratio buckets (sides multiples of 64); false crops every image square", True)
    min_side: int = doc("smallest bucket side, and the smallest usable image side, in px; 0: resolution / 2", 0)
    max_side: int = doc("largest bucket side in px; 0: resolution * 2", 0)
    max_ratio: float = doc("largest long-to-short side ratio of a bucket", 2.0)
    center_crop: bool = doc("crop the center of the resized image to its bucket (true) or a random window", True)
    random_flip: bool = doc("flip images horizontally at random", False)
    caption_extension: str = doc("sidecar caption file extension (NAME.txt, and NAME.caption is also read)", ".txt")
    caption: str = doc("caption for images without a sidecar or metadata caption (instance prompt); "
                       "empty: the file name", "")
    shuffle_tags: bool = doc("shuffle a caption's comma-separated tags each time it is used", False)
    keep_tags: int = doc("with shuffle_tags, keep the first K tags in place", 0)
    caption_dropout: float = doc("share of images trained with an empty caption (lets guidance work); 0 is off",
                                 0.0)
    cache_latents: bool = doc("encode every image once with the VAE and reuse the latents from disk", False)
    cache_text: bool = doc("embed every caption once and reuse the embeddings from disk", False)
    cache_shards: int = doc("with cache_latents: pack this many latents a file (millions of images); 0: a file "
                            "each", 0, resume=FREE)
    cache_dir: str = doc("folder of the latent, text and scan caches; empty: ~/.cache/sdtune", "")
    check_images: Literal["decode", "headers"] = doc(
        "before step 1, decode every image (every bad file reported up front) or read headers only (large "
        "folders: a bad file is reported and replaced when the loader meets it)", "decode", resume=FREE)
    loader_threads: int = doc("threads decoding the next micro-batch's images during this one; 0: none", 2, resume=FREE)
    scan_cache: bool = doc("remember each image's check by (path, size, mtime) in cache_dir/scan, so a rerun "
                           "starts without opening the images again", True, resume=FREE)
    class_dir: str = doc("DreamBooth prior preservation: folder of class images (generated into it when short); "
                         "empty: off", "")
    class_prompt: str = doc("caption of the class images, and the prompt that generates the missing ones "
                            "(e.g. 'a photo of a dog')", "")
    num_class_images: int = doc("class images to have in class_dir; missing ones are generated from the base "
                                "model before step 1", 100)

    def __post_init__(self):
        _require(self.resolution >= 8 and self.resolution % 8 == 0,
                 f"data.resolution must be a positive multiple of 8, got {self.resolution}")
        _require(self.loader_threads >= 0, f"data.loader_threads must be 0 or more, got {self.loader_threads}")
        _require(0 <= self.caption_dropout < 1, f"data.caption_dropout must be in [0, 1), got {self.caption_dropout}")
        _require(min(self.min_side, self.max_side, self.keep_tags, self.cache_shards) >= 0,
                 "data.min_side, data.max_side, data.keep_tags and data.cache_shards must be >= 0")
        _require(self.max_ratio >= 1, f"data.max_ratio must be at least 1, got {self.max_ratio}")
        _require(not (self.cache_latents and not self.center_crop),
                 "data.cache_latents stores one crop per image; it cannot serve data.center_crop=false "
                 "(a random crop each time): set one of them the other way")
        _require(self.num_class_images >= 1, f"data.num_class_images must be at least 1, got {self.num_class_images}")
        _require(not (self.class_prompt and not self.class_dir),
                 "data.class_prompt is set but data.class_dir is empty: name the folder of the class images")
        _require(not (self.cache_text and self.shuffle_tags),
                 "data.cache_text stores one embedding per caption; data.shuffle_tags makes a new caption each "
                 "time: set one of them the other way")

    @property
    def smallest_side(self) -> int:
        return self.min_side or self.resolution // 2

    @property
    def largest_side(self) -> int:
        return self.max_side or self.resolution * 2


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    max_steps: int = doc("optimizer steps to train", 1000, resume=FREE)
    batch_size: int = doc("images per forward pass", 1)
    gradient_accumulation_steps: int = doc("forward/backward passes summed into one optimizer step", 1)
    learning_rate: float = doc("peak learning rate", 1e-5)
    lr_scheduler: Literal["constant", "cosine"] = doc("learning-rate curve after warmup", "constant")
    lr_warmup_steps: int = doc("steps of linear warmup from 0 to learning_rate", 0)
    adam_beta1: float = doc("AdamW first-moment decay", 0.9)
    adam_beta2: float = doc("AdamW second-moment decay", 0.999)
    adam_epsilon: float = doc("AdamW denominator epsilon", 1e-8)
    weight_decay: float = doc("AdamW decoupled weight decay", 1e-2)
    max_grad_norm: float = doc("clip the gradient norm to this; 0 turns clipping off", 1.0)
    snr_gamma: float = doc("min-SNR-gamma loss weighting (5.0 is the paper's value); 0 turns it off", 0.0)
    noise_offset: float = doc("offset noise strength (0.05-0.1 helps very dark/bright images); 0 is off", 0.0)
    seed: int = doc("seed for weights' noise, timesteps, data order and augmentation", 0)
    max_bad_steps: int = doc("stop after this many steps in a row with a NaN/Inf loss or gradient (each is "
                             "skipped); 0 never stops", 5, resume=FREE)

    method: Literal["full", "lora"] = doc("what trains: the full UNet, or a LoRA ([lora]) over the frozen model",
                                          "full")
    prior_loss_weight: float = doc("with data.class_dir: loss = instance loss + this x class (prior) loss", 1.0)

    def __post_init__(self):
        for name in ("max_steps", "batch_size", "gradient_accumulation_steps"):
            _require(getattr(self, name) >= 1, f"train.{name} must be at least 1, got {getattr(self, name)}")
        _require(self.learning_rate > 0, f"train.learning_rate must be positive, got {self.learning_rate}")
        for name in ("lr_warmup_steps", "max_grad_norm", "snr_gamma", "noise_offset", "weight_decay", "max_bad_steps",
                     "prior_loss_weight"):
            _require(getattr(self, name) >= 0, f"train.{name} must be >= 0, got {getattr(self, name)}")
        _require(self.lr_warmup_steps <= self.max_steps,
                 f"train.lr_warmup_steps ({self.lr_warmup_steps}) exceeds train.max_steps ({self.max_steps})")


@dataclass(frozen=True, kw_only=True)
class LoraConfig:
    rank: int = doc("LoRA rank: the inner size of each low-rank update (4-128; larger learns more, bigger file)", 16)
    alpha: float = doc("LoRA alpha: the update is scaled by alpha / rank; 0: alpha = rank (scale 1)", 0.0)
    dropout: float = doc("dropout on the LoRA branch's input while training; 0 is off", 0.0)
    target: Literal["attention", "attention+conv"] = doc(
        "UNet layers that get a LoRA: attention projections (to_q/k/v/out), or those plus the ResNet and "
        "projection convolutions (LoCon)", "attention")
    text_encoder: bool = doc("also train a LoRA on the text encoder(s)' attention projections (no text cache)",
                             False)

    def __post_init__(self):
        _require(self.rank >= 1, f"lora.rank must be at least 1, got {self.rank}")
        _require(self.alpha >= 0, f"lora.alpha must be >= 0, got {self.alpha}")
        _require(0 <= self.dropout < 1, f"lora.dropout must be in [0, 1), got {self.dropout}")

    @property
    def scale_alpha(self) -> float:
        """The alpha the layers use: `alpha`, or the rank when it is 0."""
        return self.alpha or float(self.rank)


@dataclass(frozen=True, kw_only=True)
class MemoryConfig:
    device: Literal["auto", "cuda", "cpu"] = doc("compute device; auto takes the GPU when there is one", "auto")
    precision: Literal["fp32", "bf16", "fp16"] = doc(
        "autocast precision; UNet master weights stay fp32, fp16 adds dynamic loss scaling", "fp32")
    gradient_checkpointing: bool = doc("recompute UNet activations in backward: far less memory, ~25% slower",
                                       False, resume=NEUTRAL)
    attention: Literal["sdpa", "xformers", "auto"] = doc(
        "attention kernel: torch SDPA, xformers (needs the extra), or xformers if a test call on the GPU works",
        "sdpa", resume=NEUTRAL)
    optimizer: Literal["adamw", "adamw8bit"] = doc(
        "adamw (torch fused/foreach) or adamw8bit (bitsandbytes, 1/4 of the state memory)", "adamw")
    optimizer_offload: Literal["none", "cpu", "nvme"] = doc(
        "where fp32 master weights and AdamW state live: on the device, host RAM, or files in offload_dir", "none",
        resume=_not_nvme)
    offload_dir: str = doc("folder on a fast local disk for optimizer_offload=nvme (12 bytes per parameter)", "",
                           resume=NEUTRAL)
    param_offload: Literal["none", "cpu"] = doc(
        "keep the UNet's working weights in host RAM and stream them to the GPU block by block", "none",
        resume=NEUTRAL)
    distributed: Literal["auto", "none", "ddp", "fsdp"] = doc(
        "several processes (torchrun, accelerate launch): ddp copies the model to every GPU, fsdp shards its "
        "weights, gradients and AdamW state (FSDP2); auto is ddp when launched so", "auto")
    param_prefetch_blocks: int = doc("with param_offload=cpu: UNet blocks (up to 128 MiB each) copied to the GPU "
                                     "ahead of the one running; more overlaps copies better, costs VRAM", 2,
                                     resume=NEUTRAL)

    def __post_init__(self):
        _require(self.optimizer_offload == "none" or self.optimizer == "adamw",
                 f"memory.optimizer_offload={self.optimizer_offload} steps AdamW on the host; "
                 f"memory.optimizer={self.optimizer} cannot be offloaded (set memory.optimizer=adamw)")
        _require(self.optimizer_offload != "nvme" or self.offload_dir,
                 "memory.optimizer_offload=nvme needs memory.offload_dir (a folder on a fast local disk)")
        _require(self.param_prefetch_blocks >= 0,
                 f"memory.param_prefetch_blocks must be 0 or more, got {self.param_prefetch_blocks}")
        _require(self.param_offload == "none" or self.gradient_checkpointing,
                 f"memory.param_offload={self.param_offload} streams weights into the recomputation of backward; "
                 "it needs memory.gradient_checkpointing=true")


@dataclass(frozen=True, kw_only=True)
class OutputConfig:
    checkpoint_every: int = doc("save a resumable checkpoint every N steps; 0 saves only at the end", 500, resume=FREE)
    keep_checkpoints: int = doc("how many of the newest checkpoints to keep", 2, resume=FREE)
    sample_every: int = doc("sample sample_prompts into a PNG grid every N steps; 0 turns it off", 0, resume=FREE)
    sample_prompts: tuple[str, ...] = doc("prompts for the validation grids", (), resume=FREE)
    sample_steps: int = doc("denoising steps for validation samples", 20, resume=FREE)
    single_file: bool = doc("also write model.safetensors (fp16, original layout) when A1111/ComfyUI can read it",
                            True, resume=FREE)
    tensorboard: bool = doc("also write TensorBoard event files to OUT/logs/ (needs sdtune[tensorboard])", False,
                            resume=FREE)

    def __post_init__(self):
        for name in ("checkpoint_every", "sample_every"):
            _require(getattr(self, name) >= 0, f"output.{name} must be >= 0, got {getattr(self, name)}")
        _require(self.keep_checkpoints >= 1, f"output.keep_checkpoints must be at least 1, got {self.keep_checkpoints}")
        _require(self.sample_steps >= 1, f"output.sample_steps must be at least 1, got {self.sample_steps}")
        _require(not (self.sample_every and not self.sample_prompts),
                 "output.sample_every is set but output.sample_prompts is empty: add prompts or set sample_every=0")


@dataclass(frozen=True, kw_only=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def __post_init__(self):
        if self.train.method == "lora":
            memory = self.memory
            _require(memory.optimizer_offload == "none",
                     f"train.method=lora trains a few MB of weights: memory.optimizer_offload="
                     f"{memory.optimizer_offload} would move their AdamW state off the GPU to save nothing; "
                     "set memory.optimizer_offload=none")
        else:  # a full fine-tune streams the working copies of masters that a host tier keeps
            _require(self.memory.param_offload == "none" or self.memory.optimizer_offload != "none",
                     f"memory.param_offload={self.memory.param_offload} keeps weights off the GPU; it needs "
                     "memory.optimizer_offload=cpu or nvme (else the fp32 weights and AdamW state stay on the GPU)")
        _require(not (self.lora.text_encoder and self.train.method != "lora"),
                 "lora.text_encoder=true needs train.method=lora")
        _require(not (self.lora.text_encoder and self.data.cache_text),
                 "lora.text_encoder=true trains the text encoder, whose outputs then change every step; "
                 "data.cache_text cannot serve it: set data.cache_text=false")

    @property
    def prior_preservation(self) -> bool:
        """DreamBooth prior preservation: each batch pairs instance images with class images."""
        return bool(self.data.class_dir)


@dataclass(frozen=True, kw_only=True)
class PresetInfo:
    """The `[preset]` table: what the plan is for. Shown by `sdtune presets`, not used by training."""

    name: str
    card: str = ""
    vram_gib: float = 0.0
    description: str = ""


# ---------------------------------------------------------------------------------------------------------
# Type checking of raw TOML values against the dataclass fields


def _coerce(value, kind, where: str):
    origin = typing.get_origin(kind)
    if origin is Literal:
        choices = typing.get_args(kind)
        _require(value in choices, f"{where} must be one of {', '.join(map(str, choices))}; got {value!r}")
        return value
    if origin is tuple:
        _require(isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value),
                 f"{where} must be a list of strings, got {value!r}")
        return tuple(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    _require(ok, f"{where} must be {_TYPE_WORDS[kind]}, got {value!r}")
    return value


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _section_type(name: str, source: str) -> type:
    if name not in SECTIONS:
        close = difflib.get_close_matches(name, SECTIONS, n=1)
        hint = f"; did you mean [{close[0]}]?" if close else f"; sections are {', '.join(SECTIONS)}"
        raise SdtuneError(f"unknown section [{name}] in {source}{hint}")
    return typing.get_type_hints(Config)[name]


def _checked_values(name: str, values, source: str) -> dict:
    """`values` of section `name` with every key known and every value of the field's type."""
    _require(isinstance(values, dict), f"[{name}] in {source} must be a table of keys")
    kind = _section_type(name, source)
    hints, names = typing.get_type_hints(kind), [f.name for f in dataclasses.fields(kind)]
    checked = {}
    for key, value in values.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean '{name}.{close[0]}'?" if close else f"; known keys: {', '.join(names)}"
            raise SdtuneError(f"unknown key '{name}.{key}' in {source}{hint}")
        checked[key] = _coerce(value, hints[key], f"{name}.{key} in {source}")
    return checked


def apply_layers(cfg: Config, layers: list[tuple[dict, str]]) -> Config:
    """Overlay TOML-shaped dicts ({section: {key: value}}, each with its source for error messages) on
    `cfg`. Keys and types are checked layer by layer; cross-key rules once, on the final values, so the
    order of `--set` items never matters."""
    changes: dict[str, dict] = {}
    for data, source in layers:
        for name, values in data.items():
            changes.setdefault(name, {}).update(_checked_values(name, values, source))
    return dataclasses.replace(cfg, **{name: dataclasses.replace(getattr(cfg, name), **values)
                                       for name, values in changes.items()})


def parse_set(item: str) -> dict:
    """`section.key=value` into {section: {key: value}}; value is TOML, or a bare string."""
    path, sep, text = item.partition("=")
    section, dot, key = path.strip().partition(".")
    _require(sep == "=" and dot == "." and section and key,
             f"--set '{item}' is not of the form section.key=value (for example train.max_steps=100)")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    kind = typing.get_type_hints(Config).get(section)
    if kind is not None and typing.get_type_hints(kind).get(key) is str and not isinstance(value, str):
        value = text  # a path like 123 or a word like true stays text
    return {section: {key: value}}


# ---------------------------------------------------------------------------------------------------------
# Presets


def preset_names() -> list[str]:
    """The shipped presets, numbers in their numeric order (sdxl-8gb before sdxl-12gb)."""
    return sorted((p.stem for p in PRESET_DIR.glob("*.toml")),
                  key=lambda name: [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)])


def preset_path(name: str) -> Path:
    if name.endswith(".toml"):
        path = Path(name)
        _require(path.is_file(), f"preset file {name} does not exist")
        return path
    path = PRESET_DIR / f"{name}.toml"
    _require(path.is_file(), f"unknown preset '{name}'; choose one of {', '.join(preset_names())} "
                             "or pass a path to a .toml file")
    return path


def read_preset(name: str) -> tuple[dict, PresetInfo]:
    path = preset_path(name)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SdtuneError(f"{path} is not valid TOML: {exc}") from None
    meta = data.pop("preset", {})
    allowed = {f.name for f in dataclasses.fields(PresetInfo)} - {"name"}
    for key in meta:
        _require(key in allowed, f"unknown key 'preset.{key}' in {path.name}; known: {', '.join(sorted(allowed))}")
    return data, PresetInfo(name=path.stem, **meta)


def load_config(preset: str, overrides: list[str] | tuple[str, ...] = ()) -> tuple[Config, PresetInfo]:
    """Defaults, then the preset, then each `--set`: the resolved, validated config."""
    data, info = read_preset(preset)
    layers = [(data, preset_path(preset).name)] + [(parse_set(item), f"--set {item}") for item in overrides]
    return apply_layers(Config(), layers), info
