"""`lora.init_from`: what a LoRA file holds, read from its safetensors header alone (no torch, no model), so
that the config's `[lora]` keys follow the file before anything loads (hence here, in the config, below
every stage: `load_config` applies it).

    shape = adapter_shape("old/lora.safetensors")    # AdapterShape(rank=16, alpha=16.0, target="attention", ...)
    layer = file_layer(cfg.lora, layers)             # the config layer that makes rank, alpha, target follow it

A file is kohya's layout (`lora_unet_<module>.lora_down.weight` / `.lora_up.weight` / `.alpha`, with
`lora_te_`, `lora_te1_`, `lora_te2_` for text encoders: sdtune's own `lora.safetensors`, sd-scripts', most
model sites') or diffusers/peft's (`unet.<module>.lora_A.weight` / `lora_B`, alpha in its
`lora_adapter_metadata`), or a folder holding one of them (an sdtune LoRA run's output). One rank and one
alpha for every module: a file whose modules differ (kohya's block dims) is refused with one line, as sdtune
trains one rank. The weights themselves go into the adapters in `sdtune.lora.adapter.load_file`.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from sdtune.errors import SdtuneError
from sdtune.util.run_folder import DIFFUSERS_FILE, KOHYA_FILE

ATTENTION_ENDS = ("to_q", "to_k", "to_v", "to_out_0", "to_out.0")  # the "attention" target's module names
TEXT_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "text_encoder.", "text_encoder_2.")
FOLLOWED = ("rank", "alpha", "target", "text_encoder")  # the [lora] keys a file decides


@dataclass(frozen=True)
class AdapterShape:
    path: Path
    kohya: bool            # kohya's names (else diffusers/peft's)
    rank: int
    alpha: float
    target: str            # "attention" or "attention+conv"
    text_encoder: bool     # the file has text-encoder adapters


def lora_file(path: str | Path) -> Path:
    """The adapter file `path` names: the file, or in a folder its diffusers file, else its kohya file."""
    path = Path(path)
    if path.is_dir():
        found = [path / name for name in (DIFFUSERS_FILE, KOHYA_FILE) if (path / name).is_file()]
        if not found:
            raise SdtuneError(f"lora.init_from={path} is a folder without {DIFFUSERS_FILE} or {KOHYA_FILE}; "
                              "pass a LoRA run's --out or the .safetensors file itself")
        return found[0]
    if not path.is_file():
        raise SdtuneError(f"lora.init_from={path} does not exist; pass a LoRA .safetensors file or a LoRA run's --out")
    return path


def _header(path: Path) -> tuple[dict, dict, int]:
    """(tensors' entries, metadata, where the data begins) of a safetensors file."""
    try:
        with open(path, "rb") as f:
            size = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(size))
    except (OSError, struct.error, ValueError) as exc:
        raise SdtuneError(f"lora.init_from={path} is not a safetensors file ({exc})") from None
    return header, header.pop("__metadata__", None) or {}, 8 + size


def _scalar(path: Path, entry: dict, start: int) -> float:
    """A one-value tensor's value (kohya's `.alpha`), read from its bytes."""
    begin, end = entry["data_offsets"]
    with open(path, "rb") as f:
        f.seek(start + begin)
        raw = f.read(end - begin)
    kinds = {"F32": "<f", "F64": "<d", "F16": "<e", "I64": "<q", "I32": "<i"}
    if entry["dtype"] == "BF16":
        return struct.unpack("<f", b"\0\0" + raw[:2])[0]
    if entry["dtype"] not in kinds or len(raw) < struct.calcsize(kinds[entry["dtype"]]):
        raise SdtuneError(f"lora.init_from={path} has an alpha of {entry['dtype']} {entry['shape']}, not one number; "
                          "pass a kohya or diffusers LoRA file")
    return float(struct.unpack(kinds[entry["dtype"]], raw[:struct.calcsize(kinds[entry["dtype"]])])[0])


def adapter_shape(path: str | Path) -> AdapterShape:
    """What the LoRA file (or folder) `path` holds: its one rank and alpha, its target, its text encoders."""
    path = lora_file(path)
    tensors, metadata, start = _header(path)
    kohya = any(".lora_down." in key for key in tensors)
    downs = {key.split(".lora_")[0].split(".lora.")[0]: entry["shape"] for key, entry in tensors.items()
             if ".lora_down." in key or ".lora_A." in key or ".lora.down." in key}
    if not downs:
        raise SdtuneError(f"lora.init_from={path} holds no LoRA adapters (no lora_down / lora_A weights: a LoHa, "
                          "LoKr or full model?); pass a plain LoRA file")
    ranks = sorted({shape[0] for shape in downs.values()})
    alphas = sorted({_scalar(path, tensors[f"{name}.alpha"], start) if f"{name}.alpha" in tensors
                     else float(shape[0]) for name, shape in downs.items()}  # kohya: no alpha is alpha = rank
                    if kohya else _peft_alphas(metadata, ranks[0]))
    if len(ranks) > 1 or len(alphas) > 1:
        what = f"ranks {ranks}" if len(ranks) > 1 else f"alphas {alphas}"
        raise SdtuneError(f"lora.init_from={path} holds adapters of {what} (kohya's per-block dims, or a "
                          "conv_dim apart from the network_dim): sdtune trains one rank and alpha for every module; "
                          "pick a file with one rank and alpha")
    unet = [name for name in downs if not name.startswith(TEXT_PREFIXES)]
    attention = all(name.endswith(ATTENTION_ENDS) for name in unet)
    return AdapterShape(path, kohya, ranks[0], alphas[0],
                        "attention" if attention else "attention+conv", len(unet) < len(downs))


def _peft_alphas(metadata: dict, rank: int) -> list[float]:
    """The alphas a diffusers file's `lora_adapter_metadata` gives its parts (`unet.lora_alpha`, ...) and
    their patterns; none recorded: alpha = rank, as diffusers loads it."""
    settings = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    alphas = {float(v) for k, v in settings.items() if k.endswith(".lora_alpha") or k == "lora_alpha"}
    for key, pattern in settings.items():
        if key.endswith("alpha_pattern") and pattern:
            alphas |= {float(v) for v in pattern.values()}
    return sorted(alphas) or [float(rank)]


def file_layer(lora, layers: list[tuple[dict, str]]) -> tuple[dict, str]:
    """The config layer that sets `[lora]` rank, alpha, target and text_encoder to what `lora.init_from` holds.
    A `--set` of one of them (a layer whose source is "--set ...") that says otherwise is one error."""
    shape = adapter_shape(lora.init_from)
    given = {key: value for data, source in layers if source.startswith("--set")
             for key, value in data.get("lora", {}).items() if key in FOLLOWED}  # the last --set of each
    for key, value in given.items():
        if _differs(key, value, shape):
            raise SdtuneError(f"lora.{key}={value} but {shape.path} holds {_holds(key, shape)}: drop "
                              f"--set lora.{key} (it follows lora.init_from) or pick another file")
    return {"lora": {key: getattr(shape, key) for key in FOLLOWED}}, f"lora.init_from={shape.path}"


def _differs(key: str, value, shape: AdapterShape) -> bool:
    if key == "alpha":  # 0 means alpha = rank
        return float(value or shape.rank) != shape.alpha
    return value != getattr(shape, key)


def _holds(key: str, shape: AdapterShape) -> str:
    return {"rank": f"rank {shape.rank} adapters", "alpha": f"alpha {shape.alpha:g} adapters",
            "target": f"{shape.target} adapters",
            "text_encoder": "text-encoder adapters" if shape.text_encoder else "no text-encoder adapters"}[key]
