"""Each adapter kind against plain LoRA on the tiny model: s/step, peak memory and what the run keeps.

    .venv/bin/python bench/adapter_kinds.py [--steps 20] [--repeats 3] [--batch-size 4] [--rank 8]

Every row is the real `sdtune train --preset cpu --model sdtune-tiny` in a fresh process (one thread, fp32,
64 px, the same 16 images and seed), so that its peak RSS is its own; the rows take turns over the repeats,
so the machine's drift falls on all of them alike. s/step (from `summary.json`: the mean after the first
step) is the median over the repeats; peak memory is the process's peak RSS (what `summary.json` reports on
the CPU) and, as the tiny model's training state is far below what RSS resolves, the number of values the
method trains (counted in the file it shares; its training state is 16 bytes each: fp32 weight, gradient and
AdamW's two moments). The last column is the
estimator's answer for the same method on the full-size SD1.5 under `lora-6gb` (what the kind costs on the
model users train), so the tiny model's ranking can be read against the real one.

Textual inversion trains on captions that name its token ("<sks>, a red circle ..."), the others on the
plain captions.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import save_results
from support.testing import make_image_folder

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
ROWS = {  # row: the --set overrides beside train.method=lora (or the method they name)
    "LoRA (baseline)": [],
    "LoCon (LoRA, attention+conv)": ["lora.target=attention+conv"],
    "DoRA": ["lora.dora=true"],
    "LoHa": ["lora.algo=loha"],
    "LoKr": ["lora.algo=lokr"],
    "textual inversion (2 vectors)": ["train.method=embedding", "embedding.token=<sks>",
                                      "embedding.init_text=shape", "embedding.vectors=2"],
}


def train(data: Path, out: Path, args, sets: list[str]) -> dict:
    method = [] if any(s.startswith("train.method=") for s in sets) else ["train.method=lora", f"lora.rank={args.rank}"]
    command = [sys.executable, "-m", "sdtune", "train", "--preset", "cpu", "--model", "sdtune-tiny", "--data",
               str(data), "--out", str(out), "--max-steps", str(args.steps),
               *(item for s in [*method, *sets, f"train.batch_size={args.batch_size}", "data.resolution=64",
                                f"output.checkpoint_every={args.steps}", "output.sample_every=0"]
                 for item in ("--set", s))]
    subprocess.run(command, env=ENV, check=True, capture_output=True)
    summary = json.loads((out / "summary.json").read_text())
    return {"s_per_step": summary["seconds_per_step"], "peak_rss": summary["peak_memory_bytes"],
            "params": trained_parameters(out)}


def trained_parameters(out: Path) -> int:
    """The values the run trained, counted in the file it shares (an adapter's one-number alphas left out)."""
    from safetensors import safe_open

    [shared] = [out / name for name in ("lora.safetensors", "embedding.safetensors") if (out / name).is_file()]
    with safe_open(str(shared), framework="pt") as f:
        sizes = [f.get_slice(key).get_shape() for key in f.keys()]
    return sum(math.prod(size) for size in sizes if math.prod(size) > 1)


def estimate(sets: list[str], rank: int) -> float:
    """The estimator's total GiB for this method on the full-size SD1.5 under lora-6gb."""
    method = [] if any(s.startswith("train.method=") for s in sets) else ["train.method=lora", f"lora.rank={rank}"]
    command = [sys.executable, "-m", "sdtune", "estimate-vram", "--model", "sd15", "--preset", "lora-6gb", "--json",
               *(item for s in [*method, *sets] for item in ("--set", s))]
    done = subprocess.run(command, env=ENV, check=True, capture_output=True, text=True)
    return json.loads(done.stdout)["estimates"][0]["total"] / 2**30


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    plain = make_image_folder(tmp / "images", count=16)
    named = make_image_folder(tmp / "named", count=16)
    for caption in named.glob("*.txt"):
        caption.write_text("<sks>, " + caption.read_text())
    runs: dict[str, list[dict]] = {name: [] for name in ROWS}
    for repeat in range(args.repeats):
        for i, (name, sets) in enumerate(ROWS.items()):
            data = named if any(s == "train.method=embedding" for s in sets) else plain
            runs[name].append(train(data, tmp / f"out-{repeat}-{i}", args, sets))
    rows = {name: {"s_per_step": statistics.median(r["s_per_step"] for r in found),
                   "peak_rss_mib": max(r["peak_rss"] for r in found) / 2**20, "trained_parameters": found[0]["params"],
                   "sd15_lora_6gb_gib": estimate(ROWS[name], args.rank)} for name, found in runs.items()}
    base = rows["LoRA (baseline)"]["s_per_step"]
    print(f"sdtune-tiny, 64 px, batch {args.batch_size}, rank {args.rank}, {args.steps} steps, {args.repeats} "
          "repeats (median), one thread, fp32")
    print("| method | s/step | time vs LoRA | peak RSS | trained values | SD1.5, lora-6gb estimate |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, row in rows.items():
        print(f"| {name} | {row['s_per_step']:.3f} | {row['s_per_step'] / base:.2f}x | {row['peak_rss_mib']:.0f} MiB "
              f"| {row['trained_parameters']:,} | {row['sd15_lora_6gb_gib']:.2f} GiB |")
    save_results("adapter_kinds", rows)


if __name__ == "__main__":
    main()
