"""Image generation through diffusers' own `StableDiffusionPipeline`, saved as PNGs and a PNG grid.

    sdtune sample --ckpt out/ --prompt "a red circle on the white background" --num-images 4

Image i uses seed `seed + i`, so any single image can be regenerated alone.
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


def generate(pipe, prompts: list[str], *, steps: int, seed: int, device: str,
             height: int | None = None, width: int | None = None) -> list:
    """One image per prompt, prompt i seeded with `seed + i`."""
    import torch

    pipe.set_progress_bar_config(disable=True)
    images = []
    for i, prompt in enumerate(prompts):
        generator = torch.Generator(device).manual_seed(seed + i)
        result = pipe(prompt, num_inference_steps=steps, generator=generator, height=height, width=width)
        images.append(result.images[0])
    return images


@dataclass(frozen=True)
class SampleResult:
    images: list[Path]
    grid: Path


def sample(ckpt: str, prompt: str, *, num_images: int = 4, steps: int = 30, seed: int = 0,
           height: int | None = None, width: int | None = None, out_dir: str = "samples") -> SampleResult:
    """Load the pipeline at `ckpt` and write `num_images` PNGs plus `grid.png` into `out_dir`."""
    import torch

    from sdtune.errors import SdtuneError
    from sdtune.models import assemble_pipeline, classify_source, load_components

    if classify_source(ckpt) != "folder":
        raise SdtuneError(f"--ckpt {ckpt} must be a diffusers folder such as a finished `sdtune train --out` folder")
    for name, value in (("--height", height), ("--width", width)):
        if value is not None and (value < 8 or value % 8):
            raise SdtuneError(f"{name} must be a positive multiple of 8, got {value}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    components = load_components(ckpt)
    pipe = assemble_pipeline(components).to(device, torch.float16 if device == "cuda" else torch.float32)
    images = generate(pipe, [prompt] * num_images, steps=steps, seed=seed, device=device, height=height, width=width)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        paths.append(out / f"{i:03d}-seed{seed + i}.png")
        image.save(paths[-1])
    grid = out / "grid.png"
    make_grid(images).save(grid)
    return SampleResult(paths, grid)
