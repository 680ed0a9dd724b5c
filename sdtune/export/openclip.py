"""A Hugging Face CLIP text model's state dict in OpenCLIP's layout, the one SD 2.x and SDXL single files use.

SD 2.x files keep their OpenCLIP ViT-H text tower under `cond_stage_model.model.`, SDXL files their ViT-bigG
tower under `conditioner.embedders.1.model.`; AUTOMATIC1111 loads them into `open_clip` modules, ComfyUI and
diffusers' `from_single_file` convert them back to the transformers layout. What differs from transformers:

    text_model.encoder.layers.N.self_attn.{q,k,v}_proj   -> transformer.resblocks.N.attn.in_proj_{weight,bias}
                                                            (q, k, v concatenated along the output dimension)
    ...self_attn.out_proj / layer_norm1 / layer_norm2    -> attn.out_proj / ln_1 / ln_2
    ...mlp.fc1 / mlp.fc2                                 -> mlp.c_fc / mlp.c_proj
    text_model.embeddings.token_embedding.weight         -> token_embedding.weight
    text_model.embeddings.position_embedding.weight      -> positional_embedding   (a bare tensor)
    text_model.final_layer_norm                          -> ln_final
    text_projection.weight  [proj, width]                -> text_projection        [width, proj]: transposed

    from sdtune.export.openclip import text_model_to_open_clip
    keys = text_model_to_open_clip(encoder.state_dict(), "conditioner.embedders.1.model.")

A key outside this table raises `ValueError`; only `position_ids`, a buffer OpenCLIP derives itself, is left out.
"""

from __future__ import annotations

TOP = {"embeddings.token_embedding.weight": "token_embedding.weight",
       "embeddings.position_embedding.weight": "positional_embedding",
       "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
         "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
QKV = ("q_proj", "k_proj", "v_proj")
DERIVED = "embeddings.position_ids"  # OpenCLIP has no such buffer: it counts positions itself
LAYERS = "encoder.layers."


def _strip(key: str) -> str:
    """`text_model.x` and `x` (transformers >= 5.6 flattened CLIPTextModel) name the same tensor."""
    return key.removeprefix("text_model.")


def _layer_key(rest: str) -> tuple[int, str, str]:
    """`N.module.leaf` -> (N, module, leaf), e.g. `3.self_attn.q_proj.weight` -> (3, 'self_attn.q_proj', 'weight')."""
    index, _, tail = rest.partition(".")
    module, _, leaf = tail.rpartition(".")
    return int(index), module, leaf


def _renamed(name: str, value, packed: dict) -> tuple[str, object] | None:
    """The OpenCLIP (key, tensor) of one transformers key; q/k/v parts go to `packed` and give None."""
    if name in TOP:
        return TOP[name], value
    if name == "text_projection.weight":
        return "text_projection", value.t()
    if name.startswith(LAYERS):
        index, module, leaf = _layer_key(name[len(LAYERS):])
        if module.startswith("self_attn.") and module.removeprefix("self_attn.") in QKV:
            packed.setdefault((index, leaf), {})[module.removeprefix("self_attn.")] = value
            return None
        if module in LAYER:
            return f"transformer.resblocks.{index}.{LAYER[module]}.{leaf}", value
    raise ValueError(f"cannot map {name!r} to the OpenCLIP single-file layout")


def _pack(packed: dict) -> dict:
    """Concatenate each layer's q, k, v into OpenCLIP's `in_proj_weight` / `in_proj_bias`."""
    import torch

    out = {}
    for (index, leaf), parts in packed.items():
        if set(parts) != set(QKV):
            raise ValueError(f"layer {index} has {sorted(parts)} of its attention {leaf}s, not q, k and v")
        out[f"transformer.resblocks.{index}.attn.in_proj_{leaf}"] = torch.cat([parts[p] for p in QKV], dim=0)
    return out


def text_model_to_open_clip(state_dict: dict, prefix: str) -> dict:
    """transformers `CLIPTextModel(WithProjection)` state dict -> OpenCLIP keys, each under `prefix`."""
    out, packed = {}, {}
    for key, value in state_dict.items():
        name = _strip(key)
        if name == DERIVED:
            continue
        renamed = _renamed(name, value, packed)
        if renamed is not None:
            out[renamed[0]] = renamed[1]
    out.update(_pack(packed))
    return {prefix + key: value for key, value in out.items()}
