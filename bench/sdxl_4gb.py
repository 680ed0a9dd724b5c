"""`sdxl-4gb`: where its host RAM goes, and its training on the CPU against the resident plan's.

    flock /tmp/bigmem.lock .venv/bin/python bench/sdxl_4gb.py [--width 0.5] [--resolution 64] [--steps 3]

First the host-RAM breakdown of the preset at 1024 px on the full-size SDXL, by the estimator's byte model
(`NvmeAdamW.host_bytes`, `sdtune.estimate._host_ram`): the fp32 pipeline while it loads; the optimizer
tier while it is built (the fp32 UNet becoming the state file and the bf16 host weights bucket by bucket,
the ring) and while it trains (host weights, gradient staging, ring); the cached-away encoders parked in
host RAM. "before" is the engine that page-locked the host weights whole before building them (so they
were resident beside the whole fp32 UNet), "now" the one that page-locks them once built.

Then an SDXL-architecture pipeline whose UNet has `--width` of SDXL's channels (0.5: 0.56 B parameters;
the tiny test text encoders and VAE, so the UNet is what counts) trains `--steps` steps on the CPU at
`--resolution` px under `sdxl-4gb` (weights streamed, AdamW state in a file) and under the resident plan
(the same config without `memory.param_offload` and `memory.optimizer_offload`), in fp32 and in bf16
(the preset's), each in a child process of its own: losses per step, peak RSS (VmHWM) against the estimate
(host RAM + the device peak: on the CPU both are the same RAM), and s/step. fp32 must be equal bit for
bit; bf16 within 0.1% (the offloaded plan keeps bf16 working copies of the norm weights, the resident
one autocasts fp32 ones). Needs ~10 GB of RAM (the resident fp32 plan): run it under the big-memory lock.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import save_results

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30


def breakdown() -> list[tuple[str, float, float]]:
    """(what, GiB before, GiB now) of sdxl-4gb's host RAM at 1024 px on the full-size SDXL."""
    from sdtune.config import load_config
    from sdtune.estimate import _meta_parts, estimate
    from sdtune.offload import layout
    from sdtune.offload.nvme import RING

    cfg, info = load_config("sdxl-4gb")
    parts = _meta_parts(cfg, None)
    numels = [p.numel() for p in parts.unet.parameters()]
    total, small = sum(numels), sum(n for n in numels if n < layout.SMALL_PARAM)
    largest = max(sum(numels[i] for i in r) for r in layout.partition(numels))
    count = lambda modules: sum(p.numel() for m in modules for p in m.parameters())  # noqa: E731
    parked = 2 * count([*parts.text_encoders, parts.vae])  # bf16
    ring, chunk = RING * layout.MASTER_BYTES * largest, 4 * min(layout.CHUNK, largest)
    loading = 4 * (total + count([*parts.text_encoders, parts.vae]))
    building = [4 * total + 2 * total + ring + chunk, 4 * total + 2 * largest + ring + chunk]
    running = 2 * total + 2 * (total + small) + ring + chunk
    rows = [("loading: the fp32 pipeline", loading, loading),
            ("building: fp32 UNet + bf16 host weights + ring", *building),
            ("training: host weights + gradient staging + ring", running, running),
            ("encoders parked in bf16 (cached latents, text)", parked, parked)]
    peak = [max(loading, b + parked, running + parked) for b in building]
    rows.append(("peak (the estimate's host RAM)", *peak))
    assert abs(estimate(cfg, info).host_ram - peak[1]) < 2**20, "the byte model and the estimate disagree"
    return [(what, before / GIB, now / GIB) for what, before, now in rows]


def build_model(folder: Path, width: float) -> int:
    """A diffusers SDXL folder: SDXL's UNet at `width` of its channels beside the tiny test text encoders and
    VAE; returns the UNet's parameter count."""
    import torch
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from support.testing import tiny_sdxl_components

    from sdtune.family import archs

    parts = tiny_sdxl_components()
    config = archs.unet_config("sdxl")
    pooled = parts["text_encoder_2"].config.projection_dim
    text = parts["text_encoder"].config.hidden_size + parts["text_encoder_2"].config.hidden_size
    config.update(block_out_channels=[max(32, round(c * width / 32) * 32) for c in config["block_out_channels"]],
                  sample_size=8, cross_attention_dim=text,
                  projection_class_embeddings_input_dim=pooled + 6 * config["addition_time_embed_dim"])
    torch.manual_seed(0)
    parts["unet"] = UNet2DConditionModel.from_config(config)
    StableDiffusionXLPipeline(**parts).save_pretrained(folder, safe_serialization=True)
    return sum(p.numel() for p in parts["unet"].parameters())


def child(spec: dict) -> None:
    """One plan: train, then print its losses, step times and peak RSS as JSON."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    from sdtune.config import load_config
    from sdtune.estimate import estimate
    from sdtune.train import loop as trainer

    cfg, info = load_config("sdxl-4gb", spec["overrides"])
    with trainer.prepare(cfg, info, spec["data"], spec["out"], resume=False) as run:
        trainer.loop(run)
    est = estimate(cfg, info, spec["model"])
    print(json.dumps({"losses": run.losses, "step_seconds": run.step_times[1:], "peak_rss_bytes": _hwm(),
                      "estimate_bytes": est.host_ram + est.peak_allocated}))


def _hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def run_plan(plan: str, precision: str, args, model: Path, data: Path, tmp: Path) -> dict:
    out, state = tmp / f"{plan}-{precision}", tmp / f"state-{plan}-{precision}"
    state.mkdir()
    sets = [f"model.pretrained={model}", "memory.device=cpu", "memory.attention=sdpa", f"memory.precision={precision}",
            f"data.resolution={args.resolution}", f"train.max_steps={args.steps}", "train.lr_warmup_steps=0",
            "train.learning_rate=1e-4", "output.checkpoint_every=0", f"memory.offload_dir={state}",
            f"data.cache_dir={tmp / 'cache'}"]
    if plan == "resident":
        sets += ["memory.param_offload=none", "memory.optimizer_offload=none"]
    spec = {"overrides": sets, "data": str(data), "out": str(out), "model": str(model)}
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env, capture_output=True,
                          text=True, check=False)
    shutil.rmtree(state, ignore_errors=True)
    if done.returncode:
        raise SystemExit(f"{plan} {precision} failed:\n{done.stderr[-3000:]}")
    return {"plan": plan, "precision": precision, **json.loads(done.stdout.strip().splitlines()[-1])}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        return child(json.loads(args.child))
    sys.path.insert(0, str(ROOT / "tests"))
    print("sdxl-4gb host RAM at 1024 px, full-size SDXL (GiB)      before    now")
    for what, before, now in breakdown():
        print(f"  {what:<52} {before:6.2f} {now:6.2f}")
    from support.testing import make_image_folder

    tmp = Path(tempfile.mkdtemp(prefix="sdxl4gb-"))
    try:
        count = build_model(tmp / "model", args.width)
        data = make_image_folder(tmp / "images", count=4, size=args.resolution)
        print(f"\nSDXL architecture at {args.width:g} of its channels ({count / 1e9:.2f} B UNet parameters), "
              f"{args.resolution} px, {args.steps} steps on the CPU")
        rows = [run_plan(plan, precision, args, tmp / "model", data, tmp)
                for precision in ("fp32", "bf16") for plan in ("resident", "sdxl-4gb")]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{'plan':<10} {'dtype':<5} {'s/step':>7} {'peak RSS':>9} {'estimate':>9}  losses")
    for row in rows:
        seconds = sum(row["step_seconds"]) / max(1, len(row["step_seconds"]))
        print(f"{row['plan']:<10} {row['precision']:<5} {seconds:7.2f} {row['peak_rss_bytes'] / GIB:8.2f}G "
              f"{row['estimate_bytes'] / GIB:8.2f}G  {' '.join(f'{x:.7f}' for x in row['losses'])}")
    for precision in ("fp32", "bf16"):
        resident, offloaded = (r["losses"] for r in rows if r["precision"] == precision)
        worst = max(abs(a - b) / abs(a) for a, b in zip(resident, offloaded, strict=True))
        print(f"{precision}: largest relative loss difference sdxl-4gb vs resident {worst:.2e}")
    save_results("sdxl_4gb", rows)


if __name__ == "__main__":
    main()
