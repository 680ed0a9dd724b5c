"""The adapter algorithms (`lora.algo`, `lora.dora`): LoRA, LyCORIS' LoHa and LoKr, and DoRA on LoRA. The one
place that knows, per algorithm, peft's config, the parameters of one adapted module, their names in a
kohya/LyCORIS file and the scale convention there; attach, checkpoints, export, `lora.init_from` and merge
ask this table and never branch on the algorithm themselves.

    algorithm = algorithm_of(cfg.lora)                  # ALGORITHMS["loha"]: label, diffusers file or not, ...
    config = peft_config(cfg.lora, targets)             # peft's LoraConfig / LoHaConfig / LoKrConfig
    tensors = to_kohya(layer, weights, base_weight)     # one module's file tensors: {"hada_w1_a": ..., "alpha": ...}
    weights = from_kohya(layer, tensors, base_weight)   # and back, at the run's scale

Why peft and not lycoris-lora (docs/design/adapters.md, measured on the tiny SD1 UNet at rank 4, 20 steps):
peft already trains sdtune's LoRA; at equal rank its LoHa and LoKr have lycoris' parameter counts (LoRA
14,080, LoHa 28,160, LoKr 4,160) and file shapes, the same speed within noise (s/step LoRA 0.038, LoHa
0.046 / 0.050, LoKr 0.043 / 0.042, DoRA 0.051 / 0.055, peft / lycoris), and sdtune's kohya file of each is
read by ComfyUI's formulas to fp32 rounding (error 3e-06 of the trained change); diffusers reads neither
library's LoHa/LoKr for SD, so lycoris' writer buys no client. sdtune writes the kohya names itself. Two
conventions differ between peft and the clients, and are converted here:

- LoKr: peft scales by alpha / r always; ComfyUI and lycoris by 1 when neither factor is decomposed, so
  there alpha / r is folded into `lokr_w1` and no `alpha` is written (and unfolded when read).
- DoRA: peft keeps a magnitude per output row and divides by the norm of the patched weight W + s·ΔW;
  ComfyUI divides by the norm of the original W (peft's file as is: 26-30% of the change off there). The
  kohya file's `dora_scale` is m·‖W‖/‖W + s·ΔW‖, which ComfyUI rebuilds exactly (1.3e-06) and a reader of
  lycoris' formula does not (19-24% off); the diffusers file keeps peft's magnitudes, exact in diffusers.
  peft 0.22 has no DoRA for LoHa/LoKr (lycoris-lora has), so the config refuses that pair.
"""

from __future__ import annotations

from dataclasses import dataclass

from sdtune.errors import SdtuneError

ADAPTER = "default"  # peft's adapter name, the one diffusers' loaders use
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
CONV = ("proj_in", "proj_out", "conv1", "conv2", "conv_shortcut")  # what target=attention+conv adds (LoCon)
KOHYA_LORA = {"lora_A": "lora_down.weight", "lora_B": "lora_up.weight", "lora_magnitude_vector": "dora_scale"}
DORA_FOR_COMFYUI = "sdtune.dora_scale"  # metadata: the file's dora_scale is rescaled for ComfyUI's formula


@dataclass(frozen=True)
class Algorithm:
    name: str                 # lora.algo
    label: str                # how `sdtune presets` and the file's modelspec.title name it
    params: tuple[str, ...]   # peft's parameters of one adapted module (their kohya names: `kohya_name`)
    network_module: str       # kohya's ss_network_module: the code that reads the file in sd-scripts
    diffusers: bool           # diffusers' load_lora_weights reads peft's names of it (pytorch_lora_weights)
    clients: str = "ComfyUI, AUTOMATIC1111"  # who reads its lora.safetensors as trained


ALGORITHMS = {
    "lora": Algorithm("lora", "LoRA", ("lora_A", "lora_B"), "networks.lora", True),
    # AUTOMATIC1111 normalises a dora_scale per input column, so peft's per-row magnitudes draw wrong there
    "dora": Algorithm("lora", "DoRA", ("lora_A", "lora_B", "lora_magnitude_vector"), "lycoris.kohya",
                      True, "ComfyUI; not AUTOMATIC1111, which reads DoRA per input column"),
    "loha": Algorithm("loha", "LoHa", ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
                      "lycoris.kohya", False),
    "lokr": Algorithm("lokr", "LoKr", ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"),
                      "lycoris.kohya", False),
}
PARAMS = sorted({p for a in ALGORITHMS.values() for p in a.params}, key=len, reverse=True)  # longest first


def algorithm_of(lora) -> Algorithm:
    """The algorithm a `[lora]` section trains."""
    return ALGORITHMS["dora" if lora.dora else lora.algo]


def kohya_name(param: str) -> str:
    return KOHYA_LORA.get(param, param)


def split_key(key: str) -> tuple[str, str]:
    """(module path, parameter) of a peft key: `a.to_q.lora_A.weight`, `a.to_q.hada_w1_a`, with or without the
    adapter's name (`.default`)."""
    for param in PARAMS:
        for tail in (f".{param}.default.weight", f".{param}.weight", f".{param}.default", f".{param}"):
            if key.endswith(tail):
                return key[:-len(tail)], param
    raise ValueError(f"not an adapter weight: {key}")


def peft_config(lora, targets):
    """peft's config of `lora`'s algorithm on `targets`; the CONV names among them get conv_rank/conv_alpha
    through peft's rank_pattern / alpha_pattern (only where they differ: a plain LoRA's config is as before)."""
    from peft import LoHaConfig, LoKrConfig
    from peft import LoraConfig as PeftLoraConfig

    conv = [name for name in targets if name in CONV]
    ranks = {name: lora.conv_scale_rank for name in conv if lora.conv_scale_rank != lora.rank}
    alphas = {name: lora.conv_scale_alpha for name in conv if lora.conv_scale_alpha != lora.scale_alpha}
    common = {"r": lora.rank, "target_modules": list(targets), "rank_pattern": ranks, "alpha_pattern": alphas}
    if lora.algo == "loha":
        return LoHaConfig(alpha=lora.scale_alpha, **common)
    if lora.algo == "lokr":
        return LoKrConfig(alpha=lora.scale_alpha, decompose_factor=lora.factor, **common)
    return PeftLoraConfig(lora_alpha=lora.scale_alpha, lora_dropout=lora.dropout, init_lora_weights="gaussian",
                          use_dora=lora.dora, **common)


def scale_of(layer) -> tuple[float, int]:
    """(alpha, rank) of a peft layer's adapter: its update is alpha / rank x its product."""
    alphas = getattr(layer, "lora_alpha", None) or layer.alpha
    return float(alphas[ADAPTER]), int(layer.r[ADAPTER])


def _full_lokr(tensors: dict) -> bool:
    """A LoKr module with neither factor decomposed: ComfyUI and lycoris apply it at scale 1, whatever alpha."""
    return "lokr_w1" in tensors and "lokr_w2" in tensors


def to_kohya(layer, weights: dict, base_weight) -> dict:
    """One module's adapter in a kohya/LyCORIS file: {key suffix: fp32 tensor} from peft's `weights`
    ({parameter: tensor}); `base_weight()` gives the frozen weight (DoRA's rescale needs it)."""
    import torch

    alpha, rank = scale_of(layer)
    out = {kohya_name(param): value for param, value in weights.items() if param != "lora_magnitude_vector"}
    if _full_lokr(weights):
        out["lokr_w1"] = weights["lokr_w1"] * (alpha / rank)
    else:
        out["alpha"] = torch.tensor(alpha)
    if "lora_magnitude_vector" in weights:
        weight = base_weight().detach().float().cpu()  # beside the file's tensors
        ratio = _row_norm(weight) / _row_norm(weight + alpha / rank * _lora_delta(weights, weight))
        out["dora_scale"] = _rows(weights["lora_magnitude_vector"], weight) * ratio
    return out


def from_kohya(layer, tensors: dict, base_weight, comfyui_dora: bool) -> dict:
    """The inverse of `to_kohya` for the run's `layer`: {parameter: tensor} from one module's file tensors (kohya
    names). `comfyui_dora`: the file's dora_scale is rescaled for ComfyUI (sdtune's), else it is lycoris' m."""
    alpha, rank = scale_of(layer)
    names = {kohya_name(param): param for param in PARAMS}
    out = {names[key]: value for key, value in tensors.items() if key in names}
    if _full_lokr(tensors):
        out["lokr_w1"] = tensors["lokr_w1"] / (alpha / rank)
    if "dora_scale" in tensors:
        weight = base_weight().detach().float().cpu()  # beside the file's tensors
        if tensors["dora_scale"].shape[0] != weight.shape[0]:
            raise SdtuneError(f"a dora_scale of shape {list(tensors['dora_scale'].shape)} normalises each input "
                              "column (lycoris' wd_on_output=false), which peft cannot train; pass an output-axis "
                              "DoRA file")
        magnitude = tensors["dora_scale"].float().reshape(weight.shape[0], *[1] * (weight.dim() - 1))
        if comfyui_dora:
            patched = weight + alpha / rank * _lora_delta(out, weight)
            magnitude = magnitude * _row_norm(patched) / _row_norm(weight)
        out["lora_magnitude_vector"] = magnitude.reshape(layer.lora_magnitude_vector[ADAPTER].weight.shape)
    return out


def _lora_delta(weights: dict, weight):
    """up @ down in the weight's shape (a conv's 1x1 up and k x k down flattened)."""
    return (weights["lora_B"].flatten(1).float() @ weights["lora_A"].flatten(1).float()).reshape(weight.shape)


def _row_norm(weight):
    return weight.flatten(1).norm(dim=1).reshape(weight.shape[0], *[1] * (weight.dim() - 1))


def _rows(magnitude, weight):
    """peft's magnitude ((out,) for a Linear, (1, out, 1, 1) for a conv) as one value per output row."""
    return magnitude.float().reshape(weight.shape[0], *[1] * (weight.dim() - 1))
