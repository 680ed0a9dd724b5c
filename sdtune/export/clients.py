"""What ComfyUI and AUTOMATIC1111 need before they can read an original-layout single file, and what they read
as the v-prediction marker.

Neither client reads a config from the file: they tell SD 1.x, SD 2.x and SDXL apart by tensor shapes
(ComfyUI: `comfy/model_detection.py:detect_unet_config` matched against `comfy/supported_models.py`'s
`unet_config` tables, e.g. SDXL = 320 model channels, context 2048, adm 2816, transformer depth
[0, 0, 2, 2, 10, 10]; AUTOMATIC1111: `modules/sd_models_config.py:guess_model_config_from_state_dict`), then
build the family's *published* network (A1111 from a fixed YAML, ComfyUI with fixed head counts) whose
every GroupNorm has 32 groups, and copy the weights in. A model with other sizes either fails to load or,
worse, loads into the wrong shapes. So a file is written only for a model with the published sizes.

    from sdtune.export.clients import unreadable_reason
    from sdtune.family import architecture_of
    arch = architecture_of(unet, [text_encoder])           # "sd15", "sd21", "sdxl" or None
    unreadable_reason(arch, unet, vae, [text_encoder])     # None, or one line: why the clients cannot read it

The tables here are keyed by architecture, the bundled names (`sdtune.family.archs`).
"""

from __future__ import annotations

from functools import cache

from sdtune.family.archs import TITLES

GROUPS = 32  # ldm / sgm `normalization()` and `Normalize()` hard-code GroupNorm(32, channels)

UNET_FIELDS = ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "down_block_types",
               "up_block_types", "mid_block_type", "cross_attention_dim", "heads", "transformer_layers_per_block",
               "use_linear_projection", "only_cross_attention", "addition_embed_type", "addition_time_embed_dim",
               "projection_class_embeddings_input_dim", "class_embed_type", "encoder_hid_dim_type",
               "time_cond_proj_dim", "time_embedding_type", "resnet_time_scale_shift", "conv_in_kernel",
               "conv_out_kernel", "act_fn", "flip_sin_to_cos", "freq_shift", "dual_cross_attention")
VAE_FIELDS = ("in_channels", "out_channels", "latent_channels", "block_out_channels", "layers_per_block",
              "down_block_types", "up_block_types", "act_fn", "mid_block_add_attention", "use_quant_conv",
              "use_post_quant_conv")
TEXT_FIELDS = ("hidden_act", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
               "max_position_embeddings", "vocab_size")
CLIP_L = {"hidden_act": "quick_gelu", "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
          "intermediate_size": 3072, "max_position_embeddings": 77, "vocab_size": 49408}
# SD 2.x: OpenCLIP ViT-H, as diffusers ships it: 23 of its 24 layers (SD 2 reads the penultimate one)
OPENCLIP_H = {**CLIP_L, "hidden_act": "gelu", "hidden_size": 1024, "num_hidden_layers": 23,
              "num_attention_heads": 16, "intermediate_size": 4096}
OPENCLIP_BIGG = {**CLIP_L, "hidden_act": "gelu", "hidden_size": 1280, "num_hidden_layers": 32,
                 "num_attention_heads": 20, "intermediate_size": 5120}
TEXT_ENCODERS = {"sd15": (CLIP_L,), "sd21": (OPENCLIP_H,), "sdxl": (CLIP_L, OPENCLIP_BIGG)}
PREDICTION_TYPES = ("epsilon", "v_prediction")
V_PRED_KEY = "v_pred"  # an empty tensor; ComfyUI's and (since PR #16567) A1111's SDXL loaders look for it

V_PRED_NOTES = {
    "sdxl": "v-prediction: wrote the empty `v_pred` tensor, which ComfyUI and AUTOMATIC1111 read for SDXL",
    "sd21": "v-prediction: wrote the empty `v_pred` tensor as ComfyUI's own saver does, but no client reads it "
           "for SD 2.x: ComfyUI guesses v from the weights and AUTOMATIC1111 from a test run of the UNet; "
           "if one samples noise, choose v-prediction there by hand",
    "sd15": "v-prediction: no client reads a v-prediction marker in an SD 1.x file (the empty `v_pred` tensor "
           "is written anyway); choose it by hand: ComfyUI's ModelSamplingDiscrete node set to v_prediction, "
           "AUTOMATIC1111 a v1-inference.yaml with parameterization: \"v\" named like the file",
}
ZTSNR_KEY = "ztsnr"  # an empty tensor beside `v_pred`: ComfyUI and Forge then sample SDXL with zero terminal SNR
ZTSNR_NOTES = {
    "sdxl": "zero terminal SNR: wrote the empty `ztsnr` tensor, which ComfyUI and Forge read for an SDXL "
            "v-prediction file; in AUTOMATIC1111 set Settings > Sampler parameters > Noise schedule to Zero "
            "Terminal SNR by hand",
    "sd21": "zero terminal SNR: wrote the empty `ztsnr` tensor, which no client reads for SD 2.x; choose it by "
            "hand (ComfyUI: ModelSamplingDiscrete with zsnr on; AUTOMATIC1111: Noise schedule Zero Terminal SNR)",
    "sd15": "zero terminal SNR: wrote the empty `ztsnr` tensor, which no client reads for SD 1.x; choose it by "
            "hand (ComfyUI: ModelSamplingDiscrete with zsnr on; AUTOMATIC1111: Noise schedule Zero Terminal SNR)",
}
SD2_LAYER_NOTE = ("SD 2.x text encoder: the file has the 23 OpenCLIP-H layers diffusers keeps, not the 24th, "
                  "which SD 2 never reads (ComfyUI may log resblocks.23 as missing)")


def describe(unet, text_encoders: list) -> str:
    """A few words on a model that fits no family: its conditioning and its encoders' activations."""
    acts = [getattr(encoder.config, "hidden_act", "?") for encoder in text_encoders]
    return f"addition_embed_type={unet.config.get('addition_embed_type')}, text encoders {acts or 'none'}"


def _frozen(value):
    return tuple(_frozen(v) for v in value) if isinstance(value, (list, tuple)) else value


def _per_level(value, levels: int):
    return _frozen(value) if isinstance(value, (list, tuple)) else (value,) * levels


def unet_signature(config) -> dict:
    """The UNet config fields that decide its tensor shapes and what the clients compute, normalised."""
    levels = len(config["block_out_channels"])
    out = {name: _frozen(config.get(name)) for name in UNET_FIELDS}
    out["layers_per_block"] = _per_level(config["layers_per_block"], levels)
    out["heads"] = _per_level(config.get("num_attention_heads") or config["attention_head_dim"], levels)
    out["transformer_layers_per_block"] = _per_level(config.get("transformer_layers_per_block") or 1, levels)
    out["only_cross_attention"] = _per_level(config.get("only_cross_attention") or False, levels)
    out["use_linear_projection"] = bool(config.get("use_linear_projection"))
    return out


@cache
def _published(arch: str, part: str) -> tuple:
    """The init arguments of a bundled published config, defaults filled in as an instance would have them."""
    import inspect

    import diffusers

    from sdtune.family.archs import arch_dir

    folder = arch_dir("sd15" if part == "vae" else arch) / part  # SDXL's VAE has SD's architecture (other scale)
    cls = getattr(diffusers, "AutoencoderKL" if part == "vae" else "UNet2DConditionModel")
    init, _, _ = cls.extract_init_dict(cls.load_config(folder))
    defaults = {name: parameter.default for name, parameter in inspect.signature(cls.__init__).parameters.items()
                if parameter.default is not inspect.Parameter.empty}
    return tuple({**defaults, **init}.items())


def _first_difference(what: str, got: dict, published: dict, arch: str) -> str | None:
    for name, value in published.items():
        if got.get(name) != value:
            return (f"the {what}'s {name} is {got.get(name)!r}, not {TITLES[arch]}'s published "
                    f"{value!r}; ComfyUI and AUTOMATIC1111 detect the family from tensor shapes and build "
                    f"its published sizes")
    return None


def group_counts(module) -> set[int]:
    """The `num_groups` of every GroupNorm in `module` (works on the meta device)."""
    import torch

    return {m.num_groups for m in module.modules() if isinstance(m, torch.nn.GroupNorm)}


def _group_reason(unet, vae) -> str | None:
    for what, module in (("UNet", unet), ("VAE", vae)):
        other = sorted(group_counts(module) - {GROUPS})
        if other:
            return (f"the {what} has GroupNorm with {', '.join(map(str, other))} groups; ComfyUI and "
                    f"AUTOMATIC1111 build every GroupNorm with {GROUPS}")
    return None


def _text_reason(arch: str, text_encoders: list) -> str | None:
    for index, (encoder, published) in enumerate(zip(text_encoders, TEXT_ENCODERS[arch], strict=True)):
        got = {name: getattr(encoder.config, name, None) for name in TEXT_FIELDS}
        name = "text encoder" if len(text_encoders) == 1 else f"text encoder {index + 1}"
        reason = _first_difference(name, got, published, arch)
        if reason:
            return reason
    return None


def unreadable_reason(arch: str, unet, vae, text_encoders: list, prediction_type: str = "epsilon") -> str | None:
    """One line saying why ComfyUI / AUTOMATIC1111 could not read this model from a single file, or None."""
    if prediction_type not in PREDICTION_TYPES:
        return (f"prediction type {prediction_type!r} has no marker ComfyUI or AUTOMATIC1111 read; "
                f"they would sample it as epsilon")
    unet_published = unet_signature(dict(_published(arch, "unet")))
    vae_published = {name: _frozen(value) for name, value in _published(arch, "vae") if name in VAE_FIELDS}
    vae_got = {name: _frozen(vae.config.get(name)) for name in VAE_FIELDS}
    return (_group_reason(unet, vae)
            or _first_difference("UNet", unet_signature(unet.config), unet_published, arch)
            or _first_difference("VAE", vae_got, vae_published, arch)
            or _text_reason(arch, text_encoders))


def prediction_notes(arch: str, prediction_type: str, zero_terminal_snr: bool = False) -> tuple[str, ...]:
    """Lines to log about the v-prediction and zero-terminal-SNR markers (none for an epsilon model)."""
    if prediction_type != "v_prediction":
        return ()
    return (V_PRED_NOTES[arch],) + ((ZTSNR_NOTES[arch],) if zero_terminal_snr else ())


def layout_notes(arch: str, text_encoders: list) -> tuple[str, ...]:
    """Lines to log about what the file leaves out: SD 2.x's unused last OpenCLIP layer."""
    layers = getattr(text_encoders[0].config, "num_hidden_layers", None) if arch == "sd21" else None
    return (SD2_LAYER_NOTE,) if layers == OPENCLIP_H["num_hidden_layers"] else ()
