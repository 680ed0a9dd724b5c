"""The one place that loads models (SD 1.x, 2.x, SDXL): a diffusers folder, a single-file checkpoint, a hub id.

    components = load_components("path/to/sd15")             # diffusers folder with model_index.json
    components = load_components("model.safetensors", config="path/to/sd15")   # single file + its configs
    components = load_components("stable-diffusion-v1-5/stable-diffusion-v1-5") # hub id, where online
    components = load_components("sdtune-tiny")                                  # bundled with sdtune

The model's family (`sdtune.families`) is read from model_index.json (for a single file, from its
`model.config` folder, checked against the file's keys) and loads it. Everything is loaded in fp32 on the
CPU; `sdtune.placement.place` casts and places it for a plan.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from sdtune.errors import SdtuneError
from sdtune.families.base import Components
from sdtune.libraries import quiet_libraries

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}
BUNDLED = {"sdtune-tiny": Path(__file__).parent / "assets" / "sdtune-tiny"}  # models shipped in the package
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


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


def check_pipeline_class(index_path: Path):
    """The family of the diffusers folder whose model_index.json is `index_path`; an error for others."""
    from sdtune.families import family_for_class

    return family_for_class(json.loads(index_path.read_text()).get("_class_name", ""), str(index_path.parent))


def _family(source: str, kind: str, config: str):
    from sdtune.families import family_for_class

    if kind == "folder":
        return check_pipeline_class(Path(source) / "model_index.json")
    if kind == "single_file":
        if not config:
            raise SdtuneError(f"{source} is a single-file checkpoint; tell sdtune its architecture with "
                              "--set model.config=DIR (a diffusers folder of the same model family)")
        if not (Path(config) / "model_index.json").is_file():
            raise SdtuneError(f"model.config {config} is not a diffusers folder (no model_index.json)")
        family = check_pipeline_class(Path(config) / "model_index.json")
        if (single_file_family(Path(source)) == "sdxl") != (family.name == "sdxl"):
            raise SdtuneError(f"{source} and model.config {config} are of different model families "
                              f"({single_file_family(Path(source))} and {family.name}): pass the configs of its own")
        return family
    try:  # a hub id: its model_index.json says which pipeline it is
        index = json.loads(Path(_hub_file(source, "model_index.json")).read_text())
    except OSError as exc:
        raise SdtuneError(f"could not fetch '{source}' from the Hugging Face hub ({str(exc).splitlines()[0]}); "
                          "download it, or pass a local diffusers folder with --model") from None
    return family_for_class(index.get("_class_name", ""), source)


def _hub_file(repo: str, name: str) -> str:
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo, name)


def single_file_family(path: Path) -> str:
    """"sdxl" for a checkpoint in SDXL's original layout (its UNet has `label_emb`), else "sd"."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return "sdxl" if any(k.startswith("model.diffusion_model.label_emb.") for k in f.keys()) else "sd"


def load_components(source: str, config: str = "", unet=None) -> Components:
    """Load a model of any family sdtune trains from `source` (see the module docstring) in fp32 on the CPU;
    `unet`, a UNet to use instead of the source's (which is then not read: `sdtune.scratch`)."""
    resolved, kind = resolve_source(source), classify_source(source)
    family = _family(resolved, kind, config)
    quiet_libraries()
    return family.components(family.load_pipeline(resolved, kind, config, **({"unet": unet} if unet else {})))


def assemble_pipeline(components: Components):
    """The family's inference pipeline sharing `components`' modules (no copies), for sampling or saving."""
    return components.family.assemble(components)
