"""What the UNet trains on, per micro-batch: latents and text embeddings, encoded now or read from the caches.

    features = Features(components, cfg.data, plan, text_grad=False)
    features.prepare([(stream, examples)])   # with caches: encode what is missing, then free the encoders
    latents = features.latents(stream, items, generator)
    latents, mask = features.latents_and_mask(stream, items, generator)   # data.masked_loss: the latent-grid mask
    cond = features.text(captions)           # a sdtune.family.Conditioning: hidden states (+ pooled)

Without caches both are encoded for every micro-batch by the frozen VAE and text encoder on the device.
With `data.cache_latents`, every image is encoded once before step 1 (both flips when `data.random_flip`)
and each micro-batch samples from the stored distribution with the step's generator, drawing exactly the
values the uncached path draws. With `data.cache_text`, every caption (and the empty one of caption
dropout) is embedded once by the model family's encoder(s): the hidden states and, for SDXL, the pooled
embedding. Encoders whose outputs are all cached leave the device for host memory, which `estimate-vram`
counts the same way. With `data.masked_loss` each latent comes with its image's mask on the latent grid
(`sdtune.data.masks`), stored in the latent's cache entry, whose key then covers the mask file's content.
"""

from __future__ import annotations

import contextlib
import logging
import random

from sdtune.config import DataConfig
from sdtune.data.cache import FeatureCache, cache_root, key_of, module_identity
from sdtune.data.captions import fixed
from sdtune.data.masks import to_latent_grid
from sdtune.data.scan_cache import FileDigests
from sdtune.data.shards import ShardedCache
from sdtune.data.stream import ImageFailed

logger = logging.getLogger(__name__)


class Features:
    def __init__(self, components, data: DataConfig, plan, text_grad: bool = False):
        self.c, self.data, self.plan = components, data, plan
        self.text_grad = text_grad  # the text encoders train (a LoRA on them): encode with autograd
        self.latent_cache: FeatureCache | None = None
        self.text_cache: FeatureCache | None = None
        self._digests: dict = {}
        self._files = FileDigests.for_cache(data)  # content digests, remembered by (path, size, mtime)
        self._buckets = None

    # ------------------------------------------------------------------------------------------------
    # before step 1

    def prepare(self, sources, world=None) -> None:
        """Fill the caches for every (stream, examples) of `sources` (the instance images, and the class
        images of prior preservation), then park the encoders whose outputs are all cached. Under a
        launcher (`world`, a `sdtune.util.world.World`) each rank encodes its share of what is missing."""
        from sdtune.util.world import World

        world, root = world or World(), cache_root(self.data.cache_dir)
        if self.data.cache_latents:
            identity, shards = module_identity(self.c.vae), self.data.cache_shards
            self.latent_cache = (ShardedCache(root, "latents", identity, shards) if shards
                                 else FeatureCache(root, "latents", identity))
            for stream, examples in sources:
                self._encode_missing_latents(stream, examples[world.rank::world.size])
            for rank in range(world.size):  # one at a time: each merges its digests (and shard index) into the file
                if rank == world.rank:
                    self._save_digests()
                    self.latent_cache.flush()
                world.barrier()
            self.latent_cache.reload()  # what the other ranks encoded
            self.c.vae.to("cpu")
        if self.data.cache_text:
            self.text_cache = FeatureCache(root, "text", self._text_identity())
            captions = {fixed(e.caption, stream.cfg_of(e)) for stream, examples in sources for e in examples}
            dropout = self.data.caption_dropout or any(s.caption_dropout for s in self.data.subsets)
            captions = sorted(captions | ({""} if dropout else set()))
            missing = [caption for caption in captions if self.text_cache.get(key_of(caption)) is None]
            mine = missing[world.rank::world.size]
            for start in range(0, len(mine), 32):
                chunk = mine[start:start + 32]
                for caption, entry in zip(chunk, _entries(self.c.family.encode(self.c, chunk)), strict=True):
                    self.text_cache.put(key_of(caption), entry)
            world.barrier()
            logger.info(f"text cache: {len(captions) - len(missing)} of {len(captions)} captions reused")
            for encoder in self.c.text_encoders:
                encoder.to("cpu")

    def _save_digests(self) -> None:
        try:
            self._files.save()
        except OSError as exc:  # the cache still works; the next run reads the images' bytes again
            logger.warning(f"{self._files.path} cannot be written ({exc.strerror or exc})")

    def _text_identity(self) -> str:
        """A digest of every text encoder with its tokenizer (and the family's handling of empty captions, and
        how captions are read: max_token_length, clip_skip)."""
        parts = []
        for tokenizer, encoder in zip(self.c.tokenizers, self.c.text_encoders, strict=True):
            name = f"{type(tokenizer).__name__}:{len(tokenizer)}:{tokenizer.model_max_length}:{self.c.text}"
            parts.append(module_identity(encoder, f"{self.c.family.name}:{name}:{sorted(self.c.options.items())}"))
        return parts[0] if len(parts) == 1 else key_of(*parts)[:32]

    def _encode_missing_latents(self, stream, examples) -> None:
        items = [item for example in examples for item in self._cached_items(stream, example)]
        missing = [item for item in items if self.latent_cache.get(self._latent_key(stream, item)) is None]
        for start in range(0, len(missing), 8):
            chunk = missing[start:start + 8]
            for bucket in sorted({item.bucket for item in chunk}):  # one encode per bucket: equal sizes
                same = [item for item in chunk if item.bucket == bucket]
                try:
                    self._encode_into_cache(stream, same)
                except ImageFailed:  # reported by the stream; the others go one by one
                    for item in same:
                        with contextlib.suppress(ImageFailed):
                            self._encode_into_cache(stream, [item])
        logger.info(f"latent cache: {len(items) - len(missing)} of {len(items)} latents reused")

    def _encode_into_cache(self, stream, items) -> None:
        import torch

        vae = self.c.vae
        parameter = next(vae.parameters())
        pixels, masks = stream.pixels_and_masks(items)
        with torch.no_grad():
            dist = vae.encode(pixels.to(parameter.device, parameter.dtype)).latent_dist
        grid = None if masks is None else to_latent_grid(masks, dist.mean.shape[-2:])
        for i, item in enumerate(items):
            entry = {"mean": dist.mean[i], "std": dist.std[i]}
            if grid is not None and stream.masks.source(item.example) is not None:  # none: ones when read
                entry["mask"] = grid[i]
            self.latent_cache.put(self._latent_key(stream, item), entry)

    def _cached_items(self, stream, example) -> list:
        """The crops a latent cache must hold for `example`: its bucket's center crop, both ways round when
        flips are on (a random crop cannot be cached; the config refuses that combination)."""
        from sdtune.data.buckets import assign, fit, make_buckets
        from sdtune.data.stream import Item

        if self._buckets is None:
            self._buckets = make_buckets(self.data)
        bucket = assign(example.size, self._buckets)
        resized, crop = fit(example.size, bucket, True, random.Random(0))  # center: the rng is not used
        flips = (False, True) if stream.cfg_of(example).random_flip else (False,)
        return [Item(example, bucket, resized, crop, flip, "") for flip in flips]

    def _latent_key(self, stream, item) -> str:
        image = item.example.image
        if image not in self._digests:
            self._digests[image] = self._files.of(image)
        parts = (self._digests[image], item.bucket, item.resized, item.crop, item.flip)
        mask = None if stream.masks is None else stream.masks.token(item.example, self._files.of)
        return key_of(*parts) if mask is None else key_of(*parts, mask)  # unmasked: the key as before

    @contextlib.contextmanager
    def on_device(self):
        """The frozen encoders back on the device for a while (validation samples), then home again."""
        parked = ([self.c.vae] if self.latent_cache is not None else []) + (
            list(self.c.text_encoders) if self.text_cache is not None else [])
        for module in parked:
            module.to(self.plan.device)
        try:
            yield
        finally:
            for module in parked:
                module.to("cpu")

    # ------------------------------------------------------------------------------------------------
    # every micro-batch

    def latents(self, stream, items, generator, rows: tuple[int, slice] | None = None):
        """Scaled latents of `items` in fp32: the VAE's sample, drawn with `generator`. `rows` = (global batch,
        these items' rows of it): the sample's noise is drawn for the whole global batch and sliced, so a
        rank's share equals those rows of one process's batch."""
        return self.latents_and_mask(stream, items, generator, rows)[0]

    def latents_and_mask(self, stream, items, generator, rows: tuple[int, slice] | None = None):
        """(`latents(...)`, with data.masked_loss the items' masks [B, 1, h, w] on the latent grid in fp32 on
        the device (ones for an image without one), else None)."""
        import torch
        from diffusers.utils.torch_utils import randn_tensor

        device, dtype = self.plan.device, self.plan.working_dtype
        total, mine = rows or (len(items), slice(None))
        with torch.no_grad():
            if self.latent_cache is None:
                pixels, masks = stream.pixels_and_masks(items)
                pixels = pixels.to(device, next(self.c.vae.parameters()).dtype)
                dist = self.c.vae.encode(pixels).latent_dist  # its own sample(): mean + std x randn of its shape
                mean, std, where, dtype = dist.mean, dist.std, dist.parameters.device, dist.parameters.dtype
                mask = None if masks is None else to_latent_grid(masks, mean.shape[-2:]).to(device)
            else:
                stored = [self._stored_latent(stream, item) for item in items]
                mean = torch.stack([s["mean"] for s in stored]).to(device, dtype)
                std = torch.stack([s["std"] for s in stored]).to(device, dtype)
                where = mean.device
                mask = None if stream.masks is None else torch.stack(
                    [s["mask"] if "mask" in s else torch.ones(1, *mean.shape[-2:]) for s in stored]).to(device)
            noise = randn_tensor((total, *mean.shape[1:]), generator=generator, device=where, dtype=dtype)
            latents = mean + std * noise[mine]
        return latents.float() * self.c.vae.config.scaling_factor, None if mask is None else mask.float()

    def _stored_latent(self, stream, item) -> dict:
        key = self._latent_key(stream, item)
        stored = self.latent_cache.get(key)
        if stored is None:  # deleted or damaged since prepare(): encode it again, on the host if need be
            self._encode_missing_latents(stream, [item.example])
            stored = self.latent_cache.get(key)
        return stored

    def text(self, captions: list[str]):
        """The micro-batch's `Conditioning` on the device in the working precision: encoded now, or cached."""
        import torch

        from sdtune.family import Conditioning

        if self.text_cache is None:
            return self.c.family.encode(self.c, captions, grad=self.text_grad)
        stored = [self.text_cache.get(key_of(caption)) for caption in captions]
        for i, caption in enumerate(captions):
            if stored[i] is None:  # deleted or damaged since prepare(): embedded again, on the host if need be
                stored[i] = _entries(self.c.family.encode(self.c, [caption]))[0]

        def stack(name):
            if name not in stored[0]:
                return None
            return torch.stack([entry[name].cpu() for entry in stored]).to(self.plan.device, self.plan.working_dtype)

        return Conditioning(hidden=stack("hidden"), pooled=stack("pooled"))


def _entries(cond) -> list[dict]:
    """A text-cache entry per caption of a `Conditioning`: its hidden states, and its pooled embedding."""
    return [{"hidden": cond.hidden[i], **({} if cond.pooled is None else {"pooled": cond.pooled[i]})}
            for i in range(len(cond.hidden))]
