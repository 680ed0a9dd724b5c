"""Model families: everything that differs between Stable Diffusion 1.x/2.x and SDXL, behind one interface.

    family = family_for_class("StableDiffusionXLPipeline")    # or family_named("sdxl")
    pipe = family.load_pipeline(source, kind="folder", config="")
    components = family.components(pipe)
    family.read_text(components, max_token_length=225, clip_skip=1)  # kohya's long captions (default 75, 1)
    cond = family.encode(components, ["a photo of sks dog"])  # Conditioning: hidden states (+ pooled)
    extra = family.added_cond(cond, items, device, dtype)     # the UNet's added_cond_kwargs, or None
    pipe = family.assemble(components)                       # the inference pipeline, sharing the modules
    found = detect("model.safetensors")   # Detected(arch="sdxl", family="sdxl", assumed=False), weights unread
    architecture_of(unet, text_encoders)  # "sd15", "sd21", "sdxl" or None: built modules' architecture

The loop, the data path and the estimator call these and never branch on a family's name; a family is
one module (`sd.py`, `sdxl.py`), as torchtitan's `TrainSpec` gives each model its own builders.

One vocabulary (`sdtune.family.archs`): an *architecture* is a bundled name, `sd15`, `sd21` or `sdxl`, and
its *family* is "sd" (SD 1.x and 2.x) or "sdxl". `detect` is the one place a source's architecture is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sdtune.errors import SdtuneError
from sdtune.family import archs
from sdtune.family.base import Components, Conditioning, Family

__all__ = ["Components", "Conditioning", "Detected", "Family", "architecture_of", "assumed_architecture",
           "detect", "families", "family_for_class", "family_named", "family_of_arch",
           "source_kind"]


def families() -> dict[str, Family]:
    """Every family sdtune trains, by name."""
    from sdtune.family.sd import StableDiffusion
    from sdtune.family.sdxl import StableDiffusionXL

    return {family.name: family for family in (StableDiffusion(), StableDiffusionXL())}


def family_named(name: str) -> Family:
    known = families()
    if name not in known:
        raise SdtuneError(f"unknown model family {name!r}; sdtune knows {', '.join(known)}")
    return known[name]


def family_for_class(class_name: str, where: str = "the model") -> Family:
    """The family whose pipeline class is `class_name` (a model_index.json's `_class_name`)."""
    for family in families().values():
        if family.pipeline_class == class_name:
            return family
    raise SdtuneError(f"{where} is a {class_name or 'pipeline of unknown class'}; sdtune trains Stable Diffusion "
                      "1.x, 2.x (StableDiffusionPipeline) and SDXL (StableDiffusionXLPipeline) models")


@dataclass(frozen=True)
class Detected:
    """What a model source is: its architecture (None for a folder of other sizes, such as the bundled toy
    model) and family, and whether that was assumed rather than read (no model, or a hub id that is no
    bundled architecture's repository: the default's, `archs.DEFAULT_ARCH`)."""

    arch: str | None
    family: str
    assumed: bool = False


def detect(source: str) -> Detected:
    """The architecture of `source` without reading a weight: a bundled architecture by its name or its hub
    repository (`archs.HUB_IDS`), a diffusers folder by its pipeline class and UNet config, a single file by
    its keys (`sdtune.family.load.inspect_single_file`). A hub id of no bundled architecture, or no source,
    is assumed to be `archs.DEFAULT_ARCH` (a name is no architecture: a repository called "...xl..." may
    hold anything), and `assumed` says so."""
    from sdtune.family.load import check_pipeline_class, inspect_single_file, resolve_source

    arch = source if source in archs.ARCHS else archs.HUB_IDS.get(source)
    if arch or not source:
        return _of(arch or archs.DEFAULT_ARCH, assumed=not source)
    kind = source_kind(source)
    if kind == "single_file":
        return _of(inspect_single_file(Path(source)).arch)
    if kind == "folder":
        folder = Path(resolve_source(source))
        family = check_pipeline_class(folder / "model_index.json").name
        return Detected(_folder_arch(folder, family), family)
    return _of(archs.DEFAULT_ARCH, assumed=True)


def source_kind(source: str) -> str:
    """'folder', 'single_file' or 'hub' (`sdtune.family.load.classify_source`), where a bare word that is
    no file is taken for a mistyped architecture rather than a hub id."""
    from sdtune.family.load import classify_source, resolve_source

    if not Path(resolve_source(source)).expanduser().exists() and "/" not in source:
        raise SdtuneError(f"unknown model {source}: pass an architecture ({', '.join(archs.ARCHS)}), "
                          "a diffusers folder or a .safetensors file")
    return classify_source(source)


def _of(arch: str, assumed: bool = False) -> Detected:
    return Detected(arch, archs.FAMILY_OF[arch], assumed)


def _folder_arch(folder: Path, family: str) -> str | None:
    """The bundled architecture whose UNet a diffusers folder's has the text width of, within its family."""
    config = folder / "unet" / "config.json"
    width = archs.read_json(config).get("cross_attention_dim") if config.is_file() else None
    return next((arch for arch in archs.ARCHS if archs.FAMILY_OF[arch] == family
                 and archs.unet_config(arch)["cross_attention_dim"] == width), None)


def assumed_architecture(source: str) -> tuple[str, bool]:
    """What the estimator builds for a config's `source` that names no local model: no source, or a hub id
    (not downloaded to be estimated). A bundled architecture's name or hub repository is that architecture;
    any other hub id, or none, is `archs.DEFAULT_ARCH`, and True says it was assumed (the `--preset auto`
    reason line and `estimate-vram` say which architecture). A local source is returned as it is (False)."""
    from sdtune.family.load import classify_source

    try:
        local = bool(source) and source not in archs.ARCHS and classify_source(source) != "hub"
    except SdtuneError:  # a missing path: the estimator's own loader says what is wrong with it
        local = True
    if local:
        return source, False
    found = detect(source)  # a name, a hub id or nothing: no file is read
    return found.arch, found.assumed


def assumption(source: str) -> str:
    """Where an estimate cannot read `source`'s architecture (no model, or a hub id of no bundled
    architecture's repository): which one it assumed and why, in one clause; "" where it reads it."""
    arch, assumed = assumed_architecture(source)
    if not assumed:
        return ""
    what = f"{source} is a hub id of no bundled architecture" if source else "no model is named"
    return (f"estimated as {arch} ({archs.TITLES[arch]}) because {what}: pass the model as a local folder "
            "or .safetensors file to estimate its own architecture")


def architecture_of(unet, text_encoders) -> str | None:
    """The architecture of built modules, by what the clients read: SDXL's text_time conditioning and two
    encoders; SD 1.x's one quick_gelu CLIP; SD 2.x's one gelu OpenCLIP. None for any other combination."""
    if unet.config.get("addition_embed_type") == "text_time":
        return "sdxl" if len(text_encoders) == 2 else None
    if len(text_encoders) != 1:
        return None
    return {"quick_gelu": "sd15", "gelu": "sd21"}.get(getattr(text_encoders[0].config, "hidden_act", None))


def family_of_arch(arch: str) -> Family:
    """The family that loads, encodes and exports architecture `arch`."""
    return family_named(archs.FAMILY_OF[arch])
