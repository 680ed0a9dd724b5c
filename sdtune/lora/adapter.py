"""LoRA adapters through peft, the layers diffusers' own `load_lora_weights` injects: no home-made layer.

    modules = attach(components.unet, components.text_encoders, cfg.lora, seed=cfg.train.seed)
    weights = trained_weights(modules)       # {"unet.<param>": tensor, ...}: what a checkpoint holds
    restore(modules, weights)

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
