"""ComfyUI's own loaders on sdtune's adapter files: run in a ComfyUI environment (bench/comfy_venv.sh), it imports
no sdtune code. `bench/client_adapters.py` runs it; by hand:

    PYTHONPATH=COMFYUI:VENV_DIR/stubs VENV_DIR/venv/bin/python bench/comfy_lora_check.py BASE.safetensors \\
        NAME=RUN/lora.safetensors,MERGED/model.safetensors ...

For each NAME: the base single file through `comfy.sd.load_checkpoint_guess_config` (the Load Checkpoint
node), the adapter file through `comfy.sd.load_lora_for_models` at strength 1 for the model and the text
encoders (the LoraLoader node), with every "lora key not loaded" line it logs counted. The weight ComfyUI
patches in for each key is `comfy.lora.calculate_weight` on the patcher's patches (what
`ModelPatcher.patch_weight_to_device` applies, in fp32); it is compared with `sdtune merge`'s
model.safetensors read through the same loader, key by key over the whole UNet and text encoder(s) (an
unpatched key must equal the base). Per model part (unet, clip_l, clip_g): keys patched, keys the merge
changed that ComfyUI left alone, patched keys equal to the merged ones once rounded to fp16 and the most fp16
steps (ulps) any weight is apart, the largest change the adapter made, the largest |ComfyUI - merge| over it
(the relative error), and over it the error that rounding the exact result to the files' fp16 alone makes
(the floor the relative error can be compared with). One JSON line per NAME on stdout.

Weights are kept in the files' fp16 (`model_options` dtype) so that an SDXL base and a merged model need
about 7 GB each; each merged model is read through ComfyUI once and kept on disk (beside it, as
`comfy-view.safetensors`) so only one model is in memory at a time.
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import sys
from pathlib import Path

options = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
options.add_argument("base", type=Path)
options.add_argument("checks", nargs="+", help="NAME=LORA_FILE,MERGED_FILE")
args = options.parse_args()
sys.argv = [sys.argv[0], "--cpu"]  # ComfyUI's own argument parser: no GPU

import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()
import comfy.lora  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

FP16 = {"dtype": torch.float16}
warnings: list[str] = []


class Grab(logging.Handler):
    def emit(self, record):
        warnings.append(record.getMessage())


logging.getLogger().addHandler(Grab())


def load(path: Path):
    """The loader's model and text encoders, and the keys it built but did not find in the file (left
    uninitialised: SD1's `clip_l.transformer.text_projection.weight`, which it logs as missing at debug level)."""
    warnings.clear()
    logging.getLogger().setLevel(logging.DEBUG)
    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=False, model_options=FP16,
                                                               te_model_options=FP16)
    logging.getLogger().setLevel(logging.WARNING)
    missing = {f"{kind}/{key}" for line in warnings for kind in ("unet", "clip")
               if line.startswith(f"{kind} missing: ") for key in ast.literal_eval(line.split(": ", 1)[1])}
    return model, clip, missing


def weights(model, clip, missing: set) -> dict:
    """Every floating-point weight the loader read from the file, as `unet/<key>` and `clip/<key>` (ComfyUI's
    key names)."""
    named = {f"unet/{k}": v for k, v in model.model.state_dict().items()}
    named |= {f"clip/{k}": v for k, v in clip.cond_stage_model.state_dict().items()}
    return {k: v.contiguous() for k, v in named.items() if v.is_floating_point() and k not in missing}


def comfy_view(merged: Path) -> Path:
    """The merged file as ComfyUI's loader builds it, saved once."""
    view = merged.with_name("comfy-view.safetensors")
    if not view.is_file():
        model, clip, missing = load(merged)
        save_file(weights(model, clip, missing), str(view))
        del model, clip
    return view


def part(key: str) -> str:
    kind, name = key.split("/", 1)
    return "unet" if kind == "unet" else name.split(".", 1)[0]  # clip_l, clip_g


def fp16_steps(a, b) -> int:
    """How many fp16 steps (units in the last place) apart two fp16 tensors are at most."""
    spacing = torch.exp2(torch.floor(torch.log2(b.float().abs().clamp_min(2**-14))) - 10)
    return round(((a.float() - b.float()).abs() / spacing).max().item())


def measure(row: dict, key: str, before, merged, patches: dict) -> None:
    """Add one key to its part's row: the weight ComfyUI patches in (the base where it patches nothing)
    against the merged file's."""
    if key in patches:
        after = comfy.lora.calculate_weight(patches[key], before.float().clone(), key.split("/", 1)[1])
        row["patched"] += 1
        row["equal_in_fp16"] += int(torch.equal(after.half(), merged.half()))
        row["fp16_steps"] = max(row["fp16_steps"], fp16_steps(after.half(), merged.half()))
        row["change"] = max(row["change"], (after - before.float()).abs().max().item())
        row["rounding"] = max(row["rounding"], (after.half().float() - after).abs().max().item())
    else:
        after = before.float()
        if not torch.equal(merged, after):
            row["merge_only"].append(key)
    row["diff"] = max(row["diff"], (after - merged).abs().max().item())


def compare(base: dict, patches: dict, view: Path) -> dict:
    parts: dict[str, dict] = {}
    with safe_open(str(view), framework="pt") as merged_file:
        for key, before in base.items():
            row = parts.setdefault(part(key), {"patched": 0, "equal_in_fp16": 0, "fp16_steps": 0, "merge_only": [],
                                               "change": 0.0, "diff": 0.0, "rounding": 0.0})
            measure(row, key, before, merged_file.get_tensor(key).float(), patches)
    for row in parts.values():
        change = row["change"] or float("nan")
        row["relative_error"], row["fp16_floor"] = row.pop("diff") / change, row.pop("rounding") / change
        row["merge_only"] = {"count": len(row["merge_only"]), "first": row["merge_only"][:5]}
    return parts


def check(model, clip, base: dict, lora_path: Path, view: Path) -> dict:
    lora = comfy.utils.load_torch_file(str(lora_path))
    warnings.clear()
    patched_model, patched_clip = comfy.sd.load_lora_for_models(model, clip, lora, 1.0, 1.0)
    not_loaded = [line for line in warnings if "lora key not loaded" in line]
    patches = {f"unet/{k}": v for k, v in patched_model.patches.items()}
    patches |= {f"clip/{k}": v for k, v in patched_clip.patcher.patches.items()}
    return {"file_keys": len(lora), "not_loaded": len(not_loaded), "not_loaded_first": not_loaded[:5],
            "parts": compare(base, patches, view)}


def main() -> None:
    checks = []
    for spec in args.checks:
        name, _, files = spec.partition("=")
        lora_path, merged = (Path(p) for p in files.split(","))
        checks.append((name, lora_path, comfy_view(merged)))
    model, clip, missing = load(args.base)
    base = weights(model, clip, missing)
    print(json.dumps({"base_keys": len(base), "not_in_file": sorted(missing)}), flush=True)
    for name, lora_path, view in checks:
        print(json.dumps({"name": name, **check(model, clip, base, lora_path, view)}), flush=True)


main()
