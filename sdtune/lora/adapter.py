"""The adapters (LoRA, LoHa, LoKr, DoRA: `sdtune.lora.algorithms`) through peft, the layers diffusers' own
`load_lora_weights` injects: no home-made layer.

    modules = attach(components.unet, components.text_encoders, cfg.lora, seed=cfg.train.seed)
    weights = trained_weights(modules)       # {"unet.<param>": tensor, ...}: what a checkpoint holds
    restore(modules, weights)
    load_file(modules, family, "old/lora.safetensors")   # lora.init_from: start from a file's weights

`modules` maps the pipeline's attribute names ("unet", and with `lora.text_encoder` "text_encoder",
"text_encoder_2") to the modules that carry an adapter. The adapters' random factors are drawn from
`seed` (one factor starts at zero, so step 0 is the base model); their weights are fp32 whatever the base's
precision, so the optimizer steps fp32 values while the frozen base runs in the working precision.
"""

from __future__ import annotations

from sdtune.config import LoraConfig
from sdtune.errors import SdtuneError
from sdtune.family.base import TEXT_ENCODER_NAMES
from sdtune.lora.algorithms import ATTENTION, CONV, from_kohya, peft_config, split_key

UNET_TARGETS = {
    "attention": ATTENTION,
    # LoCon: the ResNet convolutions (3x3 and the 1x1 shortcut) and the transformers' in/out projections too
    "attention+conv": (*ATTENTION, *CONV),
}
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")  # CLIP's self-attention projections


def attach(unet, text_encoders, lora: LoraConfig, *, seed: int) -> dict:
    """Freeze `unet` (and the text encoders) and add `lora.algo`'s adapter to the UNet's `lora.target` layers,
    and with `lora.text_encoder` to each text encoder's attention; the pipeline names of the modules that
    train."""
    import torch

    modules = {"unet": unet}
    if lora.text_encoder:
        modules.update(zip(TEXT_ENCODER_NAMES, text_encoders, strict=False))
    with torch.random.fork_rng(devices=[]):  # the adapters' draw leaves the run's own RNG alone
        torch.manual_seed(seed)
        for name, module in modules.items():
            module.requires_grad_(False)
            module.add_adapter(peft_config(lora, UNET_TARGETS[lora.target] if name == "unet" else TEXT_TARGETS))
    for module in modules.values():
        for param in trainable(module):
            param.data = param.data.float()
    return modules


def trainable(module) -> list:
    """The adapter's parameters of `module` (the only ones that require grad)."""
    return [p for p in module.parameters() if p.requires_grad]


def trained_weights(modules: dict) -> dict:
    """Every adapter weight as "<pipeline name>.<parameter name>", the tensors themselves (not copies)."""
    return {f"{name}.{key}": p for name, module in modules.items() for key, p in module.named_parameters()
            if p.requires_grad}


def restore(modules: dict, weights: dict) -> None:
    """Copy `weights` (as `trained_weights` names them) into the adapters; every one must be there."""
    import torch

    live = trained_weights(modules)
    if set(live) != set(weights):
        missing, extra = sorted(set(live) - set(weights)), sorted(set(weights) - set(live))
        raise SdtuneError(f"the checkpoint's LoRA does not match this run's ({len(missing)} weights missing, "
                          f"{len(extra)} unexpected, e.g. {(missing or extra)[0]}); resume with the same [lora] keys")
    with torch.no_grad():
        for key, param in live.items():
            param.copy_(weights[key])


def load_file(modules: dict, family, path: str) -> str:
    """Copy the adapters of the file `path` (`lora.init_from`, whose algorithm, ranks, alphas and target the
    config follows already) into `modules`' adapters: every adapter this run trains must be in the file and
    every adapter of the file in this run, at this run's sizes, else one line. What was loaded, for the log."""
    import torch

    from sdtune.config.lora_file import adapter_shape

    shape = adapter_shape(path)
    live = _live_modules(modules)
    found = _kohya_modules(modules, family, shape) if shape.kohya else _diffusers_modules(shape.path)
    missing, extra = sorted(set(live) - set(found)), sorted(set(found) - set(live))
    misfit = [(where, param) for where in set(live) & set(found) for param in live[where][1]
              if param not in found[where] or found[where][param].shape != live[where][1][param].shape]
    if missing or extra or misfit:
        (where, param) = misfit[0] if misfit else (None, None)
        example = (f"{'.'.join((*where, param))} is {list(live[where][1][param].shape)} here, "
                   f"{list(getattr(found[where].get(param), 'shape', []))} in the file"
                   if misfit else ".".join((extra or missing)[0]))
        raise SdtuneError(f"the LoRA in {shape.path} does not fit this model ({len(extra)} of its modules are "
                          f"layers this run does not adapt, {len(missing)} adapters this run trains are not in it, "
                          f"{len(misfit)} differ in size; e.g. {example}): it was trained on another architecture, or "
                          "on layers outside lora.target's (kohya's feed-forward and MLP layers); pass the base model "
                          "it was trained on, or a file of attention (+conv) adapters")
    with torch.no_grad():
        for where, (_, params) in live.items():
            for param, value in params.items():
                value.copy_(found[where][param])
    sizes = f"rank {shape.rank}, alpha {shape.alpha:g}, " if shape.rank and shape.alpha else ""
    return f"{shape.path} ({shape.label}, {sizes}{len(live)} adapted modules)"


def _live_modules(modules: dict) -> dict[tuple[str, str], tuple]:
    """{(pipeline name, module path): (its peft layer, {parameter: the trained tensor})}."""
    out = {}
    for key, value in trained_weights(modules).items():
        part, _, rest = key.partition(".")
        path, param = split_key(rest)
        if (part, _same(path)) not in out:
            out[part, _same(path)] = (modules[part].get_submodule(path), {})
        out[part, _same(path)][1][param] = value
    return out


def _same(path: str) -> str:
    """A module path in one spelling: a text encoder's without transformers 4's `text_model.` level."""
    return path.removeprefix("text_model.")


def _kohya_modules(modules: dict, family, shape) -> dict[tuple[str, str], dict]:
    """A kohya/LyCORIS file's adapters as `_live_modules` keys them, in this run's parameters (`from_kohya`);
    a module of another model or layer under ("?", its kohya name). Text-encoder names as `_kohya_text_key`
    reads them."""
    from safetensors.torch import load_file as read

    from sdtune.lora.algorithms import DORA_FOR_COMFYUI
    from sdtune.lora.kohya_names import kohya_names

    grouped: dict[str, dict] = {}
    for key, value in read(str(shape.path)).items():
        name, _, suffix = _kohya_text_key(key, family).partition(".")
        grouped.setdefault(name, {})[suffix] = value
    where = {name: (part, path) for part, names in kohya_names(modules, family).items() for path, name in names.items()}
    out = {}
    for name, tensors in grouped.items():
        if name not in where:
            out["?", name] = tensors
            continue
        part, path = where[name]
        layer = modules[part].get_submodule(path)
        comfyui_dora = shape.metadata.get(DORA_FOR_COMFYUI) == "comfyui"
        out[part, _same(path)] = from_kohya(layer, tensors, lambda layer=layer: layer.get_base_layer().weight,
                                            comfyui_dora)
    return out


def _kohya_text_key(key: str, family) -> str:
    """A kohya key as `kohya_names` spells it: a one-encoder model's `lora_te1_` (diffusers'
    `convert_state_dict_to_kohya` writes it) is kohya's `lora_te_`, and a text-encoder module without CLIP's
    `text_model_` level (lycoris under transformers 5, which names the live model's modules) gets it."""
    prefix = next((p for p in ("lora_te_", "lora_te1_", "lora_te2_") if key.startswith(p)), None)
    if prefix is None:
        return key
    rest = key[len(prefix):]
    if prefix == "lora_te1_" and len(family.kohya_text_prefixes) == 1:
        prefix = family.kohya_text_prefixes[0]
    return prefix + ("" if rest.startswith("text_model_") else "text_model_") + rest


def _diffusers_modules(path) -> dict[tuple[str, str], dict]:
    """A diffusers/peft file's adapters as `_live_modules` keys them (`_canonical` spelling)."""
    from safetensors.torch import load_file as read

    out: dict[tuple[str, str], dict] = {}
    for key, value in read(str(path)).items():
        part, _, rest = _canonical(key).partition(".")
        try:
            module, param = split_key(rest)
        except ValueError:  # not an adapter's weight (the header's reader counts only those)
            continue
        out.setdefault((part, module), {})[param] = value
    return out


def _canonical(key: str) -> str:
    """A diffusers file's key in one spelling: peft's `lora_A`/`lora_B` (not diffusers' `lora.down`/`lora.up`),
    a text encoder's modules without transformers 4's `text_model.` level."""
    part, _, rest = key.partition(".")
    rest = rest.removeprefix("text_model.").replace(".lora.down.", ".lora_A.").replace(".lora.up.", ".lora_B.")
    return f"{part}.{rest}"
