"""DreamBooth prior preservation: the class images, generated from the base model where they are missing.

    examples = class_images(cfg, components, plan)   # before step 1, with the base model placed

`data.class_dir` should hold `data.num_class_images` images of the subject's class ("a photo of a dog").
The missing ones are drawn by the base model from `data.class_prompt` before the first step: image `i`
is `class-NNNNN.png` (with `class-NNNNN.txt`, its caption), drawn with seed `train.seed + i`, so a run
interrupted while generating continues where it stopped and draws the same images. Each file is written
under a temporary name and renamed, the caption before the image: an image is never half written, nor
without its caption. Class images the user put there are used as they are (their captions as the
instance data's are found; `data.class_prompt` for those without one).

The is_reg tables of `data.subsets` (kohya's regularisation subsets) are class images too, in place of
`data.class_dir`: `sdtune.train.loop.prepare` takes them from the scan and generates none.

The trainer pairs every micro-batch of instance images with one of class images and trains on
instance loss + `train.prior_loss_weight` x class loss, one backward pass each.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from pathlib import Path

from sdtune.config import Config
from sdtune.data.scan import scan_all
from sdtune.errors import SdtuneError
from sdtune.util.world import World

logger = logging.getLogger(__name__)

BATCH = 4  # class images drawn per pipeline call


def class_config(cfg: Config):
    """The [data] settings the class images are read with: their caption defaults to data.class_prompt; they
    train unmasked (data.masked_loss masks the instance images)."""
    return dataclasses.replace(cfg.data, caption=cfg.data.class_prompt, masked_loss=False, mask_dir="")


def class_images(cfg: Config, components, plan, sample_context=None,
                 world: World | None = None) -> list:
    """The class images' examples, after generating the missing ones. `sample_context()` is entered around
    generation (the trainer's: autocast, the parked encoders back on the device). Under a launcher every
    rank draws the same images (an FSDP forward is collective) and rank 0 writes them."""
    from contextlib import nullcontext

    world = world or World()
    folder = Path(cfg.data.class_dir)
    if world.main:
        folder.mkdir(parents=True, exist_ok=True)
    world.barrier()
    scan = scan_all(folder, class_config(cfg))
    world.barrier()  # every rank has seen the folder as it was before rank 0 adds to it
    for skip in scan.skipped:
        logger.info(f"skipped class image {skip.path} ({skip.kind}): {skip.detail}")
    missing = cfg.data.num_class_images - len(scan.examples)
    if missing > 0:
        if not cfg.data.class_prompt:
            raise SdtuneError(f"data.class_dir {folder} holds {len(scan.examples)} usable images, fewer than "
                              f"data.num_class_images={cfg.data.num_class_images}, and data.class_prompt is empty: "
                              "set data.class_prompt to generate the rest, or lower data.num_class_images")
        taken = {e.image.name for e in scan.examples}
        todo = [i for i in range(cfg.data.num_class_images + len(taken)) if _name(i) not in taken][:missing]
        logger.info(f"prior preservation: generating {len(todo)} class images of '{cfg.data.class_prompt}' "
                    f"into {folder}")
        with (sample_context or nullcontext)():
            _generate(components, cfg, folder, todo, write=world.main)
        world.barrier()
        scan = scan_all(folder, class_config(cfg))
    if not scan.examples:
        raise SdtuneError(f"no usable class images in {folder}")
    logger.info(f"prior preservation: {len(scan.examples):,} class images from {folder}, "
                f"prior loss weight {cfg.train.prior_loss_weight:g}")
    return scan.examples


def _name(i: int) -> str:
    return f"class-{i:05d}.png"


def _generate(components, cfg: Config, folder: Path, indices: list[int], write: bool = True) -> None:
    from sdtune.family.load import assemble_pipeline
    from sdtune.sample import generate

    pipe = assemble_pipeline(components)
    side = cfg.data.resolution
    for start in range(0, len(indices), BATCH):
        chunk = indices[start:start + BATCH]
        images = generate(pipe, [cfg.data.class_prompt] * len(chunk), [cfg.train.seed + i for i in chunk],
                          steps=cfg.output.sample_steps, height=side, width=side, batch_size=len(chunk))
        if not write:
            continue
        for i, image in zip(chunk, images, strict=True):
            path = folder / _name(i)
            _write_atomic(path.with_suffix(".txt"), lambda tmp: tmp.write_text(cfg.data.class_prompt, encoding="utf-8"))
            _write_atomic(path, lambda tmp, image=image: image.save(tmp, format="PNG"))


def _write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")  # hidden: a scan never takes it for an image
    write(tmp)
    os.replace(tmp, path)
