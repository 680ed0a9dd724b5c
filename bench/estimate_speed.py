"""The VRAM estimator: how fast it answers, and what it says of plans with published measurements.

    .venv/bin/python bench/estimate_speed.py

Speed: `sdtune estimate-vram --model sd15 --preset rtx3050 --json` as a user runs it, in a fresh process
(imports included), then each GPU preset's estimate of SD1.5 at 512 px timed in this process (warm).
Published measurements (the DreamBooth README of ShivamShrirao's diffusers fork: SD v1-4 UNet, 512 px,
batch 1, T4, xformers, VAE and text encoder not on the GPU) beside the estimator's figure for the same
plan; the published figures are whole-card usage, so they are set beside `total` (peak reserved + CUDA
context).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from _common import save_results

from sdtune.config import load_config
from sdtune.estimate import estimate

GIB = 2**30
PUBLISHED = [  # (plan, --set overrides on rtx2070 (fp16), published GB)
    ("fp16 + checkpointing + 8-bit Adam", ["memory.optimizer=adamw8bit", "memory.gradient_checkpointing=true"], 9.92),
    ("fp16 + checkpointing + AdamW", ["memory.gradient_checkpointing=true"], 15.79),
    ("fp16 + AdamW", ["memory.gradient_checkpointing=false"], 17.7),
]


def main() -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "sdtune.cli", "estimate-vram", "--model", "sd15", "--preset",
                          "rtx3050", "--json"], check=True, capture_output=True, text=True, env=env).stdout
    cold = time.perf_counter() - started
    json.loads(out)
    rows = {"cold process, rtx3050 (s)": round(cold, 2)}
    print(f"sdtune estimate-vram --model sd15 --preset rtx3050 in a fresh process: {cold:.1f} s")
    for preset in ("rtx2070", "rtx3050", "rtx3080", "rtx4090"):
        cfg, info = load_config(preset)
        result = estimate(cfg, info, "sd15")
        rows[f"warm, {preset} (s)"] = result.seconds
        print(f"{preset:8s} {result.seconds:5.2f} s  total {result.total / GIB:5.2f} GiB, card {info.vram_gib:g} GB")
    print("\nplan (SD1.5 UNet, 512 px, batch 1, frozen parts off the GPU) | published | estimate total")
    for label, sets, published in PUBLISHED:
        cfg, info = load_config("rtx2070", ["memory.optimizer_offload=none", *sets])
        result = estimate(cfg, info, "sd15", frozen_on_device=False)
        error = result.total / 1e9 / published - 1
        rows[label] = {"published_gb": published, "estimate_gb": round(result.total / 1e9, 2), "error": round(error, 3)}
        print(f"{label:36s} {published:6.2f} GB  {result.total / 1e9:6.2f} GB ({error:+.0%})")
    save_results("estimate_speed", rows)


if __name__ == "__main__":
    main()
