"""The names of a run's adapter weights: peft's (`<module>.lora_A.weight`, `<module>.hada_w1_a`, ...) and the
kohya/LyCORIS module names a `lora.safetensors` holds them under (`lora_unet_<module>`, `lora_te_`, SDXL's
`lora_te1_`/`lora_te2_` and original-layout UNet names, as kohya's sd-scripts write them). Here in `lora`, below
the export that writes the file, as reading a file back (`sdtune.lora.adapter.load_file`) needs the same names.

    names = kohya_names(modules, family)   # {"unet": {"down_blocks.0.attentions.0...to_q": "lora_unet_..."}, ...}
"""

from __future__ import annotations


def peft_weights(module) -> dict:
    """`module`'s adapter weights as peft names them (`<module>.lora_A.weight`), fp32 on the CPU."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(module).items()}


def kohya_names(modules: dict, family) -> dict[str, dict[str, str]]:
    """{pipeline name: {adapted module path (peft's): its kohya LoRA name}} of `modules`."""
    from sdtune.lora.algorithms import split_key

    encoders = [name for name in modules if name != "unet"]
    out = {}
    for name, module in modules.items():
        paths = sorted({split_key(key)[0] for key in peft_weights(module)})
        if name == "unet":
            out[name] = _unet_names(paths, module.config, sgm=family.kohya_sgm_names)
        else:  # the family's prefix of the encoder's place: lora_te_ (SD), lora_te1_ and lora_te2_ (SDXL)
            prefix = family.kohya_text_prefixes[_encoder_index(name, encoders, family)]
            out[name] = {path: prefix + _text_name(path) for path in paths}
    return out


def _encoder_index(name: str, trained: list[str], family) -> int:
    """Which of the family's text encoders `name` is: its place among those trained (SDXL: both or
    neither), the first where the family has one."""
    return trained.index(name) if len(family.kohya_text_prefixes) > 1 else 0


def _unet_names(paths: list[str], config, sgm: bool) -> dict:
    """diffusers UNet module path -> kohya LoRA name (SGM-layout names for SDXL, as kohya writes them)."""
    if not sgm:
        return {path: "lora_unet_" + path.replace(".", "_") for path in paths}
    from sdtune.family.ldm_names import UNET_PREFIX, unet_to_ldm

    renamed = unet_to_ldm({f"{path}.weight": path for path in paths}, config)
    return {path: "lora_unet_" + key[len(UNET_PREFIX):-len(".weight")].replace(".", "_")
            for key, path in renamed.items()}


def _text_name(path: str) -> str:
    """A CLIP module path (with or without transformers' `text_model.` level) as kohya spells it."""
    return "text_model_" + path.removeprefix("text_model.").replace(".", "_")
