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
from sdtune.export.lora_files import DIFFUSERS_FILE


def is_lora_folder(folder: str | Path) -> bool:
    return (Path(folder) / DIFFUSERS_FILE).is_file() and not (Path(folder) / "model_index.json").is_file()


def base_of(folder: str | Path) -> tuple[str, str]:
    """(model.pretrained, model.config) of the run that trained the LoRA in `folder`."""
    from sdtune.config.toml import from_toml

    path = Path(folder) / "config.toml"
    if not path.is_file():
        raise SdtuneError(f"{folder} has {DIFFUSERS_FILE} but no config.toml naming its base model; "
                          "load the file into its base with diffusers' load_lora_weights")
    cfg = from_toml(path.read_text(encoding="utf-8"), str(path))
    return cfg.model.pretrained, cfg.model.config


def merged_components(folder: str | Path, scale: float = 1.0, base: str | None = None, config: str = ""):
    """The base model's components (`base`, with the configs `config` for a single file, or the one the run
    trained on) with the LoRA of `folder` merged in at `scale`."""
    from sdtune.family.load import assemble_pipeline, load_components

    pretrained, config = base_of(folder) if base is None else (base, config)
    components = load_components(pretrained, config)
    check_fits(folder, components, pretrained)
    pipe = assemble_pipeline(components)
    pipe.load_lora_weights(str(folder), weight_name=DIFFUSERS_FILE, adapter_name="sdtune")
    pipe.fuse_lora(lora_scale=scale, adapter_names=["sdtune"])
    pipe.unload_lora_weights()
    return components


def check_fits(folder: str | Path, components, base: str) -> None:
    """One line when the LoRA in `folder` cannot go onto `base`: a module it adapts is missing there, or has
    other sizes (a LoRA of an SD 1.x model onto SDXL), where diffusers would fail with a page of sizes."""
    from safetensors import safe_open

    from sdtune.family.base import TEXT_ENCODER_NAMES

    parts = {"unet": components.unet, **dict(zip(TEXT_ENCODER_NAMES, components.text_encoders, strict=False))}
    modules = {part: dict(module.named_modules()) for part, module in parts.items()}
    with safe_open(str(Path(folder) / DIFFUSERS_FILE), framework="pt") as f:
        shapes = {key: f.get_slice(key).get_shape() for key in f.keys() if ".lora_A." in key}
    misfits = []
    for key, (_, *inputs) in shapes.items():
        part, _, name = key.partition(".")
        name = name[:name.index(".lora_A.")]
        named = modules.get(part, {})  # a text encoder's names come with or without `text_model.` (transformers 4/5)
        module = named.get(name) or named.get(name.removeprefix("text_model."))
        weight = getattr(module, "weight", None)  # a Linear's or Conv2d's; None where the base lacks the layer
        if weight is None:
            misfits.append(f"{part}.{name} is not in the base")
        elif list(weight.shape[1:]) != inputs:  # lora_A: [rank, in (, kh, kw)]; the weight: [out, in (, kh, kw)]
            misfits.append(f"{part}.{name} takes {list(weight.shape[1:])} there and {inputs} in the LoRA")
    if misfits:
        raise SdtuneError(f"the LoRA in {folder} does not fit the base model {base} ({len(misfits)} of "
                          f"{len(shapes)} layers: {misfits[0]}): it was trained on a model of another architecture; "
                          "pass --base the model it was trained on (its config.toml's model.pretrained)")
