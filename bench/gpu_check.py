"""GPU check: each memory plan trains a random SD1.5-architecture model for real, under its card's memory cap.

    python bench/gpu_check.py                              # CUDA: every plan, sd15 at 512 px, ~5 min on an H200
    python bench/gpu_check.py --plans baseline,rtx3050 --steps 10
    python bench/gpu_check.py --device cpu --arch tiny     # dry run of the plumbing on the CPU, ~1 min

Every plan runs the real loop (`sdtune.trainer.train`, as `sdtune train` calls it) in a fresh subprocess,
so peak statistics and the cap are per plan. The cap simulates the preset's card:
`torch.cuda.set_per_process_memory_fraction(vram_gib * 2**30 / total_memory)`, set before anything
touches CUDA memory. It bounds torch's allocator only; a real card also loses ~0.3-0.5 GiB to the CUDA
context, so a plan fits a real card when its peak reserved memory stays that much below the cap. The
overrides make every plan comparable: batch 1, no accumulation, no warmup, no samples or single file.
The end-of-run checkpoint and pipeline export (gigabytes of disk writes, not training) are skipped unless
`--with-saves`. Seconds per step exclude the warm-up steps.

Results: `$OUT/gpu_check.json` when OUT is set (the device tool's output folder), else
`bench/results/gpu_check.json`, rewritten after every plan; a markdown table on stdout.

On the project's lent GPU machine (diffusers is missing there: its wheel travels in the git-ignored `.whl/`;
see bench/README.md for how to fetch it), call the device tool's `run` with carry [".whl"], timeout_s 540
and this command:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:. HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 && timeout 500 python3 bench/gpu_check.py
"""  # noqa: E501

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without `pip install -e .`
GIB = 2**30


@dataclass(frozen=True)
class PlanSpec:
    preset: str
    overrides: tuple[str, ...] = ()
    capped: bool = True               # run under the preset's [preset] vram_gib
    max_timed_steps: int | None = None  # for slow tiers: fewer timed steps than --steps
    about: str = ""


PLANS = {
    "baseline": PlanSpec("rtx3050", ("memory.optimizer_offload=none", "memory.param_offload=none"), capped=False,
                         about="rtx3050 without offload, uncapped: the speed reference"),
    "rtx3050": PlanSpec("rtx3050", about="AdamW offloaded to host RAM"),
    "rtx3050-params-cpu": PlanSpec("rtx3050", ("memory.param_offload=cpu",), about="UNet weights streamed too"),
    "rtx2070": PlanSpec("rtx2070", about="fp16 with loss scaling"),
    "rtx3080": PlanSpec("rtx3080"),
    "rtx4090": PlanSpec("rtx4090"),
    "rtx3050-nvme": PlanSpec("rtx3050", ("memory.optimizer_offload=nvme", "memory.offload_dir={offload_dir}"),
                             max_timed_steps=5, about="AdamW state streamed from disk (5 timed steps)"),
    "cpu": PlanSpec("cpu", ("memory.precision=fp32",), capped=False, about="the CPU preset (dry runs)"),
}
DEFAULT_PLANS = {"cuda": [p for p in PLANS if p != "cpu"], "cpu": ["cpu"] + [p for p in PLANS if p != "cpu"]}
APPLIED = ("precision", "gradient_checkpointing", "attention", "optimizer_offload", "param_offload")

# (plan, what, row key, limit): the targets this check exists to measure; a ratio goal is a lower bound.
GOALS = [
    ("rtx3050", "peak reserved <= 6 GiB", "peak_reserved_bytes", 6 * GIB),
    ("rtx3050-params-cpu", "peak reserved <= 2 GiB", "peak_reserved_bytes", 2 * GIB),
    ("rtx3050", "CPU optimizer offload >= 0.85x baseline speed", "speed_vs_baseline", 0.85),
]


# ---------------------------------------------------------------------------------------------------------
# The child: one plan in a fresh process


def _peaks(device: str) -> dict:
    import torch

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    if device != "cuda":
        return {"host_peak_rss_bytes": rss}
    return {"peak_reserved_bytes": torch.cuda.max_memory_reserved(),
            "peak_allocated_bytes": torch.cuda.max_memory_allocated(), "host_peak_rss_bytes": rss}


def _cap(device: str, vram_gib: float) -> float | None:
    """Cap torch's CUDA allocator at `vram_gib`; must come before the first CUDA allocation."""
    import torch

    if device != "cuda" or not vram_gib:
        return None
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, vram_gib * GIB / total))
    return vram_gib


def _skip_saves() -> None:
    """Make the end-of-run checkpoint and pipeline export no-ops: disk writes, not training."""
    from sdtune import export, trainer

    if hasattr(trainer, "_save"):
        trainer._save = lambda run: None
    export.export_pipeline = lambda components, out_dir: Path(out_dir)


def _estimate(cfg, info, device: str) -> dict:
    """The estimator's figure for this plan (the model traced on the meta device), to set beside the
    measured peak; its failure is a column of the report, not the end of the measurement."""
    try:
        from sdtune.estimate import estimate

        result = estimate(cfg, info, device="cuda" if device == "cuda" else "cpu")
        return {"estimate_reserved_bytes": result.peak_reserved, "estimate_total_bytes": result.total}
    except Exception as exc:
        return {"estimate_failure": f"{type(exc).__name__}: {exc}"[:200]}


def child(spec_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    device, result_path = spec["device"], Path(spec["result"])
    row: dict = {"status": "error", "message": "did not start", "step_seconds": []}

    def save(**values) -> None:
        row.update(values)
        result_path.write_text(json.dumps(row))

    import torch

    if device == "cpu":
        torch.set_num_threads(1)  # tiny models run far faster on one thread (DESIGN.md)
    cfg = None
    try:
        from sdtune.config import load_config
        from sdtune.trainer import train

        cfg, info = load_config(spec["preset"], spec["overrides"])
        save(cap_gib=_cap(device, info.vram_gib) if spec["capped"] else None, message="")
        if device == "cuda":
            props = torch.cuda.get_device_properties(0)
            save(gpu=props.name, gpu_total_bytes=props.total_memory)
        if not spec["with_saves"]:
            _skip_saves()

        def progress(run, seconds_per_step) -> None:
            done = sum(row["step_seconds"])
            save(steps_done=run.step, step_seconds=row["step_seconds"] + [run.seconds - done], **_peaks(device))

        summary = train(cfg, info, spec["data"], spec["out"], log=lambda line: print(line, flush=True),
                        progress=progress)
        save(status="ok", trainer_seconds_per_step=summary["seconds_per_step"],
             skipped_steps=summary["skipped_steps"], applied={k: summary.get(k) for k in APPLIED}, **_peaks(device))
    except Exception as exc:  # a plan that fails is a row of the report, not the end of the check
        traceback.print_exc()
        first = (str(exc).splitlines() or [""])[0]
        oom = isinstance(exc, torch.OutOfMemoryError) or "out of memory" in first.lower()
        save(status="OOM" if oom else "error", message=f"{type(exc).__name__}: {first}"[:300], **_peaks(device))
    if cfg is not None:
        save(**_estimate(cfg, info, device))


# ---------------------------------------------------------------------------------------------------------
# The parent: prepare the model and images once, run each plan, judge and report


def _overrides(spec: PlanSpec, args, model: Path, offload_dir: Path) -> list[str]:
    steps = min(args.steps, spec.max_timed_steps or args.steps)
    common = [f"model.pretrained={model}", f"data.resolution={args.resolution}", "train.batch_size=1",
              f"train.max_steps={args.warmup + steps}", "train.gradient_accumulation_steps=1",
              "train.lr_warmup_steps=0", "output.checkpoint_every=0", "output.single_file=false",
              "output.sample_every=0"] + (["memory.device=cpu"] if args.device == "cpu" else [])
    return common + [item.format(offload_dir=offload_dir) for item in spec.overrides] + args.set


def _tail(path: Path, lines: int = 15) -> list[str]:
    text = path.read_text(errors="replace").splitlines() if path.exists() else []
    return [line for line in text if line.strip()][-lines:]


def run_plan(name: str, args, work: Path, model: Path, images: Path, timeout: float) -> dict:
    spec = PLANS[name]
    plan_dir = work / name
    offload_dir = plan_dir / "offload"
    offload_dir.mkdir(parents=True)
    child_spec = {"device": args.device, "preset": spec.preset, "capped": spec.capped,
                  "overrides": _overrides(spec, args, model, offload_dir), "data": str(images),
                  "out": str(plan_dir / "out"), "result": str(plan_dir / "result.json"),
                  "with_saves": args.with_saves}
    (plan_dir / "spec.json").write_text(json.dumps(child_spec))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    started, returncode = time.time(), None
    with open(plan_dir / "log.txt", "w") as log:
        try:
            returncode = subprocess.run([sys.executable, __file__, "--child", str(plan_dir / "spec.json")],
                                        stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            pass
    result = plan_dir / "result.json"
    row = json.loads(result.read_text()) if result.exists() else {"status": "error", "step_seconds": []}
    if returncode is None:
        row.update(status="timeout", message=f"stopped after {timeout:.0f} s, {len(row['step_seconds'])} steps")
    elif returncode != 0 or not result.exists():
        last = (_tail(plan_dir / "log.txt", 1) or ["no output"])[0]
        row.update(status="error", message=f"exit code {returncode}: {last}"[:300])
    row.update(plan=name, preset=spec.preset, overrides=list(spec.overrides), about=spec.about,
               wall_seconds=round(time.time() - started, 1), seconds_per_step=_seconds_per_step(row, args.warmup))
    if row["status"] != "ok":
        row["log_tail"] = _tail(plan_dir / "log.txt")
    shutil.rmtree(plan_dir / "out", ignore_errors=True)
    shutil.rmtree(offload_dir, ignore_errors=True)
    return row


def _seconds_per_step(row: dict, warmup: int) -> float | None:
    times = row.get("step_seconds") or []
    timed = times[warmup:] or times[1:]
    return round(statistics.mean(timed), 4) if timed else None


def judge(rows: list[dict], dry_run: bool = False) -> list[dict]:
    """Add speed_vs_baseline to every row; return the goals with their measured values and verdicts (none in
    a CPU dry run, whose numbers say nothing about a GPU)."""
    measured = {row["plan"]: row for row in rows if row["status"] == "ok"}
    base = measured.get("baseline", {}).get("seconds_per_step")
    for row in rows:
        mine = measured.get(row["plan"]) is row and row.get("seconds_per_step")
        row["speed_vs_baseline"] = round(base / row["seconds_per_step"], 3) if base and mine else None
        if row.get("estimate_reserved_bytes") and row.get("peak_reserved_bytes"):
            row["estimate_error"] = round(row["estimate_reserved_bytes"] / row["peak_reserved_bytes"] - 1, 3)
    verdicts = []
    for plan, what, key, limit in GOALS:
        value = measured.get(plan, {}).get(key)
        at_least = key == "speed_vs_baseline"
        passed = None if value is None or dry_run else (value >= limit if at_least else value <= limit)
        verdicts.append({"plan": plan, "goal": what, "value": value, "passed": passed})
    errors = [abs(row["estimate_error"]) for row in measured.values() if row.get("estimate_error") is not None]
    worst = max(errors) if errors else None
    verdicts.append({"plan": "every plan", "goal": "estimate within 10% of peak reserved", "value": worst,
                     "passed": None if worst is None or dry_run else worst <= 0.10})
    return verdicts


def _gib(value) -> str:
    return "-" if value is None else f"{value / GIB:.2f}"


def _num(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table(meta: dict, rows: list[dict], goals: list[dict]) -> str:
    head = ["plan", "cap GiB", "status", "peak reserved GiB", "peak allocated GiB", "host peak RSS GiB", "s/step",
            "speed vs baseline", "estimate GiB", "estimate error", "what"]
    lines = [f"## sdtune GPU check, {meta['date']}", "",
             f"{meta['gpu']}; torch {meta['torch']}, diffusers {meta['diffusers']}, transformers "
             f"{meta['transformers']}; {meta['arch']} at {meta['resolution']} px, batch 1, {meta['warmup']} "
             f"warm-up + {meta['steps']} timed steps; {meta['wall_seconds']:.0f} s in all", "",
             "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in rows:
        status = row["status"] + (f": {row['message']}" if row.get("message") and row["status"] != "ok" else "")
        cells = [row["plan"], _num(row.get("cap_gib"), "g"), status.replace("|", "/"),
                 _gib(row.get("peak_reserved_bytes")), _gib(row.get("peak_allocated_bytes")),
                 _gib(row.get("host_peak_rss_bytes")), _num(row.get("seconds_per_step"), ".3f"),
                 _num(row.get("speed_vs_baseline"), ".2f")]
        error = row.get("estimate_error")
        cells += [_gib(row.get("estimate_reserved_bytes")), "-" if error is None else f"{error:+.0%}"]
        lines.append("| " + " | ".join(cells + [row["about"]]) + " |")
    lines += ["", "| goal | plan | measured | verdict |", "| --- | --- | --- | --- |"]
    for goal in goals:
        value = goal["value"]
        if value is None:
            shown = "-"
        elif "estimate" in goal["goal"]:
            shown = f"worst {value:.0%}"
        else:
            shown = f"{value:.2f}x" if "speed" in goal["goal"] else f"{value / GIB:.2f} GiB"
        verdict = {True: "PASS", False: "FAIL", None: "not judged" if meta["device"] == "cpu" else "not measured"}[
            goal["passed"]]
        lines.append(f"| {goal['goal']} | {goal['plan']} | {shown} | {verdict} |")
    return "\n".join(lines)


def _versions() -> dict:
    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "missing"

    return {name: version(name) for name in ("torch", "diffusers", "transformers")}


def prepare_model(args, work: Path) -> Path:
    if args.model:
        return Path(args.model)
    if args.arch == "tiny":
        from sdtune.testing import save_tiny_pipeline

        return save_tiny_pipeline(work / "model")
    from sdtune.archs import build_random_pipeline

    folder = build_random_pipeline(args.arch, work / "model", device=args.device)
    if args.device == "cuda":
        import torch

        torch.cuda.empty_cache()  # the children need the memory; this process keeps only its context
    return folder


def filesystem(path: Path) -> str:
    """The file system type under `path` (tmpfs would make the NVMe plan measure RAM, not a disk)."""
    try:
        mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return "unknown"
    path = str(path.resolve())
    inside = [(point, kind) for point, kind in mounts if path == point or path.startswith(point.rstrip("/") + "/")]
    return max(inside, key=lambda m: len(m[0]))[1] if inside else "unknown"


def output_path() -> Path:
    folder = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "bench" / "results"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / "gpu_check.json"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--plans", help=f"comma-separated, from {', '.join(PLANS)} (default: all for the device)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per plan (default 20; 3 on the CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 3; 1 on the CPU)")
    parser.add_argument("--resolution", type=int, default=None, help="pixels (default 512; 64 on the CPU)")
    parser.add_argument("--arch", default=None, choices=["sd15", "sd21", "tiny"],
                        help="random model to build (default sd15; tiny on the CPU)")
    parser.add_argument("--model", help="use this diffusers folder instead of building a random one")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="one more override for every plan (repeatable), as `sdtune train --set`")
    parser.add_argument("--budget", type=float, default=450, help="seconds for everything; later plans are skipped")
    parser.add_argument("--with-saves", action="store_true", help="keep the end-of-run checkpoint and export")
    parser.add_argument("--workdir", default=None, help="parent folder of the scratch folder (default: temp)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (model, logs)")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cpu = args.device == "cpu"
    for key, gpu_value, cpu_value in (("steps", 20, 3), ("warmup", 3, 1), ("resolution", 512, 64),
                                      ("arch", "sd15", "tiny")):
        if getattr(args, key) is None:
            setattr(args, key, cpu_value if cpu else gpu_value)
    args.plans = args.plans.split(",") if args.plans else DEFAULT_PLANS[args.device]
    unknown = [p for p in args.plans if p not in PLANS]
    if unknown:
        parser.error(f"unknown plan(s) {', '.join(unknown)}; choose from {', '.join(PLANS)}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        return child(args.child)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA GPU is visible; use --device cpu --arch tiny for a dry run")
    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="sdtune-gpu-check-", dir=args.workdir))
    from sdtune.testing import make_image_folder

    model = prepare_model(args, work)
    images = make_image_folder(work / "images", count=8, size=args.resolution)
    print(f"model and images ready in {time.time() - started:.0f} s ({work})", flush=True)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), **_versions(),
            "device": args.device, "arch": args.arch if not args.model else args.model, "resolution": args.resolution,
            "steps": args.steps, "warmup": args.warmup, "gpu": "CPU dry run (no GPU, no caps)",
            "workdir_filesystem": filesystem(work), "extra_overrides": args.set}
    rows: list[dict] = []
    for name in args.plans:
        left = args.budget - (time.time() - started)
        if left < 30:
            rows.append({"plan": name, "status": "skipped", "message": "time budget spent", "about": PLANS[name].about})
        else:
            rows.append(run_plan(name, args, work, model, images, timeout=left - 10))
        row = rows[-1]
        print(f"{name}: {row['status']} {row.get('message', '')} s/step={row.get('seconds_per_step')} "
              f"reserved={_gib(row.get('peak_reserved_bytes'))} GiB", flush=True)
        if row.get("gpu"):
            meta["gpu"] = f"{row['gpu']} ({row['gpu_total_bytes'] / GIB:.1f} GiB)"
        meta["wall_seconds"] = round(time.time() - started, 1)
        goals = judge(rows, dry_run=args.device == "cpu")
        output_path().write_text(json.dumps({"meta": meta, "goals": goals, "plans": rows}, indent=2) + "\n")
    report = table(meta, rows, goals)
    output_path().with_suffix(".md").write_text(report + "\n")
    print("\n" + report)
    print(f"\nwrote {output_path()} and {output_path().with_suffix('.md')}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
