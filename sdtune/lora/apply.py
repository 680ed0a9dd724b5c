"""A trained LoRA on its base model, through diffusers' own loader: for `sdtune sample` and `sdtune merge`.

    if is_lora_folder("out"):
        components = merged_components("out", scale=0.8)   # the base with the LoRA merged into its weights

A LoRA run's folder holds `pytorch_lora_weights.safetensors` and the `config.toml` that names its base
(`model.pretrained`, and `model.config` for a single file). The base is loaded as training loaded it,
the file goes through `pipe.load_lora_weights` and `fuse_lora(lora_scale=scale)`, and the adapters are
unloaded: what is left is a plain model whose weights are base + scale x the LoRA's update.
"""

from __future__ import annotations

from pathlib import Path

from sdtune.errors import SdtuneError
from sdtune.lora.files import DIFFUSERS_FILE


def is_lora_folder(folder: str | Path) -> bool:
    return (Path(folder) / DIFFUSERS_FILE).is_file() and not (Path(folder) / "model_index.json").is_file()


def base_of(folder: str | Path) -> tuple[str, str]:
    """(model.pretrained, model.config) of the run that trained the LoRA in `folder`."""
    from sdtune.config_toml import from_toml

    path = Path(folder) / "config.toml"
    if not path.is_file():
        raise SdtuneError(f"{folder} has {DIFFUSERS_FILE} but no config.toml naming its base model; "
                          "load the file into its base with diffusers' load_lora_weights")
    cfg = from_toml(path.read_text(encoding="utf-8"), str(path))
    return cfg.model.pretrained, cfg.model.config


def merged_components(folder: str | Path, scale: float = 1.0, base: str | None = None):
    """The base model's components (`base`, or the one the run trained on) with the LoRA of `folder` merged
    in at `scale`."""
    from sdtune.models import assemble_pipeline, load_components

    pretrained, config = base_of(folder) if base is None else (base, "")
    components = load_components(pretrained, config)
    pipe = assemble_pipeline(components)
    pipe.load_lora_weights(str(folder), weight_name=DIFFUSERS_FILE, adapter_name="sdtune")
    pipe.fuse_lora(lora_scale=scale, adapter_names=["sdtune"])
    pipe.unload_lora_weights()
    return components
