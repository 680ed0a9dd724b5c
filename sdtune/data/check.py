"""Checking training data before step 1: one image file at a time (`check_image`), and the whole scan as
`sdtune data check` shows it (`report`).

Pillow's `verify()` reads a file's structure but not its pixels, so it misses a truncated JPEG; each image
is therefore also decoded (JPEGs at 1/8 scale, which still reads every byte of the compressed data) and
converted to RGB exactly as training will convert it. A file that passes cannot fail later unless it
changes on disk.

    size = check_image(Path("a.jpg"), smallest_side=256)     # (w, h) as seen, or raises ImageProblem
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, UnidentifiedImageError

from sdtune.data.images import SWAPS_SIDES, orientation, to_rgb

if TYPE_CHECKING:
    from sdtune.config import DataConfig
    from sdtune.data.scan import Scan, Skip

# the first bytes of the formats Pillow reads here: a file that starts like one is a broken image, not a non-image
SIGNATURES = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM", b"II*\x00", b"MM\x00*", b"RIFF")


class ImageProblem(Exception):
    """Why an image file is skipped: `kind` (a short class, see `Skip`) and `detail` (one line)."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail = kind, detail


def check_image(path: Path, smallest_side: int) -> tuple[int, int]:
    """(width, height) of `path` as training sees it; raises `ImageProblem` for a file training cannot use."""
    try:
        if path.stat().st_size == 0:
            raise ImageProblem("empty", "0 bytes")
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            w, h = im.size
            _check_size(w, h, smallest_side)
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
        return ImageProblem("too large", f"over the decompression-bomb limit of {Image.MAX_IMAGE_PIXELS:,} pixels "
                                         "(Pillow's guard against malicious files): downscale it")
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
    limit = Image.MAX_IMAGE_PIXELS
    if limit and w * h > limit:
        raise ImageProblem("too large", f"{w}x{h} is over the decompression-bomb limit of {limit:,} pixels "
                                        "(Pillow's guard against malicious files): downscale it")
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


# ---------------------------------------------------------------------------------------------------------
# `sdtune data check`: the whole scan in numbers


@dataclass(frozen=True)
class Report:
    found: int                                     # image files found, usable or not
    usable: int
    with_repeats: int                              # usable images counted with their folder's repeats
    buckets: list[tuple[tuple[int, int], int, int]]  # (bucket, images, with repeats), in bucket order
    captions: list[tuple[str, int]]                # (caption source, images), most first
    empty_captions: int                            # usable images whose caption is empty
    skipped: list[Skip]
    summary: str                                   # Scan.summary(): "" when nothing was skipped


def report(scan: Scan, cfg: DataConfig) -> Report:
    """What `sdtune data check` prints, computed from a scan (buckets as the batch stream assigns them)."""
    from sdtune.data.buckets import assign, make_buckets

    buckets = make_buckets(cfg)
    images, repeats = Counter(), Counter()
    for example in scan.examples:
        bucket = assign(example.size, buckets)
        images[bucket] += 1
        repeats[bucket] += example.repeats
    sources = Counter(e.caption_source for e in scan.examples)
    return Report(
        found=len(scan.examples) + len(scan.skipped), usable=len(scan.examples),
        with_repeats=sum(e.repeats for e in scan.examples),
        buckets=[(b, images[b], repeats[b]) for b in buckets if images[b]],
        captions=sorted(sources.items(), key=lambda kv: (-kv[1], kv[0])),
        empty_captions=sum(1 for e in scan.examples if not e.caption), skipped=list(scan.skipped),
        summary=scan.summary())
