"""Where a model's UNet weights lie in .safetensors files, read a few rows at a time (FSDP's meta-device load).

    weights = UnetWeights(folder_keys(folder / "unet"))       # a diffusers folder's UNet file(s)
    weights = UnetWeights(single_file_keys(path, names, cfg)) # a single file: its original-layout keys
    rows = weights.read("conv_in.weight", 0, 160)             # fp32, from the memory-mapped file

`sdtune.family.load` builds the UNet on the meta device and hands these over; `sdtune.train.parallel` reads
each rank's rows into its shards, so no rank holds the whole UNet.
"""

from __future__ import annotations

import json
from pathlib import Path


class UnetWeights:
    """Where a model's UNet weights lie in .safetensors files, read a few rows at a time: what lets each rank
    of an FSDP run build the UNet on the meta device and read its own shards only
    (`sdtune.train.parallel.load_shards`). Read with safetensors' `get_slice` (the file is memory-mapped, so a
    rank touches its rows' bytes only) rather than torch.distributed.checkpoint's `set_model_state_dict(...,
    full_state_dict=True, broadcast_from_rank0=True)`, which needs rank 0 to hold the whole fp32 UNet and
    sends every tensor whole to every rank. `elements` counts what was read, for the run's log."""

    def __init__(self, keys: dict[str, tuple[Path, str]]):
        self.keys = keys  # {diffusers name: (file, its key in the file)}
        self.elements = 0
        self._open: dict[Path, object] = {}

    @property
    def files(self) -> list[Path]:
        return sorted({path for path, _ in self.keys.values()})

    def read(self, name: str, start: int, stop: int):
        """Rows [start, stop) of parameter `name` (its first dimension), in fp32."""
        import torch
        from safetensors import safe_open

        path, key = self.keys[name]
        if path not in self._open:
            self._open[path] = safe_open(str(path), framework="pt")
        rows = self._open[path].get_slice(key)
        tensor = rows[start:stop] if rows.get_shape() else rows[:]
        self.elements += tensor.numel()
        return tensor.to(torch.float32)

    def close(self) -> None:
        self._open.clear()


def folder_keys(folder: Path) -> dict[str, tuple[Path, str]] | None:
    """A diffusers UNet folder's weights by name: one .safetensors file, or several under an index."""
    single = folder / "diffusion_pytorch_model.safetensors"
    index = single.with_name(single.name + ".index.json")
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as f:
            return {key: (single, key) for key in f.keys()}
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {key: (folder / file, key) for key, file in weight_map.items()}
    return None


def single_file_keys(path: Path, renamed: dict[str, str]) -> dict[str, tuple[Path, str]] | None:
    """A single file's UNet weights by diffusers name, `renamed` being {original-layout key: diffusers name}
    (`sdtune.family.ldm_names.unet_to_ldm`, as the export writes them and diffusers' `from_single_file`
    reads them); None when the file lacks any of them."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        present = set(f.keys())
    if set(renamed) - present:
        return None
    return {name: (path, key) for key, name in renamed.items()}
