"""Checking one image file before step 1 (`check_image`): can training open, decode and use it?

Pillow's `verify()` reads a file's structure but not its pixels, so it misses a truncated JPEG; each image
is therefore also decoded (JPEGs at 1/8 scale, which still reads every byte of the compressed data) and
converted to RGB exactly as training will convert it. A file that passes cannot fail later unless it
changes on disk.

    size = check_image(Path("a.jpg"), smallest_side=256)     # (w, h) as seen, or raises ImageProblem
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

from sdtune.data.images import SWAPS_SIDES, orientation, oriented_size, to_rgb

# the first bytes of the formats Pillow reads here: a file that starts like one is a broken image, not a non-image
SIGNATURES = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM", b"II*\x00", b"MM\x00*", b"RIFF")


TOO_LARGE_FIX = "raise data.max_pixels (0: no limit) for a photo you trust, or downscale it"


class ImageProblem(Exception):
    """Why an image file is skipped: `kind` (a short class, see `sdtune.data.scan.Skip`) and `detail` (one line)."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail = kind, detail


def check_image(path: Path, smallest_side: int, decode: bool = True) -> tuple[int, int]:
    """(width, height) of `path` as training sees it; raises `ImageProblem` for a file training cannot use.
    `decode=False` reads the header only (data.check_images=headers): a file broken further in is found,
    reported and replaced by the loader during training instead."""
    try:
        if path.stat().st_size == 0:
            raise ImageProblem("empty", "0 bytes")
        if not decode:
            with Image.open(path) as im:
                size = oriented_size(im)
                _check_size(*size, smallest_side)
                return size
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            w, h = im.size
            _check_size(*oriented_size(im), smallest_side)  # a problem names the size as seen, as buckets use it
            if im.format in ("JPEG", "MPO"):
                im.draft(None, (max(1, w // 8), max(1, h // 8)))
            to_rgb(im)
            return (h, w) if orientation(im) in SWAPS_SIDES else (w, h)  # read after decoding: PNG's late eXIf
    except ImageProblem:
        raise
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, ... for broken data
        raise _classify(exc, path) from None


def _classify(exc: Exception, path: Path) -> ImageProblem:
    """The problem an exception from opening, verifying or decoding `path` stands for."""
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return ImageProblem("too large", f"over data.max_pixels={Image.MAX_IMAGE_PIXELS:,} (Pillow's guard "
                                         f"against decompression bombs): {TOO_LARGE_FIX}")
    if isinstance(exc, PermissionError):
        return ImageProblem("unreadable", "permission denied: make the file readable")
    if isinstance(exc, FileNotFoundError):
        return ImageProblem("unreadable", "vanished during the scan, or a broken link")
    if isinstance(exc, UnidentifiedImageError):
        if _looks_like_an_image(path):
            return ImageProblem("corrupt", "starts like an image, but Pillow cannot read it")
        return ImageProblem("not an image", "its content is not JPEG, PNG, WebP, BMP, GIF or TIFF")
    if isinstance(exc, OSError) and exc.errno is not None:  # the disk or the OS, not the data
        return ImageProblem("unreadable", _one_line(exc))
    return ImageProblem("corrupt", _one_line(exc))


def _check_size(w: int, h: int, smallest_side: int) -> None:
    limit = Image.MAX_IMAGE_PIXELS  # data.max_pixels, set by the scan
    if limit and w * h > limit:
        raise ImageProblem("too large", f"{w}x{h} is {w * h:,} pixels, over data.max_pixels={limit:,} (Pillow's "
                                        f"guard against decompression bombs): {TOO_LARGE_FIX}")
    if min(w, h) < smallest_side:
        raise ImageProblem("too small", f"{w}x{h}: shorter side under {smallest_side} px "
                                        "(data.min_side; 0 means data.resolution / 2)")


def _looks_like_an_image(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(8).startswith(SIGNATURES)
    except OSError:
        return False


def _one_line(exc: Exception) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."
