"""`lora.init_from`: what a LoRA file holds, read from its safetensors header alone (no torch, no model), so
that the config's `[lora]` keys follow the file before anything loads (hence here, in the config, below
every stage: `load_config` applies it).

    shape = adapter_shape("old/lora.safetensors")    # AdapterShape(algo="loha", rank=16, alpha=16.0, ...)
    layer = file_layer(cfg.lora, layers)             # the config layer that makes rank, alpha, target follow it

A file is kohya's layout (`lora_unet_<module>.lora_down.weight` / `.lora_up.weight` / `.alpha`, with
`lora_te_`, `lora_te1_`, `lora_te2_` for text encoders: sdtune's own `lora.safetensors`, sd-scripts', most
model sites'; LyCORIS' `.hada_*` for LoHa, `.lokr_*` for LoKr, `.dora_scale` for DoRA) or diffusers/peft's
(`unet.<module>.lora_A.weight` / `lora_B` / `lora_magnitude_vector`, alpha in its `lora_adapter_metadata`),
or a folder holding one of them (an sdtune adapter run's output). One rank and one alpha for the attention
and text-encoder modules and one for the convolutions (`lora.conv_rank`, `lora.conv_alpha`): a file whose
modules differ otherwise (kohya's block dims) is refused with one line. A LoKr whose factors are all full
shows no rank (its `ss_network_dim` metadata does, where there is one). The weights themselves go into the
adapters in `sdtune.lora.adapter.load_file`.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from sdtune.errors import SdtuneError
from sdtune.util.run_folder import DIFFUSERS_FILE, KOHYA_FILE

ATTENTION_ENDS = ("to_q", "to_k", "to_v", "to_out_0", "to_out.0")  # the "attention" target's module names
TEXT_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "text_encoder.", "text_encoder_2.")
FOLLOWED = ("rank", "alpha", "target", "text_encoder", "algo", "dora", "factor", "conv_rank", "conv_alpha")
RANK_OF = {"lora_down.weight": "lora", "lora_A.weight": "lora", "hada_w1_b": "loha",  # the factor whose first
           "lokr_w2_b": "lokr", "lokr_w1_b": "lokr"}                                   # size is the rank
DORA_KEYS = ("dora_scale", "lora_magnitude_vector")
# What one module of a kohya/LyCORIS file may hold, for every algorithm sdtune trains: LoRA (and DoRA's
# dora_scale), LoHa, LoKr; the names `sdtune.lora.algorithms` maps peft's parameters onto (a unit test ties them)
KOHYA_KEYS = frozenset({"alpha", "lora_down.weight", "lora_up.weight", "dora_scale", "hada_w1_a", "hada_w1_b",
                        "hada_w2_a", "hada_w2_b", "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a",
                        "lokr_w2_b"})
PEFT_KEYS = frozenset({"lora_A.weight", "lora_B.weight", "lora_magnitude_vector"})  # a diffusers file's


@dataclass(frozen=True)
class AdapterShape:
    path: Path
    kohya: bool            # kohya's names (else diffusers/peft's)
    algo: str              # "lora", "loha" or "lokr"
    dora: bool
    rank: int | None       # None: unknown (a LoKr whose factors are all full, without sdtune's metadata)
    alpha: float | None
    target: str            # "attention" or "attention+conv"
    text_encoder: bool     # the file has text-encoder adapters
    conv_rank: int = 0     # the convolutions' rank and alpha where they differ from rank and alpha (else 0)
    conv_alpha: float = 0.0
    factor: int = -1       # LoKr's lora.factor (from the file's ss_network_args)
    metadata: dict = field(default_factory=dict, compare=False)

    @property
    def label(self) -> str:
        return "DoRA" if self.dora else {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr"}[self.algo]


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
    """What the adapter file (or folder) `path` holds: its algorithm, its one rank and alpha (and the
    convolutions'), its target, its text encoders."""
    path = lora_file(path)
    tensors, metadata, start = _header(path)
    kohya = not any(key.startswith(("unet.", "text_encoder")) for key in tensors)
    modules = _modules(tensors, kohya)
    if not modules:
        raise SdtuneError(f"lora.init_from={path} holds no adapters (no lora_down / lora_A, hada_ or lokr_ "
                          "weights: a full model?); pass a LoRA, LoHa or LoKr file")
    unknown = sorted({k for keys in modules.values() for k in keys} - KOHYA_KEYS - PEFT_KEYS)
    if unknown:
        raise SdtuneError(f"lora.init_from={path} holds {unknown[0]} weights (LyCORIS' Tucker or another extra), "
                          "which sdtune does not train; pass a LoRA, LoHa or LoKr file without them")
    algos = sorted({_algo(keys) for keys in modules.values()})
    if len(algos) > 1:
        raise SdtuneError(f"lora.init_from={path} mixes adapters of {algos}; sdtune trains one lora.algo at a time")
    args = json.loads(metadata.get("ss_network_args") or "{}")
    groups = {}
    for conv in (False, True):
        names = [n for n in modules if _is_conv(n) == conv]
        ranks = sorted({r for r in (_rank(modules[n]) for n in names) if r is not None})
        alphas = (sorted({a for a in (_alpha(path, modules[n], start) for n in names) if a is not None}) if kohya
                  else _peft_alphas(metadata, ranks[0] if ranks else 0, conv))
        _one(path, ranks, alphas)
        groups[conv] = (ranks[0] if ranks else None, alphas[0] if alphas else None, bool(names))
    # a LoKr whose attention factors are all full tells its rank in the metadata only (not the convolutions')
    rank = groups[False][0] or _number(metadata.get("ss_network_dim"), int) or groups[True][0]
    alpha = groups[False][1] or _number(metadata.get("ss_network_alpha"), float) or (float(rank) if rank else None)
    conv_rank, conv_alpha, has_conv = groups[True]
    conv_rank = conv_rank if has_conv and conv_rank and conv_rank != rank else 0
    implied = float(conv_rank) if conv_rank else alpha
    conv_alpha = conv_alpha if has_conv and conv_alpha and conv_alpha != implied else 0.0
    return AdapterShape(path, kohya, algos[0], any(k in DORA_KEYS for keys in modules.values() for k in keys),
                        rank, alpha, "attention+conv" if has_conv else "attention",
                        any(n.startswith(TEXT_PREFIXES) for n in modules), conv_rank, conv_alpha,
                        int(args.get("factor", -1)) if algos[0] == "lokr" else -1, metadata)


def _modules(tensors: dict, kohya: bool) -> dict[str, dict]:
    """{module name: {its key's suffix (kohya's names): header entry}}, adapter keys only."""
    out: dict[str, dict] = {}
    for key, entry in tensors.items():
        if kohya:
            name, _, suffix = key.partition(".")
        else:
            key = key.replace(".lora.down.", ".lora_A.").replace(".lora.up.", ".lora_B.")
            cut = next((key.index(m) for m in (".lora_A.", ".lora_B.", ".lora_magnitude_vector") if m in key), None)
            if cut is None:
                continue
            name, suffix = key[:cut], key[cut + 1:]
        out.setdefault(name, {})[suffix] = entry
    return {name: keys for name, keys in out.items() if any(k in RANK_OF or k.startswith("lokr_") for k in keys)}


def _algo(keys: dict) -> str:
    return "loha" if "hada_w1_a" in keys else "lokr" if any(k.startswith("lokr_") for k in keys) else "lora"


def _is_conv(name: str) -> bool:
    """A layer target=attention+conv adds (neither an attention projection nor a text encoder's)."""
    return not name.startswith(TEXT_PREFIXES) and not name.endswith(ATTENTION_ENDS)


def _rank(keys: dict) -> int | None:
    return next((keys[k]["shape"][0] for k in RANK_OF if k in keys), None)


def _alpha(path: Path, keys: dict, start: int) -> float | None:
    """A kohya module's alpha: its `.alpha`, else its rank (kohya: none is scale 1); None for a LoKr with both
    factors full (the clients apply it at scale 1, whatever its alpha)."""
    if "lokr_w1" in keys and "lokr_w2" in keys:
        return None
    return _scalar(path, keys["alpha"], start) if "alpha" in keys else float(_rank(keys))


def _one(path: Path, ranks: list, alphas: list) -> None:
    if len(ranks) > 1 or len(alphas) > 1:
        what = f"ranks {ranks}" if len(ranks) > 1 else f"alphas {alphas}"
        raise SdtuneError(f"lora.init_from={path} holds adapters of {what} (kohya's per-block dims): sdtune trains "
                          "one rank and alpha for the attention and one for the convolutions; pick a file with those")


def _number(value, kind):
    try:
        return kind(float(value)) if value not in (None, "", "None") else None
    except ValueError:
        return None


def _peft_alphas(metadata: dict, rank: int, conv: bool) -> list[float]:
    """The alphas a diffusers file's `lora_adapter_metadata` gives its parts (`unet.lora_alpha`, ...), and for
    the convolutions their `alpha_pattern`; none recorded: alpha = rank, as diffusers loads it."""
    settings = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    alphas = {float(v) for k, v in settings.items() if k.endswith(".lora_alpha") or k == "lora_alpha"}
    patterns = {float(v) for key, pattern in settings.items() if key.endswith("alpha_pattern") and pattern
                for v in pattern.values()}
    return sorted(patterns if conv and patterns else alphas) or ([float(rank)] if rank else [])


def file_layer(lora, layers: list[tuple[dict, str]]) -> tuple[dict, str]:
    """The config layer that sets the `[lora]` keys a file decides (FOLLOWED) to what `lora.init_from` holds.
    A `--set` of one of them (a layer whose source is "--set ...") that says otherwise is one error."""
    shape = adapter_shape(lora.init_from)
    given = {key: value for data, source in layers if source.startswith("--set")
             for key, value in data.get("lora", {}).items() if key in FOLLOWED}  # the last --set of each
    for key, value in given.items():
        if getattr(shape, key) is not None and _differs(key, value, shape):
            raise SdtuneError(f"lora.{key}={value} but {shape.path} holds {_holds(key, shape)}: drop "
                              f"--set lora.{key} (it follows lora.init_from) or pick another file")
    followed = {key: getattr(shape, key) for key in FOLLOWED if getattr(shape, key) is not None}
    return {"lora": followed}, f"lora.init_from={shape.path}"


def _differs(key: str, value, shape: AdapterShape) -> bool:
    if key == "alpha":  # 0 means alpha = rank
        return float(value or shape.rank) != shape.alpha
    if key == "conv_rank":  # 0 means the rank
        return (value or shape.rank) != (shape.conv_rank or shape.rank)
    if key == "conv_alpha":  # 0 means the implied one
        return bool(value) and float(value) != _conv_alpha(shape)
    return value != getattr(shape, key)


def _conv_alpha(shape: AdapterShape) -> float:
    return shape.conv_alpha or (float(shape.conv_rank) if shape.conv_rank else shape.alpha)


def _holds(key: str, shape: AdapterShape) -> str:
    return {"rank": f"rank {shape.rank} adapters", "alpha": f"alpha {shape.alpha:g} adapters",
            "target": f"{shape.target} adapters",
            "text_encoder": "text-encoder adapters" if shape.text_encoder else "no text-encoder adapters",
            "algo": f"{shape.algo} adapters", "dora": "DoRA adapters" if shape.dora else "adapters without DoRA",
            "factor": f"LoKr adapters of factor {shape.factor}",
            "conv_rank": f"convolution adapters of rank {shape.conv_rank or shape.rank}",
            "conv_alpha": f"convolution adapters of alpha {_conv_alpha(shape):g}"}[key]
