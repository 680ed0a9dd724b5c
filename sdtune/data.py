"""Training images and captions: discovery, validation, transforms, and a deterministic batch stream.

An image folder is searched recursively for .jpg/.jpeg/.png/.webp files; `NAME.txt` beside an image is
its caption, otherwise the file name is (`red_circle.png` -> "red circle"). Unreadable files are
reported and skipped before training starts. Batch `k` is a pure function of (seed, k), so a resumed
run sees exactly the images, crops and flips the uninterrupted run would have seen.

    scan = scan_folder("images", DataConfig())
    stream = BatchStream(scan.examples, DataConfig(), batch_size=2, seed=0)
    pixels, captions = stream.batch(0)
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sdtune.config import DataConfig
from sdtune.errors import SdtuneError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


@dataclass(frozen=True)
class Example:
    image: Path
    caption: str


@dataclass(frozen=True)
class Scan:
    examples: list[Example]
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (file, reason)


def _caption_for(image: Path, extension: str) -> str:
    sidecar = image.with_suffix(extension)
    if sidecar.is_file():
        return sidecar.read_text(encoding="utf-8-sig").strip()
    return image.stem.replace("_", " ").replace("-", " ").strip()


def _problem(image: Path) -> str | None:
    from PIL import Image

    if image.stat().st_size == 0:
        return "empty file"
    try:
        with Image.open(image) as im:
            im.verify()
    except Exception as exc:  # PIL raises many types for corrupt data; each means "skip this file"
        return f"not a readable image ({type(exc).__name__})"
    return None


def scan_folder(root: str | Path, cfg: DataConfig) -> Scan:
    """Every usable image under `root` with its caption, and every skipped file with the reason."""
    root = Path(root)
    if not root.is_dir():
        raise SdtuneError(f"data folder {root} does not exist or is not a folder; pass --data DIR with your images")
    examples, skipped = [], []
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        problem = _problem(path)
        if problem:
            skipped.append((path, problem))
            continue
        try:
            examples.append(Example(path, _caption_for(path, cfg.caption_extension)))
        except UnicodeDecodeError:
            skipped.append((path, f"caption {path.with_suffix(cfg.caption_extension).name} is not UTF-8"))
    if not examples:
        raise SdtuneError(f"no usable images in {root} (looked for {', '.join(IMAGE_SUFFIXES)}; "
                          f"{len(skipped)} skipped); add images or fix --data")
    return Scan(examples, skipped)


def load_image(path: Path, cfg: DataConfig, rng: random.Random):
    """Resize the short side to `cfg.resolution`, crop a square, maybe flip; a [3, H, W] tensor in [-1, 1]."""
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    size = cfg.resolution
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
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
