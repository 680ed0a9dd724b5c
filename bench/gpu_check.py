"""The GPU check in one command: the versions first, then the rows most worth having, each written the moment it
exists, none started without the seconds it may take, and at the end what remains and the command that runs it.

    python bench/gpu_check.py --budget 520               # a CUDA machine; rows go to $OUT, else bench/results/
    python bench/gpu_check.py --dry-run --budget 520     # anywhere, at once: the order, each row's assumed
                                                         # seconds and their running sum against the budget
    python bench/gpu_check.py --rows race-nvme,compile-blocks --budget 400   # the rows a first run left
    python bench/gpu_check.py --cpu --rows rtx3050,race-canary --budget 600  # the plumbing on the CPU and
                                                         # sdtune-tiny (64 px); GPU-only tests are skipped

The rows, most valuable first: the 8 GB full fine-tunes (`rtx3050` on SD1.5, `sdxl-8gb`), then every other
preset (each `sdtune train` under its card's memory cap beside `sdtune estimate-vram --json`: the estimate
against `torch.cuda.max_memory_reserved`, bench/gpu_plans.py), then the race pre-flight (a planted race the
delays must show, then each asynchronous offload path against `SDTUNE_OFFLOAD_SYNC=1` with the copy streams
and the compute stream delayed: tests/gpu/), then `rtx3050` with `memory.compile=blocks`. A row's seconds
are what it may take on a GPU, its random model's build included when it is the first to need it; they are
its timeout too, so the sum never overruns the budget. Written to gpu_check.json and .md (the table) and
gpu_check.log (each row's last output lines).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_plans  # noqa: E402  (the plan rows: the same command lines and files)

ROOT = Path(__file__).resolve().parents[1]
BUILD = gpu_plans.BUILD_SECONDS  # a random fp32 model initialised on the GPU and written to disk (~4 / ~14 GB)
OVERHEAD = 5  # seconds of the budget for the versions and the writes, before and between the rows
STEPS = 3  # optimizer steps a plan row trains: the first is warm-up, s/step is read from the rest


@dataclass(frozen=True)
class Row:
    name: str
    seconds: int  # what it may take on a GPU once its model exists: its timeout
    model: str | None = None  # "sd" or "sdxl": built by the first row that needs it
    plan: str = ""  # a preset: a gpu_plans row
    sets: tuple = ()  # its extra --set values
    test: str = ""  # else a pytest node of tests/gpu


def _race(case: str) -> Row:
    return Row(f"race-{case}", 200, "sd", test=f"tests/gpu/test_async_equals_sync.py::"
               f"test_the_asynchronous_copies_give_what_synchronous_ones_give[cuda-{case}]")


ROWS = [Row("rtx3050", 120, "sd", "rtx3050"), Row("sdxl-8gb", 270, "sdxl", "sdxl-8gb"),
        *[Row(p, 120, "sd", p) for p in ("rtx4090", "rtx2070", "rtx3080", "lora-6gb", "lora-4gb")],
        *[Row(p, 210, "sdxl", p) for p in ("sdxl-4gb", "sdxl-12gb", "sdxl-16gb", "sdxl-24gb", "sdxl-lora-8gb")],
        Row("race-canary", 40, test="tests/gpu/test_delay_streams.py::test_a_missing_wait_is_seen_under_the_delay"),
        *[_race(c) for c in ("weight-streaming", "bf16-clip", "ema-step-in-backward", "bf16-step-in-backward",
                             "nvme", "fp16")],
        Row("compile-blocks", 240, "sd", "rtx3050", ("memory.compile=blocks",))]


def needs(row: Row, built: set) -> int:
    """Seconds `row` may take now: its own, and its model's build if no earlier row built it."""
    return row.seconds + (BUILD[row.model] if row.model and row.model not in built else 0)


def remaining(rows: list[Row]) -> int:
    """Seconds the rows not run would take together on a fresh machine, each model built once."""
    return sum(row.seconds for row in rows) + sum(BUILD[m] for m in {r.model for r in rows} - {None})


def schedule(rows: list[Row], budget: float, run, write, clock=time.monotonic, given=()) -> list[dict]:
    """Run each row that fits what is left of `budget` (run(row, seconds) -> its result; it builds the model
    unless `given`), list the others as not run; `write(results, rows_left)` after every row."""
    started, built, results, left = clock(), set(given), [], []
    for row in rows:
        seconds, free = needs(row, built), budget - (clock() - started)
        if seconds > free:
            left.append(row)
            results.append({"row": row.name, "status": "not run", "assumed_s": seconds,
                            "message": f"needs {seconds} s, {max(free, 0):.0f} s left"})
        else:
            began = clock()
            result = run(row, seconds)
            built |= {row.model} - {None}
            results.append({"row": row.name, "assumed_s": seconds, **result, "wall_s": round(clock() - began, 1)})
        write(results, left)
    return results


def versions() -> dict:
    """torch, CUDA, cuDNN, the driver, the GPU and the libraries sdtune runs on, from a child process (this one
    holds no CUDA context: the rows' memory caps see the whole card)."""
    code = """import json, importlib.metadata as m, platform, torch
found = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
         "cudnn": torch.backends.cudnn.version(), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available()
         else None, "gpu_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
         if torch.cuda.is_available() else None}
for name in ("diffusers", "transformers", "peft", "accelerate", "bitsandbytes", "safetensors", "xformers"):
    try:
        found[name] = m.version(name)
    except m.PackageNotFoundError:
        found[name] = "not installed"
print(json.dumps(found))"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    found = json.loads(done.stdout) if done.returncode == 0 else {"error": done.stderr.strip()[-300:]}
    smi = shutil.which("nvidia-smi")
    if smi:
        query = [smi, "--query-gpu=driver_version,name,memory.total", "--format=csv,noheader"]
        found["nvidia-smi"] = subprocess.run(query, capture_output=True, text=True, timeout=60).stdout.strip()
    found["sdtune_commit"] = os.environ.get("GPU_CHECK_COMMIT") or _commit()
    return found


def _commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


class Runner:
    """Runs a row on CUDA: builds its random model the first time (or takes --sd-model / --sdxl-model), then
    trains its plan (gpu_plans.train) or runs its pytest node, within the row's seconds."""

    def __init__(self, args):
        self.args, self.models, self.log = args, {}, Path(args.out) / "gpu_check.log"
        self.plans = argparse.Namespace(dry_run=args.cpu, workdir=args.workdir, steps=STEPS, extra=(),
                                        sd_model=args.sd_model, sdxl_model=args.sdxl_model)

    def __call__(self, row: Row, seconds: float) -> dict:
        started = time.monotonic()
        if row.model and row.model not in self.models:
            self.models[row.model] = gpu_plans.model_for(self.plans, row.model, Path(self.args.workdir))
        model = self.models.get(row.model)
        if row.model and not isinstance(model, str):  # its build failed, or --cpu has no SDXL model
            return {"status": "not run", "message": f"no {row.model} model: {str(model or '--sdxl-model')[:200]}"}
        left = seconds - (time.monotonic() - started)
        return self.plan(row, model, left) if row.plan else self.pytest(row, model, left)

    def plan(self, row: Row, model: str, seconds: float) -> dict:
        work = Path(self.args.workdir) / row.name
        work.mkdir(parents=True, exist_ok=True)
        self.plans.extra = row.sets
        result = gpu_plans.train(self.plans, row.plan, model, work, seconds)
        shutil.rmtree(work, ignore_errors=True)  # the nvme tier's state file: 31 GB for SDXL
        self._log(row, result.get("message", ""))
        return result

    def pytest(self, row: Row, model: str | None, seconds: float) -> dict:
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # carried wheels too
        env = {**os.environ, "GPU_CHECK_SD15": model or "", "PYTHONPATH": path}
        command = [sys.executable, "-m", "pytest", "-q", "-x", "-rs", "--basetemp",
                   str(Path(self.args.workdir) / f"pytest-{row.name}"), row.test]
        # its own process group: at the timeout its `sdtune train` children stop with it, off the GPU
        child = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True, start_new_session=True)
        try:
            out, _ = child.communicate(timeout=seconds)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            out, _ = child.communicate()
            self._log(row, out)
            return {"status": "timeout", "message": " / ".join(out.strip().splitlines()[-2:])[-300:]}
        shutil.rmtree(Path(self.args.workdir) / f"pytest-{row.name}", ignore_errors=True)
        self._log(row, out)
        return {"status": pytest_status(child.returncode, out), "message": _failure(out)}

    def _log(self, row: Row, text: str) -> None:
        with self.log.open("a") as log:
            log.write(f"## {row.name}\n" + "\n".join(text.strip().splitlines()[-60:]) + "\n\n")


def pytest_status(returncode: int, stdout: str) -> str:
    last = (stdout.strip().splitlines() or [""])[-1]
    if returncode == 0:
        return "skipped" if "skipped" in last and "passed" not in last else "ok"
    return "failed" if "failed" in last else "error"


def _failure(stdout: str) -> str:
    """The assertion a failed pytest row stopped at (its `E ` lines), else nothing."""
    lines = [line[1:].strip() for line in stdout.splitlines() if line.startswith("E ")]
    return " / ".join(lines[:3])[:300]


def _cell(value) -> str:
    return "-" if value is None else str(value).replace("|", "/")


def within(row: dict) -> str | None:
    """Whether the estimate is within the estimator's goal of the peak CUDA reserved: max(10%, 256 MiB)."""
    peak, guess = row.get("peak_memory_bytes"), row.get("estimate_reserved_bytes")
    if not (peak and guess) or row.get("peak_memory_kind") != "cuda_max_reserved":  # the CPU's is RSS
        return None
    return "yes" if abs(guess - peak) <= max(0.10 * peak, 256 * 2**20) else "no"


def table(results: list[dict]) -> list[str]:
    head = ["row", "status", "assumed s", "wall s", "s/step", "peak GiB", "estimate GiB", "estimate within",
            "cap GiB", "message"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        peak, guess = r.get("peak_memory_bytes"), r.get("estimate_reserved_bytes")
        cells = [r["row"], r["status"], r.get("assumed_s"), r.get("wall_s"), r.get("seconds_per_step"),
                 f"{peak / gpu_plans.GIB:.2f}" if peak else None, f"{guess / gpu_plans.GIB:.2f}" if guess else None,
                 within(r), r.get("cap_gib"), r.get("message", "")]
        lines.append("| " + " | ".join(map(_cell, cells)) + " |")
    return lines


def writer(out: Path, head: dict):
    """write(results, left): gpu_check.json and .md, the versions on top, what remains at the end."""
    def write(results: list[dict], left: list[Row]) -> None:
        rest = {"seconds": remaining(left), "rows": [row.name for row in left]}
        (out / "gpu_check.json").write_text(json.dumps({**head, "rows": results, "remaining": rest}, indent=1))
        md = [f"GPU check, {head['date']}: " + ", ".join(f"{k} {v}" for k, v in head["versions"].items()), "",
              *table(results), "", _rest_line(rest, head["budget_s"])]
        (out / "gpu_check.md").write_text("\n".join(md) + "\n")
        if results:
            print(table(results)[-1], flush=True)  # the row just written

    return write


def _rest_line(rest: dict, budget: float) -> str:
    if not rest["rows"]:
        return "Remaining: nothing."
    return (f"Remaining: {len(rest['rows'])} rows, about {rest['seconds']} s: "
            f"`python bench/gpu_check.py --rows {','.join(rest['rows'])} --budget {min(rest['seconds'], budget):.0f}`")


def dry_run(rows: list[Row], budget: float) -> None:
    """The order, each row's assumed seconds (its model's build with the first row that needs it) and the
    running sum, as a run whose every row takes exactly its assumed time would go."""
    print(f"| # | row | assumed s | cumulative s | within {budget:.0f} s |\n|---|---|---|---|---|")
    built, total, left = set(), 0, []
    for number, row in enumerate(rows, 1):
        seconds = needs(row, built)
        fits = total + seconds <= budget - OVERHEAD
        total, built = (total + seconds, built | {row.model} - {None}) if fits else (total, built)
        left += [] if fits else [row]
        print(f"| {number} | {row.name} | {seconds} | {total if fits else '-'} | {'yes' if fits else 'no'} |")
    print(_rest_line({"seconds": remaining(left), "rows": [row.name for row in left]}, budget))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=520, help="seconds for every row: none starts late")
    parser.add_argument("--rows", help="comma-separated row names, in this order (default: all, most valuable first)")
    parser.add_argument("--dry-run", action="store_true", help="print the order and assumed seconds; run nothing")
    parser.add_argument("--cpu", action="store_true", help="run the rows on the CPU: sdtune-tiny, 64 px, no GPU test")
    parser.add_argument("--sd-model", help="an SD1.x diffusers folder (default: a random SD1.5, built once)")
    parser.add_argument("--sdxl-model", help="an SDXL diffusers folder (default: a random SDXL, built once)")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "bench" / "results"))
    parser.add_argument("--workdir", default=None, help="models, images and runs (default: a temporary folder)")
    args = parser.parse_args(argv)
    by_name = {row.name: row for row in ROWS}
    unknown = [name for name in (args.rows or "").split(",") if name and name not in by_name]
    if unknown:
        parser.error(f"unknown rows {', '.join(unknown)}; rows: {', '.join(by_name)}")
    args.rows = [by_name[name] for name in args.rows.split(",")] if args.rows else ROWS
    return args


def main(argv=None) -> None:
    import tempfile

    args = parse_args(argv)
    if args.dry_run:
        return dry_run(args.rows, args.budget)
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="gpu-check-")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    head = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "budget_s": args.budget,
            "versions": versions()}
    print(json.dumps(head["versions"]), flush=True)
    write = writer(out, head)
    write([], args.rows)  # the versions, before any row
    given = [kind for kind, folder in (("sd", args.sd_model), ("sdxl", args.sdxl_model)) if folder]
    results = schedule(args.rows, args.budget - OVERHEAD, Runner(args), write, given=given)
    print((out / "gpu_check.md").read_text().splitlines()[-1])
    shutil.rmtree(args.workdir, ignore_errors=True)
    sys.exit(0 if all(r["status"] in ("ok", "not run", "skipped") for r in results) else 1)


if __name__ == "__main__":
    main()
