"""The one data iterator: a micro-batch as a rank trains on it, with the next one's images decoding
meanwhile and a broken image replaced by another of its bucket.

    batches = MicroBatches(stream, features, world, device="cuda")
    batch = batches.load(index, seed)      # this rank's items, latents (and masks); batch.generator draws the rest
    value = until_loaded(lambda: [...])    # anything that reads images: again after an ImageFailed

The loop, validation and the tests' helpers all load through here, so the retry and the prefetch have one
owner; the loss that follows only computes. Written here rather than as a torch DataLoader: batch `k` is a
pure function of (seed, k) (`sdtune.data.stream`) and a failure changes which images batch `k` holds,
which a DataLoader's worker queue would have fetched already.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from sdtune.data.stream import BatchStream, ImageFailed, Item
from sdtune.util.world import World

if TYPE_CHECKING:
    import torch

    from sdtune.data.features import Features

T = TypeVar("T")


def until_loaded(load: Callable[[], T]) -> T:
    """`load()`, called again after each `ImageFailed`: the stream has reported the image once and now
    substitutes another of its bucket (or, for a fixed set, leaves it out)."""
    while True:
        try:
            return load()
        except ImageFailed:
            continue


@dataclass(frozen=True)
class MicroBatch:
    """This rank's share of one global micro-batch, its latents drawn, and the generator that draws the
    rest of it (noise, timesteps) for the whole global batch."""

    items: list[Item]          # this rank's slots
    latents: torch.Tensor      # their scaled fp32 latents
    generator: torch.Generator
    size: int                  # slots of the global micro-batch
    rows: slice                # this rank's rows of a tensor drawn for the global batch
    mask: torch.Tensor | None = None  # data.masked_loss: [B, 1, h, w] on the latent grid, 1 trains, 0 does not


class MicroBatches:
    """The micro-batches of `stream` as this rank of `world` trains on them."""

    def __init__(self, stream: BatchStream, features: Features, world: World, device: str):
        self.stream, self.features, self.world, self.device = stream, features, world, device

    def load(self, index: int, seed: int) -> MicroBatch:
        """Micro-batch `index`, its draws seeded with `seed`; without a latent cache the next micro-batch's
        images start decoding first (JPEG decoding overlaps the step)."""
        return until_loaded(lambda: self._load(index, seed))

    def _load(self, index: int, seed: int) -> MicroBatch:
        import torch

        stream, world = self.stream, self.world
        every = stream.items(index)
        items, rows = world.share(every), world.slice(len(every))
        generator = torch.Generator(self.device).manual_seed(seed)  # anew each try: a retry draws alike
        if self.features.latent_cache is None:
            stream.prefetch(world.share(stream.items(index + 1)))
        latents, mask = self.features.latents_and_mask(stream, items, generator, rows=(len(every), rows))
        return MicroBatch(items, latents, generator, len(every), rows, mask)
