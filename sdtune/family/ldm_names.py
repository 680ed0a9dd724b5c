"""The original-layout (CompVis `ldm`, Stability `sgm`) names of a diffusers UNet's, VAE's and SD1 text
encoder's weights: what a single file holds them under, and what kohya's SDXL LoRA names are built from.

    unet_to_ldm(unet.state_dict(), unet.config)   # {"model.diffusion_model.input_blocks.1.0.in_layers.2.weight": ...}
    vae_to_ldm(vae.state_dict(), vae.config)      # {"first_stage_model.encoder.down.0.block.0.conv1.weight": ...}

Each converter builds a table from diffusers module prefixes to original module prefixes, worked out from the
model's config (number of blocks, `layers_per_block`), then renames every key through it by its longest
matching prefix. A key with no entry raises `ValueError`, so nothing is silently dropped. Every converter
returns keys *with* their original prefix, so their outputs merge into one file. Here, below the stages, as
both the export (`sdtune.export.single_file`) and the adapters' kohya names (`sdtune.lora.kohya_names`) use it.
"""

from __future__ import annotations

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."

UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
              "conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
            # SDXL's pooled-text + size/crop conditioning ("adm"): sgm's `label_emb` Sequential(Linear, SiLU, Linear)
            "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
CLIP_PARTS = ("text_model.embeddings.", "text_model.encoder.layers.", "text_model.final_layer_norm.")


def _module(*names: str) -> str:
    return ".".join(name for name in names if name) + "."


def _add(table: dict, diffusers: str, ldm: str, children: dict | None = None) -> None:
    """Map module `diffusers` to `ldm`; with `children`, map only those (renamed) submodules."""
    for d_child, l_child in (children or {"": ""}).items():
        table[_module(diffusers, d_child)] = _module(ldm, l_child)


def _rename(state_dict: dict, table: dict, prefix: str) -> dict:
    """Rename every key by its longest prefix in `table`; raise on a key the table does not cover."""
    out = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        heads = (".".join(parts[:cut]) + "." for cut in range(len(parts) - 1, 0, -1))
        head = next((h for h in heads if h in table), None)
        if head is None:
            raise ValueError(f"cannot map {key!r} to the LDM single-file layout")
        out[prefix + table[head] + key[len(head):]] = value
    return out


def _per_level(config) -> list[int]:
    layers = config["layers_per_block"]
    return list(layers) if isinstance(layers, (list, tuple)) else [layers] * len(config["block_out_channels"])


def unet_to_ldm(state_dict: dict, config) -> dict:
    """diffusers `UNet2DConditionModel` state dict -> LDM keys, `model.diffusion_model.`-prefixed."""
    table, counts = {}, _per_level(config)
    for source, target in UNET_TOP.items():
        _add(table, source, target)
    index = 1
    for level, count in enumerate(counts):
        for j in range(count):
            _add(table, f"down_blocks.{level}.resnets.{j}", f"input_blocks.{index}.0", UNET_RESNET)
            _add(table, f"down_blocks.{level}.attentions.{j}", f"input_blocks.{index}.1")
            index += 1
        if level < len(counts) - 1:
            _add(table, f"down_blocks.{level}.downsamplers.0.conv", f"input_blocks.{index}.0.op")
            index += 1
    _add(table, "mid_block.resnets.0", "middle_block.0", UNET_RESNET)
    _add(table, "mid_block.attentions.0", "middle_block.1")
    _add(table, "mid_block.resnets.1", "middle_block.2", UNET_RESNET)
    index = 0
    for level, count in enumerate(reversed(counts)):
        for j in range(count + 1):
            _add(table, f"up_blocks.{level}.resnets.{j}", f"output_blocks.{index}.0", UNET_RESNET)
            _add(table, f"up_blocks.{level}.attentions.{j}", f"output_blocks.{index}.1")
            index += 1
        if level < len(counts) - 1:  # the upsampler follows the attention, if the level has one
            slot = 2 if any(k.startswith(f"up_blocks.{level}.attentions.") for k in state_dict) else 1
            _add(table, f"up_blocks.{level}.upsamplers.0", f"output_blocks.{index - 1}.{slot}")
    return _rename(state_dict, table, UNET_PREFIX)


def vae_to_ldm(state_dict: dict, config) -> dict:
    """diffusers `AutoencoderKL` state dict -> LDM keys, `first_stage_model.`-prefixed.

    The mid-block attention's linear weights become 1x1 convolutions, `[C, C]` -> `[C, C, 1, 1]`."""
    table, blocks, layers = {}, len(config["block_out_channels"]), config["layers_per_block"]
    for name in ("quant_conv", "post_quant_conv", "encoder.conv_in", "encoder.conv_out",
                 "decoder.conv_in", "decoder.conv_out"):
        _add(table, name, name)
    for part in ("encoder", "decoder"):
        _add(table, f"{part}.conv_norm_out", f"{part}.norm_out")
        _add(table, f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", VAE_RESNET)
        _add(table, f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", VAE_RESNET)
        _add(table, f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", VAE_ATTENTION)
    for i in range(blocks):
        for j in range(layers):
            _add(table, f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", VAE_RESNET)
        _add(table, f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv")
        up = blocks - 1 - i  # the decoder counts its levels from the lowest resolution up
        for j in range(layers + 1):
            _add(table, f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{up}.block.{j}", VAE_RESNET)
        _add(table, f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{up}.upsample.conv")
    out = _rename(state_dict, table, VAE_PREFIX)
    for key, value in out.items():
        if ".mid.attn_1." in key and key.endswith(".weight") and value.ndim == 2:
            out[key] = value.reshape(*value.shape, 1, 1)
    return out


def text_encoder_to_ldm(state_dict: dict, config=None, prefix: str = "") -> dict:
    """SD1's (or SDXL's first) `CLIPTextModel` state dict -> `<prefix>text_model.*` keys (by default SD1's
    prefix, as `Family.single_file_text` gives it).

    Accepts keys with or without `text_model.` (transformers >= 5.6 dropped it) and adds the
    `position_ids` buffer SD1 files carry. Raises `ValueError` for other encoders: a projection head
    (SDXL's second), other modules, or a config whose `hidden_act` is not `quick_gelu` (SD2's OpenCLIP
    uses `gelu` and the OpenCLIP layout, `sdtune.export.openclip`)."""
    import torch

    from sdtune.family.sd import StableDiffusion

    if config is not None and getattr(config, "hidden_act", "quick_gelu") != "quick_gelu":
        raise ValueError(f"only the SD1 CLIP text encoder (quick_gelu) converts; got {config.hidden_act}")
    prefix = prefix or StableDiffusion.single_file_text["sd15"][0]
    out = {}
    for key, value in state_dict.items():
        name = key if key.startswith("text_model.") else "text_model." + key
        if not name.startswith(CLIP_PARTS):
            raise ValueError(f"{key!r} is not part of an SD1 CLIP text encoder; only SD1 converts")
        out[prefix + name] = value
    positions = out.get(prefix + "text_model.embeddings.position_embedding.weight")
    if positions is not None:
        ids = torch.arange(positions.shape[0], device=positions.device)[None]
        out.setdefault(prefix + "text_model.embeddings.position_ids", ids)
    return out
