"""LoHa, LoKr and DoRA from peft against the same algorithms from lycoris-lora, beside sdtune's plain LoRA: the
evidence issue 28 chooses its implementation on (docs/design/adapters.md).

    PYTHONPATH=/path/to/lycoris:$PWD .venv/bin/python bench/adapters.py [--steps 20] [--warmup 3] [--rank 4]

Same model (the tiny SD1 UNet of tests/support/testing.py), same random latents and text states (batch 4,
64 px), one thread, fp32. Each row runs in a fresh process: the adapter on the attention projections
(`to_q`, `to_k`, `to_v`, `to_out.0`) at rank = alpha = --rank (the LoKr rows named so: their own rank and
alpha, to exercise LoKr's scaling), AdamW (lr 1e-3) over the adapter only.
Per row: trainable parameters, s/step (forward + backward + AdamW step, median of --steps after --warmup),
the process's peak RSS, then the file each library writes in kohya's format (lycoris: its own writer; peft:
diffusers' `convert_state_dict_to_kohya` for LoRA and DoRA, the mapping `peft_to_kohya` here for LoHa and
LoKr), read back twice:
- ComfyUI: `comfy_read` transcribes ComfyUI's loader (comfy/lora.py `load_lora` and `model_lora_keys_unet`,
  comfy/weight_adapter/{lora,loha,lokr,base}.py). Keys it reads, keys it leaves ("lora key not loaded"), and
  the largest error of the weight it builds against the trained model's own weight, relative to the largest
  change training made (0 = the file means in ComfyUI what it meant in training). For DoRA also that error
  had ComfyUI normalised the patched weight on the output axis as on the input one, for peft's DoRA the
  file after `fix_peft_dora` (the mapping diffusers' converter lacks), and for output-axis DoRA the file
  after `rescale_for_comfy` (magnitudes rescaled to undo ComfyUI's norm of the original weight).
- diffusers: `StableDiffusionPipeline.load_lora_weights` on the same file, and for peft on peft's own names
  (`unet.M.lora_A.weight`, `unet.M.hada_w1_a`, ...): refused (the error), or loaded and the same relative
  error of the weight it then applies.
Results to bench/results/adapters.json. Needs lycoris-lora (`pip install --target DIR lycoris-lora einops
toml`, DIR on PYTHONPATH); without it the script says so and exits 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from _common import save_results

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
ROWS = {  # row: (library, algorithm, DoRA: "" none, "out" a magnitude per output row, "in" per input column,
    #              (rank, alpha) or None for (--rank, --rank))
    "peft LoRA (sdtune today)": ("peft", "lora", "", None),
    "peft LoHa": ("peft", "loha", "", None),
    "peft LoKr": ("peft", "lokr", "", None),
    "peft LoKr, alpha 1": ("peft", "lokr", "", (4, 1)),
    "peft LoKr, rank 2 alpha 1": ("peft", "lokr", "", (2, 1)),
    "peft LoRA + DoRA": ("peft", "lora", "out", None),
    "lycoris LoHa": ("lycoris", "loha", "", None),
    "lycoris LoKr": ("lycoris", "lokr", "", None),
    "lycoris LoKr, alpha 1": ("lycoris", "lokr", "", (4, 1)),
    "lycoris LoKr, rank 2 alpha 1": ("lycoris", "lokr", "", (2, 1)),
    "lycoris LoRA + DoRA (default, output axis)": ("lycoris", "lora", "out", None),
    "lycoris LoRA + DoRA, wd_on_output=False": ("lycoris", "lora", "in", None),
}


def tiny_unet():
    from support.testing import tiny_components

    return tiny_components(version=1, seed=0)["unet"]


def targets(unet) -> list[str]:
    return [name for name, m in unet.named_modules()
            if isinstance(m, torch.nn.Linear) and name.endswith(tuple("." + t for t in ATTENTION))]


def attach_peft(unet, algo: str, dora: str, rank: int, alpha: float):
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    kinds = {"lora": lambda: LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                        target_modules=list(ATTENTION), use_dora=bool(dora)),
             "loha": lambda: LoHaConfig(r=rank, alpha=alpha, target_modules=list(ATTENTION)),
             "lokr": lambda: LoKrConfig(r=rank, alpha=alpha, target_modules=list(ATTENTION))}
    unet.add_adapter(kinds[algo]())
    return [p for p in unet.parameters() if p.requires_grad]


def attach_lycoris(unet, algo: str, dora: str, rank: int, alpha: float):
    from lycoris.kohya import LycorisNetworkKohya, create_network

    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:  # its presets are toml files: only the attention's Linears
        preset = Path(tmp) / "attention.toml"
        preset.write_text('enable_conv = false\nunet_target_module = ["Attention"]\nunet_target_name = []\n')
        net = create_network(1.0, rank, alpha, None, None, unet, algo=algo, dora_wd=str(bool(dora)),
                             wd_on_output=str(dora != "in"), preset=str(preset))
    net.apply_to(None, unet, apply_text_encoder=False, apply_unet=True)
    assert isinstance(net, LycorisNetworkKohya)
    unet.requires_grad_(False)
    for p in net.parameters():
        p.requires_grad_(True)
    return net


def train(unet, params, steps: int, warmup: int) -> list[float]:
    """Seconds of each step after `warmup`: a UNet forward on fixed random latents, MSE, backward, AdamW."""
    gen = torch.Generator().manual_seed(0)
    latents, text = torch.randn(4, 4, 8, 8, generator=gen), torch.randn(4, 16, 32, generator=gen)
    noise, timesteps = torch.randn(4, 4, 8, 8, generator=gen), torch.randint(0, 1000, (4,), generator=gen)
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    unet.train()
    times = []
    for _ in range(warmup + steps):
        started = time.perf_counter()
        prediction = unet(latents + noise, timesteps, text).sample
        torch.nn.functional.mse_loss(prediction, noise).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    return times[warmup:]


@torch.no_grad()
def effective_weights(unet, names: list[str]) -> dict[str, torch.Tensor]:
    """The weight each adapted Linear applies, read off its output on the identity (bias taken away)."""
    unet.eval()
    out = {}
    for name in names:
        module = unet.get_submodule(name)
        inner = getattr(module, "base_layer", module)
        eye = torch.eye(inner.in_features)
        y = module(eye) - (inner.bias if inner.bias is not None else 0)
        out[name] = y.T.contiguous()
    return out


def peft_to_kohya(sd: dict, algo: str, rank: int, alpha: float) -> dict:
    """peft's LoHa/LoKr state dict (`M.hada_w1_a`, `M.lokr_w1`, ...) in kohya's names (`lora_unet_M_.hada_w1_a`,
    `.alpha`). peft scales both by alpha / r; ComfyUI scales LoKr by alpha / (rank of the decomposed factor)
    and not at all when no factor is decomposed, so there the scale is baked into `lokr_w1`."""
    out, modules = {}, sorted({k.rsplit(".", 1)[0] for k in sd})
    for module in modules:
        key = "lora_unet_" + module.replace(".", "_")
        parts = {k.rsplit(".", 1)[1]: v for k, v in sd.items() if k.rsplit(".", 1)[0] == module}
        decomposed = algo == "loha" or "lokr_w1_a" in parts or "lokr_w2_a" in parts
        if not decomposed:
            parts["lokr_w1"] = parts["lokr_w1"] * (alpha / rank)
        for suffix, value in parts.items():
            out[f"{key}.{suffix}"] = value.detach().clone()
        if decomposed:
            out[f"{key}.alpha"] = torch.tensor(float(alpha))
    return out


def export_peft(unet, algo: str, rank: int, alpha: float) -> tuple[dict, dict]:
    """(kohya file, peft's own names with diffusers' `unet.` prefix: what `save_lora_weights` writes)."""
    from diffusers.utils import convert_state_dict_to_kohya
    from peft.utils import get_peft_model_state_dict

    sd = {k: v.detach().clone() for k, v in get_peft_model_state_dict(unet).items()}
    native = {"unet." + k: v for k, v in sd.items()}
    if algo == "lora":
        return convert_state_dict_to_kohya(dict(native)), native
    return peft_to_kohya(sd, algo, rank, alpha), native


def fix_peft_dora(kohya: dict) -> dict:
    """diffusers' converter leaves `lora_unet_..._attn1.to_q.lora_magnitude_vector` (its `elif` renames only
    keys without a `unet` prefix); ComfyUI wants `lora_unet_..._attn1_to_q.dora_scale` shaped (out, 1)."""
    out = {}
    for key, value in kohya.items():
        if key.endswith(".lora_magnitude_vector"):
            key, value = key[:-len(".lora_magnitude_vector")].replace(".", "_") + ".dora_scale", value.reshape(-1, 1)
        out[key] = value
    return out


def rescale_for_comfy(kohya: dict, base_unet) -> dict:
    """An output-axis DoRA file that ComfyUI reads as trained: ComfyUI divides by the original row norm
    ||W||, so store m * ||W|| / ||W + s * up @ down|| (readers following lycoris' formula then get it wrong)."""
    out, keys = dict(kohya), comfy_key_map([n for n, _ in base_unet.named_modules()])
    for key in [k for k in kohya if k.endswith(".dora_scale")]:
        x = key[:-len(".dora_scale")]
        weight = base_unet.get_submodule(keys[x]).weight.detach()
        up, down = kohya[f"{x}.lora_up.weight"], kohya[f"{x}.lora_down.weight"]
        patched = weight + kohya[f"{x}.alpha"].item() / down.shape[0] * (up @ down)
        out[key] = kohya[key] * weight.norm(dim=1, keepdim=True) / patched.norm(dim=1, keepdim=True)
    return out


def export_lycoris(net) -> dict:
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as tmp:
        net.save_weights(f"{tmp}/lycoris.safetensors", torch.float32, {})
        return load_file(f"{tmp}/lycoris.safetensors")


def comfy_key_map(names: list[str]) -> dict[str, str]:
    """ComfyUI's `model_lora_keys_unet` for an SD1 UNet, in diffusers' module names: `lora_unet_M` and
    `lycoris_M` (M with `_` for `.`), and diffusers' old `[unet.]...processor.to_q` forms."""
    keys = {}
    for name in names:
        flat = name.replace(".", "_")
        keys["lora_unet_" + flat] = keys["lycoris_" + flat] = name
        old = name.replace(".to_", ".processor.to_")
        old = old[:-2] if old.endswith(".to_out.0") else old
        keys[old] = keys["unet." + old] = name
    return keys


def comfy_decompose(dora_scale, weight, diff, alpha, as_trained: bool = False):
    """comfy/weight_adapter/base.py `weight_decompose` at strength 1, as written there: on the output axis
    (dora_scale.shape[0] == out) the norm is the ORIGINAL weight's, on the input axis the patched one's.
    `as_trained`: the patched one's on both axes (what peft and lycoris train with)."""
    calc = weight + diff * alpha
    if dora_scale.shape[0] == calc.shape[0]:
        norm = (calc if as_trained else weight).reshape(weight.shape[0], -1).norm(dim=1, keepdim=True)
    else:
        norm = calc.transpose(0, 1).reshape(calc.shape[1], -1).norm(dim=1, keepdim=True).transpose(0, 1)
    return calc * (dora_scale / (norm + torch.finfo(weight.dtype).eps))


def comfy_delta(sd: dict, x: str, loaded: set):
    """(diff, scale) as ComfyUI's LoRA, LoHa and LoKr adapters build it for key `x`, or None."""
    get = {s: sd.get(f"{x}.{s}") for s in ("lora_up.weight", "lora_down.weight", "lora_B.weight",
                                           "lora_A.weight", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b",
                                           "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")}
    alpha = sd[f"{x}.alpha"].item() if f"{x}.alpha" in sd else None
    for up, down in (("lora_up.weight", "lora_down.weight"), ("lora_B.weight", "lora_A.weight")):
        if get[up] is not None:
            loaded.update({f"{x}.{up}", f"{x}.{down}"})
            return get[up].flatten(1) @ get[down].flatten(1), 1.0 if alpha is None else alpha / get[down].shape[0]
    if get["hada_w1_a"] is not None:
        loaded.update(f"{x}.hada_w{i}_{ab}" for i in (1, 2) for ab in "ab")
        diff = (get["hada_w1_a"] @ get["hada_w1_b"]) * (get["hada_w2_a"] @ get["hada_w2_b"])
        return diff, 1.0 if alpha is None else alpha / get["hada_w1_b"].shape[0]
    if not any(get[s] is not None for s in ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w2_a")):
        return None
    loaded.update(f"{x}.{s}" for s, v in get.items() if s.startswith("lokr") and v is not None)
    dim = None
    w1 = get["lokr_w1"]
    if w1 is None:
        dim, w1 = get["lokr_w1_b"].shape[0], get["lokr_w1_a"] @ get["lokr_w1_b"]
    w2 = get["lokr_w2"]
    if w2 is None:
        dim, w2 = get["lokr_w2_b"].shape[0], get["lokr_w2_a"] @ get["lokr_w2_b"]
    return torch.kron(w1, w2), alpha / dim if alpha is not None and dim is not None else 1.0


def comfy_read(sd: dict, base_unet, names: list[str], reference: dict) -> dict:
    """What ComfyUI's `load_lora` makes of `sd`: keys read and left, and the weights it would patch in (and,
    where there is DoRA, the error had it normalised the patched weight on the output axis too)."""
    loaded, patched, as_trained = set(), {}, {}
    all_weights = [n for n, m in base_unet.named_modules() if getattr(m, "weight", None) is not None]
    for x, name in comfy_key_map(all_weights).items():
        for extra in ("alpha", "dora_scale"):
            if f"{x}.{extra}" in sd:
                loaded.add(f"{x}.{extra}")
        made = comfy_delta(sd, x, loaded)
        if made is None:
            continue
        weight = base_unet.get_submodule(name).weight.detach()
        diff, scale = made[0].reshape(weight.shape), made[1]
        dora = sd.get(f"{x}.dora_scale")
        patched[name] = comfy_decompose(dora, weight, diff, scale) if dora is not None else weight + scale * diff
        if dora is not None:
            as_trained[name] = comfy_decompose(dora, weight, diff, scale, as_trained=True)
    left = sorted(set(sd) - loaded)
    return {"keys": len(sd), "read": len(loaded), "left": len(left), "left_example": left[:2],
            "modules_patched": len(patched), "rel_error": rel_error(patched, reference, base_unet, names),
            "rel_error_norm_of_patched": rel_error(as_trained, reference, base_unet, names) if as_trained else None}


def rel_error(weights: dict, reference: dict, base_unet, names: list[str]):
    """Largest |W - W_trained| over the targets, relative to the largest |W_trained - W_0|; None if a target
    is missing from `weights`."""
    if any(n not in weights for n in names):
        return None
    change = max((reference[n] - base_unet.get_submodule(n).weight).abs().max().item() for n in names)
    return max((weights[n] - reference[n]).abs().max().item() for n in names) / change


def diffusers_read(sd: dict, base_unet, names: list[str], reference: dict) -> dict:
    """`StableDiffusionPipeline.load_lora_weights(sd)` on the tiny pipeline: refused, or what it applies."""
    from diffusers import StableDiffusionPipeline
    from support.testing import tiny_components

    pipe = StableDiffusionPipeline(**tiny_components(version=1, seed=0), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    said = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: said.append(record.getMessage()[:100])  # text encoder's "no keys": noise
    handler.addFilter(lambda record: not record.getMessage().startswith("No LoRA keys associated"))
    logging.getLogger("diffusers").addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipe.load_lora_weights({k: v.clone() for k, v in sd.items()})
    except Exception as error:  # noqa: BLE001 - what a client says when it refuses a file is the finding
        return {"loaded": False, "error": f"{type(error).__name__}: {str(error).splitlines()[0][:140]}"}
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
    weights = effective_weights(pipe.unet, names)
    return {"loaded": True, "warnings": said, "rel_error": rel_error(weights, reference, base_unet, names)}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_row(name: str, steps: int, warmup: int, rank: int) -> dict:
    library, algo, dora, own = ROWS[name]
    rank, alpha = own or (rank, rank)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    unet, base = tiny_unet(), tiny_unet()
    names = targets(unet)
    before = peak_rss_mib()
    if library == "peft":
        params = attach_peft(unet, algo, dora, rank, alpha)
    else:
        net = attach_lycoris(unet, algo, dora, rank, alpha)
        params = [p for p in net.parameters() if p.requires_grad]
    times = train(unet, params, steps, warmup)
    peak = peak_rss_mib()
    reference = effective_weights(unet, names)
    sd, native = export_peft(unet, algo, rank, alpha) if library == "peft" else (export_lycoris(net), None)
    count = sum(p.numel() for p in params)
    extra = {}
    if native is not None:  # diffusers on peft's own names; ComfyUI on the DoRA mapping written here
        extra["diffusers_peft_names"] = diffusers_read(native, base, names, reference)
    if dora and library == "peft":
        extra["comfyui_fixed_mapping"] = comfy_read(fix_peft_dora(sd), base, names, reference)
    if dora == "out":  # ComfyUI's output-axis norm compensated in the file
        fixed = fix_peft_dora(sd) if library == "peft" else sd
        extra["comfyui_rescaled"] = comfy_read(rescale_for_comfy(fixed, base), base, names, reference)
    return {**extra, "row": name, "library": library, "algorithm": algo, "dora": dora, "rank": rank, "alpha": alpha,
            "targets": len(names), "trainable_params": count, "train_state_bytes": count * 4 * 4,
            "s_per_step": statistics.median(times), "peak_rss_mib": peak, "rss_before_adapter_mib": before,
            "file_keys": sorted({k.split(".", 1)[1] for k in sd}),
            "comfyui": comfy_read(sd, base, names, reference),
            "diffusers": diffusers_read(sd, base, names, reference)}


def fmt_error(value) -> str:
    return "missing targets" if value is None else f"{value:.1e}"


def fmt_load(d: dict | None) -> str:
    if d is None:
        return "-"
    if not d["loaded"]:
        return "refused: " + d["error"][:60]
    return f"loaded, error {fmt_error(d['rel_error'])}" + (", warns" if d["warnings"] else "")


def table(rows: list[dict]) -> str:
    lines = ["| row | trainable params | s/step | peak RSS MiB | kohya file keys | ComfyUI reads / left | ComfyUI "
             "weight error | diffusers, kohya file | diffusers, peft's names |",
             "| --- | ---: | ---: | ---: | --- | --- | --- | --- | --- |"]
    for r in rows:
        c = r["comfyui"]
        lines.append(f"| {r['row']} | {r['trainable_params']:,} | {r['s_per_step']:.4f} | {r['peak_rss_mib']:.0f} | "
                     f"{', '.join(r['file_keys'])} | {c['read']} / {c['left']} | {fmt_error(c['rel_error'])} | "
                     f"{fmt_load(r['diffusers'])} | {fmt_load(r.get('diffusers_peft_names'))} |")
    return "\n".join(lines)


def dora_table(rows: list[dict]) -> str:
    lines = ["| DoRA row | ComfyUI error, file as written | ... normalising the patched weight on both axes | "
             "peft file after fix_peft_dora | ComfyUI error, file after rescale_for_comfy |",
             "| --- | --- | --- | --- | --- |"]
    for r in (r for r in rows if r["dora"]):
        fixed = r.get("comfyui_fixed_mapping")
        after = f"{fmt_error(fixed['rel_error'])} ({fmt_error(fixed['rel_error_norm_of_patched'])})" if fixed else "-"
        rescaled = r.get("comfyui_rescaled")
        lines.append(f"| {r['row']} | {fmt_error(r['comfyui']['rel_error'])} | "
                     f"{fmt_error(r['comfyui']['rel_error_norm_of_patched'])} | {after} | "
                     f"{fmt_error(rescaled['rel_error']) if rescaled else '-'} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--row", choices=list(ROWS), help="run one row in this process, print its JSON")
    args = parser.parse_args()
    try:
        import lycoris  # noqa: F401
    except ImportError:
        print("bench/adapters.py needs lycoris-lora: pip install --target DIR lycoris-lora einops toml, "
              "then put DIR on PYTHONPATH")
        return 2
    if args.row:
        print(json.dumps(run_row(args.row, args.steps, args.warmup, args.rank)))
        return 0
    rows = []
    for name in ROWS:  # a fresh process each, so that peak RSS is the row's own
        done = subprocess.run([sys.executable, __file__, "--row", name, "--steps", str(args.steps),
                               "--warmup", str(args.warmup), "--rank", str(args.rank)],
                              capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{name}: done", file=sys.stderr)
    print(table(rows) + "\n\n" + dora_table(rows))
    print(f"results: {save_results('adapters', rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
