"""Bundled Stable Diffusion architectures: the published configs of SD 1.5, SD 2.1 and SDXL, without weights.

    from sdtune.family import archs
    archs.parameter_count("sd15")                     # 859_520_964: built on the meta device, no RAM, instant
    archs.build_model("sd15", "vae")                  # a part with random weights, built from its config

`sdtune/archs/NAME/` is laid out like a diffusers pipeline folder with the weights left out: one config
per part, as published in stable-diffusion-v1-5/stable-diffusion-v1-5 (`sd15`), stabilityai/
stable-diffusion-2-1 (`sd21`: v-prediction, OpenCLIP-H text encoder) and stabilityai/stable-diffusion-xl-
base-1.0 (`sdxl`: two text encoders, CLIP ViT-L and OpenCLIP ViT-bigG with its projection, and the VAE with
SDXL's scaling factor and `force_upcast`). Their `model_index.json` leaves out the safety checker and
feature extractor, which sdtune never loads. `HUB_IDS` names those repositories, so that a preset naming
one is estimated as its architecture without a download.

A whole pipeline with random weights (benchmarks, GPU checks) is `sdtune.toy.random_pipeline`'s.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sdtune.errors import SdtuneError
from sdtune.util.libraries import quiet_libraries

ARCH_ROOT = Path(__file__).parent / "archs"
ARCHS = ("sd15", "sd21", "sdxl")
HUB_IDS = {  # the hub repositories whose published configs these are: same architecture, weights on the hub
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "sd15",
    "stabilityai/stable-diffusion-2-1": "sd21",
    "stabilityai/stable-diffusion-xl-base-1.0": "sdxl",
}


# One vocabulary: an architecture is a bundled name (above); its family is the `sdtune.family.Family` that
# loads, encodes and exports it ("sd" for SD 1.x and 2.x, "sdxl"). Every module says these words.
FAMILY_OF = {"sd15": "sd", "sd21": "sd", "sdxl": "sdxl"}
TITLES = {"sd15": "SD 1.x", "sd21": "SD 2.x", "sdxl": "SDXL"}  # as users and the clients' docs name them
DEFAULT_ARCH = "sd15"  # what is estimated for no model, or for a hub id that is no bundled architecture


def arch_dir(name: str) -> Path:
    """The folder of configs of architecture `name`."""
    if name not in ARCHS:
        raise SdtuneError(f"unknown architecture '{name}'; choose one of {', '.join(ARCHS)}")
    return ARCH_ROOT / name


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def unet_config(name: str) -> dict:
    """The published `unet/config.json` of `name`, as a dict."""
    return read_json(arch_dir(name) / "unet" / "config.json")


def parts(name: str) -> dict[str, tuple[str, str]]:
    """{part: (library, class name)} of the parts `name` ships, from its `model_index.json`."""
    index = arch_dir(name) / "model_index.json"
    if not index.is_file():
        return {"unet": ("diffusers", "UNet2DConditionModel")}
    return {key: (value[0], value[1]) for key, value in read_json(index).items()
            if not key.startswith("_") and isinstance(value, list) and value[0]}


def pipeline_archs() -> list[str]:
    """The architectures that ship a whole pipeline (a `model_index.json`), not only a UNet."""
    return [name for name in ARCHS if (arch_dir(name) / "model_index.json").is_file()]


def build_model(name: str, part: str = "unet", device: str = "meta") -> Any:
    """One model part of `name` (unet, vae, text_encoder, text_encoder_2) built from its config: on the meta
    device it holds no memory (for counting and tracing), elsewhere it has torch's default random
    initialisation."""
    known = parts(name)
    if part not in known or known[part][1].endswith(("Tokenizer", "Scheduler")):
        models = [p for p, (_, cls) in known.items() if not cls.endswith(("Tokenizer", "Scheduler"))]
        raise SdtuneError(f"{name} has no model part '{part}'; it has {', '.join(models)}")
    library, class_name = known[part]
    return build_part(arch_dir(name) / part, library, class_name, device)


def parameter_count(name: str, part: str = "unet") -> int:
    """Parameters of one part of `name`, counted on the meta device."""
    return sum(p.numel() for p in build_model(name, part, "meta").parameters())


def build_part(folder: Path, library: str, class_name: str, device: str = "meta") -> Any:
    """A model part built from the config in `folder` alone: on the meta device it holds no memory (for
    counting and tracing); elsewhere it has the library's random initialisation."""
    import torch

    quiet_libraries()  # before diffusers' first model class is imported
    with torch.device(device):
        if library == "diffusers":
            import diffusers

            cls = getattr(diffusers, class_name)
            return cls.from_config(cls.load_config(folder))
        import transformers

        cls = getattr(transformers, class_name)
        return cls(cls.config_class.from_pretrained(folder))
