"""Where a model's UNet weights lie in .safetensors files, read a few rows at a time (FSDP's meta-device load).

    weights = UnetWeights(folder_keys(folder / "unet"))       # a diffusers folder's UNet file(s)
    weights = UnetWeights(single_file_keys(path, names, cfg)) # a single file: its original-layout keys
    rows = weights.read("conv_in.weight", 0, 160)             # fp32, those rows' bytes only

`sdtune.family.load` builds the UNet on the meta device and hands these over; `sdtune.train.parallel` reads
each rank's rows into its shards, so no rank holds the whole UNet.
"""

from __future__ import annotations

import json
from pathlib import Path

DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}  # safetensors' names


class UnetWeights:
    """Where a model's UNet weights lie in .safetensors files, read a few rows at a time: what lets each rank
    of an FSDP run build the UNet on the meta device and read its own shards only
    (`sdtune.train.parallel.load_shards`). Rows are read by hand from the safetensors layout (an 8-byte
    header length, a JSON header of dtype, shape and byte offsets, then each tensor's raw row-major bytes):
    rows [a, b) of dimension 0 are one run of bytes, read with one positioned read into a buffer of their
    own. Not safetensors' `get_slice`: it memory-maps the file, and every page a rank has touched stays in its
    RSS while the file is open (measured on the SD1.5 UNet: half its rows read cost 1.8 GB of mapped file
    on top of the 1.7 GB shard). Not torch.distributed.checkpoint's `set_model_state_dict(...,
    full_state_dict=True, broadcast_from_rank0=True)` either: rank 0 would hold the whole fp32 UNet and send
    every tensor whole to every rank. `elements` counts what was read, for the run's log."""

    def __init__(self, keys: dict[str, tuple[Path, str]]):
        self.keys = keys  # {diffusers name: (file, its key in the file)}
        self.elements = 0
        self._headers: dict[Path, tuple[int, dict]] = {}

    @property
    def files(self) -> list[Path]:
        return sorted({path for path, _ in self.keys.values()})

    def read(self, name: str, start: int, stop: int):
        """Rows [start, stop) of parameter `name` (its first dimension), in fp32."""
        import math

        import torch

        path, key = self.keys[name]
        data, header = self._header(path)
        entry = header[key]
        dtype, shape = getattr(torch, DTYPES[entry["dtype"]]), entry["shape"]
        if not shape:  # a scalar: its one value
            start, stop, shape = 0, 1, [1]
        row = math.prod(shape[1:]) * dtype.itemsize
        buffer = bytearray((stop - start) * row)
        with open(path, "rb") as f:
            f.seek(data + entry["data_offsets"][0] + start * row)
            if f.readinto(buffer) != len(buffer):
                raise OSError(f"{path} ends inside {key}: the file is cut short")
        tensor = torch.frombuffer(buffer, dtype=dtype).view(stop - start, *shape[1:]) if buffer else \
            torch.empty(0, *shape[1:], dtype=dtype)
        self.elements += tensor.numel()
        return tensor.to(torch.float32)

    def _header(self, path: Path) -> tuple[int, dict]:
        """(where the data starts, the header) of the safetensors file `path`, read once."""
        if path not in self._headers:
            with open(path, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                self._headers[path] = (8 + size, json.loads(f.read(size)))
        return self._headers[path]

    def close(self) -> None:
        self._headers.clear()


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
