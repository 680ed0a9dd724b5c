"""Latent and text-embedding caches: each computed once, stored on disk, reused by every later run.

    cache = FeatureCache(cache_dir, "latents", identity=module_identity(vae))
    tensors = cache.get(key)            # None when missing
    cache.put(key, {"mean": ..., "std": ...})

A latent entry holds the VAE's latent distribution (mean and std, fp32) of one image as trained: its
content hash, bucket, resize, crop box and flip are in the key, so a changed file, another bucket or
transform, or another VAE (the identity digests its config and every weight) misses the cache instead of
reusing a stale latent. Sampling from the stored distribution with the step's generator gives the latent
the uncached path would have drawn. With `data.masked_loss` the entry of an image with a mask also holds
the mask on the latent grid, and its key adds the mask file's content digest (or "alpha": the image's own).
A text entry holds the text encoder's hidden states for one caption, keyed by the caption and the encoder's
and tokenizer's identities. Entries are safetensors files written under a temporary name and renamed, so a
killed run never leaves a half-written entry; a write the disk refuses (full, read-only) is one line naming
the cache's folder and what is free.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from sdtune.util.files import cache_root as cache_root  # where it lives now; its callers import it from here
from sdtune.util.files import disk_errors, save_safetensors, tensor_bytes


def module_identity(module, extra: str = "") -> str:
    """A digest of a model's config and every weight's bytes (a few hundred MB hash in well under a second)."""
    import torch

    config = getattr(module, "config", {})
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config)  # transformers' or diffusers' config
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    digest.update(extra.encode())
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]


def key_of(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class FeatureCache:
    """Safetensors entries under `root/kind/identity/`, one file per key."""

    def __init__(self, root: Path, kind: str, identity: str):
        self.folder = Path(root) / kind / identity
        self.kind = kind

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> dict | None:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = self._path(key)
        if not path.is_file():
            return None
        try:
            return load_file(path)
        except (SafetensorError, OSError):  # a damaged entry is a miss; it is rewritten
            return None

    def flush(self) -> None:
        """Entries are written as they are put: nothing is pending (the interface of `ShardedCache`)."""

    def reload(self) -> None:
        """Entries are found by their file names: nothing to read again."""

    def put(self, key: str, tensors: dict) -> None:
        path = self._path(key)
        with cache_write_errors(self.folder, self.kind, tensor_bytes(tensors)):
            path.parent.mkdir(parents=True, exist_ok=True)
            save_safetensors({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, path)  # atomic


def cache_write_errors(folder: Path, kind: str, needed: int):
    """A cache write the disk refuses (full, read-only) as one line naming the cache, its folder and the fix."""
    switch = "data.cache_latents" if kind == "latents" else "data.cache_text"
    return disk_errors(folder, f"the {kind} cache", f"set data.cache_dir to a writable folder or {switch}=false",
                       needed, full_fix=f"free space there, set data.cache_dir to another disk, or {switch}=false")
