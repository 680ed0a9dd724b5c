"""Opening training images as they are meant to be seen: 8-bit RGB, upright, transparency on white.

Phone photos store pixels sideways and say so in an EXIF orientation tag; PNGs carry alpha; scans come
as CMYK or 16-bit grayscale; GIFs are animated. The VAE wants none of that, so every image the trainer
or the cache reads goes through `open_rgb`, and the scan measures sizes the same way (`seen_size`).

    im = open_rgb("photo.jpg")          # PIL.Image, mode RGB, EXIF rotation applied
    w, h = seen_size("photo.jpg")       # the same size, from the header alone
    (w, h), im = open_scaled("100mp.jpg", (683, 512))   # its size as seen; decoded at 1/4: 6 MP, not 100

How large an image may be is `data.max_pixels` (Pillow's decompression-bomb limit, `set_pixel_limit`).
Training needs a photo only at its bucket's size, so one of more than `LARGE_PIXELS` is decoded smaller
where the format allows (JPEG's DCT scaling via `draft`, else `reduce` right after decoding), never below
twice the size it is resized to: a 100-megapixel photo costs tens of MB, not a GB, in each loader thread.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

ORIENTATION_TAG = 0x0112
SWAPS_SIDES = (5, 6, 7, 8)  # EXIF orientations that turn the image by 90 degrees
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
              4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
              7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
WHITE = (255, 255, 255, 255)
LARGE_PIXELS = 2**25  # 33.5 MP: above this, decode smaller (a 24 MP camera photo decodes whole, as always)
_REDUCIBLE = ("RGB", "RGBA", "L", "LA", "CMYK")  # modes Image.reduce takes


def set_pixel_limit(max_pixels: int) -> None:
    """Pillow's decompression-bomb limit for this process: `data.max_pixels` (0: none). Pillow reads a module
    global, so this is set once, before any thread opens an image (the scan does it first)."""
    Image.MAX_IMAGE_PIXELS = max_pixels or None


def open_rgb(path: str | Path) -> Image.Image:
    """The image at `path` (the first frame of an animation) as 8-bit RGB, EXIF orientation applied."""
    with Image.open(path) as im:
        return to_rgb(im)


def open_scaled(path: str | Path, at_least: tuple[int, int], convert=None) -> tuple[tuple[int, int], Image.Image]:
    """(the size as seen, the image as `open_rgb` returns it), but an image over `LARGE_PIXELS` decoded at a
    smaller scale that keeps it at least twice `at_least` (width, height as seen) on each side. `convert(im,
    turn)` makes the result from the decoded image instead of `to_rgb` (masked loss keeps the alpha channel)."""
    make = convert or to_rgb
    with Image.open(path) as im:
        stored = im.size
        if stored[0] * stored[1] <= LARGE_PIXELS:
            image = make(im)
            return _seen(stored, orientation(im)), image
        im.draft(None, _stored_target(at_least, orientation(im)))  # JPEG (EXIF in its header): 1/2, 1/4 or 1/8
        im.load()
        turn = orientation(im)  # after decoding: a PNG's eXIf chunk may follow its pixels
        w, h = _stored_target(at_least, turn)
        factor = min(im.width // w, im.height // h)
        if factor >= 2 and im.mode in _REDUCIBLE:  # what draft could not do: a box filter right after decoding
            reduced = im.reduce(factor)
            reduced.info = dict(im.info)
            return _seen(stored, turn), make(reduced, turn)
        return _seen(stored, turn), make(im, turn)


def _stored_target(at_least: tuple[int, int], turn: int) -> tuple[int, int]:
    """Twice `at_least` (as seen), in the stored image's orientation."""
    w, h = 2 * at_least[0], 2 * at_least[1]
    return (h, w) if turn in SWAPS_SIDES else (w, h)


def _seen(stored: tuple[int, int], turn: int) -> tuple[int, int]:
    return (stored[1], stored[0]) if turn in SWAPS_SIDES else stored


def seen_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of `path` as `open_rgb` returns it, read from the header without decoding pixels."""
    with Image.open(path) as im:
        return oriented_size(im)


def orientation(im: Image.Image) -> int:
    """The EXIF orientation (1-8) of an opened image; 1 when it has none or the EXIF block is unreadable.

    A PNG's eXIf chunk may follow the pixel data; Pillow would decode the whole image to reach it, so
    before the image is loaded only an eXIf chunk in the header counts."""
    if im.format == "PNG" and "exif" not in im.info:
        return 1
    try:
        value = im.getexif().get(ORIENTATION_TAG, 1)
    except Exception:  # a malformed EXIF block says nothing reliable about orientation: treat as upright
        return 1
    return value if value in range(1, 9) else 1


def oriented_size(im: Image.Image) -> tuple[int, int]:
    w, h = im.size
    return (h, w) if orientation(im) in SWAPS_SIDES else (w, h)


def to_rgb(im: Image.Image, turn: int | None = None) -> Image.Image:
    """An opened image (decoded here) as a new 8-bit RGB image, upright (by `turn`, else its own EXIF
    orientation), any transparency on white."""
    return on_white(upright(im, turn))


def upright(im: Image.Image, turn: int | None = None) -> Image.Image:
    """An opened image (decoded here) turned upright (by `turn`, else its own EXIF orientation), deep
    grayscale as 8-bit; any alpha channel kept."""
    im.load()
    method = _TRANSPOSE.get(orientation(im) if turn is None else turn)
    turned = im.transpose(method) if method is not None else im
    if turned.mode in ("I", "F") or turned.mode.startswith("I;16"):
        turned = _to_8bit_gray(turned)
    return turned


def has_alpha(im: Image.Image) -> bool:
    """Whether an opened image carries transparency (an alpha channel or a transparent palette colour)."""
    return im.mode in _ALPHA_MODES or "transparency" in im.info


def on_white(im: Image.Image) -> Image.Image:
    """An upright image as 8-bit RGB, any transparency on white."""
    if has_alpha(im):
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE), rgba).convert("RGB")
    return im.convert("RGB")


def _to_8bit_gray(im: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float grayscale scaled into 0-255 (Pillow's own conversion clips them,
    which turns most 16-bit images white). 16-bit modes use their full range; "I" and "F" images, whose
    range the mode does not say, are read as 8-bit, 16-bit or [0, 1] data by their largest value."""
    import numpy as np

    a = np.nan_to_num(np.asarray(im).astype(np.float64))
    top = float(a.max()) if a.size else 0.0
    if im.mode.startswith("I;16"):
        a = a / 257
    elif im.mode == "F" and top <= 1:
        a = a * 255
    elif top > 255:
        a = a * (255 / max(top, 65535))
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))
