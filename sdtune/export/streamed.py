"""Write a `.safetensors` file tensor by tensor, each cast (and made contiguous) only as it is written.

Why by hand: `safetensors.torch.save_file` (0.8) writes from the tensors' own memory, but it needs every
tensor ready at once: a model cast to fp16 for its file (a full fine-tune's fp32 UNet, bf16 text encoders) is a
second copy of the model in RAM for the time of the write, 5-7 GB for SDXL. safetensors offers no writer that
takes one tensor at a time. The format is simple enough to write in order: an 8-byte little-endian header
length, the JSON header (`__metadata__` first, then each tensor's dtype, shape and byte range, padded with
spaces to a multiple of 8), then the tensors' bytes. This writer lays it out as safetensors does (the tensors
ordered by dtype, widest first, then by name; the header's JSON compact), so the tensors, their offsets and their
bytes are those `save_file` writes of the cast tensors (`tests/unit/test_single_file.py` checks it); only the
metadata's keys may come in another order (sorted here, safetensors' hash map's there).

    write_streamed({"a": fp32_tensor, "b": int_tensor}, path, dtype=torch.float16, metadata={"format": "pt"})
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# safetensors' `Dtype` enum order, which sorts the tensors of a file (descending), and the header's names
_ORDER = ("BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16", "U16", "F16",
          "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64")
_NAMES = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.float8_e5m2: "F8_E5M2",
          torch.float8_e4m3fn: "F8_E4M3", torch.int16: "I16", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int32: "I32", torch.float32: "F32", torch.complex64: "C64", torch.float64: "F64", torch.int64: "I64",
          **{getattr(torch, name): code for name, code in (("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64"))
             if hasattr(torch, name)}}


def _target(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype `tensor` is written in: `dtype` for a floating-point tensor, else its own."""
    return dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype


def header(tensors: dict, dtype: torch.dtype | None = None, metadata: dict | None = None) -> tuple[bytes, list]:
    """The file's first bytes (length and padded JSON header) and the names in the order their data follows."""
    order = sorted(tensors, key=lambda name: (-_ORDER.index(_NAMES[_target(tensors[name], dtype)]), name))
    entries, offset = {}, 0
    if metadata:
        entries["__metadata__"] = dict(sorted(metadata.items()))
    for name in order:
        tensor = tensors[name]
        target = _target(tensor, dtype)
        size = tensor.numel() * target.itemsize
        entries[name] = {"dtype": _NAMES[target], "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw, order


def write_streamed(tensors: dict, path, dtype: torch.dtype | None = None, metadata: dict | None = None) -> Path:
    """Write `tensors` (any device, any layout) to `path` as safetensors, floating-point ones cast to `dtype`
    (None: as they are), holding one converted tensor at a time."""
    if metadata and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError(f"safetensors metadata takes strings only, got {metadata!r}")  # as save_file refuses
    first, order = header(tensors, dtype, metadata)
    with open(path, "wb") as out:
        out.write(first)
        for name in order:
            tensor = tensors[name]
            if tensor.numel() == 0:
                continue
            data = tensor.detach().to("cpu", _target(tensor, dtype)).contiguous()
            out.write(memoryview(data.view(-1).view(torch.uint8).numpy()))
            del data
    return Path(path)
