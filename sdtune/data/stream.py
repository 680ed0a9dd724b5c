"""Transforms and a deterministic batch stream. Batch `k` is a pure function of (seed, k), so a resumed
run sees exactly the images, crops and flips the uninterrupted run would have seen.

    stream = BatchStream(scan.examples, DataConfig(), batch_size=2, seed=0)
    pixels, captions = stream.batch(0)
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

from sdtune.config import DataConfig
from sdtune.data.images import open_rgb
from sdtune.data.scan import Example
from sdtune.errors import SdtuneError


def load_image(path: Path, cfg: DataConfig, rng: random.Random):
    """Resize the short side to `cfg.resolution`, crop a square, maybe flip; a [3, H, W] tensor in [-1, 1]."""
    import numpy as np
    import torch
    from PIL import Image

    size = cfg.resolution
    im = open_rgb(path)
    scale = size / min(im.size)
    im = im.resize((max(size, round(im.width * scale)), max(size, round(im.height * scale))), Image.BICUBIC)
    if cfg.center_crop:
        left, top = (im.width - size) // 2, (im.height - size) // 2
    else:
        left, top = rng.randint(0, im.width - size), rng.randint(0, im.height - size)
    im = im.crop((left, top, left + size, top + size))
    if cfg.random_flip and rng.random() < 0.5:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    array = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)


class BatchStream:
    """Batches drawn epoch by epoch in a seeded order; `batch(k)` depends only on (seed, k)."""

    def __init__(self, examples: list[Example], cfg: DataConfig, batch_size: int, seed: int,
                 warn: Callable[[str], None] = print):
        self.examples, self.cfg, self.batch_size, self.seed, self.warn = examples, cfg, batch_size, seed, warn
        self._orders: dict[int, list[int]] = {}
        self.failed: set[Path] = set()

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(len(self.examples)))
            random.Random(self.seed * 7919 + epoch).shuffle(order)
            self._orders = {epoch: order}  # only the current epoch is ever needed again
        return self._orders[epoch]

    def _load(self, position: int):
        n = len(self.examples)
        rng = random.Random(self.seed * 1_000_003 + position)
        for attempt in range(n):  # a file that vanished or broke since the scan: take the next one
            example = self.examples[self._order((position + attempt) // n)[(position + attempt) % n]]
            try:
                pixels = load_image(example.image, self.cfg, rng)
                return pixels, "" if rng.random() < self.cfg.caption_dropout else example.caption
            except OSError as exc:
                if example.image not in self.failed:
                    self.failed.add(example.image)
                    self.warn(f"skipping {example.image}: {exc}")
        raise SdtuneError("every training image became unreadable during the run")

    def batch(self, index: int):
        import torch

        start = index * self.batch_size
        pixels, captions = zip(*(self._load(start + i) for i in range(self.batch_size)), strict=True)
        return torch.stack(pixels), list(captions)
