"""Bundled Stable Diffusion architectures: the published configs of SD 1.5, SD 2.1 and SDXL, without weights.

    from sdtune import archs
    archs.parameter_count("sd15")                     # 859_520_964: built on the meta device, no RAM, instant
    archs.build_random_pipeline("sd15", "rand-sd15")  # a diffusers folder with random fp32 weights (~4 GB)

`sdtune/archs/NAME/` is laid out like a diffusers pipeline folder with the weights left out: one config
per part, as published in stable-diffusion-v1-5/stable-diffusion-v1-5 (`sd15`), stabilityai/
stable-diffusion-2-1 (`sd21`: v-prediction, OpenCLIP-H text encoder) and stabilityai/stable-diffusion-xl-
base-1.0 (`sdxl`: the UNet only, for counting and estimating; sdtune trains SD 1.x/2.x pipelines). Their
`model_index.json` leaves out the safety checker and feature extractor, which sdtune never loads.

A random pipeline stands in for real weights where none can be downloaded (benchmarks, GPU checks): the
same shapes, memory and speed, meaningless images. Its tokenizer is sdtune's tiny CLIP tokenizer (the
real vocabulary is a download) unless `tokenizer_from` names a folder that holds a real one.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from sdtune.errors import SdtuneError

ARCH_ROOT = Path(__file__).parent / "archs"
ARCHS = ("sd15", "sd21", "sdxl")


def arch_dir(name: str) -> Path:
    """The folder of configs of architecture `name`."""
    if name not in ARCHS:
        raise SdtuneError(f"unknown architecture '{name}'; choose one of {', '.join(ARCHS)}")
    return ARCH_ROOT / name


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def unet_config(name: str) -> dict:
    """The published `unet/config.json` of `name`, as a dict."""
    return _read_json(arch_dir(name) / "unet" / "config.json")


def parts(name: str) -> dict[str, tuple[str, str]]:
    """{part: (library, class name)} of the parts `name` ships, from its `model_index.json`."""
    index = arch_dir(name) / "model_index.json"
    if not index.is_file():
        return {"unet": ("diffusers", "UNet2DConditionModel")}
    return {key: (value[0], value[1]) for key, value in _read_json(index).items()
            if not key.startswith("_") and isinstance(value, list) and value[0]}


def pipeline_archs() -> list[str]:
    """The architectures that ship a whole pipeline (a `model_index.json`), not only a UNet."""
    return [name for name in ARCHS if (arch_dir(name) / "model_index.json").is_file()]


def build_model(name: str, part: str = "unet", device: str = "meta") -> Any:
    """One model part of `name` (unet, vae, text_encoder) built from its config: on the meta device it holds
    no memory (for counting and tracing), elsewhere it has torch's default random initialisation."""
    from sdtune.models import build_part

    known = parts(name)
    if part not in known or known[part][1].endswith(("Tokenizer", "Scheduler")):
        models = [p for p, (_, cls) in known.items() if not cls.endswith(("Tokenizer", "Scheduler"))]
        raise SdtuneError(f"{name} has no model part '{part}'; it has {', '.join(models)}")
    library, class_name = known[part]
    return build_part(arch_dir(name) / part, library, class_name, device)


def parameter_count(name: str, part: str = "unet") -> int:
    """Parameters of one part of `name`, counted on the meta device."""
    return sum(p.numel() for p in build_model(name, part, "meta").parameters())


def _tokenizer(tokenizer_from: str | Path | None, text_config: dict) -> Any:
    from transformers import CLIPTokenizer

    from sdtune.testing import write_tiny_tokenizer

    if tokenizer_from is None:
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = write_tiny_tokenizer(tmp, max_length=text_config["max_position_embeddings"])
    else:
        folder = Path(tokenizer_from)
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer" if (folder / "tokenizer").is_dir() else folder)
    if len(tokenizer) > text_config["vocab_size"]:
        raise SdtuneError(f"the tokenizer has {len(tokenizer)} tokens but the text encoder only "
                          f"{text_config['vocab_size']}; use a CLIP tokenizer")
    return tokenizer


def build_random_pipeline(name: str, folder: str | Path, *, seed: int = 0,
                          tokenizer_from: str | Path | None = None, device: str = "cpu") -> Path:
    """Write a diffusers pipeline folder of architecture `name` with randomly initialised fp32 weights
    (safetensors) that `StableDiffusionPipeline.from_pretrained(folder)` loads offline; returns `folder`.

    The weights are a function of `seed` and `device`; `device="cuda"` initialises them on the GPU, which
    is many times faster than the CPU's random number generator (SD1.5 takes ~50 s on 2 CPU cores)."""
    import diffusers
    import torch

    from sdtune.models import quiet_libraries

    if not (arch_dir(name) / "model_index.json").is_file():
        raise SdtuneError(f"{name} ships only its UNet config (for counting and estimates), not a pipeline; "
                          f"random pipelines exist for {', '.join(pipeline_archs())}")
    quiet_libraries()
    index = _read_json(arch_dir(name) / "model_index.json")
    tokenizer = _tokenizer(tokenizer_from, _read_json(arch_dir(name) / "text_encoder" / "config.json"))
    torch.manual_seed(seed)  # seeds the CUDA generators too
    modules: dict[str, Any] = {}
    for part, value in index.items():
        if part.startswith("_"):
            continue
        if not isinstance(value, list):  # a pipeline argument such as requires_safety_checker
            modules[part] = value
        elif value[0] is None:  # a part this architecture leaves out
            modules[part] = None
        elif value[1].endswith("Tokenizer"):
            modules[part] = tokenizer
        elif value[1].endswith("Scheduler"):
            cls = getattr(diffusers, value[1])
            modules[part] = cls.from_config(cls.load_config(arch_dir(name) / part))
        else:
            modules[part] = build_model(name, part, device).to("cpu")  # saved from host memory
    pipeline = getattr(diffusers, index["_class_name"])(**modules)
    pipeline.save_pretrained(folder, safe_serialization=True)
    return Path(folder)
