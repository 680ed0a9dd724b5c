"""Training step time of a small UNet with each offload mode against no offload, on the CPU.

    .venv/bin/python bench/offload_unet.py [--steps 12] [--batch-size 4]

The real trainer (`sdtune.train.loop.prepare` + `loop`) trains the bundled `sdtune-tiny` model at 64 px with
the `cpu` preset plus gradient checkpointing (parameter streaming requires it, so every mode has it) and
each of: no offload, `optimizer_offload` cpu and nvme, and each of those with `param_offload=cpu`. The
modes run one after another in this process on the same data; s/step is the median over all steps but
the first. On the CPU the "device" is host memory, so this measures the engine's bookkeeping (hooks,
buckets, copies, streaming), not PCIe transfers.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from _common import save_results, summarize, trainer_step_times
from support.testing import make_image_folder

from sdtune.config import load_config

MODES = {
    "no offload": [],
    "optimizer cpu": ["memory.optimizer_offload=cpu"],
    "optimizer nvme": ["memory.optimizer_offload=nvme", "memory.offload_dir={tmp}"],
    "optimizer cpu + params streamed": ["memory.optimizer_offload=cpu", "memory.param_offload=cpu"],
    "optimizer nvme + params streamed": ["memory.optimizer_offload=nvme", "memory.offload_dir={tmp}",
                                         "memory.param_offload=cpu"],
}


def step_times(sets: list[str], data: Path, out: Path, steps: int, batch_size: int) -> list[float]:
    cfg, info = load_config("cpu", ["model.pretrained=sdtune-tiny", "memory.gradient_checkpointing=true",
                                    f"train.max_steps={steps}", f"train.batch_size={batch_size}",
                                    "output.checkpoint_every=0", *sets])
    return trainer_step_times(cfg, info, data, out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp())
    data = make_image_folder(tmp / "images", count=8)
    rows = {}
    for index, (name, sets) in enumerate(MODES.items()):
        times = step_times([s.format(tmp=tmp) for s in sets], data, tmp / f"out{index}", args.steps, args.batch_size)
        rows[name] = summarize(times)
    base = rows["no offload"]["median_s"]
    print(f"sdtune-tiny, 64 px, batch {args.batch_size}, checkpointing on, {args.steps} steps, one thread")
    for name, row in rows.items():
        row["speed_vs_no_offload"] = base / row["median_s"]
        print(f"{name:34s} {row['median_s']:6.3f} s/step (min {row['min_s']:.3f}, max {row['max_s']:.3f})  "
              f"{row['speed_vs_no_offload']:.2f}x")
    save_results("offload_unet", rows)


if __name__ == "__main__":
    main()
