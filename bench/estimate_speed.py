"""The VRAM estimator: how fast it answers, and what it says of plans with published measurements.

    .venv/bin/python bench/estimate_speed.py [--baseline DIR] [--rounds 3] [--check]

Fresh processes, as a user runs them (`sdtune estimate-vram --model M --preset P --json`, imports included),
interleaved round by round so that a busy machine slows each kind alike, medians printed:
- `first`: this tree with an empty cache folder (`XDG_CACHE_HOME`): the plan is traced;
- `again`: this tree with the cache the first run filled: the plan is read back (`sdtune.estimate.remembered`);
- `baseline`: the same command from another checkout (`--baseline DIR`, e.g. a `git worktree add` of the
  commit before), to set beside `first` and `again` with ratios;
- `sdtune --help`.
Then each GPU preset's estimate of SD1.5 at 512 px (and sdxl-8gb's of SDXL) timed in this process (warm),
with the meta-op memo (`sdtune.estimate.memtrack`; emptied first, as a fresh process has it) and without
it, and published measurements (the DreamBooth README of
ShivamShrirao's diffusers fork: SD v1-4 UNet, 512 px, batch 1, T4, xformers, VAE and text encoder not on
the GPU) beside the estimator's figure for the same plan; the published figures are whole-card usage, so
they are set beside `total` (peak reserved + CUDA context).
`--check`: every shipped preset (at its own model) and a few variants estimated with and without the memo:
every figure must be the same.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import save_results

from sdtune.config import load_config, preset_names
from sdtune.estimate import estimate, memtrack

GIB = 2**30
HERE = Path(__file__).resolve().parents[1]
ASKED = [("sd15", "rtx3050"), ("sdxl", "sdxl-8gb")]  # (model, preset) of the fresh-process timings
PUBLISHED = [  # (plan, --set overrides on rtx2070 (fp16), published GB)
    ("fp16 + checkpointing + 8-bit Adam", ["memory.optimizer=adamw8bit", "memory.gradient_checkpointing=true"], 9.92),
    ("fp16 + checkpointing + AdamW", ["memory.gradient_checkpointing=true"], 15.79),
    ("fp16 + AdamW", ["memory.gradient_checkpointing=false"], 17.7),
]
WARM = [("rtx2070", "sd15"), ("rtx3050", "sd15"), ("rtx3080", "sd15"), ("rtx4090", "sd15"), ("sdxl-8gb", "sdxl")]
VARIANTS = [("rtx3050", "sd15", {}), ("sdxl-8gb", "sdxl", {}), ("rtx2070", "sd15", {"frozen_on_device": False}),
            ("rtx3080", "sd21", {}), ("rtx4090", "sd15", {"gpus": 2}), ("rtx3050", "sd15", {"device": "cpu"})]


def fresh(tree: Path, args: list[str], cache: Path) -> float:
    """Seconds of `python -m sdtune ARGS` run from `tree` in a new process, its cache folder `cache`."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(tree), "XDG_CACHE_HOME": str(cache)}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "sdtune", *args], check=True, capture_output=True, cwd=tree, env=env)
    return time.perf_counter() - started


def fresh_processes(baseline: Path | None, rounds: int) -> dict:
    """{row label: [seconds each round]}, the kinds interleaved within each round."""
    times: dict[str, list[float]] = {}
    tmp = Path(tempfile.mkdtemp(prefix="estimate-speed-"))
    fresh(HERE, ["--help"], tmp / "warm-up")  # the libraries' files into the page cache before anything is timed
    for n in range(rounds):
        for model, preset in ASKED:
            args = ["estimate-vram", "--model", model, "--preset", preset, "--json"]
            cache = tmp / f"{n}-{model}"
            kinds = [("baseline", baseline)] if baseline else []
            for kind, tree in [*kinds, ("first", HERE), ("again", HERE)]:
                times.setdefault(f"{model} {preset}: {kind}", []).append(fresh(tree, args, cache if tree == HERE
                                                                                 else tmp / f"{n}-base"))
        times.setdefault("sdtune --help", []).append(fresh(HERE, ["--help"], tmp / "help"))
    return times


def print_fresh(times: dict, baseline: Path | None) -> dict:
    medians = {label: statistics.median(runs) for label, runs in times.items()}
    rounds = len(next(iter(times.values())))
    print(f"fresh process, median of {rounds} (s)" + (f"; baseline: {baseline}" if baseline else ""))
    for label, median in medians.items():
        model_preset = label.split(": ")[0]
        base = medians.get(f"{model_preset}: baseline")
        ratio = f"  {median / base:.2f}x baseline" if base and not label.endswith("baseline") else ""
        runs = " ".join(f"{s:.2f}" for s in times[label])
        print(f"  {label:32s} {median:6.2f}{ratio:18s} ({runs})")
    return {label: round(median, 2) for label, median in medians.items()}


def warm_presets() -> dict:
    """Each GPU preset's SD1.5 estimate in this process, with the meta-op memo (emptied first) and without it,
    interleaved; then SDXL's sdxl-8gb plan the same way."""
    rows, kept = {}, memtrack._shape_only_ops
    estimate(*load_config("rtx3050"), "sd15")  # imports, and the memo of SD1.5's signatures
    print("\nwarm, in this process (s): with the meta-op memo (emptied first, as in a fresh process) | without")
    for preset, model in WARM:
        cfg, info = load_config(preset)
        seconds = {}
        for memo in (True, False):
            memtrack._OUTPUTS.clear()
            memtrack._shape_only_ops = kept if memo else frozenset
            result = estimate(cfg, info, model)
            seconds[memo] = result.seconds
        memtrack._shape_only_ops = kept
        rows[f"warm, {preset} (s)"] = {"memo": seconds[True], "no memo": seconds[False]}
        print(f"  {preset:9s} {seconds[True]:5.2f} | {seconds[False]:5.2f}  total {result.total / GIB:5.2f} GiB, "
              f"card {info.vram_gib:g} GB")
    return rows


def published() -> dict:
    rows = {}
    print("\nplan (SD1.5 UNet, 512 px, batch 1, frozen parts off the GPU) | published | estimate total")
    for label, sets, gb in PUBLISHED:
        cfg, info = load_config("rtx2070", ["memory.optimizer_offload=none", *sets])
        result = estimate(cfg, info, "sd15", frozen_on_device=False)
        error = result.total / 1e9 / gb - 1
        rows[label] = {"published_gb": gb, "estimate_gb": round(result.total / 1e9, 2), "error": round(error, 3)}
        print(f"  {label:36s} {gb:6.2f} GB  {result.total / 1e9:6.2f} GB ({error:+.0%})")
    return rows


def check() -> bool:
    """Every shipped preset and `VARIANTS` estimated with the meta-op memo and without: the same figures."""
    kept, same = memtrack._shape_only_ops, True
    print("\nfigures with the meta-op memo against without it (seconds aside)")
    for name, model, options in [(name, None, {}) for name in preset_names()] + VARIANTS:
        cfg, info = load_config(name)
        figures = []
        for ops in (kept, frozenset):
            memtrack._shape_only_ops = ops
            figures.append(json.dumps({**estimate(cfg, info, model, **options).to_dict(), "seconds": 0}))
        memtrack._shape_only_ops = kept
        same &= figures[0] == figures[1]
        print(f"  {name:14s} {model or '':5s} {options!s:28s} {'same' if figures[0] == figures[1] else 'DIFFERENT'}")
    return same


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", type=Path, help="a checkout to time the same commands from, side by side")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--check", action="store_true", help="compare every preset's figures with and without the memo")
    args = parser.parse_args()
    times = fresh_processes(args.baseline.resolve() if args.baseline else None, args.rounds)
    rows = {"fresh": print_fresh(times, args.baseline), **warm_presets(), **published()}
    if args.check:
        rows["memo changes no figure"] = check()
    save_results("estimate_speed", rows)
    if args.check and not rows["memo changes no figure"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
