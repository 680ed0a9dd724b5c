"""Image generation through diffusers' own pipeline of the model's family (`StableDiffusionPipeline`,
`StableDiffusionXLPipeline`), saved as PNGs and a PNG grid.

    sdtune sample --ckpt out/ --prompt "a red circle on the white background" --num-images 4

Image i uses seed `seed + i`, so any single image can be regenerated alone. Every PNG carries the
`parameters` text chunk AUTOMATIC1111 writes (prompt, negative prompt, steps, sampler, CFG scale, seed, size,
model), which its PNG Info tab reads back; the grid shows each image below its prompt. On a GPU the pipeline
runs in fp16; SDXL's own VAE overflows there, so the pipeline decodes in fp32 (a note says so) unless `vae` names
an fp16-safe one (its config says `force_upcast: false`, as madebyollin/sdxl-vae-fp16-fix's does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from sdtune.sample_prompts import GUIDANCE  # also sdtune.sample.GUIDANCE, as before


def make_grid(images: list, columns: int | None = None, labels: list[str] | None = None):
    """Paste PIL images into one roughly square grid of equal cells, each as large as the largest image (a
    smaller one sits in its cell's top left corner, on white); with `labels`, each image below its own text
    (wrapped to the cell's width: the band may be taller than a small image)."""
    from PIL import Image, ImageDraw

    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    w, h = max(image.width for image in images), max(image.height for image in images)
    font = _label_font()
    lines = [_wrap(label, font, w - 2 * LABEL_PAD) for label in labels] if labels else []
    line_height = font.getbbox("Ag")[3] + 2
    band = max(map(len, lines)) * line_height + 2 * LABEL_PAD if lines else 0
    grid = Image.new("RGB", (columns * w, rows * (band + h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, image in enumerate(images):
        x, y = (i % columns) * w, (i // columns) * (band + h)
        for j, line in enumerate(lines[i] if lines else ()):
            draw.text((x + LABEL_PAD, y + LABEL_PAD + j * line_height), line, fill="black", font=font)
        grid.paste(image, (x, y + band))
    return grid


LABEL_PAD = 3  # px around a label
LABEL_SIZE = 12  # px: readable, and still a few words a line on a 64-px image


def _label_font():
    from PIL import ImageFont, features

    return ImageFont.load_default(LABEL_SIZE) if features.check("freetype2") else ImageFont.load_default()


def _wrap(text: str, font, width: int) -> list[str]:
    """`text` in lines no wider than `width` px, broken at spaces (and at newlines)."""
    lines = []
    for paragraph in text.split("\n"):
        line = ""
        for word in _pieces(paragraph.split(), font, width):
            candidate = f"{line} {word}" if line else word
            if line and font.getlength(candidate) > width:
                lines.append(line)
                candidate = word
            line = candidate
        lines.append(line)
    return lines


def _pieces(words: list[str], font, width: int):
    """Each word; one wider than `width` px alone, in pieces that fit (a character at least)."""
    for word in words:
        while len(word) > 1 and font.getlength(word) > width:
            cut = next(n for n in range(len(word) - 1, 0, -1) if n == 1 or font.getlength(word[:n]) <= width)
            yield word[:cut]
            word = word[cut:]
        yield word


# diffusers' scheduler classes by the names AUTOMATIC1111 gives the same samplers
SAMPLER_NAMES = {"EulerAncestralDiscreteScheduler": "Euler a", "EulerDiscreteScheduler": "Euler",
                 "DDIMScheduler": "DDIM", "PNDMScheduler": "PLMS", "LMSDiscreteScheduler": "LMS",
                 "HeunDiscreteScheduler": "Heun", "DPMSolverMultistepScheduler": "DPM++ 2M",
                 "UniPCMultistepScheduler": "UniPC", "KDPM2DiscreteScheduler": "DPM2",
                 "KDPM2AncestralDiscreteScheduler": "DPM2 a", "LCMScheduler": "LCM", "DDPMScheduler": "DDPM"}


def parameters(prompt: str, *, negative: str = "", steps: int, guidance: float, seed: int, size: tuple[int, int],
               sampler: str, model: str, extra: dict | None = None) -> str:
    """The `parameters` text AUTOMATIC1111 writes into its PNGs (`processing.create_infotext`):
    "PROMPT\nNegative prompt: NEG\nSteps: 30, Sampler: Euler, CFG scale: 7.5, Seed: 0, Size: 512x512, Model:
    NAME"; a value with a comma, colon or newline is JSON-quoted, as A1111's `quote` does."""
    import json

    values = {"Steps": steps, "Sampler": SAMPLER_NAMES.get(sampler, sampler), "CFG scale": guidance, "Seed": seed,
              "Size": f"{size[0]}x{size[1]}", "Model": model, **(extra or {})}
    quoted = {k: json.dumps(str(v), ensure_ascii=False) if any(c in str(v) for c in ",:\n") else v
              for k, v in values.items()}
    settings = ", ".join(f"{k}: {v}" for k, v in quoted.items())
    negative_text = f"\nNegative prompt: {negative}" if negative else ""
    return f"{prompt}{negative_text}\n{settings}".strip()


def save_png(image, path: Path, text: str) -> Path:
    """`image` as a PNG at `path` with `text` as its `parameters` chunk."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", text)
    image.save(path, pnginfo=info)
    return path


def generate(pipe, prompts: list[str], seeds: list[int], *, steps: int, guidance: float = GUIDANCE,
             height: int | None = None, width: int | None = None, batch_size: int = 1,
             negative_prompt: str = "", encode=None) -> list:
    """One image per (prompt, seed) pair, each from its own generator, so any image can be redrawn alone.

    `batch_size` images go through the pipeline at once: faster, and the same images. `encode` (captions ->
    `sdtune.family.Conditioning`, `Components.prompt_encoder`): the prompts and the negative prompt are
    encoded by it and handed to the pipeline as embeddings (long prompts, clip_skip, as the run trained);
    None: the pipeline encodes the strings itself (77 tokens, the last layer)."""
    import torch

    pipe.set_progress_bar_config(disable=True)
    images = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        generators = [torch.Generator(pipe.device).manual_seed(s) for s in seeds[start:start + batch_size]]
        text = (_embeds(encode, batch, negative_prompt) if encode is not None else
                {"prompt": batch, "negative_prompt": [negative_prompt] * len(batch) if negative_prompt else None})
        images += pipe(**text, num_inference_steps=steps, guidance_scale=guidance, generator=generators,
                       height=height, width=width).images
    return images


def _embeds(encode, prompts: list[str], negative_prompt: str) -> dict:
    """The pipeline's prompt arguments as `encode` makes them: the prompts', and the negative prompt's (the
    empty one when none is given, as the pipelines encode it; SDXL's zeros where the model says
    force_zeros_for_empty_prompt) at the same length."""
    cond, uncond = encode(prompts), encode([negative_prompt] * len(prompts))
    embeds = {"prompt_embeds": cond.hidden, "negative_prompt_embeds": uncond.hidden}
    if cond.pooled is not None:
        embeds |= {"pooled_prompt_embeds": cond.pooled, "negative_pooled_prompt_embeds": uncond.pooled}
    return embeds


@dataclass(frozen=True)
class SampleResult:
    images: list[Path]
    grid: Path
    notes: tuple[str, ...] = ()  # lines for the user, e.g. that the VAE decodes in fp32


def sample(ckpt: str, prompt: str, *, num_images: int = 4, steps: int = 30, seed: int = 0,
           height: int | None = None, width: int | None = None, guidance: float = GUIDANCE,
           out_dir: str = "samples", vae: str | None = None, lora_scale: float = 1.0,
           negative_prompt: str = "", embeddings: tuple[str, ...] = (),
           embedding_tokens: tuple[str, ...] = (), max_token_length: int | None = None,
           clip_skip: int | None = None) -> SampleResult:
    """Load the pipeline at `ckpt` (with the VAE folder `vae` instead of its own, if given) and write
    `num_images` PNGs plus `grid.png` (each image under its prompt and seed) into `out_dir`, each with its
    A1111 `parameters`. A LoRA run's folder is its base model with the LoRA merged in at `lora_scale`; a
    textual inversion's, its base model with its embedding. `embeddings`: textual-inversion files loaded
    too (each word `embedding_tokens[i]`, else the file's own). Prompts are read to `max_token_length`
    tokens from the layer `clip_skip` from the end (None: a run folder's own data.max_token_length and
    train.clip_skip, else 75 and 1, as the pipeline reads them)."""
    import torch

    from sdtune.errors import SdtuneError
    from sdtune.export.embedding_file import load_embeddings
    from sdtune.family.load import assemble_pipeline
    from sdtune.lora.apply import is_lora_folder

    for name, value in (("--height", height), ("--width", width)):
        if value is not None and (value < 8 or value % 8):
            raise SdtuneError(f"{name} must be a positive multiple of 8, got {value}")
    lora = is_lora_folder(ckpt)
    components, embeddings, embedding_tokens = _model(ckpt, lora, lora_scale, embeddings, embedding_tokens)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    if vae is not None:
        components.vae = _load_vae(vae)
    notes = (components.origin,) if components.origin else ()
    notes += _read_text(ckpt, components, max_token_length, clip_skip)
    if components.family.vae_dtype(components.vae, dtype) != dtype:  # the pipeline upcasts it to decode
        notes += ("the VAE overflows in fp16 (its config says force_upcast): decoding in fp32; pass --vae with an "
                 "fp16-safe VAE (e.g. madebyollin/sdxl-vae-fp16-fix) to decode in fp16",)
    pipe = assemble_pipeline(components)
    load_embeddings(pipe, components.family, embeddings, embedding_tokens)
    pipe = pipe.to(device, dtype)
    seeds = [seed + i for i in range(num_images)]
    images = generate(pipe, [prompt] * num_images, seeds, steps=steps, guidance=guidance, height=height,
                      width=width, negative_prompt=negative_prompt, encode=components.prompt_encoder())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    source = Path(ckpt).resolve()
    model = source.stem if source.is_file() else source.name  # as A1111 names a checkpoint: no extension
    texts = [parameters(prompt, negative=negative_prompt, steps=steps, guidance=guidance, seed=s, size=image.size,
                        sampler=type(pipe.scheduler).__name__, model=model,
                        extra=({"LoRA scale": lora_scale} if lora else {}) | _clip_skip(components))
             for s, image in zip(seeds, images, strict=True)]
    paths = [save_png(image, out / f"{i:03d}-seed{s}.png", text)
             for i, (s, image, text) in enumerate(zip(seeds, images, texts, strict=True))]
    grid = save_png(make_grid(images, labels=[f"{prompt}\nseed {s}" for s in seeds]), out / "grid.png", texts[0])
    return SampleResult(paths, grid, notes)


def _model(ckpt: str, lora: bool, lora_scale: float, embeddings: tuple, tokens: tuple) -> tuple:
    """(the components `ckpt` names, the embedding files to load onto them, their words): a LoRA run's base
    with the LoRA merged in, a textual inversion's base with its own embedding first, or the model itself."""
    from sdtune.errors import SdtuneError
    from sdtune.export.embedding_file import EMBEDDING_FILE, is_embedding_folder
    from sdtune.family.load import classify_source, load_components
    from sdtune.lora.apply import base_components, merged_components

    if is_embedding_folder(ckpt):  # the base, sampled with the run's noise schedule
        return base_components(ckpt), [str(Path(ckpt) / EMBEDDING_FILE), *embeddings], ["", *tokens]
    if not lora and classify_source(ckpt, "--ckpt") == "hub":
        raise SdtuneError(f"--ckpt {ckpt} does not exist: pass a finished `sdtune train --out` folder, a diffusers "
                          "folder or a .safetensors checkpoint")
    return (merged_components(ckpt, lora_scale) if lora else load_components(ckpt)), list(embeddings), list(tokens)


def _read_text(ckpt: str, components, max_token_length: int | None, clip_skip: int | None) -> tuple[str, ...]:
    """Set how `components` read prompts (`Family.read_text`): the given values, else those `ckpt` trained
    with where it is an sdtune run's folder, else the pipeline's (75, 1); a note where clients read otherwise."""
    from sdtune.config.toml import from_toml
    from sdtune.errors import SdtuneError
    from sdtune.util.run_folder import is_run_folder

    trained = Path(ckpt) / "config.toml"
    if (max_token_length is None or clip_skip is None) and is_run_folder(Path(ckpt)):
        cfg = from_toml(trained.read_text(encoding="utf-8"), str(trained))
        max_token_length = cfg.data.max_token_length if max_token_length is None else max_token_length
        clip_skip = cfg.train.clip_skip if clip_skip is None else clip_skip
    max_token_length = 75 if max_token_length is None else max_token_length
    clip_skip = 1 if clip_skip is None else clip_skip
    if max_token_length not in (75, 150, 225) or clip_skip < 1:
        raise SdtuneError(f"--max-token-length must be 75, 150 or 225 and --clip-skip at least 1, got "
                          f"{max_token_length} and {clip_skip}")
    components.family.read_text(components, max_token_length, clip_skip)
    note = components.text.note("prompts")
    return (note,) if note else ()


def _clip_skip(components) -> dict:
    """A1111's "Clip skip" parameter where it is not 1 (A1111 writes it so too)."""
    return {"Clip skip": components.text.clip_skip} if components.text.clip_skip > 1 else {}


def _load_vae(folder: str):
    from diffusers import AutoencoderKL

    from sdtune.errors import SdtuneError

    if not (Path(folder) / "config.json").is_file():
        raise SdtuneError(f"--vae {folder} is not a diffusers VAE folder (no config.json)")
    return AutoencoderKL.from_pretrained(folder, local_files_only=True)
