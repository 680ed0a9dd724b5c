"""Models on the meta device, for counting and tracing: shapes and dtypes, no weights.

    parts = meta_model("sdxl")              # a bundled architecture name (sd15, sd21, sdxl)
    parts = meta_model("path/to/folder")    # a diffusers folder, read from its configs
    parts = meta_model("model.safetensors") # a single file: its architecture from its tensor shapes

`sdtune.estimate` counts and traces these; nothing here reads a weight. What a source is (its architecture
and family) is `sdtune.family.detect`'s.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sdtune.errors import SdtuneError
from sdtune.family import archs, source_kind
from sdtune.family.base import TEXT_ENCODER_NAMES
from sdtune.family.load import check_pipeline_class, inspect_single_file, resolve_source
from sdtune.util.libraries import quiet_libraries

if TYPE_CHECKING:
    import torch

    from sdtune.family.base import Family



@dataclass
class MetaModel:
    """A model's trainable and frozen parts on the meta device: shapes and dtypes, no weights."""

    label: str
    unet: torch.nn.Module
    vae: torch.nn.Module | None
    text_encoders: tuple[torch.nn.Module, ...]  # in pipeline order: (CLIP-L,) for SD1; (CLIP-L, OpenCLIP-bigG) for SDXL
    prediction_type: str
    family: Family | None = None    # its `sdtune.family.Family`, which says the VAE's precision
    tokenizers: tuple = ()          # none: nothing here is tokenized (a textual inversion's word gets no id)

    @property
    def frozen(self) -> list:
        return [m for m in (self.vae, *self.text_encoders) if m is not None]


def meta_model(source: str) -> MetaModel:
    """Build `source` on the meta device: a bundled architecture name (sd15, sd21, sdxl), a diffusers folder,
    or a single-file checkpoint whose architecture is read from its tensor shapes (no weights are read)."""
    if source in archs.ARCHS:
        return _meta_from(archs.arch_dir(source), source)
    kind = source_kind(source)
    if kind == "hub":
        raise SdtuneError(f"{source} is a hub id; estimate a local folder or file, or an architecture "
                          f"({', '.join(archs.ARCHS)})")
    if kind == "folder":
        folder = Path(resolve_source(source))
        check_pipeline_class(folder / "model_index.json")
        return _meta_from(folder, source)
    return _meta_from(archs.arch_dir(inspect_single_file(Path(source)).arch), source)


def _meta_from(folder: Path, label: str) -> MetaModel:
    quiet_libraries()
    index = json.loads((folder / "model_index.json").read_text()) if (folder / "model_index.json").is_file() else {}
    built = {part: archs.build_part(folder / part, *index[part][:2]) for part in ("vae", *TEXT_ENCODER_NAMES)
             if isinstance(index.get(part), list) and index[part][0]}
    scheduler = folder / "scheduler" / "scheduler_config.json"
    scheduler_config = json.loads(scheduler.read_text()) if scheduler.is_file() else {}
    prediction = scheduler_config.get("prediction_type", "epsilon")
    from sdtune.family import family_for_class

    return MetaModel(label, archs.build_part(folder / "unet", "diffusers", "UNet2DConditionModel"), built.get("vae"),
                     tuple(built[part] for part in TEXT_ENCODER_NAMES if part in built), prediction,
                     family_for_class(index.get("_class_name", "StableDiffusionPipeline"), str(folder)))
