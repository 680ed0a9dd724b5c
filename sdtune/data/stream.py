"""The batch stream: which images make batch `k`, in which bucket, with which crop, flip and caption.

Batch `k` is a pure function of (seed, k), so a resumed run sees exactly the images, crops, flips and
captions the uninterrupted run would have seen. The data order, epoch by epoch:

- each example is an entry `repeats` times (kohya's `N_name` folders);
- each bucket's entries are shuffled by a generator seeded with (seed, epoch) and cut into batches of
  `batch_size`; a bucket's last, short batch is filled up with other entries of the same bucket, drawn
  from the same generator, so every batch is full and holds one bucket only;
- the epoch's batches are shuffled (when there is more than one bucket; with one, the entries already are).

Every epoch has the same number of batches, so batch `k` is batch `k % n` of epoch `k // n`. The crop
(when `data.center_crop` is false), the flip and the caption dropout and tag shuffle of slot `i` of batch
`k` come from a generator seeded with (seed, k, i), under the settings of the example's `data.subsets`
table where there are subsets (`cfg_of`).

    stream = BatchStream(scan.examples, DataConfig(), batch_size=2, seed=0)
    items = stream.items(0)          # which images, crops, flips and captions make batch 0
    pixels = stream.pixels(items)    # raises ImageFailed for a file that broke: ask items(0) again
    pixels, masks = stream.pixels_and_masks(items)   # with data.masked_loss: [B, 1, H, W] in [0, 1], else None

With `data.masked_loss` each image's mask (`sdtune.data.masks`) is loaded with its pixels, resized, cropped
and flipped as they are.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path

from sdtune.config import DataConfig
from sdtune.data import captions
from sdtune.data.buckets import Size, assign, fit, make_buckets
from sdtune.data.images import open_scaled, seen_size
from sdtune.data.masks import MaskFailed, MaskSource
from sdtune.data.scan import Example
from sdtune.errors import SdtuneError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Item:
    """One slot of a batch: the image, where it goes, and the caption it is trained with."""

    example: Example
    bucket: Size  # (width, height) of the batch
    resized: Size  # the image is resized to this (aspect kept) ...
    crop: tuple[int, int, int, int]  # ... then cropped to this box (left, top, right, bottom) of bucket size
    flip: bool  # ... then flipped left to right
    caption: str  # after tag shuffling and caption dropout


class ImageFailed(Exception):
    """An image of a batch could not be used (it vanished, broke or changed since the scan). The stream has
    recorded and reported it; `items()` asked again gives the batch with another image in its place."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def _seen_size(example: Example) -> Size:
    """The image's (width, height) as seen (EXIF orientation applied): from the scan, else from the header."""
    if all(example.size):
        return tuple(example.size)
    try:
        return seen_size(example.image)
    except Exception:  # unreadable now: any size will do, loading it reports the problem
        return (1, 1)


class BatchStream:
    """Single-bucket batches drawn epoch by epoch in a seeded order; batch `k` depends only on (seed, k)."""

    def __init__(self, examples: list[Example], cfg: DataConfig, batch_size: int, seed: int):
        if not examples:
            raise SdtuneError("no training images to draw batches from")
        self.examples, self.cfg, self.batch_size, self.seed = examples, cfg, batch_size, seed
        self.buckets = make_buckets(cfg)
        self.sizes = [_seen_size(e) for e in examples]
        self.bucket_of = [assign(size, self.buckets) for size in self.sizes]
        self.members: dict[Size, list[int]] = {}  # bucket -> indices into examples, in scan order
        for i, bucket in enumerate(self.bucket_of):
            self.members.setdefault(bucket, []).append(i)
        self.entries = {b: [i for i in members for _ in range(max(1, examples[i].repeats))]
                        for b, members in self.members.items()}
        self.batches_per_epoch = sum(math.ceil(len(e) / batch_size) for e in self.entries.values())
        self.subset_cfgs = [cfg.for_subset(i) for i in range(len(cfg.subsets))]  # data.subsets' own settings
        self.failed: set[Path] = set()
        self.masks = MaskSource(examples, cfg) if cfg.masked_loss else None
        self._ahead: dict = {}  # tuple(items) -> the Future of their pixels
        self._pool = None
        self._epoch: tuple[int, list[tuple[Size, list[int]]]] | None = None

    def _plan(self, epoch: int) -> list[tuple[Size, list[int]]]:
        """The epoch's batches, each (bucket, example indices)."""
        if self._epoch is None or self._epoch[0] != epoch:  # only the current epoch is ever needed again
            rng = random.Random(self.seed * 7919 + epoch)
            batches = []
            for bucket in sorted(self.entries):
                entries = list(self.entries[bucket])
                rng.shuffle(entries)
                for start in range(0, len(entries), self.batch_size):
                    batch = entries[start:start + self.batch_size]
                    others = entries[:start]
                    need = self.batch_size - len(batch)
                    if need and len(others) >= need:
                        batch += rng.sample(others, need)
                    elif need:  # the bucket has fewer entries than a batch: repeat them
                        batch += [rng.choice(entries) for _ in range(need)]
                    batches.append((bucket, batch))
            if len(self.entries) > 1:
                rng.shuffle(batches)
            self._epoch = (epoch, batches)
        return self._epoch[1]

    def _usable(self, i: int, bucket: Size) -> int:
        """Example `i`, or when its file failed, the next usable example of the same bucket."""
        if self.examples[i].image not in self.failed:
            return i
        members = self.members[bucket]
        start = members.index(i)
        for j in members[start:] + members[:start]:
            if self.examples[j].image not in self.failed:
                return j
        w, h = bucket
        raise SdtuneError(f"every image of the {w}x{h} bucket ({len(members)} files) became unusable during the "
                          "run (deleted, broken or replaced): restore them or remove them, then continue with --resume")

    def cfg_of(self, example: Example) -> DataConfig:
        """The settings `example` trains with: its subset's (data.subsets), else the [data] section."""
        return self.subset_cfgs[example.subset] if self.subset_cfgs else self.cfg

    def items(self, index: int) -> list[Item]:
        """Batch `index`: `batch_size` items from one bucket, a pure function of (seed, index) (and of which
        files failed so far)."""
        bucket, entries = self._plan(index // self.batches_per_epoch)[index % self.batches_per_epoch]
        items = []
        for slot, i in enumerate(entries):
            i = self._usable(i, bucket)
            rng = random.Random(self.seed * 1_000_003 + index * self.batch_size + slot)
            own = self.cfg_of(self.examples[i])
            resized, crop = fit(self.sizes[i], bucket, own.center_crop, rng)
            flip = own.random_flip and rng.random() < 0.5
            caption = captions.render(self.examples[i].caption, own, rng)
            items.append(Item(self.examples[i], bucket, resized, crop, flip, caption))
        return items

    def _fail(self, path: Path, reason: str) -> ImageFailed:
        if path not in self.failed:
            self.failed.add(path)
            logger.info(f"skipping {path}: {reason}")
        return ImageFailed(path, reason)

    def prefetch(self, items: list[Item]) -> None:
        """Start decoding `items` in a background thread (`data.loader_threads` of them; none: nothing to
        do), so that `pixels(items)` later finds them ready: JPEG decoding overlaps the training step."""
        if not self.cfg.loader_threads or tuple(items) in self._ahead:
            return
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.cfg.loader_threads, thread_name_prefix="sdtune-loader")
        while len(self._ahead) >= 4:  # batches asked for and never taken (a failure changed them)
            self._ahead.pop(next(iter(self._ahead)))
        self._ahead[tuple(items)] = self._pool.submit(self._load, items)

    def close(self) -> None:
        """Stop the loader threads and drop what they decoded ahead (the run is over: before its export)."""
        pool, self._pool = self._pool, None
        self._ahead.clear()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def pixels(self, items: list[Item]):
        """The items' images as a [B, 3, H, W] float tensor in [-1, 1]: opened, resized, cropped, flipped
        (or taken from `prefetch`). Raises ImageFailed (after reporting the file once) when one cannot be
        used."""
        return self.pixels_and_masks(items)[0]

    def pixels_and_masks(self, items: list[Item]):
        """(`pixels(items)`, their masks as [B, 1, H, W] in [0, 1], ones for an image without one; None
        without data.masked_loss)."""
        ahead = self._ahead.pop(tuple(items), None)
        return ahead.result() if ahead is not None else self._load(items)

    def _load(self, items: list[Item]):
        import numpy as np
        import torch

        arrays, masks = [], []
        for item in items:
            im, mask = self._open(item)
            arrays.append(np.asarray(_placed(im, item), dtype=np.float32) / 127.5 - 1.0)
            if self.masks is not None:
                h, w = arrays[-1].shape[:2]
                masks.append(np.ones((h, w), np.float32) if mask is None
                             else np.asarray(_placed(mask, item), dtype=np.float32) / 255.0)  # kohya: / 255
        pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
        return pixels, (torch.from_numpy(np.stack(masks)).unsqueeze(1) if self.masks is not None else None)

    def _open(self, item: Item):
        """(the item's image, upright RGB, and its mask as an L image or None) at their size as stored (or
        decoded smaller); a file that cannot be used is reported and raised as ImageFailed."""
        path = item.example.image
        try:
            if self.masks is None:
                seen, im = open_scaled(path, item.resized)  # a very large photo decodes smaller
                mask = None
            else:
                seen, im, mask = self.masks.open(item.example, item.resized)
        except MaskFailed as exc:
            raise self._fail(path, str(exc)) from exc
        except Exception as exc:  # PIL raises many types for broken data; each means "skip this file"
            raise self._fail(path, f"unreadable ({type(exc).__name__}: {exc})") from exc
        expected = tuple(item.example.size)
        if all(expected) and seen != expected:
            raise self._fail(path, f"changed since the scan ({expected[0]}x{expected[1]} px, "
                                   f"now {seen[0]}x{seen[1]})")
        return im, mask


def _placed(im, item: Item):
    """`im` resized, cropped and flipped as `item` says (the image, and its mask the same way)."""
    from PIL import Image

    im = im.resize(item.resized, Image.BICUBIC).crop(item.crop)
    return im.transpose(Image.FLIP_LEFT_RIGHT) if item.flip else im
