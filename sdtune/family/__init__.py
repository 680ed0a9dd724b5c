"""Model families: everything that differs between Stable Diffusion 1.x/2.x and SDXL, behind one interface.

    family = family_for_class("StableDiffusionXLPipeline")    # or family_named("sdxl")
    pipe = family.load_pipeline(source, kind="folder", config="")
    components = family.components(pipe)
    cond = family.encode(components, ["a photo of sks dog"])  # Conditioning: hidden states (+ pooled)
    extra = family.added_cond(cond, items, device, dtype)     # the UNet's added_cond_kwargs, or None
    pipe = family.assemble(components)                       # the inference pipeline, sharing the modules

The loop, the data path and the estimator call these and never branch on a family's name; a family is
one module (`sd.py`, `sdxl.py`), as torchtitan's `TrainSpec` gives each model its own builders.
"""

from __future__ import annotations

from sdtune.errors import SdtuneError
from sdtune.family.base import Components, Conditioning, Family

__all__ = ["Components", "Conditioning", "Family", "family_for_class", "family_named"]


def _families() -> dict[str, Family]:
    from sdtune.family.sd import StableDiffusion
    from sdtune.family.sdxl import StableDiffusionXL

    return {family.name: family for family in (StableDiffusion(), StableDiffusionXL())}


def family_named(name: str) -> Family:
    families = _families()
    if name not in families:
        raise SdtuneError(f"unknown model family {name!r}; sdtune knows {', '.join(families)}")
    return families[name]


def family_for_class(class_name: str, where: str = "the model") -> Family:
    """The family whose pipeline class is `class_name` (a model_index.json's `_class_name`)."""
    for family in _families().values():
        if family.pipeline_class == class_name:
            return family
    raise SdtuneError(f"{where} is a {class_name or 'pipeline of unknown class'}; sdtune trains Stable Diffusion "
                      "1.x, 2.x (StableDiffusionPipeline) and SDXL (StableDiffusionXLPipeline) models")
