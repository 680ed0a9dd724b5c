"""The sections of a run's configuration: one frozen dataclass each, `[model] [data] [train] [lora] [embedding]
[memory] [output]`. Each field's `doc` metadata is its help and the comment written beside the key in `config.toml`;
its `resume` metadata says what `--resume` may change. A section checks its keys' own ranges; the rules
that tie two keys are the table of `sdtune.config.rules` (those inside one section are checked when it is
built, `check_section`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Literal

from sdtune.config.rules import check_section
from sdtune.errors import SdtuneError

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


def require(ok: bool, message: str) -> None:
    if not ok:
        raise SdtuneError(message)


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    pretrained: str = doc("diffusers folder, single-file .safetensors checkpoint, or hub id", "")
    config: str = doc("a single file's configs: a bundled architecture (sd15, sd21, sdxl) or a diffusers folder; "
                      "empty: detected from the file's keys (tokenizers the folder lacks are bundled)", "")
    init: Literal["pretrained", "random"] = doc(
        "the UNet's starting weights: the base model's, or random (pretraining from scratch; the VAE and text "
        "encoders stay the base model's)", "pretrained")
    architecture: str = doc("with init=random: the UNet's architecture, a bundled name (sd15, sd21, sdxl) or a "
                            "folder with its config.json; empty: the base model's", "")

    def __post_init__(self):
        check_section("model", self)


@dataclass(frozen=True, kw_only=True)
class SubsetConfig:
    """One `[[data.subsets]]` table: a folder of images with its repeats and its own caption and augmentation
    settings (kohya's `[[datasets.subsets]]`). An override left out (None) takes the [data] section's value."""

    dir: str = doc("folder of the subset's images, searched recursively (relative: to the current folder)", "")
    repeats: int = doc("each image is this many entries an epoch (kohya's num_repeats)", 1)
    is_reg: bool = doc("regularisation (DreamBooth prior) images: trained as the class half of each batch, "
                       "weighted by train.prior_loss_weight", False)
    metadata_file: str = doc("kohya's fine-tuning JSON ({image key: {caption, tags}}): the captions of the "
                             "images it lists, the only ones used; empty: none", "")
    caption: str | None = doc("caption of images without a caption file (kohya's class_tokens)", None)
    caption_extension: str | None = doc("this subset's caption file extension", None)
    shuffle_tags: bool | None = doc("shuffle this subset's tags", None)
    keep_tags: int | None = doc("with shuffle_tags, keep this subset's first K tags in place", None)
    caption_dropout: float | None = doc("this subset's share of empty captions", None)
    random_flip: bool | None = doc("flip this subset's images at random", None)
    center_crop: bool | None = doc("crop this subset's images at the center (false: a random window)", None)
    tag_dropout: float | None = doc("this subset's tag dropout", None)
    keep_tags_separator: str | None = doc("this subset's keep_tags_separator", None)
    secondary_separator: str | None = doc("this subset's secondary_separator", None)
    caption_prefix: str | None = doc("this subset's caption_prefix", None)
    caption_suffix: str | None = doc("this subset's caption_suffix", None)
    wildcards: bool | None = doc("this subset's wildcards", None)
    mask_dir: str | None = doc("this subset's folder of masks for data.masked_loss (kohya's conditioning_data_dir)",
                               None)

    def __post_init__(self):
        require(bool(self.dir), "a [[data.subsets]] table needs dir, the folder of its images")
        require(self.repeats >= 1, f"data.subsets repeats must be at least 1, got {self.repeats} ({self.dir})")

    def overrides(self) -> dict:
        """The [data] keys this subset sets: its fields that are not None, past the first four."""
        return {f.name: getattr(self, f.name) for f in fields(self)[4:] if getattr(self, f.name) is not None}


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
    keep_tags: int = doc("with shuffle_tags or tag_dropout, the first K tags stay in place and never drop (a "
                         "caption with keep_tags_separator is split by it instead)", 0)
    caption_dropout: float = doc("share of images trained with an empty caption (lets guidance work); 0 is off",
                                 0.0)
    max_pixels: int = doc("largest image (width x height) the scan opens: Pillow's guard against decompression "
                          "bombs, at the size where Pillow itself refuses by default (twice its warning's); 0: no "
                          "limit", 178_956_970)
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
    validation_dir: str = doc("folder of held-out images (and captions) for the validation loss; empty: none, or "
                              "validation_split", "")
    validation_split: float = doc("share of the training images held out (seeded by train.seed) for the "
                                  "validation loss; 0 is none", 0.0)
    class_dir: str = doc("DreamBooth prior preservation: folder of class images (generated into it when short); "
                         "empty: off", "")
    class_prompt: str = doc("caption of the class images, and the prompt that generates the missing ones "
                            "(e.g. 'a photo of a dog')", "")
    num_class_images: int = doc("class images to have in class_dir; missing ones are generated from the base "
                                "model before step 1", 100)
    tag_dropout: float = doc("drop each comma-separated tag of a caption with this probability each time it is used "
                             "(kohya's caption_tag_dropout_rate); the kept tags never drop; 0 is off", 0.0)
    keep_tags_separator: str = doc("the part of a caption before this separator stays first and never drops or "
                                   "shuffles; a second one starts a fixed end (kohya's keep_tokens_separator, e.g. "
                                   "'|||'); empty: off", "")
    secondary_separator: str = doc("tags joined by this separator shuffle and drop as one tag and read as a comma "
                                   "afterwards (kohya's secondary_separator, e.g. ';;;'); empty: off", "")
    caption_prefix: str = doc("text put before every caption, with a space (before shuffling: keep_tags counts its "
                              "tags)", "")
    caption_suffix: str = doc("text put after every caption, with a space", "")
    wildcards: bool = doc("each {a|b|c} in a caption becomes one of a, b, c each time it is used, and a caption "
                          "file's lines are alternatives (kohya's enable_wildcard)", False)
    max_token_length: Literal[75, 150, 225] = doc(
        "caption tokens the text encoders read: 75, or 150/225 in 75-token windows (each with its start and end "
        "token, hidden states joined, as kohya's max_token_length)", 75)
    masked_loss: bool = doc("weight the loss by a mask (white trains, black does not): the image's alpha channel or "
                            "its file in mask_dir; an image without one trains unmasked", False)
    mask_dir: str = doc("with masked_loss: folder of masks under the images' relative names (any image suffix); "
                        "empty: the images' alpha channels", "")
    subsets: tuple[SubsetConfig, ...] = doc("folders of images each with its repeats, captions and augmentation "
                                            "([[data.subsets]] tables, or kohya's dataset config as --data); "
                                            "empty: the --data folder", ())

    def __post_init__(self):
        require(self.resolution >= 8 and self.resolution % 8 == 0,
                 f"data.resolution must be a positive multiple of 8, got {self.resolution}")
        require(self.loader_threads >= 0, f"data.loader_threads must be 0 or more, got {self.loader_threads}")
        require(0 <= self.caption_dropout < 1, f"data.caption_dropout must be in [0, 1), got {self.caption_dropout}")
        require(0 <= self.tag_dropout < 1, f"data.tag_dropout must be in [0, 1), got {self.tag_dropout}")
        require(min(self.min_side, self.max_side, self.keep_tags, self.cache_shards, self.max_pixels) >= 0,
                 "data.min_side, data.max_side, data.keep_tags, data.cache_shards and data.max_pixels must be >= 0")
        require(0 <= self.validation_split < 1,
                 f"data.validation_split must be in [0, 1), got {self.validation_split}")
        require(self.max_ratio >= 1, f"data.max_ratio must be at least 1, got {self.max_ratio}")
        require(self.num_class_images >= 1, f"data.num_class_images must be at least 1, got {self.num_class_images}")
        check_section("data", self)
        for index, subset in enumerate(self.subsets):  # each subset's overrides within their ranges and rules
            try:
                self.for_subset(index)
            except SdtuneError as exc:  # said as the [data] key's, with the table that set it
                raise SdtuneError(f"[[data.subsets]] {index + 1} ({subset.dir}): {exc}") from None

    def for_subset(self, index: int) -> DataConfig:
        """The settings subset `index`'s images train with: this section with the subset's overrides."""
        return dataclasses.replace(self, subsets=(), **self.subsets[index].overrides())

    @property
    def smallest_side(self) -> int:
        return self.min_side or self.resolution // 2

    @property
    def largest_side(self) -> int:
        return self.max_side or self.resolution * 2


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    max_steps: int = doc("optimizer steps to train", 1000, resume=FREE)
    max_epochs: int = doc("train this many epochs instead (passes over the images, repeats counted; overrides "
                          "max_steps, as kohya's max_train_epochs does); 0: max_steps decides", 0, resume=FREE)
    batch_size: int = doc("images per forward pass", 1)
    gradient_accumulation_steps: int = doc("forward/backward passes summed into one optimizer step", 1)
    learning_rate: float = doc("peak learning rate", 1e-5)
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                          "polynomial"] = doc(
        "learning-rate curve after warmup, shaped as diffusers' get_scheduler: constant, linear or polynomial "
        "decay to 0, half a cosine, or cosine_with_restarts", "constant")
    lr_warmup_steps: int = doc("steps of linear warmup from 0 to learning_rate, for every scheduler (constant then "
                               "equals constant_with_warmup)", 0)
    lr_num_cycles: int = doc("cosine_with_restarts: how many cosine cycles (hard restarts) after warmup", 1)
    lr_power: float = doc("polynomial: power of the decay (1.0 is linear) to 1e-7", 1.0)
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

    ema_decay: float = doc("exponential moving average of the trained weights (0.9999 for long runs); 0 is off",
                           0.0)
    ema_power: float = doc("EMA warm-up: the decay is min(ema_decay, 1 - (1 + n / ema_inv_gamma) ** -ema_power) "
                           "after n updates (diffusers' EMAModel; 2/3 for long runs, 3/4 for short)", 2 / 3)
    ema_inv_gamma: float = doc("EMA warm-up: inverse multiplicative factor of the update count", 1.0)
    ema_every: int = doc("update the EMA every N optimizer steps", 1)
    text_encoder_lr: float = doc("also train the text encoder(s), in fp32, at this learning rate; 0 keeps them "
                                 "frozen", 0.0)
    method: Literal["full", "lora", "embedding"] = doc(
        "what trains: the full UNet, a LoRA ([lora]) over the frozen model, or a new word's embedding ([embedding]: "
        "textual inversion)", "full")
    prior_loss_weight: float = doc("with data.class_dir: loss = instance loss + this x class (prior) loss", 1.0)
    clip_skip: int = doc("the text encoder layer captions are read from, counted from the end: 1 the last, 2 the "
                         "penultimate (kohya's clip_skip; SD 1.x anime models use 2); SD 1.x/2.x only", 1)
    prediction_type: Literal["", "epsilon", "v_prediction"] = doc(
        "what the UNet predicts, overriding the model's scheduler (v_prediction for v-pred SDXL models); "
        "written into the exported scheduler and single file; empty: the model's own", "")
    zero_terminal_snr: bool = doc("rescale the noise schedule so its last step is pure noise (zero terminal SNR; "
                                  "with v_prediction), as kohya's zero_terminal_snr; exported with the model", False)
    multires_noise_iterations: int = doc("multi-resolution (pyramid) noise: levels added to the noise (6-10 is "
                                         "usual); 0 is off", 0)
    multires_noise_discount: float = doc("multi-resolution noise: each level's weight is this to the power of "
                                         "its index", 0.3)
    ip_noise_gamma: float = doc("input perturbation: the latents are noised with noise + this x fresh noise, the "
                                "target stays the noise (0.1 is usual); 0 is off", 0.0)
    ip_noise_gamma_random_strength: bool = doc("draw the input perturbation's strength uniformly from 0 to "
                                               "ip_noise_gamma each step", False)
    noise_offset_random_strength: bool = doc("draw the offset noise's strength uniformly from 0 to noise_offset "
                                             "each step", False)
    debiased_estimation: bool = doc("weight each sample's loss by 1 / sqrt(SNR) (1 / (SNR + 1) with v_prediction): "
                                    "kohya's debiased_estimation_loss", False)
    min_timestep: int = doc("smallest timestep trained (inclusive)", 0)
    max_timestep: int = doc("largest timestep trained (exclusive); 0: the scheduler's count (1000)", 0)
    timestep_sampling: Literal["uniform", "logit_normal"] = doc(
        "how timesteps are drawn in [min_timestep, max_timestep): uniform, or logit-normal, more in the middle: "
        "min + floor(sigmoid(N(logit_mean, logit_std)) x (max - min)), as sd-scripts' SD3 training", "uniform")
    logit_mean: float = doc("timestep_sampling=logit_normal: mean of the normal before the sigmoid", 0.0)
    logit_std: float = doc("timestep_sampling=logit_normal: standard deviation of that normal", 1.0)
    loss: Literal["l2", "l1", "huber", "smooth_l1"] = doc(
        "the per-element loss: squared error, absolute error, or pseudo-Huber / smooth L1 with threshold huber_c "
        "(kohya's loss_type)", "l2")
    huber_c: float = doc("loss=huber or smooth_l1: the threshold (and the snr schedule's end value); l2 and l1 "
                         "ignore it, as kohya does", 0.1)
    huber_schedule: Literal["snr", "exponential", "constant"] = doc(
        "loss=huber or smooth_l1: how the threshold changes with the timestep (kohya's huber_schedule)", "snr")
    huber_scale: float = doc("loss=huber or smooth_l1: the threshold's scale for the exponential and constant "
                             "schedules", 1.0)
    scale_v_pred_loss_like_noise_pred: bool = doc("with v_prediction: weight the loss by SNR / (SNR + 1), as an "
                                                  "epsilon loss would be", False)

    def __post_init__(self):
        for name in ("max_steps", "batch_size", "gradient_accumulation_steps"):
            require(getattr(self, name) >= 1, f"train.{name} must be at least 1, got {getattr(self, name)}")
        require(self.learning_rate > 0, f"train.learning_rate must be positive, got {self.learning_rate}")
        for name in ("lr_warmup_steps", "max_grad_norm", "snr_gamma", "noise_offset", "weight_decay", "max_bad_steps",
                     "prior_loss_weight"):
            require(getattr(self, name) >= 0, f"train.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("ema_power", "ema_inv_gamma", "lr_power"):
            require(getattr(self, name) > 0, f"train.{name} must be positive, got {getattr(self, name)}")
        require(0 <= self.ema_decay < 1, f"train.ema_decay must be in [0, 1), got {self.ema_decay}")
        require(self.text_encoder_lr >= 0, f"train.text_encoder_lr must be >= 0, got {self.text_encoder_lr}")
        for name in ("ema_every", "lr_num_cycles"):
            require(getattr(self, name) >= 1, f"train.{name} must be at least 1, got {getattr(self, name)}")
        require(self.max_epochs >= 0, f"train.max_epochs must be 0 or more, got {self.max_epochs}")
        self._check_noise_knobs()
        require(self.clip_skip >= 1, f"train.clip_skip must be at least 1 (1: the last layer), got {self.clip_skip}")
        check_section("train", self)

    def _check_noise_knobs(self) -> None:
        for name in ("multires_noise_iterations", "multires_noise_discount", "ip_noise_gamma"):
            require(getattr(self, name) >= 0, f"train.{name} must be >= 0, got {getattr(self, name)}")
        require(0 <= self.min_timestep <= 999, f"train.min_timestep must be in [0, 999], got {self.min_timestep}")
        require(0 <= self.max_timestep <= 1000,
                f"train.max_timestep must be in [1, 1000] (0: the schedule's end), got {self.max_timestep}")
        for name in ("logit_std", "huber_c", "huber_scale"):
            require(getattr(self, name) > 0, f"train.{name} must be positive, got {getattr(self, name)}")

    @property
    def warmup_steps(self) -> int:
        """The warm-up the schedule runs: lr_warmup_steps, cut to max_steps (a preset's 100-step warm-up
        and --max-steps 10 warm up over the 10 steps, as a run shorter than its warm-up should)."""
        return min(self.lr_warmup_steps, self.max_steps)


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
    algo: Literal["lora", "loha", "lokr"] = doc(
        "the adapter: LoRA (up @ down), LyCORIS' LoHa (Hadamard product of two low-rank pairs, ~2x LoRA's "
        "parameters) or LoKr (Kronecker product; lora.factor sets its split); diffusers loads only lora", "lora")
    dora: bool = doc("DoRA: also train a magnitude per output row of each weight (weight-decomposed LoRA; "
                     "algo=lora only)", False)
    factor: int = doc("LoKr's Kronecker factor: the size of its small factor; -1 splits each weight as evenly as "
                      "its shape allows", -1)
    conv_rank: int = doc("with target=attention+conv: the rank of the layers it adds (ResNet convolutions, "
                         "proj_in/proj_out); 0: lora.rank", 0)
    conv_alpha: float = doc("with target=attention+conv: the alpha of the layers it adds; 0: conv_rank's value "
                            "(as alpha 0 is rank)", 0.0)
    init_from: str = doc("continue from this LoRA: a kohya or diffusers .safetensors file or a LoRA run's folder; "
                         "rank, alpha, target and text_encoder follow the file, the optimizer starts fresh", "",
                         resume=FREE)

    def __post_init__(self):
        require(self.rank >= 1, f"lora.rank must be at least 1, got {self.rank}")
        require(self.alpha >= 0, f"lora.alpha must be >= 0, got {self.alpha}")
        require(0 <= self.dropout < 1, f"lora.dropout must be in [0, 1), got {self.dropout}")
        require(self.factor == -1 or self.factor >= 1, f"lora.factor must be -1 or at least 1, got {self.factor}")
        require(self.conv_rank >= 0 and self.conv_alpha >= 0,
                f"lora.conv_rank and lora.conv_alpha must be >= 0, got {self.conv_rank} and {self.conv_alpha}")
        check_section("lora", self)

    @property
    def scale_alpha(self) -> float:
        """The alpha the layers use: `alpha`, or the rank when it is 0."""
        return self.alpha or float(self.rank)

    @property
    def conv_scale_rank(self) -> int:
        """The rank of the layers attention+conv adds: `conv_rank`, or `rank` when it is 0."""
        return self.conv_rank or self.rank

    @property
    def conv_scale_alpha(self) -> float:
        """Their alpha: `conv_alpha`; 0: `alpha` when conv_rank is 0 too, else conv_rank (scale 1)."""
        if self.conv_alpha:
            return self.conv_alpha
        return float(self.conv_rank) if self.conv_rank else self.scale_alpha


@dataclass(frozen=True, kw_only=True)
class EmbeddingConfig:
    token: str = doc("train.method=embedding: the new word captions and prompts name the concept by, e.g. '<sks>' "
                     "(one the tokenizer does not know)", "")
    init_text: str = doc("the new vectors start as this text's token embeddings (e.g. 'dog'), repeated or cut to "
                         "vectors; empty: the mean of every token's embedding", "")
    vectors: int = doc("embedding vectors the token stands for (1-75): more learn more, and leave fewer of a "
                       "prompt's 75 tokens", 1)

    def __post_init__(self):
        require(1 <= self.vectors <= 75,
                f"embedding.vectors must be 1-75 (a prompt holds 75 tokens), got {self.vectors}")
        require(not any(c.isspace() for c in self.token),
                f"embedding.token must be one word, got {self.token!r}: e.g. '<sks>'")
        require(self.token == self.token.lower(), f"embedding.token={self.token!r}: CLIP's tokenizer lower-cases "
                f"every prompt; use {self.token.lower()!r}")
        check_section("embedding", self)


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
    optimizer: Literal["adamw", "adamw8bit", "adafactor", "prodigy", "lion"] = doc(
        "adamw (torch fused/foreach), adamw8bit (bitsandbytes, 1/4 of the state memory), adafactor (transformers; "
        "factored second moment), prodigy (prodigyopt; learning_rate 1.0) or lion (lion-pytorch; 1 moment)",
        "adamw")
    fused_backward: bool = doc("step each weight as soon as backward makes its gradient and drop it (no "
                               "gradients for the whole model); needs max_grad_norm=0, no fp16, no accumulation",
                               False)
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
    compile: Literal["none", "blocks"] = doc(
        "torch.compile the UNet's repeated blocks one by one (regional compilation: compiled once, reused by every "
        "block of the same shape); the first steps pay the compile time", "none", resume=NEUTRAL)

    def __post_init__(self):
        require(self.param_prefetch_blocks >= 0,
                 f"memory.param_prefetch_blocks must be 0 or more, got {self.param_prefetch_blocks}")
        check_section("memory", self)


@dataclass(frozen=True, kw_only=True)
class OutputConfig:
    checkpoint_every: int = doc("save a resumable checkpoint every N steps; 0 saves only at the end", 500, resume=FREE)
    keep_checkpoints: int = doc("how many of the newest resume checkpoints to keep; 0 writes none (a stopped run "
                                "then cannot be resumed)", 2, resume=FREE)
    keep_final_state: bool = doc("keep the resume checkpoints after the run finishes (to train on with --resume "
                                 "and more steps); false deletes them once the model is written", False, resume=FREE)
    sample_every: int = doc("sample sample_prompts into a PNG grid every N steps; 0 turns it off", 0, resume=FREE)
    sample_prompts: tuple[str, ...] = doc("prompts for the validation grids, each with kohya's options if wanted "
                                          "(\"a cat --w 768 --d 3\": see sample_prompts_file)", (), resume=FREE)
    sample_steps: int = doc("denoising steps for validation samples", 20, resume=FREE)
    sample_ema: bool = doc("with train.ema_decay: draw the validation grids with the EMA weights", True,
                           resume=FREE)
    sample_negative_prompt: str = doc("negative prompt of the validation grids (what to steer away from); empty: "
                                      "none", "", resume=FREE)
    sample_at_start: bool = doc("also draw the validation grid before step 1 (step 0: the base model), to compare",
                                False, resume=FREE)
    save_every: int = doc("write a model file a client loads (the single file, or a LoRA run's kohya LoRA) to "
                          "OUT/saves/step-NNNNNN.safetensors every N steps; 0 turns it off", 0, resume=FREE)
    save_every_epochs: int = doc("the same every N epochs (passes over the images, repeats counted); 0 turns it "
                                 "off", 0, resume=FREE)
    validate_every: int = doc("validation loss (data.validation_dir or validation_split: fixed timesteps and "
                              "noise) every N steps; 0 turns it off", 0, resume=FREE)
    single_file: bool = doc("also write model.safetensors (original layout) when A1111/ComfyUI can read it",
                            True, resume=FREE)
    save_precision: Literal["fp16", "bf16", "fp32"] = doc(
        "precision of the written model: the diffusers folder's trained weights and model.safetensors (fp16 and "
        "bf16 take half of fp32's disk)", "fp16", resume=FREE)
    tensorboard: bool = doc("also write TensorBoard event files to OUT/logs/ (needs sdtune[tensorboard])", False,
                            resume=FREE)
    sample_prompts_file: str = doc("a file of sample prompts in kohya's format, drawn after sample_prompts (one a "
                                   "line; --n negative, --w --h size, --d seed, --s steps, --l CFG scale, --ss "
                                   "sampler: euler_a, dpmsolver++, ddim, ...; # comments; or kohya's .toml/.json)",
                                   "", resume=FREE)
    wandb: bool = doc("also send the metrics and sample grids to Weights & Biases (needs sdtune[wandb]; "
                      "WANDB_MODE=offline works without a network)", False, resume=FREE)
    wandb_project: str = doc("with wandb: the project the run is logged to", "sdtune", resume=FREE)

    def __post_init__(self):
        for name in ("checkpoint_every", "sample_every", "validate_every", "save_every", "save_every_epochs"):
            require(getattr(self, name) >= 0, f"output.{name} must be >= 0, got {getattr(self, name)}")
        require(self.keep_checkpoints >= 0, f"output.keep_checkpoints must be >= 0, got {self.keep_checkpoints}")
        require(self.sample_steps >= 1, f"output.sample_steps must be at least 1, got {self.sample_steps}")
        require(bool(self.wandb_project.strip()), "output.wandb_project must name a W&B project, got an empty one")
        from sdtune.sample_prompts import check_inline

        check_inline(self.sample_prompts)  # the file's prompts are read when the run starts
        check_section("output", self)


