"""One process against two on the CPU (gloo): images per second of `sdtune train` under torchrun.

    .venv/bin/python bench/distributed_step.py [--steps 20] [--batch-size 4]

The bundled sdtune-tiny on 16 test images, one thread per process, the same per-process batch: one
process (`sdtune train`), then `torchrun --standalone --nproc-per-node 2 -m sdtune train` with DDP and
with FSDP2 (twice the global batch). Images per second are the global batch over the mean seconds per
step after the first (summary.json); the ratio is against the single process. On a 2-core machine the
two processes have a core each; on GPUs each has its card.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import save_results
from support.testing import make_image_folder

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def run(launcher: list[str], data: Path, out: Path, steps: int, batch: int, *sets: str) -> dict:
    command = [*launcher, "-m", "sdtune", "train", "--preset", "cpu", "--model", "sdtune-tiny", "--data", str(data),
               "--out", str(out), "--max-steps", str(steps), "--set", f"train.batch_size={batch}",
               "--set", "output.checkpoint_every=0", "--set", "output.single_file=false",
               *(item for s in sets for item in ("--set", s))]
    subprocess.run(command, env=ENV, check=True, capture_output=True)
    return json.loads((out / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    data = make_image_folder(tmp / "images", count=16)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    rows = {
        "1 process": run([sys.executable], data, tmp / "one", args.steps, args.batch_size),
        "2 processes, ddp": run(torchrun, data, tmp / "ddp", args.steps, args.batch_size),
        "2 processes, fsdp": run(torchrun, data, tmp / "fsdp", args.steps, args.batch_size,
                                 "memory.distributed=fsdp"),
    }
    speed = {name: r["global_batch"] / r["seconds_per_step"] for name, r in rows.items()}
    print(f"| run (sdtune-tiny, {args.batch_size} images a process) | global batch | s/step | images/s "
          "| vs 1 process |")
    print("| --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        print(f"| {name} | {r['global_batch']} | {r['seconds_per_step']:.3f} | {speed[name]:.1f} | "
              f"{speed[name] / speed['1 process']:.2f}x |")
    path = save_results("distributed_step", {name: {"global_batch": r["global_batch"],
                                                    "seconds_per_step": r["seconds_per_step"],
                                                    "images_per_second": speed[name]} for name, r in rows.items()})
    print(f"results: {path}")


if __name__ == "__main__":
    main()
