"""Image generation through diffusers' own pipeline of the model's family (`StableDiffusionPipeline`,
`StableDiffusionXLPipeline`), saved as PNGs and a PNG grid.

    sdtune sample --ckpt out/ --prompt "a red circle on the white background" --num-images 4

Image i uses seed `seed + i`, so any single image can be regenerated alone. On a GPU the pipeline runs in
fp16; SDXL's own VAE overflows there, so the pipeline decodes in fp32 (a note says so) unless `vae` names
an fp16-safe one (its config says `force_upcast: false`, as madebyollin/sdxl-vae-fp16-fix's does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path


def make_grid(images: list, columns: int | None = None):
    """Paste equally sized PIL images into one roughly square grid."""
    from PIL import Image

    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    w, h = images[0].size
    grid = Image.new("RGB", (columns * w, rows * h), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * w, (i // columns) * h))
    return grid


def generate(pipe, prompts: list[str], seeds: list[int], *, steps: int, guidance: float = 7.5,
             height: int | None = None, width: int | None = None, batch_size: int = 1) -> list:
    """One image per (prompt, seed) pair, each from its own generator, so any image can be redrawn alone.

    `batch_size` images go through the pipeline at once: faster, and the same images."""
    import torch

    pipe.set_progress_bar_config(disable=True)
    images = []
    for start in range(0, len(prompts), batch_size):
        generators = [torch.Generator(pipe.device).manual_seed(s) for s in seeds[start:start + batch_size]]
        images += pipe(prompts[start:start + batch_size], num_inference_steps=steps, guidance_scale=guidance,
                       generator=generators, height=height, width=width).images
    return images


@dataclass(frozen=True)
class SampleResult:
    images: list[Path]
    grid: Path
    notes: tuple[str, ...] = ()  # lines for the user, e.g. that the VAE decodes in fp32


def sample(ckpt: str, prompt: str, *, num_images: int = 4, steps: int = 30, seed: int = 0,
           height: int | None = None, width: int | None = None, guidance: float = 7.5,
           out_dir: str = "samples", vae: str | None = None, lora_scale: float = 1.0) -> SampleResult:
    """Load the pipeline at `ckpt` (with the VAE folder `vae` instead of its own, if given) and write
    `num_images` PNGs plus `grid.png` into `out_dir`. A LoRA run's folder is its base model with the LoRA
    merged in at `lora_scale`."""
    import torch

    from sdtune.errors import SdtuneError
    from sdtune.lora.apply import is_lora_folder, merged_components
    from sdtune.models import assemble_pipeline, classify_source, load_components

    lora = is_lora_folder(ckpt)
    if not lora and classify_source(ckpt) != "folder":
        raise SdtuneError(f"--ckpt {ckpt} must be a diffusers folder such as a finished `sdtune train --out` folder")
    for name, value in (("--height", height), ("--width", width)):
        if value is not None and (value < 8 or value % 8):
            raise SdtuneError(f"{name} must be a positive multiple of 8, got {value}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    components = merged_components(ckpt, lora_scale) if lora else load_components(ckpt)
    if vae is not None:
        components.vae = _load_vae(vae)
    notes = ()
    if components.family.vae_dtype(components.vae, dtype) != dtype:  # the pipeline upcasts it to decode
        notes = ("the VAE overflows in fp16 (its config says force_upcast): decoding in fp32; pass --vae with an "
                 "fp16-safe VAE (e.g. madebyollin/sdxl-vae-fp16-fix) to decode in fp16",)
    pipe = assemble_pipeline(components).to(device, dtype)
    images = generate(pipe, [prompt] * num_images, [seed + i for i in range(num_images)], steps=steps,
                      guidance=guidance, height=height, width=width)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        paths.append(out / f"{i:03d}-seed{seed + i}.png")
        image.save(paths[-1])
    grid = out / "grid.png"
    make_grid(images).save(grid)
    return SampleResult(paths, grid, notes)


def _load_vae(folder: str):
    from diffusers import AutoencoderKL

    from sdtune.errors import SdtuneError

    if not (Path(folder) / "config.json").is_file():
        raise SdtuneError(f"--vae {folder} is not a diffusers VAE folder (no config.json)")
    return AutoencoderKL.from_pretrained(folder, local_files_only=True)
