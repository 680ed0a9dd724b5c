"""A trained adapter on its base model, through sdtune's own loading path: for `sdtune sample` and `sdtune merge`.

    if is_lora_folder("out"):
        components = merged_components("out", scale=0.8)   # the base with the adapter merged into its weights

An adapter run's folder holds `lora.safetensors` (and for LoRA and DoRA `pytorch_lora_weights.safetensors`)
and the `config.toml` that names its base (`model.pretrained`, and `model.config` for a single file). The
base is loaded as training loaded it, peft adapters of the file's algorithm are attached as training
attached them (`sdtune.lora.adapter.attach`, settings read from the file as `lora.init_from` reads them),
the file is loaded into them (`load_file`), merged at `scale` (peft's `scale_layer` and `merge`, what
diffusers' `fuse_lora(lora_scale=)` calls) and the adapters removed: what is left is a plain model whose
weights are the base with the update applied at `scale`. One path for every algorithm: diffusers'
`load_lora_weights` loads no LoHa or LoKr of SD, and the diffusers file, where there is one, is read here
with its exact DoRA magnitudes.
"""

from __future__ import annotations

from pathlib import Path

from sdtune.errors import SdtuneError
from sdtune.util.run_folder import DIFFUSERS_FILE, KOHYA_FILE

FULL_LOKR_RANK = 1 << 20  # a LoKr file's rank when no factor is decomposed and no metadata tells it: any rank
                          # this large leaves every factor full, which is all such a file's shapes say


def is_lora_folder(folder: str | Path) -> bool:
    folder = Path(folder)
    return (any((folder / name).is_file() for name in (DIFFUSERS_FILE, KOHYA_FILE))
            and not (folder / "model_index.json").is_file())


def _run_config(folder: str | Path):
    from sdtune.config.toml import from_toml

    path = Path(folder) / "config.toml"
    if not path.is_file():
        raise SdtuneError(f"{folder} has an adapter file but no config.toml naming its base model; pass --base, "
                          "or load the file into its base with diffusers' load_lora_weights (LoRA, DoRA)")
    return from_toml(path.read_text(encoding="utf-8"), str(path))


def base_of(folder: str | Path) -> tuple[str, str]:
    """(model.pretrained, model.config) of the run that trained the LoRA in `folder`."""
    cfg = _run_config(folder)
    return cfg.model.pretrained, cfg.model.config


def base_components(folder: str | Path):
    """The base model of the run in `folder` (an adapter's or an embedding's) with the noise schedule the run
    trained with (train.prediction_type, train.zero_terminal_snr), so that it samples as training did."""
    from sdtune.family.load import load_components, set_noise_schedule

    cfg = _run_config(folder)
    components = load_components(cfg.model.pretrained, cfg.model.config)
    set_noise_schedule(components, cfg.train.prediction_type, cfg.train.zero_terminal_snr, cfg.model.pretrained)
    return components


def _other_base(folder: str | Path, base: str, config: str):
    """`base` (another base than the run's) with the noise schedule the adapter of `folder` was trained for,
    where its run's config.toml says (a v-prediction LoRA merged into an epsilon base predicts v)."""
    from sdtune.family.load import load_components, set_noise_schedule

    components = load_components(base, config)
    if (Path(folder) / "config.toml").is_file():
        train = _run_config(folder).train
        set_noise_schedule(components, train.prediction_type, train.zero_terminal_snr, base)
    return components


def merged_components(folder: str | Path, scale: float = 1.0, base: str | None = None, config: str = ""):
    """The base model's components (`base`, with the configs `config` for a single file, or the one the run
    trained on; either with the run's noise schedule) with the adapter of `folder` merged in at `scale`."""
    if base is None:
        pretrained, components = base_of(folder)[0], base_components(folder)
    else:  # with the run's noise schedule too
        pretrained, components = base, _other_base(folder, base, config)
    if (Path(folder) / DIFFUSERS_FILE).is_file():
        check_fits(folder, components, pretrained)
    fuse(components, folder, scale)
    return components


def fuse(components, path: str | Path, scale: float) -> None:
    """Merge the adapter file (or folder) `path` into `components`' weights at `scale`, in place."""
    import torch
    from diffusers.utils import recurse_remove_peft_layers
    from peft.tuners.tuners_utils import BaseTunerLayer

    from sdtune.config import LoraConfig
    from sdtune.config.lora_file import adapter_shape
    from sdtune.lora.adapter import attach, load_file

    shape = adapter_shape(path)
    lora = LoraConfig(rank=shape.rank or FULL_LOKR_RANK, alpha=shape.alpha or 0.0, algo=shape.algo,
                      dora=shape.dora, factor=shape.factor, target=shape.target, text_encoder=shape.text_encoder,
                      conv_rank=shape.conv_rank, conv_alpha=shape.conv_alpha)
    modules = attach(components.unet, components.text_encoders, lora, seed=0)
    load_file(modules, components.family, str(shape.path))
    with torch.no_grad():
        for module in modules.values():
            for layer in module.modules():
                if isinstance(layer, BaseTunerLayer):
                    layer.scale_layer(scale)
                    layer.merge()
            recurse_remove_peft_layers(module)
            if hasattr(module, "peft_config"):
                del module.peft_config
            module._hf_peft_config_loaded = False


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
