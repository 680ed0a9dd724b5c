"""Masked loss (`data.masked_loss`): which part of each image trains, as kohya's sd-scripts' masked loss does.

    masks = MaskSource(examples, cfg)        # where each image's mask is; says once how many have none
    seen, rgb, mask = masks.open(example, at_least)   # the image as the stream reads it, its mask (L) or None
    grid = to_latent_grid(mask, (h, w))      # [B, 1, H, W] in [0, 1] -> [B, 1, h, w], kohya's area resize

A mask is the image's alpha channel (kohya's `alpha_mask`: alpha / 255), or with `data.mask_dir` a file in
that folder under the image's relative name with any image suffix (kohya's conditioning image, read as its
rule: converted to RGB, the red channel / 255, so a grayscale mask's luminance; white trains, black does
not). `data/10_dog/a.jpg` finds `mask_dir/10_dog/a.png`, else `mask_dir/a.png`: the longest tail of the
image's path that names a mask. The stream resizes, crops and flips the mask exactly as the image, and
the loss multiplies it in on the latent grid, area-averaged as kohya's `apply_masked_loss` does (not
renormalised: a half-masked image weighs about half). The image's pixels stay as sdtune reads every image
(transparency on white; kohya trains the raw colours under the alpha). An image without a mask trains
unmasked (a mask of ones); a mask file whose size differs from its image's skips the image, as a broken
image is skipped (kohya refuses the run).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from PIL import Image

from sdtune.config import DataConfig
from sdtune.data.images import has_alpha, on_white, open_scaled, oriented_size, upright
from sdtune.data.scan import IMAGE_SUFFIXES
from sdtune.errors import SdtuneError

logger = logging.getLogger(__name__)

ALPHA = "alpha"  # the mask is the image's own alpha channel


class MaskFailed(Exception):
    """An image's mask file is unreadable or of another size than the image: the stream skips the image."""


class MaskSource:
    """Each example's mask: a file of `data.mask_dir` (or its subset's mask_dir), its own alpha channel
    (`ALPHA`), or none."""

    def __init__(self, examples: list, cfg: DataConfig):
        folders = {e.image: _mask_dir(e, cfg) for e in examples}  # data.mask_dir, or the example's subset's
        indexes = {folder: _index(_checked(folder)) for folder in set(folders.values()) if folder}
        self.of = {image: _find(image, indexes[folder]) if folder else ALPHA if _carries_alpha(image) else None
                   for image, folder in folders.items()}
        without = [image for image, source in self.of.items() if source is None]
        if without:
            missing = ("no file in data.mask_dir" if set(folders.values()) == {cfg.mask_dir} and cfg.mask_dir
                       else "no alpha channel (and data.mask_dir is empty)" if not indexes
                       else "no file in their mask folder" if all(folders.values())
                       else "no mask file or alpha channel")
            logger.info(f"masked loss: {len(without):,} of {len(self.of):,} images have {missing}, e.g. "
                        f"{without[0]}: they train unmasked")

    def source(self, example) -> Path | str | None:
        return self.of.get(example.image)

    def token(self, example, digest) -> str | None:
        """What a latent cache key adds for the mask: None without one, the mask file's content digest
        (`digest(path)`), or `ALPHA` (the image's digest already covers its alpha channel)."""
        source = self.source(example)
        if source is None or source == ALPHA:
            return source
        try:
            return f"mask:{digest(source)}"
        except OSError:  # gone since the index: the load reports it
            return "mask:unreadable"

    def open(self, example, at_least) -> tuple[tuple[int, int], Image.Image, Image.Image | None]:
        """(the image's size as seen, its RGB image as `open_scaled` gives it, its mask as an L image of the
        same size, or None). Raises MaskFailed for a mask file that cannot be used."""
        source = self.source(example)
        if source == ALPHA:
            seen, (rgb, alpha) = open_scaled(example.image, at_least, _rgb_and_alpha)
            return seen, rgb, alpha
        seen, rgb = open_scaled(example.image, at_least)
        if source is None:
            return seen, rgb, None
        try:
            with Image.open(source) as im:
                size = oriented_size(im)
                if size != seen:
                    raise MaskFailed(f"its mask {source} is {size[0]}x{size[1]} px, the image {seen[0]}x{seen[1]}")
                mask = upright(im).convert("RGB").getchannel("R")  # kohya: conditioning image's R channel
        except MaskFailed:
            raise
        except Exception as exc:  # PIL raises many types for broken data
            raise MaskFailed(f"its mask {source} is unreadable ({type(exc).__name__}: {exc})") from exc
        return seen, rgb, (mask if rgb.size == mask.size else mask.resize(rgb.size, Image.BOX))


def _mask_dir(example, cfg: DataConfig) -> str:
    """The folder of `example`'s mask: its data.subsets table's mask_dir (kohya's conditioning_data_dir), else
    data.mask_dir; empty: its alpha channel."""
    own = cfg.subsets[example.subset].mask_dir if cfg.subsets else None
    return cfg.mask_dir if own is None else own


def _checked(folder: str) -> Path:
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise SdtuneError(f"data.mask_dir (or a data.subsets table's mask_dir) {path} does not exist or is not a "
                          "folder: name the folder of masks, or leave it empty to use the images' alpha channels")
    return path


def to_latent_grid(masks, size: tuple[int, int]):
    """Pixel masks [B, 1, H, W] area-averaged down to the latent grid `size` (h, w): kohya's
    `apply_masked_loss` (library/custom_train_functions.py), `interpolate(mask, size, mode="area")`."""
    import torch

    return torch.nn.functional.interpolate(masks.float(), size=tuple(size), mode="area")


def _rgb_and_alpha(im: Image.Image, turn: int | None = None) -> tuple[Image.Image, Image.Image | None]:
    """`to_rgb`'s image and, where it has transparency, the alpha channel (kohya: the RGBA image's A)."""
    turned = upright(im, turn)
    alpha = turned.convert("RGBA").getchannel("A") if has_alpha(turned) else None
    return on_white(turned), alpha


def _carries_alpha(image: Path) -> bool:
    """From the header alone; a file that cannot be opened now is reported when the loader meets it."""
    if image.suffix.lower() in (".jpg", ".jpeg"):
        return False
    try:
        with Image.open(image) as im:
            return has_alpha(im)
    except Exception:
        return False


def _index(folder: Path) -> dict[tuple[str, ...], Path]:
    """Every image file under `folder` by its relative path without the suffix (the first in name order)."""
    index = {}
    for parent, dirs, names in os.walk(folder):
        dirs.sort()
        for name in sorted(names):
            path = Path(parent, name)
            if path.suffix.lower() in IMAGE_SUFFIXES:
                index.setdefault(path.relative_to(folder).with_suffix("").parts, path)
    return index


def _find(image: Path, index: dict[tuple[str, ...], Path]) -> Path | None:
    """The mask under the longest tail of `image`'s path (without its suffix) that `index` holds."""
    parts = image.with_suffix("").parts
    for start in range(len(parts)):
        found = index.get(parts[start:])
        if found is not None:
            return found
    return None
