"""Every shipped memory plan trained for real, each in its own `sdtune train` under its card's memory cap,
beside what `sdtune estimate-vram --json` predicted for it: the rows a GPU session brings back.

    python bench/gpu_plans.py --budget 480                # CUDA: random SD1.5 / SDXL models, most valuable first
    python bench/gpu_plans.py --plans rtx3050,sdxl-8gb --sd-model DIR --sdxl-model DIR
    python bench/gpu_plans.py --dry-run                   # the CPU, the bundled sdtune-tiny: order and timings

It uses only the command line and the files a run leaves (`summary.json`, `metrics.jsonl`): a change inside
sdtune cannot break it unless the product changed for its users too. The cap is
`torch.cuda.set_per_process_memory_fraction` at the preset's card less the CUDA context, set by a few lines
of wrapper before `python -m sdtune` starts (the product has no cap of its own: a real card is one). Each
row is written to `gpu_plans.json` and `.md` (in $OUT when set, else bench/results/) the moment it exists,
and no plan starts without the seconds it may take: what the budget cannot hold is listed as not run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
CONTEXT_GIB = 0.5  # what a real card loses to the CUDA context, outside torch's allocator
# Most valuable first: the 8 GB full fine-tune and SDXL in 8 GB are the product's boldest claims.
PLANS = ["rtx3050", "sdxl-8gb", "sdxl-4gb", "rtx2070", "rtx3080", "rtx4090", "sdxl-12gb", "sdxl-16gb", "sdxl-24gb",
         "lora-6gb", "lora-4gb", "sdxl-lora-8gb"]
SECONDS = {"sd": 120, "sdxl": 300}  # start-up, load, steps and estimate of one plan on a GPU: its timeout
DRY_RUN_SECONDS = 120  # the same on 2 busy CPU cores with sdtune-tiny at 64 px
BUILD_SECONDS = {"sd": 60, "sdxl": 180}  # a random model, built once on the GPU when its first plan runs
# Run as `python -c WRAPPER ARGS...`: the cap, then the CLI as `python -m sdtune ARGS...` would run it.
WRAPPER = """
import faulthandler, os, runpy, sys
faulthandler.dump_traceback_later(float(os.environ["GPU_PLANS_TIMEOUT"]) - 10)  # a hang leaves every stack
cap = float(os.environ["GPU_PLANS_CAP_GIB"])
if cap:
    import torch
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap * 2**30 / total))
sys.argv = ["sdtune", *sys.argv[1:]]
runpy.run_module("sdtune", run_name="__main__")
"""
BUILD = ("import sys; from sdtune.toy.random_pipeline import build_random_pipeline as build; "
         "build(*sys.argv[1:3], device='cuda')")  # a public function: the model a plan trains, in a child


def family(plan: str) -> str:
    return "sdxl" if plan.startswith("sdxl") else "sd"


def _env(**values) -> dict:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # this checkout's sdtune
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **values}


def sdtune(args: list[str], cwd: Path, timeout: float, cap_gib: float = 0.0) -> subprocess.CompletedProcess:
    env = _env(GPU_PLANS_TIMEOUT=str(timeout), GPU_PLANS_CAP_GIB=str(cap_gib))
    return subprocess.run([sys.executable, "-c", WRAPPER, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def resolution(args, plan: str) -> int:
    return 64 if args.dry_run else {"sd": 512, "sdxl": 1024}[family(plan)]


def overrides(args, plan: str) -> list[str]:
    """The same run for every plan: few steps, no checkpoints, samples or single file; the CPU on a dry run;
    then the row's own `--set`s (`args.extra`, e.g. memory.compile=blocks from bench/gpu_check.py)."""
    sets = [f"data.resolution={resolution(args, plan)}", "train.lr_warmup_steps=0",
            "train.gradient_accumulation_steps=1", "output.checkpoint_every=0", "output.sample_every=0",
            "output.single_file=false"]
    return sets + (["memory.device=cpu"] if args.dry_run else []) + list(getattr(args, "extra", ()))


def estimate(args, plan: str, model: str, work: Path, timeout: float) -> dict:
    sets = [flag for value in overrides(args, plan) for flag in ("--set", value)]
    done = sdtune(["estimate-vram", "--model", model, "--preset", plan, *sets, "--json"], work, timeout)
    if done.returncode:
        return {"estimate_error": (done.stderr.strip().splitlines() or ["?"])[-1][:200]}
    (est,) = json.loads(done.stdout)["estimates"]
    return {"card_gib": est["card_gib"], "estimate_reserved_bytes": est["peak_reserved"],
            "estimate_total_bytes": est["total"], "estimate_host_bytes": est["host_ram"]}


def measured(out: Path) -> dict:
    """What the run wrote: summary.json once it finished, metrics.jsonl step by step (also when it did not)."""
    lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").is_file() else []
    records = [json.loads(line) for line in lines if line.strip()]
    row = {"steps": len(records), "losses": [r["loss"] for r in records][:8],
           "peak_memory_bytes": max((r["peak_memory_bytes"] for r in records), default=None)}
    if (out / "summary.json").is_file():
        summary = json.loads((out / "summary.json").read_text())
        row |= {key: summary[key] for key in ("seconds_per_step", "peak_memory_bytes", "peak_memory_kind",
                                              "skipped_steps", "optimizer_offload", "param_offload")}
    return row


def train(args, plan: str, model: str, work: Path, timeout: float) -> dict:
    """The estimate, then the run under the card's cap, within `timeout` seconds for both."""
    started = time.time()
    row = estimate(args, plan, model, work, timeout)
    cap = 0.0 if args.dry_run or not row.get("card_gib") else row["card_gib"] - CONTEXT_GIB
    data = images(Path(args.workdir) / f"images-{resolution(args, plan)}", resolution(args, plan))
    command = ["train", "--preset", plan, "--model", model, "--data", str(data), "--out", str(work / "out"),
               "--max-steps", str(args.steps)] + [f for value in overrides(args, plan) for f in ("--set", value)]
    try:
        done = sdtune(command, work, max(1.0, timeout - (time.time() - started)), cap)
        oom = any(words in done.stderr for words in ("out of GPU memory", "CUDA out of memory"))  # sdtune's, torch's
        status = "ok" if done.returncode == 0 else "OOM" if oom else "error"
        tail = (done.stderr.strip().splitlines() or [""])[-1][:200] if done.returncode else ""
    except subprocess.TimeoutExpired as stopped:
        err = stopped.stderr.decode(errors="replace") if isinstance(stopped.stderr, bytes) else stopped.stderr
        status, tail = "timeout", " / ".join((err or "").strip().splitlines()[-3:])[-300:]
    wall = round(time.time() - started, 1)
    return {**row, "status": status, "message": tail, "cap_gib": cap, "wall_seconds": wall, **measured(work / "out")}


def model_for(args, kind: str, work: Path) -> str | Exception | None:
    """--sd-model / --sdxl-model, else on a dry run sdtune-tiny (SD only, None for SDXL), else a random model
    built now (or why it could not be)."""
    given = args.sd_model if kind == "sd" else args.sdxl_model
    if given or args.dry_run:
        return given or ("sdtune-tiny" if kind == "sd" else None)
    folder = work / f"random-{kind}"
    try:
        subprocess.run([sys.executable, "-c", BUILD, "sd15" if kind == "sd" else "sdxl", str(folder)], env=_env(),
                       check=True, timeout=BUILD_SECONDS[kind])
    except subprocess.SubprocessError as exc:  # its plans are rows that say so; the other family's still run
        return exc
    return str(folder)


def images(folder: Path, side: int) -> Path:
    """Eight noise images with captions: the speed and memory of a step do not depend on what they show."""
    from PIL import Image

    if folder.is_dir():
        return folder
    folder.mkdir(parents=True)
    for i in range(8):
        Image.effect_noise((side, side), 40 + i).convert("RGB").save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a photo of noise number {i}")
    return folder


def _gib(value) -> str:
    return f"{value / GIB:.2f}" if isinstance(value, (int, float)) else "-"


def report(rows: list[dict], path: Path) -> None:
    path.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    head = ["plan", "status", "s/step", "peak GiB", "estimate GiB", "est/peak", "cap GiB", "wall s", "message"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ratio = (f"{r['estimate_reserved_bytes'] / r['peak_memory_bytes']:.2f}"
                 if r.get("peak_memory_bytes") and r.get("estimate_reserved_bytes") else "-")
        cells = [r["plan"], r["status"], str(r.get("seconds_per_step", "-")), _gib(r.get("peak_memory_bytes")),
                 _gib(r.get("estimate_reserved_bytes")), ratio, str(r.get("cap_gib", "-")),
                 str(r.get("wall_seconds", "-")), r.get("message", "").replace("|", "/")]
        lines.append("| " + " | ".join(cells) + " |")
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines if len(rows) == 1 else lines[-1:]), flush=True)  # the table, a row at a time


def run_all(args) -> list[dict]:
    started, rows, models = time.time(), [], {}
    path = Path(args.out) / "gpu_plans"
    for plan in args.plans:
        kind, work = family(plan), Path(args.workdir) / plan
        seconds = DRY_RUN_SECONDS if args.dry_run else SECONDS[kind]
        given = args.dry_run or (args.sd_model if kind == "sd" else args.sdxl_model)
        needs = seconds + (0 if kind in models or given else BUILD_SECONDS[kind])
        left = args.budget - (time.time() - started)
        if needs > left:
            rows.append({"plan": plan, "status": "not run", "message": f"needs {needs} s, {left:.0f} s left"})
            report(rows, path)
            continue
        if kind not in models:
            models[kind] = model_for(args, kind, Path(args.workdir))
        if isinstance(models[kind], Exception) or models[kind] is None:
            why = models[kind] or f"--{kind}-model"
            rows.append({"plan": plan, "status": "not run", "message": f"no {kind} model: {why}"})
        else:
            work.mkdir(parents=True, exist_ok=True)
            rows.append({"plan": plan, **train(args, plan, models[kind], work, seconds)})
        report(rows, path)
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plans", default=",".join(PLANS), help="comma-separated presets, in this order")
    parser.add_argument("--budget", type=float, default=480, help="seconds for everything: no plan starts late")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps a plan (default 6; dry run 2)")
    parser.add_argument("--sd-model", help="an SD1.x/2.x diffusers folder (default: a random SD1.5)")
    parser.add_argument("--sdxl-model", help="an SDXL diffusers folder (default: a random SDXL)")
    parser.add_argument("--dry-run", action="store_true", help="the CPU and sdtune-tiny: the plumbing, quickly")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "bench" / "results"))
    parser.add_argument("--workdir", default=None, help="where models, images and runs go (default: a temp dir)")
    args = parser.parse_args(argv)
    args.plans, args.steps = args.plans.split(","), args.steps or (2 if args.dry_run else 6)
    return args


def main(argv=None) -> None:
    import tempfile

    args = parse_args(argv)
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="gpu-plans-")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    rows = run_all(args)
    sys.exit(0 if all(r["status"] in ("ok", "not run") for r in rows) else 1)


if __name__ == "__main__":
    main()
