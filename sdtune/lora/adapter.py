"""LoRA adapters through peft, the layers diffusers' own `load_lora_weights` injects: no home-made layer.

    modules = attach(components.unet, components.text_encoders, cfg.lora, seed=cfg.train.seed)
    weights = trained_weights(modules)       # {"unet.<param>": tensor, ...}: what a checkpoint holds
    restore(modules, weights)
    load_file(modules, family, "old/lora.safetensors")   # lora.init_from: start from a LoRA file's weights

`modules` maps the pipeline's attribute names ("unet", and with `lora.text_encoder` "text_encoder",
"text_encoder_2") to the modules that carry an adapter. The adapters' A matrices are drawn from `seed`
(B starts at zero, so step 0 is the base model); their weights are fp32 whatever the base's precision, so
the optimizer steps fp32 values while the frozen base runs in the working precision.
"""

from __future__ import annotations

from sdtune.config import LoraConfig
from sdtune.errors import SdtuneError
from sdtune.family.base import TEXT_ENCODER_NAMES

ADAPTER = "default"  # peft's adapter name, the one diffusers' loaders use
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
UNET_TARGETS = {
    "attention": ATTENTION,
    # LoCon: the ResNet convolutions (3x3 and the 1x1 shortcut) and the transformers' in/out projections too
    "attention+conv": (*ATTENTION, "proj_in", "proj_out", "conv1", "conv2", "conv_shortcut"),
}
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")  # CLIP's self-attention projections


def peft_config(lora: LoraConfig, targets):
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(r=lora.rank, lora_alpha=lora.scale_alpha, lora_dropout=lora.dropout,
                          init_lora_weights="gaussian", target_modules=list(targets))


def attach(unet, text_encoders, lora: LoraConfig, *, seed: int) -> dict:
    """Freeze `unet` (and the text encoders) and add a LoRA to the UNet's `lora.target` layers, and with
    `lora.text_encoder` to each text encoder's attention; the pipeline names of the modules that train."""
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
    """Copy the adapters of the LoRA file `path` (`lora.init_from`, whose rank, alpha and target the config
    follows already) into `modules`' adapters: every adapter this run trains must be in the file and every
    adapter of the file in this run, at this run's sizes, else one line. What was loaded, for the log. A
    one-encoder model's `lora_te1_` (diffusers' `convert_state_dict_to_kohya` writes it) is kohya's `lora_te_`."""
    import torch
    from safetensors.torch import load_file as read

    from sdtune.config.lora_file import adapter_shape

    shape = adapter_shape(path)
    one_encoder = family.kohya_text_prefixes[0] if len(family.kohya_text_prefixes) == 1 else "lora_te1_"
    tensors = {_canonical(key.replace("lora_te1_", one_encoder, 1) if key.startswith("lora_te1_") else key): value
               for key, value in read(str(shape.path)).items() if not key.endswith(".alpha")}
    live = trained_weights(modules)
    wanted = _file_keys(modules, family, shape.kohya)
    missing, extra = sorted(set(wanted.values()) - set(tensors)), sorted(set(tensors) - set(wanted.values()))
    misfit = [key for key, name in wanted.items() if name in tensors and tensors[name].shape != live[key].shape]
    if missing or extra or misfit:
        example = (f"{misfit[0]} is {list(live[misfit[0]].shape)} here, {list(tensors[wanted[misfit[0]]].shape)} "
                   "in the file" if misfit else (extra or missing)[0])
        raise SdtuneError(f"the LoRA in {shape.path} does not fit this model ({len(extra)} of its weights are on "
                          f"layers this run does not adapt, {len(missing)} adapters this run trains are not in it, "
                          f"{len(misfit)} differ in size; e.g. {example}): it was trained on another architecture, or "
                          "on layers outside lora.target's (kohya's feed-forward and MLP layers); pass the base model "
                          "it was trained on, or a file of attention (+conv) adapters")
    with torch.no_grad():
        for key, param in live.items():
            param.copy_(tensors[wanted[key]])
    return f"{shape.path} (rank {shape.rank}, alpha {shape.alpha:g}, {len(live) // 2} adapters)"


def _file_keys(modules: dict, family, kohya: bool) -> dict[str, str]:
    """{`trained_weights` key: the key a kohya (or a diffusers, `_canonical`) file holds the weight under}."""
    from sdtune.export.lora_files import kohya_names

    names = kohya_names(modules, family) if kohya else {}
    out = {}
    for key in trained_weights(modules):
        part, _, rest = key.partition(".")
        path, _, which = rest.rpartition(".lora_")  # which: "A.default.weight" or "B.default.weight"
        if kohya:
            out[key] = f"{names[part][path]}.lora_{'down' if which[0] == 'A' else 'up'}.weight"
        else:
            out[key] = _canonical(f"{part}.{path}.lora_{which[0]}.weight")
    return out


def _canonical(key: str) -> str:
    """A diffusers file's key in one spelling: peft's `lora_A`/`lora_B` (not diffusers' `lora.down`/`lora.up`),
    a text encoder's modules without transformers 4's `text_model.` level."""
    part, _, rest = key.partition(".")
    rest = rest.removeprefix("text_model.").replace(".lora.down.", ".lora_A.").replace(".lora.up.", ".lora_B.")
    return f"{part}.{rest}"
