"""The full SDXL UNet's training step on the CPU under each SDXL preset's levers, at a small resolution.

    .venv/bin/python bench/sdxl_step.py [--resolution 128] [--steps 3] [--plans sdxl-8gb,sdxl-12gb]

A random-weight SDXL pipeline of the published architecture (`sdtune.toy.random_pipeline`, 2.57 B UNet
parameters; built once into --workdir, ~14 GB of fp32 safetensors) trains for --steps steps with the real
trainer under each preset's memory levers moved to the CPU (`memory.device=cpu`, bf16 autocast, SDPA),
each plan in a fresh subprocess so that its peak resident set is its own. A plan whose estimated host RAM
(`sdtune estimate-vram`'s figure) exceeds 90% of this machine's memory is not run, and the row says so.
The rows give s/step (steps after the first) and the subprocess's peak RSS beside the estimate. On the
CPU, "device" and host memory are the same RAM, so the RSS holds both of the estimate's columns.

Measured on the 2-core, 24 GB development VM (2026-12-03): building the random SDXL took 146 s; sdxl-8gb's
child reached a peak RSS of 15.05 GiB (the estimate: 12.92 GiB host + 6.13 GiB device peak, not at the
same moment) and its nvme state file was 28.69 GiB, the estimate's disk row exactly; its first step read
30.8 GB and wrote 30.8 GB of that file and took over 10 minutes, bound by the VM's disk, so the run was
stopped before it printed s/step. sdxl-12gb/16gb/24gb need 35.2 GiB of host RAM and are not run here.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import save_results

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
PLANS = ("sdxl-8gb", "sdxl-12gb", "sdxl-16gb", "sdxl-24gb")


def overrides(model: Path, resolution: int, steps: int, offload_dir: Path) -> list[str]:
    return [f"model.pretrained={model}", "memory.device=cpu", "memory.attention=sdpa", f"data.resolution={resolution}",
            f"train.max_steps={steps}", "train.lr_warmup_steps=0", "output.checkpoint_every=0",
            f"memory.offload_dir={offload_dir}", f"data.cache_dir={offload_dir / 'cache'}"]


def child(spec: dict) -> None:
    """One plan: train, then print its step times and peak RSS as JSON."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    from _common import trainer_step_times

    from sdtune.config import load_config

    cfg, info = load_config(spec["preset"], spec["overrides"])
    times = trainer_step_times(cfg, info, Path(spec["data"]), Path(spec["out"]))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    print(json.dumps({"step_seconds": times, "peak_rss_bytes": rss}))


def host_ram_estimate(preset: str, sets: list[str], model: str) -> int:
    from sdtune.config import load_config
    from sdtune.estimate import estimate

    cfg, info = load_config(preset, sets)
    return estimate(cfg, info, model).host_ram


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--plans", default=",".join(PLANS))
    parser.add_argument("--workdir", default=None, help="where the random SDXL model and the nvme state go")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(json.loads(args.child))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from support.testing import make_image_folder

    from sdtune.toy.random_pipeline import build_random_pipeline

    work = Path(args.workdir or tempfile.mkdtemp(prefix="sdtune-sdxl-bench-"))
    model = work / "sdxl-random"
    if not (model / "model_index.json").is_file():
        started = time.time()
        build_random_pipeline("sdxl", model)
        print(f"random SDXL pipeline built in {time.time() - started:.0f} s", flush=True)
    data = make_image_folder(work / "images", count=4, size=args.resolution)
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    rows = []
    for preset in args.plans.split(","):
        offload = work / f"state-{preset}"
        offload.mkdir(exist_ok=True)
        sets = overrides(model, args.resolution, args.steps, offload)
        estimated = host_ram_estimate(preset, sets, "sdxl")
        row = {"plan": preset, "estimated_host_ram_bytes": estimated, "resolution": args.resolution}
        if estimated > 0.9 * memory:
            row["status"] = f"not run: needs {estimated / GIB:.1f} GiB of host RAM, this machine has {memory / GIB:.1f}"
        else:
            spec = {"preset": preset, "overrides": sets, "data": str(data), "out": str(work / f"out-{preset}")}
            done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                                  text=True, cwd=ROOT / "bench")
            if done.returncode:
                row["status"] = f"error: {(done.stderr.strip().splitlines() or ['?'])[-1]}"
            else:
                result = json.loads(done.stdout.strip().splitlines()[-1])
                times = result["step_seconds"]
                row.update(status="ok", seconds_per_step=sum(times) / len(times) if times else None,
                           peak_rss_bytes=result["peak_rss_bytes"])
        rows.append(row)
        print(_line(row), flush=True)
    print(f"wrote {save_results('sdxl_step', rows)}")


def _line(row: dict) -> str:
    if row["status"] != "ok":
        return f"{row['plan']}: {row['status']}"
    return (f"{row['plan']}: {row['seconds_per_step']:.1f} s/step at {row['resolution']} px, peak RSS "
            f"{row['peak_rss_bytes'] / GIB:.2f} GiB (estimated host RAM {row['estimated_host_ram_bytes'] / GIB:.2f})")


if __name__ == "__main__":
    main()
