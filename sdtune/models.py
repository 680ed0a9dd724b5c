"""The one place that loads Stable Diffusion models: a diffusers folder, a single-file checkpoint, a hub id.

    components = load_components("path/to/sd15")             # diffusers folder with model_index.json
    components = load_components("model.safetensors", config="path/to/sd15")   # single file + its configs
    components = load_components("stable-diffusion-v1-5/stable-diffusion-v1-5") # hub id, where online
    components = load_components("sdtune-tiny")                                  # bundled with sdtune

Everything is loaded in fp32 on the CPU; `sdtune.placement.place` casts and places it for a plan.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdtune.errors import SdtuneError
from sdtune.libraries import quiet_libraries

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}
BUNDLED = {"sdtune-tiny": Path(__file__).parent / "assets" / "sdtune-tiny"}  # models shipped in the package
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class Components:
    """A Stable Diffusion pipeline taken apart for training."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any  # the pipeline's own (sampling) scheduler; training derives a DDPM one from its config

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.get("prediction_type", "epsilon")


def resolve_source(source: str) -> str:
    """A bundled model's name becomes its folder; anything else is returned as it is."""
    if source in BUNDLED:
        if not (BUNDLED[source] / "model_index.json").is_file():
            raise SdtuneError(f"the bundled model {source} is missing from this install; run `make tiny-model`")
        return str(BUNDLED[source])
    return source


def classify_source(source: str) -> str:
    """'folder', 'single_file' or 'hub' — or a one-line error that says what `source` should be."""
    if not source:
        raise SdtuneError("no base model: pass --model (a diffusers folder, a .safetensors file or a hub id)")
    path = Path(resolve_source(source)).expanduser()
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            raise SdtuneError(f"{source} is a folder but not a diffusers pipeline (no model_index.json); "
                              "pass a diffusers folder or a .safetensors checkpoint")
        return "folder"
    if path.is_file():
        if path.suffix == ".safetensors":
            return "single_file"
        if path.suffix in PICKLE_SUFFIXES:
            raise SdtuneError(f"{source} is a pickle checkpoint, which can run code when loaded; "
                              "convert it to .safetensors first")
        raise SdtuneError(f"{source} is neither a diffusers folder nor a .safetensors checkpoint")
    if _HUB_ID.match(source) and not source.startswith((".", "/", "~")):
        return "hub"
    raise SdtuneError(f"model {source} does not exist: pass a diffusers folder, a .safetensors file or a hub id")


def check_pipeline_class(index_path: Path) -> None:
    name = json.loads(index_path.read_text()).get("_class_name", "")
    if name != "StableDiffusionPipeline":
        raise SdtuneError(f"{index_path.parent} is a {name}; sdtune trains Stable Diffusion 1.x and 2.x models")


def _load_pipeline(source: str, kind: str, config: str):
    quiet_libraries()
    from diffusers import StableDiffusionPipeline

    common = dict(safety_checker=None, requires_safety_checker=False)
    if kind == "folder":
        check_pipeline_class(Path(source) / "model_index.json")
        return StableDiffusionPipeline.from_pretrained(source, local_files_only=True, **common)
    if kind == "single_file":
        if not config:
            raise SdtuneError(f"{source} is a single-file checkpoint; tell sdtune its architecture with "
                              "--set model.config=DIR (a diffusers folder of the same model family)")
        if not (Path(config) / "model_index.json").is_file():
            raise SdtuneError(f"model.config {config} is not a diffusers folder (no model_index.json)")
        try:
            return StableDiffusionPipeline.from_single_file(source, config=config, local_files_only=True, **common)
        except (ValueError, KeyError, RuntimeError, OSError) as exc:
            raise SdtuneError(f"could not load {source} with the configs of {config}: {exc}") from None
    try:
        return StableDiffusionPipeline.from_pretrained(source, **common)
    except OSError as exc:
        raise SdtuneError(f"could not fetch '{source}' from the Hugging Face hub ({str(exc).splitlines()[0]}); "
                          "download it, or pass a local diffusers folder with --model") from None


def load_components(source: str, config: str = "") -> Components:
    """Load a Stable Diffusion 1.x/2.x model from `source` (see the module docstring) in fp32 on the CPU."""
    pipe = _load_pipeline(resolve_source(source), classify_source(source), config)
    return Components(unet=pipe.unet, vae=pipe.vae, text_encoder=pipe.text_encoder,
                      tokenizer=pipe.tokenizer, scheduler=pipe.scheduler)


def assemble_pipeline(components: Components):
    """A `StableDiffusionPipeline` sharing `components`' modules (no copies), for sampling or saving."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(unet=components.unet, vae=components.vae, text_encoder=components.text_encoder,
                                   tokenizer=components.tokenizer, scheduler=components.scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
