"""`sdtune merge`: a LoRA baked into its base model, written as sdtune exports a full fine-tune.

    result = merge("out", "merged", scale=1.0)   # merged/: diffusers folder, and model.safetensors
    result = merge("out", "merged", base="model.safetensors")   # into another base; a single file alone
    result = merge("out", "merged", base="model.safetensors", config="sd15")   # ... with the configs named
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sdtune.errors import SdtuneError


@dataclass(frozen=True)
class Merged:
    pipeline_class: str
    single_file: Path | None
    notes: tuple[str, ...]


def merge(ckpt: Path, out: Path, *, scale: float = 1.0, base: str | None = None, config: str = "",
          overwrite: bool = False) -> Merged:
    from sdtune.export import export_pipeline, export_single_file
    from sdtune.lora.apply import is_lora_folder, merged_components

    ckpt, out = Path(ckpt), Path(out)
    if not is_lora_folder(ckpt):
        raise SdtuneError(f"--ckpt {ckpt} is not a LoRA run's folder (no lora.safetensors, or it is a full "
                          "model already); pass the --out of `sdtune train --set train.method=lora`")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise SdtuneError(f"{out} exists and is not empty; choose another --out or pass --overwrite")
    if config and base is None:
        raise SdtuneError("--config names the configs of a single-file --base; pass --base too (the run's own base "
                          "is loaded with the model.config it trained with)")
    components = merged_components(ckpt, scale, base, config)
    out.mkdir(parents=True, exist_ok=True)
    export_pipeline(components, out)
    written = export_single_file(components, out)
    notes = ((components.origin,) if components.origin else ()) + tuple(written.notes)
    notes += () if written.path else (f"model.safetensors not written: {written.reason}",)
    return Merged(components.family.pipeline_class, written.path, notes)
