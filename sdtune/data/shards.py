"""Latents packed into shard files (`data.cache_shards = N`): pretraining on millions of images keeps a
few thousand files of N entries each instead of one file per image.

    cache = ShardedCache(root, "latents", identity, entries=4096)
    cache.put(key, {"mean": ..., "std": ...})    # buffered; a full buffer becomes one shard file
    cache.get(key)                               # from the buffer or its shard (read lazily, by tensor)
    cache.flush()                                # the last, partial shard, and the index

The same keys as `sdtune.data.cache.FeatureCache` (content digest, bucket, crop), under
`root/kind/identity/shards/`: `shard-<random>.safetensors` files (each tensor named `<key>/<name>`) and
`index.json` ({key: shard}). A shard is written whole before the index names it (a temporary name,
renamed), so a killed run loses at most the entries not yet flushed, never reads half a shard. Several
processes each write shards of their own and merge the index one after another (`flush` under
`World.barrier`). A shard that has gone missing or broken is a miss: its entries are encoded again.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from sdtune.data.cache import cache_write_errors
from sdtune.util.files import save_safetensors, tensor_bytes, write_text


class ShardedCache:
    def __init__(self, root: Path, kind: str, identity: str, entries: int):
        self.folder = Path(root) / kind / identity / "shards"
        self.kind = kind
        self.entries, self.buffer = entries, {}
        self.index = self._read_index()
        self._open: dict[str, object] = {}

    def _read_index(self) -> dict[str, str]:
        try:
            return json.loads((self.folder / "index.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def get(self, key: str) -> dict | None:
        if key in self.buffer:
            return self.buffer[key]
        shard = self.index.get(key)
        if shard is None:
            return None
        try:
            return self._read(shard, key)
        except Exception:  # a missing or damaged shard (safetensors raises several types): a miss
            self.index.pop(key, None)
            return None

    def _read(self, shard: str, key: str) -> dict | None:
        from safetensors import safe_open

        if shard not in self._open:
            self._open[shard] = safe_open(str(self.folder / shard), framework="pt")
        handle, prefix = self._open[shard], f"{key}/"
        names = [name for name in handle.keys() if name.startswith(prefix)]
        return {name[len(prefix):]: handle.get_tensor(name) for name in names} or None

    def put(self, key: str, tensors: dict) -> None:
        self.buffer[key] = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
        if len(self.buffer) >= self.entries:
            self._write_shard()

    def _write_shard(self) -> None:
        if not self.buffer:
            return
        shard = f"shard-{uuid.uuid4().hex[:16]}.safetensors"
        with cache_write_errors(self.folder, self.kind, tensor_bytes(self.buffer)):
            self.folder.mkdir(parents=True, exist_ok=True)
            save_safetensors({f"{key}/{name}": t for key, entry in self.buffer.items() for name, t in entry.items()},
                             self.folder / shard)
        self.index.update(dict.fromkeys(self.buffer, shard))
        self.buffer = {}

    def reload(self) -> None:
        """Read the index again: the shards other processes have flushed since."""
        self.index = {**self._read_index(), **self.index}

    def flush(self) -> None:
        """Write the buffered entries as a shard and merge this process's index into the file."""
        self._write_shard()
        if not self.index:
            return
        merged = {**self._read_index(), **self.index}
        text = json.dumps(merged)
        with cache_write_errors(self.folder, self.kind, len(text)):
            write_text(self.folder / "index.json", text)
        self.index = merged
