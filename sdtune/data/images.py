"""Opening training images: any supported file, as an RGB PIL image the way it is meant to be seen."""

from __future__ import annotations

from pathlib import Path


def open_rgb(path: Path):
    """The image at `path`, EXIF orientation applied, converted to RGB."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        return ImageOps.exif_transpose(im).convert("RGB")
