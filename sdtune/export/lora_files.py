"""The files an adapter run writes into its output folder, both fp32 safetensors:

- `pytorch_lora_weights.safetensors`, diffusers' own format, written by the pipeline class's
  `save_lora_weights` with the adapters' peft settings in its metadata (so alpha round-trips):
  `pipe.load_lora_weights(out)` reads it with no sdtune code. LoRA and DoRA only: diffusers loads no
  LoHa or LoKr of SD 1.x/2.x/SDXL (docs/design/adapters.md), so those runs write the kohya file alone;
- `lora.safetensors`, the kohya / LyCORIS layout that ComfyUI's LoRA loader, AUTOMATIC1111 and
  diffusers' kohya conversion (LoRA) read: a module `M` becomes `lora_unet_<M>` (`lora_te_`, `lora_te1_`,
  `lora_te2_` for text encoders) with `.lora_down.weight` (A), `.lora_up.weight` (B) and `.alpha`, or
  LyCORIS' `.hada_*` (LoHa), `.lokr_*` (LoKr), `.dora_scale` (DoRA): `sdtune.lora.algorithms`. UNet
  names are as kohya's sd-scripts write them: diffusers' module names for SD 1.x/2.x (it trains those
  on a diffusers-layout UNet), the original SGM names (input_blocks.4.1...) for SDXL. The training
  settings go into its metadata as kohya's `ss_*` keys, which AUTOMATIC1111's LoRA tab shows, plus the
  `modelspec.*` keys of the Stability model-spec.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from sdtune.export.client_layout import text_model_names
from sdtune.lora.kohya_names import kohya_names, peft_weights
from sdtune.util.files import follow_umask, save_safetensors
from sdtune.util.run_folder import DIFFUSERS_FILE, KOHYA_FILE  # noqa: F401  (the names a LoRA run writes)

# The fields of peft 0.17's LoraConfig.to_dict() (0.17.0 and 0.17.1 alike), which clients on transformers 4.x
# with diffusers 0.35 still run (sdtune itself needs 0.21, beside transformers 5): diffusers builds a
# `LoraConfig(**fields)` from the file's metadata, and an older peft refuses a field it does not know (peft
# 0.22 adds alora_invocation_tokens, arrow_config, peft_version, ...).
PEFT_FLOOR_LORA_FIELDS = frozenset({
    "alpha_pattern", "auto_mapping", "base_model_name_or_path", "bias", "corda_config", "eva_config",
    "exclude_modules", "fan_in_fan_out", "inference_mode", "init_lora_weights", "layer_replication",
    "layers_pattern", "layers_to_transform", "loftq_config", "lora_alpha", "lora_bias", "lora_dropout",
    "megatron_config", "megatron_core", "modules_to_save", "peft_type", "qalora_group_size", "r",
    "rank_pattern", "revision", "target_modules", "target_parameters", "task_type", "trainable_token_indices",
    "use_dora", "use_qalora", "use_rslora",
})


def save_diffusers(modules: dict, family, out_dir: Path) -> Path:
    """`pytorch_lora_weights.safetensors` in `out_dir`, by diffusers' own writer (into a temporary folder,
    then renamed: never half a file). The weights keep peft's names (`lora_A`/`lora_B`), which diffusers'
    loader reads as they are: its `convert_state_dict_to_diffusers` renames only the attention projections
    (to `lora.down`/`lora.up`), and a file that mixes both styles loses its attention half on loading once
    the convolutions have adapters too. A text encoder's names carry transformers 4.x's `text_model.` level
    and the settings only the fields peft 0.17 knows, so that older diffusers, transformers and peft load
    the file too (`sdtune.export.client_layout`)."""
    layers, metadata = {}, {}
    for name, module in modules.items():
        layers[f"{name}_lora_layers"] = text_model_names(module, peft_weights(module))
        metadata[f"{name}_lora_adapter_metadata"] = floor_lora_config(module.peft_config["default"])
    out = Path(out_dir)
    with tempfile.TemporaryDirectory(dir=out, prefix=".lora-") as tmp:
        family.pipeline_type().save_lora_weights(tmp, **layers, **metadata, safe_serialization=True)
        follow_umask(Path(tmp) / DIFFUSERS_FILE)
        os.replace(Path(tmp) / DIFFUSERS_FILE, out / DIFFUSERS_FILE)
    return out / DIFFUSERS_FILE


def floor_lora_config(config) -> dict:
    """`config.to_dict()` with only the fields the oldest supported peft knows, plus any newer one that is not
    at its default: a setting older peft cannot honour should fail there rather than load another adapter."""
    from peft import LoraConfig

    defaults = LoraConfig().to_dict()
    return {key: value for key, value in config.to_dict().items()
            if key in PEFT_FLOOR_LORA_FIELDS or (key in defaults and value != defaults[key])}


def kohya_weights(modules: dict, family) -> dict:
    """The adapters under kohya's names: `<lora name>.lora_down.weight`, `.lora_up.weight`, `.alpha` for a LoRA,
    LyCORIS' `.hada_w1_a`... for LoHa, `.lokr_w1`... for LoKr, `.dora_scale` with DoRA (`sdtune.lora.algorithms`
    converts each module: LoKr's and DoRA's scale conventions differ between peft and the clients)."""
    from sdtune.lora.algorithms import split_key, to_kohya

    out = {}
    for name, names in kohya_names(modules, family).items():
        per_module: dict[str, dict] = {}
        for key, value in peft_weights(modules[name]).items():
            path, param = split_key(key)
            per_module.setdefault(path, {})[param] = value
        for path in sorted(names):
            layer = modules[name].get_submodule(path)
            tensors = to_kohya(layer, per_module[path], lambda layer=layer: layer.get_base_layer().weight)
            out |= {f"{names[path]}.{suffix}": value.detach().float().cpu().contiguous()
                    for suffix, value in tensors.items()}
    return out


def save_kohya(modules: dict, family, out_dir: Path, metadata: dict[str, str], name: str = KOHYA_FILE) -> Path:
    path = Path(out_dir) / name
    save_safetensors(kohya_weights(modules, family), path, metadata=metadata)
    return path


def save_files(modules: dict, family, out_dir: Path, metadata: dict[str, str], lora) -> list[Path]:
    """What an adapter run writes: `pytorch_lora_weights.safetensors` where diffusers loads the algorithm
    (LoRA, DoRA), and `lora.safetensors` always."""
    from sdtune.lora.algorithms import algorithm_of

    diffusers = [save_diffusers(modules, family, out_dir)] if algorithm_of(lora).diffusers else []
    return [*diffusers, save_kohya(modules, family, out_dir, metadata)]


def _network_args(lora) -> dict:
    """kohya's `ss_network_args` as LyCORIS' kohya module takes them (`--network_args algo=loha ...`)."""
    from sdtune.lora.algorithms import algorithm_of

    args = {"algo": lora.algo} if algorithm_of(lora).network_module == "lycoris.kohya" else {}
    if lora.target == "attention+conv":
        args |= {"conv_dim": lora.conv_scale_rank, "conv_alpha": lora.conv_scale_alpha}
    if lora.algo == "lokr":
        args["factor"] = lora.factor
    if lora.dora:
        args["dora_wd"] = True
    return args


def kohya_metadata(cfg, components, summary: dict, num_images: int) -> dict[str, str]:
    """Training settings as kohya's train_network.py records them (`ss_*`), plus the model-spec keys."""
    from sdtune.lora.algorithms import DORA_FOR_COMFYUI, algorithm_of

    family, unet = components.family, components.unet
    v2 = unet.config.cross_attention_dim == 1024  # SD 2.x's OpenCLIP-H width (a toy model is v1's kind)
    specs = family.kohya_model_spec  # architecture -> (kohya's base version, the model-spec's architecture)
    base, architecture = specs.get("sd21" if v2 else "sd15") or next(iter(specs.values()))
    lora, train, algorithm = cfg.lora, cfg.train, algorithm_of(cfg.lora)
    args = _network_args(lora)
    values = {
        "ss_network_module": algorithm.network_module, "ss_network_dim": lora.rank,
        "ss_network_alpha": lora.scale_alpha,
        "ss_network_dropout": lora.dropout, "ss_network_args": json.dumps(args) if args else None,
        "ss_network_train_unet_only": not lora.text_encoder, "ss_base_model_version": base, "ss_v2": v2,
        "ss_sd_model_name": Path(cfg.model.pretrained).name or cfg.model.pretrained,
        "ss_learning_rate": train.learning_rate, "ss_unet_lr": train.learning_rate,
        "ss_text_encoder_lr": train.learning_rate if lora.text_encoder else 0.0,
        "ss_lr_scheduler": train.lr_scheduler, "ss_lr_warmup_steps": train.lr_warmup_steps,
        "ss_max_train_steps": train.max_steps, "ss_steps": summary["steps"], "ss_epoch": summary.get("epoch"),
        "ss_seed": train.seed,
        "ss_batch_size_per_device": train.batch_size, "ss_gradient_accumulation_steps":
            train.gradient_accumulation_steps, "ss_optimizer": cfg.memory.optimizer,
        "ss_mixed_precision": {"fp32": "no"}.get(cfg.memory.precision, cfg.memory.precision),
        "ss_resolution": f"({cfg.data.resolution}, {cfg.data.resolution})", "ss_num_train_images": num_images,
        "ss_min_snr_gamma": train.snr_gamma or None, "ss_noise_offset": train.noise_offset or None,
        "ss_prior_loss_weight": train.prior_loss_weight if cfg.prior_preservation else None,
        "ss_training_comment": "trained with sdtune", "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": architecture, "modelspec.implementation": family.model_spec_implementation,
        "modelspec.title": f"sdtune {algorithm.label}", DORA_FOR_COMFYUI: "comfyui" if lora.dora else None,
        "modelspec.resolution": f"{cfg.data.resolution}x{cfg.data.resolution}",
        "modelspec.prediction_type": components.prediction_type,
    }
    return {key: str(value) for key, value in values.items() if value is not None}
