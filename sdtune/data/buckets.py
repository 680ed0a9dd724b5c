"""Aspect-ratio buckets: the training sizes, which bucket an image goes to, and how it is fitted into it.

A bucket is a (width, height) whose sides are multiples of 64 (of 8 when `data.resolution` is not a
multiple of 64), lie within [`data.min_side`, `data.max_side`], hold at most resolution x resolution
pixels, and whose long side is at most `data.max_ratio` times the short one. Of the buckets with the same
aspect ratio only the largest is kept. An image goes to the bucket closest to it in aspect ratio, is
scaled (aspect kept) until it covers the bucket, and is cropped to exactly the bucket's size.

    buckets = make_buckets(DataConfig(resolution=512))   # [(320, 640), (384, 640), ..., (640, 320)]
    bucket = assign((4032, 3024), buckets)               # (576, 448)
    resized, box = fit((4032, 3024), bucket, center=True, rng=random.Random(0))
"""

from __future__ import annotations

import math
import random
from fractions import Fraction

from sdtune.config import DataConfig
from sdtune.errors import SdtuneError

Size = tuple[int, int]  # (width, height) in pixels


def side_step(resolution: int) -> int:
    """Bucket sides are multiples of this: 64 (one latent of a SD UNet's deepest level is 8x8 px of
    latent, 64 px of image), or 8 for resolutions that are not themselves a multiple of 64."""
    return 64 if resolution % 64 == 0 else 8


def make_buckets(cfg: DataConfig) -> list[Size]:
    """Every bucket for `cfg`, sorted; `[(resolution, resolution)]` when `data.buckets` is false."""
    res = cfg.resolution
    if not cfg.buckets:
        return [(res, res)]
    step, low, high = side_step(res), cfg.smallest_side, cfg.largest_side
    largest: dict[Fraction, Size] = {}
    for w in range(step * math.ceil(low / step), high + 1, step):
        # the tallest bucket of width w: within the area, the ratio limit and the largest side
        h = min(res * res // w, math.floor(w * cfg.max_ratio), high) // step * step
        if h < low or w > h * cfg.max_ratio:
            continue
        for size in ((w, h), (h, w)):
            aspect = Fraction(*size)
            if size[0] * size[1] > math.prod(largest.get(aspect, (0, 0))):
                largest[aspect] = size
    if not largest:
        raise SdtuneError(f"no bucket fits data.resolution={res} with sides between {low} and {high} px "
                          f"(data.min_side, data.max_side) and data.max_ratio={cfg.max_ratio}: widen those limits")
    return sorted(largest.values())


def assign(size: Size, buckets: list[Size]) -> Size:
    """The bucket closest to `size` in aspect ratio (distance of log ratios); ties go to the larger area."""
    aspect = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (round(abs(math.log(b[0] / b[1]) - aspect), 9), -b[0] * b[1]))


def fit(size: Size, bucket: Size, center: bool, rng: random.Random) -> tuple[Size, tuple[int, int, int, int]]:
    """Where an image of `size` goes in `bucket`: the size it is resized to (aspect kept, covering the
    bucket) and the crop box (left, top, right, bottom) of exactly the bucket's size in the resized image,
    centred or drawn from `rng` (which is then always advanced by two draws)."""
    (w, h), (bw, bh) = size, bucket
    scale = max(bw / w, bh / h)
    rw, rh = max(bw, round(w * scale)), max(bh, round(h * scale))
    if center:
        left, top = (rw - bw) // 2, (rh - bh) // 2
    else:
        left, top = rng.randint(0, rw - bw), rng.randint(0, rh - bh)
    return (rw, rh), (left, top, left + bw, top + bh)
