"""The estimator's trace against a measured step of the full-size SD1.5 UNet on the CPU (fp32, 512 px).

    .venv/bin/python bench/estimate_check.py        # about a minute and 8 GB of RAM on 2 cores

Builds a randomly initialised SD1.5 UNet on the CPU, runs one forward at 512 px, batch 1, fp32, without
checkpointing, under `memtrack.MemoryTracker`, and sets what it keeps for backward beside the estimator's
figure for the same plan (`estimate(..., device="cpu")`, traced on the meta device). The test suite
checks the same agreement on a tiny UNet; this shows it holds at full scale. The GPU-side rules (autocast,
flash attention, allocator) are not exercised here: `pytest -m gpu tests/gpu` and `bench/gpu_plans.py`
check those on a GPU.
"""

from __future__ import annotations

import time

import torch
from _common import save_results

from sdtune.config import load_config
from sdtune.estimate import estimate
from sdtune.estimate.memtrack import MemoryTracker
from sdtune.family import archs

GIB = 2**30


def main() -> None:
    from diffusers.models.attention_processor import AttnProcessor2_0

    cfg, info = load_config("cpu", ["data.resolution=512", "train.batch_size=1", "memory.precision=fp32"])
    guess = estimate(cfg, info, "sd15", device="cpu").milestones["forward_end"]
    started = time.perf_counter()
    unet = archs.build_model("sd15", "unet", "cpu").train()
    unet.set_attn_processor(AttnProcessor2_0())
    tracker = MemoryTracker("cpu")
    tracker.add(unet.parameters(), "weights")
    with tracker:
        tracker.phase = "activations"
        prediction = unet(torch.randn(1, 4, 64, 64), torch.tensor([10]), torch.randn(1, 77, 768)).sample
        measured = dict(tracker.current)  # what the graph behind `prediction` keeps for backward
    del prediction
    rows = {key: {"estimate_gib": round(guess.get(key, 0) / GIB, 4),
                  "measured_gib": round(measured.get(key, 0) / GIB, 4)} for key in ("weights", "activations")}
    print(f"SD1.5 UNet, 512 px, batch 1, fp32, no checkpointing; measured forward took "
          f"{time.perf_counter() - started:.0f} s")
    for key, row in rows.items():
        print(f"{key:12s} estimate {row['estimate_gib']:.3f} GiB  measured {row['measured_gib']:.3f} GiB")
    save_results("estimate_check", rows)


if __name__ == "__main__":
    main()
