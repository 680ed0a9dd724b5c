"""What the benchmark scripts share: a summary of repeated timings and where results are written. Importing it
puts the tests' support folder (tiny models, image folders: tests/support/testing.py) on the path, so each
bench imports `_common` before `support`."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def summarize(seconds: list[float]) -> dict:
    return {"median_s": statistics.median(seconds), "min_s": min(seconds), "max_s": max(seconds)}


def trainer_step_times(cfg, info, data: Path, out: Path) -> list[float]:
    """Seconds of each step of the real trainer on `cfg`, the first (warm-up) step left out."""
    from sdtune.train import loop as trainer

    with trainer.prepare(cfg, info, str(data), str(out), resume=False) as run:
        trainer.loop(run)
    return run.step_times[1:]


def step_bench_setup(batch_size: int):
    """What the step benchmarks share: their options (--steps, --repeats, --batch-size, default
    `batch_size`), one torch thread, and a temporary folder with 16 test images. Returns (args, tmp, data)."""
    import argparse
    import tempfile

    import torch
    from support.testing import make_image_folder

    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp())
    return args, tmp, make_image_folder(tmp / "images", count=16)


def save_results(name: str, rows) -> Path:
    """Write `rows` as bench/results/NAME.json (the folder is git-ignored); returns the path."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(rows, indent=2) + "\n")
    return path


def comfy_arguments(parser) -> None:
    """The options of the benches that run ComfyUI's own loaders: its venv and its source checkout."""
    import os

    parser.add_argument("--comfy-env", type=Path, default=os.environ.get("SDTUNE_COMFY_ENV"),
                        help="the folder bench/comfy_venv.sh built (venv/, stubs/)")
    parser.add_argument("--comfyui", type=Path, default=os.environ.get("SDTUNE_COMFYUI"),
                        help="a ComfyUI source checkout")
