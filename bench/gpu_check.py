"""GPU check: a pre-flight of the offload engine's asynchronous paths, then every memory plan trained for real
on a random SD1.5-architecture model under its card's memory cap, then the SDXL plans on a random SDXL.

    python bench/gpu_check.py                              # CUDA: pre-flight + every plan, sd15 at 512 px, ~6 min
    python bench/gpu_check.py --plans rtx3050,rtx3050-repeat --no-preflight --deterministic
    python bench/gpu_check.py --device cpu --arch tiny     # dry run of the plumbing on the CPU, ~3 min

Pre-flight (~30 s, while the SD1.5 model is built): the tiny test model at 64 px, 5 steps per case, with
the asynchronous copies as shipped and with `SDTUNE_OFFLOAD_SYNC=1` (sdtune/offload/streams.py), each
variant in its own subprocess under deterministic kernels (SDPA's math backend, deterministic cuDNN) and
with the engine's buckets and streamed blocks cut to the tiny UNet's scale (else it is one of each, and
nothing overlaps). Each case's fp32 masters (and its EMA, where it keeps one) must be `torch.equal`;
fp16 from a loss scale of 2**24 must also skip steps and stay finite. A difference is a race: the case
FAILs, and the plans still run.

Plans: each runs `sdtune.run.attempt` in a fresh subprocess with its own timeout (90 s, nvme 120 s), under
`torch.cuda.set_per_process_memory_fraction` at the preset's `vram_gib - 0.5` GiB (the CUDA context lives
outside torch's allocator; each row measures that memory too), set before anything touches CUDA memory.
Ten seconds before its timeout a child dumps every thread's stack (faulthandler) into its log, whose tail
goes into the row. Data, forward+backward and optimizer seconds come from the loop's own phase timings
(`SDTUNE_PROFILE=1`, which synchronizes the device at each phase's ends: a few syncs a step to every plan).
baseline, rtx3050, rtx3050-repeat, rtx3050-params-cpu and rtx3050-nvme do the same math (bf16, clipping,
seed 0): their first 5 losses must agree within 1e-3, and the repeat must equal rtx3050 bit for bit. Plans
run torch's default kernels, whose attention backward is not deterministic: if only the repeat differs,
and slightly, rerun the two with `--deterministic` to tell the kernels from a race.

Results: `$OUT/gpu_check.json` and `.md` when OUT is set (the device tool's output folder), else
`bench/results/`, rewritten after the pre-flight and after every plan; the tables also go to stdout.

On the project's lent GPU (diffusers is missing there: its wheel travels in the git-ignored `.whl/`, see
bench/README.md), call the device tool's `run` with carry [".whl"], timeout_s 540 (of the session's 15 device
minutes, which leaves a few for start-up and a rerun of some plans with `--plans ... --no-preflight`) and:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:. HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 && timeout 515 python3 bench/gpu_check.py
"""  # noqa: E501

from __future__ import annotations

import argparse
import dataclasses
import datetime
import faulthandler
import importlib.metadata
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
import warnings
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without `pip install -e .`
sys.path.insert(0, str(ROOT / "tests"))  # the tiny models of the tests support
GIB, MIB = 2**30, 2**20
CONTEXT_GIB = 0.5  # what a real card loses to the CUDA context, outside torch's allocator
STAT_KEYS = ("num_alloc_retries", "num_ooms", "allocated_bytes.all.peak", "inactive_split_bytes.all.peak")


@dataclass(frozen=True)
class PlanSpec:
    preset: str
    overrides: tuple[str, ...] = ()
    capped: bool = True               # run under the preset's vram_gib - CONTEXT_GIB
    max_warmup: int | None = None     # for slow tiers: fewer steps than --warmup / --steps
    max_timed_steps: int | None = None
    timeout: float = 90               # seconds for the whole child: start-up, load, steps, estimate
    about: str = ""
    family: str = "sd"                # "sdxl": the random SDXL model at --sdxl-resolution


PLANS = {
    "baseline": PlanSpec("rtx3050", ("memory.optimizer_offload=none", "memory.param_offload=none"), capped=False,
                         about="rtx3050 without offload, uncapped: the speed reference"),
    "rtx3050": PlanSpec("rtx3050", about="AdamW offloaded to host RAM, clipping"),
    "rtx3050-repeat": PlanSpec("rtx3050", about="rtx3050 again: its losses must equal rtx3050's exactly"),
    "rtx3050-noclip": PlanSpec("rtx3050", ("train.max_grad_norm=0",),
                               about="no clipping: each bucket steps during backward"),
    "rtx3050-params-cpu": PlanSpec("rtx3050", ("memory.param_offload=cpu",), max_timed_steps=10,
                                   about="UNet weights streamed too (10 timed steps)"),
    "rtx2070": PlanSpec("rtx2070", about="fp16 with loss scaling"),
    "rtx4090": PlanSpec("rtx4090", about="full AdamW on the card, no checkpointing"),
    "rtx3050-nvme": PlanSpec("rtx3050", ("memory.optimizer_offload=nvme", "memory.offload_dir={offload_dir}"),
                             max_warmup=1, max_timed_steps=4, timeout=120,
                             about="AdamW state streamed from disk (1 warm-up + 4 timed steps)"),
    "rtx4090-adafactor": PlanSpec("rtx4090", ("memory.optimizer=adafactor",),
                                  about="Adafactor on the card: its factored state"),
    "rtx4090-fused": PlanSpec("rtx4090", ("memory.optimizer=adafactor", "memory.fused_backward=true",
                                          "train.max_grad_norm=0"),
                              about="Adafactor stepped inside backward: no whole-model gradients"),
    "rtx3050-ema": PlanSpec("rtx3050", ("train.ema_decay=0.9999",),
                            about="rtx3050 with the EMA in the host pass: its speed and host RAM"),
    "cpu": PlanSpec("cpu", ("memory.precision=fp32",), capped=False, about="the CPU preset (dry runs)"),
    # SDXL at --sdxl-resolution (1024), after the SD plans: the random SDXL model is built when the first runs
    "sdxl-8gb": PlanSpec("sdxl-8gb", ("memory.offload_dir={offload_dir}",), family="sdxl", max_warmup=1,
                         max_timed_steps=2, timeout=300, about="SDXL, AdamW state in an nvme file (1 + 2 steps)"),
    "sdxl-12gb": PlanSpec("sdxl-12gb", family="sdxl", max_warmup=1, max_timed_steps=3, timeout=240,
                          about="SDXL, AdamW in host RAM, checkpointing (1 + 3 steps)"),
    "sdxl-16gb": PlanSpec("sdxl-16gb", family="sdxl", max_warmup=1, max_timed_steps=3, timeout=240,
                          about="SDXL, AdamW in host RAM, no checkpointing (1 + 3 steps)"),
    "sdxl-24gb": PlanSpec("sdxl-24gb", family="sdxl", max_warmup=1, max_timed_steps=3, timeout=240,
                          about="SDXL under a 24 GiB cap (1 + 3 steps)"),
}
DEFAULT_PLANS = {"cuda": [p for p in PLANS if p != "cpu"], "cpu": ["cpu"] + [p for p in PLANS if p != "cpu"]}
SAME_MATH = ("baseline", "rtx3050", "rtx3050-repeat", "rtx3050-params-cpu", "rtx3050-nvme")  # bf16, clip 1.0, seed 0
APPLIED = ("precision", "gradient_checkpointing", "attention", "optimizer_offload", "param_offload")
GOALS = [  # (plan, what, row key, limit): a speed goal is a lower bound, a memory goal an upper one
    ("rtx3050", "peak reserved <= 6 GiB", "peak_reserved_bytes", 6 * GIB),
    ("rtx3050-params-cpu", "peak reserved <= 2 GiB", "peak_reserved_bytes", 2 * GIB),
    ("rtx3050", "CPU optimizer offload >= 0.85x baseline speed", "speed_vs_baseline", 0.85),
]

# Pre-flight cases: overrides on rtx3050 for the tiny model at 64 px, 5 steps, async against synchronous.
PREFLIGHT = {
    "bf16-clip": ("memory.optimizer_offload=cpu", "train.max_grad_norm=1.0"),
    "bf16-step-in-backward": ("memory.optimizer_offload=cpu", "train.max_grad_norm=0"),
    "nvme": ("memory.optimizer_offload=nvme", "memory.offload_dir={offload_dir}"),
    "weight-streaming": ("memory.param_offload=cpu", "memory.gradient_checkpointing=true",
                         "memory.optimizer_offload=cpu"),
    "fp16-scale-2^24": ("memory.precision=fp16", "memory.optimizer_offload=cpu"),
    "ema-step-in-backward": ("memory.optimizer_offload=cpu", "train.max_grad_norm=0", "train.ema_decay=0.9"),
}
FP16_CASE, PREFLIGHT_STEPS, PREFLIGHT_TIMEOUT = "fp16-scale-2^24", 5, 75
VARIANTS = {"async": {"SDTUNE_OFFLOAD_SYNC": ""}, "sync": {"SDTUNE_OFFLOAD_SYNC": "1"}}  # "" is off


# ---------------------------------------------------------------------------------------------------------
# Children: one plan, or one pre-flight variant, in a fresh process


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"[:300]


def _child_setup(device: str, timeout: float) -> None:
    import torch

    faulthandler.enable()  # a crash in native code leaves its stack in the log, and so does a deadlock:
    faulthandler.dump_traceback_later(max(1.0, timeout - 10), exit=False)  # every thread's, before the kill
    if device == "cpu":
        torch.set_num_threads(1)  # tiny models run far faster on one thread (DESIGN.md)


def _deterministic_kernels(strict: bool) -> None:
    """The same bits on every run. Not strict: ops without a deterministic kernel only warn, so SDPA is held
    to its math backend (flash and memory-efficient backward stay non-deterministic under warn_only)."""
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts: before any matmul
    torch.use_deterministic_algorithms(True, warn_only=not strict)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    for name in () if strict else ("enable_flash_sdp", "enable_mem_efficient_sdp", "enable_cudnn_sdp"):
        if hasattr(torch.backends.cuda, name):
            getattr(torch.backends.cuda, name)(False)


def _failure_status(exc: BaseException) -> str:
    """'OOM' (GPU), 'host OOM' (host RAM or pinned memory) or 'error', by the exception's type."""
    import torch

    from sdtune.errors import HostOutOfMemory
    from sdtune.estimate.fallback import OutOfMemory  # what run.attempt makes of torch.cuda.OutOfMemoryError

    gpu = isinstance(exc, (torch.cuda.OutOfMemoryError, OutOfMemory))  # not torch.OutOfMemoryError: torch>=2.5
    return "host OOM" if isinstance(exc, HostOutOfMemory) else "OOM" if gpu else "error"


def _memory(device: str, others: int, row: dict) -> dict:
    """Peak host RSS; on CUDA the peaks, the allocator's counters and (the largest seen) memory outside
    torch's allocator, less what other processes (the parent's context) held before this child started."""
    import torch

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    if device != "cuda":
        return {"host_peak_rss_bytes": rss}
    stats = torch.cuda.memory_stats()
    free, total = torch.cuda.mem_get_info()
    outside = total - free - torch.cuda.memory_reserved() - others
    return {"host_peak_rss_bytes": rss, "peak_reserved_bytes": torch.cuda.max_memory_reserved(),
            "peak_allocated_bytes": torch.cuda.max_memory_allocated(),
            "outside_torch_bytes": max(outside, row.get("outside_torch_bytes") or 0),
            "memory_stats": {key: stats.get(key) for key in STAT_KEYS}}


def _cap(device: str, vram_gib: float) -> float | None:
    """Cap torch's CUDA allocator at `vram_gib` less the context; must come before the first CUDA allocation."""
    import torch

    if device != "cuda" or not vram_gib:
        return None
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, (vram_gib - CONTEXT_GIB) * GIB / total))
    return vram_gib - CONTEXT_GIB


def _skip_saves() -> None:
    """Make the end-of-run checkpoint and pipeline export no-ops: disk writes, not training."""
    from sdtune import export
    from sdtune.train import loop as trainer

    trainer._save = lambda run: None
    export.export_pipeline = lambda components, out_dir: Path(out_dir)


def _estimate(cfg, info, device: str) -> dict:
    """The estimator's figures for this plan (traced on the meta device); a failure is a column, not the end."""
    try:
        from sdtune.estimate import estimate

        result = estimate(cfg, info, device="cuda" if device == "cuda" else "cpu")
        return {"estimate_reserved_bytes": result.peak_reserved, "estimate_total_bytes": result.total,
                "estimate_host_bytes": result.host_ram}
    except Exception as exc:
        return {"estimate_failure": _first_line(exc)}


def _time_parts() -> dict[str, list[float]]:
    """Each step's phase seconds, from the loop's own profiling (SDTUNE_PROFILE=1: the device synchronized
    at each phase's ends; `sdtune.train.metrics.Phases`), filled by the record of each step."""
    from sdtune.train.metrics import PROFILE_ENV

    os.environ[PROFILE_ENV] = "1"
    return {"data_seconds": [], "forward_backward_seconds": [], "optimizer_seconds": []}


def plan_child(spec: dict) -> None:
    device, result_path = spec["device"], Path(spec["result"])
    row: dict = {"status": "error", "message": "did not start", "step_seconds": [], "losses": []}

    def save(**values) -> None:
        row.update(values)
        result_path.write_text(json.dumps(row))

    _child_setup(device, spec["timeout"])
    if spec["deterministic"]:
        _deterministic_kernels(strict=True)
    try:
        import torch

        from sdtune.config import load_config
        from sdtune.run import attempt
        from sdtune.train import loop as trainer

        cfg, info = load_config(spec["preset"], spec["overrides"])
        save(cap_gib=_cap(device, info.vram_gib) if spec["capped"] else None, message="")
        if device == "cuda":
            props = torch.cuda.get_device_properties(0)
            save(gpu=props.name, gpu_total_bytes=props.total_memory)
        save(**_estimate(cfg, info, device))  # first: a plan that times out still has its estimate
        if not spec["with_saves"]:
            _skip_saves()
        parts = _time_parts()

        record = trainer._record  # called once a step, after the step: the row is saved as the run goes

        def saving_record(run, result, *args):
            for key, seconds in result.phases.items():
                parts[key].append(seconds)
            save(step_seconds=list(run.step_times), losses=run.losses,
                 **{key: list(values) for key, values in parts.items()}, **_memory(device, spec["others"], row))
            return record(run, result, *args)

        trainer._record = saving_record
        summary = attempt(cfg, info, Path(spec["data"]), Path(spec["out"]), log=lambda line: print(line, flush=True))
        save(status="ok", skipped_steps=summary["skipped_steps"], applied={k: summary.get(k) for k in APPLIED},
             **_memory(device, spec["others"], row))
    except Exception as exc:  # a plan that fails is a row of the report, not the end of the check
        traceback.print_exc()
        save(status=_failure_status(exc), message=_first_line(exc))
        try:
            save(**_memory(device, spec["others"], row))
        except Exception as again:  # e.g. a CUDA error that poisoned the context
            print(f"no memory figures after the failure: {_first_line(again)}", flush=True)


def _fine_grained() -> None:
    """Cut the engine's buckets (64 MB), streamed blocks and the blocks that wait for the overlapped step
    (128 MB) to the tiny model's scale, so that its 4 MB UNet has about as many of each as SD1.5 (~50 and
    ~34), not one: else there is no overlap to race."""
    import functools
    import inspect

    from sdtune.offload import ParamStreamer, layout, overlap

    layout.BUCKET_MB = 1 / 16  # read by `partition` when a tier is built (the nvme tier's too)
    overlap.GATE_BYTES = 128 * 2**10  # the blocks whose forward waits for their buckets (overlap_step)
    if "block_bytes" in inspect.signature(ParamStreamer.__init__).parameters:  # the counts go into the report
        ParamStreamer.__init__ = functools.partialmethod(ParamStreamer.__init__, block_bytes=128 * 2**10)


def _preflight_case(name: str, overrides: list[str], data: str, folder: Path) -> dict:
    import torch

    from sdtune.config import load_config
    from sdtune.train import loop as trainer

    cfg, info = load_config("rtx3050", overrides)
    with trainer.prepare(cfg, info, data, str(folder / "out"), resume=False, log=print) as run:  # closes the tier
        if name == FP16_CASE:  # start far above what fp16 holds, so steps overflow; the class the trainer chose
            run = dataclasses.replace(run, scaler=type(run.scaler)(run.plan.device, init_scale=2.0**24))
        trainer.loop(run)
        masters = {key: value.detach().to("cpu", copy=True) for key, value in trainer.fp32_weights(run).items()}
        if run.ema is not None:  # the average, updated in the same host pass: compared like the masters
            masters |= {f"ema/{key}": value.to("cpu", copy=True) for key, value in run.ema.weights().items()}
    torch.save(masters, folder / "masters.pt")
    streamer = run.placement.streamer
    return {"losses": run.losses, "skipped_steps": run.skipped_steps, "masters": str(folder / "masters.pt"),
            "finite": all(bool(torch.isfinite(v).all()) for v in masters.values() if v.is_floating_point()),
            "buckets": len(getattr(run.optimizer, "_buckets", ())), "blocks": len(streamer.units) if streamer else 0,
            "overlap_step": getattr(run.optimizer, "overlap_step", None)}


def preflight_child(spec: dict) -> None:
    import torch

    _child_setup(spec["device"], spec["timeout"])
    _deterministic_kernels(strict=False)
    _skip_saves()
    _fine_grained()
    results: dict = {}
    for name, overrides in spec["cases"].items():
        folder = Path(spec["folder"]) / name
        (folder / "offload").mkdir(parents=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                results[name] = _preflight_case(name, [o.format(offload_dir=folder / "offload") for o in overrides],
                                                spec["data"], folder)
            except Exception as exc:  # a case that raises is a FAIL with its first line
                traceback.print_exc()
                results[name] = {"error": _first_line(exc)}
        results[name]["warnings"] = sorted({str(w.message).splitlines()[0][:200] for w in caught
                                            if "determinis" in str(w.message)})
        Path(spec["result"]).write_text(json.dumps(results))
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------
# The parent: pre-flight, the model and images once, each plan, judge and report


def _start(spec: dict, folder: Path, env: dict | None = None) -> subprocess.Popen:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spec.json").write_text(json.dumps(spec))
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    with open(folder / "log.txt", "w") as log:  # the child keeps its own descriptor
        return subprocess.Popen([sys.executable, __file__, "--child", str(folder / "spec.json")], stdout=log,
                                stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": path, **(env or {})})


def _wait(child: subprocess.Popen, deadline: float) -> int | None:
    """The child's exit code, or None when it ran past `deadline` (then it is killed)."""
    try:
        return child.wait(timeout=max(0.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
        return None


def _tail(path: Path) -> list[str]:
    """The faulthandler dump when there is one (every thread's stack), else the last 15 lines."""
    lines = [line for line in (path.read_text(errors="replace").splitlines() if path.exists() else [])
             if line.strip()]
    dumps = [i for i, line in enumerate(lines) if line.startswith("Timeout (")]
    return lines[dumps[-1]:][:80] if dumps else lines[-15:]


def _exit_message(returncode: int | None, timeout: float, log: Path) -> str:
    if returncode is None:
        return f"stopped at its timeout, {timeout:.0f} s"
    return f"exit code {returncode}: {(_tail(log)[-1:] or ['no output'])[0]}"[:300]


def _common(args, model: Path, resolution: int, steps: int, batch: int | None = None) -> list[str]:
    """The overrides that make runs comparable: no accumulation, no warmup, no samples or single file; the
    preset's own batch size unless `batch` is given (the pre-flight's tiny runs take 1)."""
    return [f"model.pretrained={model}", f"data.resolution={resolution}", f"train.max_steps={steps}",
            "train.gradient_accumulation_steps=1", "train.lr_warmup_steps=0", "output.checkpoint_every=0",
            "output.single_file=false", "output.sample_every=0"] + (
        [f"train.batch_size={batch}"] if batch else []) + (["memory.device=cpu"] if args.device == "cpu" else [])


def start_preflight(args, work: Path, tiny: Path, images: Path) -> dict:
    # SDPA here runs its math backend: deterministic
    common = _common(args, tiny, 64, PREFLIGHT_STEPS, batch=1) + ["memory.attention=sdpa"]
    cases = {name: common + list(overrides) for name, overrides in PREFLIGHT.items()}
    children = {}
    for variant, env in VARIANTS.items():
        folder = work / "preflight" / variant
        spec = {"kind": "preflight", "device": args.device, "cases": cases, "data": str(images),
                "folder": str(folder), "result": str(folder / "result.json"), "timeout": PREFLIGHT_TIMEOUT}
        children[variant] = (_start(spec, folder, env), folder)
    return {"children": children, "at": time.time(), "deadline": time.time() + PREFLIGHT_TIMEOUT}


def _compare(name: str, runs: dict[str, dict]) -> tuple[bool, str]:
    import torch

    for variant, result in runs.items():
        if "error" in result or not result["finite"]:
            return False, f"{variant}: {result.get('error', 'NaN/Inf in the fp32 masters')}"
    a, s = (torch.load(runs[v]["masters"], weights_only=True) for v in VARIANTS)
    differ = [key for key in a if key not in s or not torch.equal(a[key], s[key])]
    if differ or a.keys() != s.keys():
        first = differ[0] if differ else "(names differ)"
        gap = (a[first].float() - s[first].float()).abs().max().item() if first in s else float("nan")
        return False, f"{len(differ)} of {len(a)} master tensors differ, first {first} by up to {gap:.3g}"
    if runs["async"]["losses"] != runs["sync"]["losses"]:
        return False, f"masters equal but losses differ: {runs['async']['losses']} != {runs['sync']['losses']}"
    grain = ", ".join(f"{runs['async'][k]} {k}" for k in ("buckets", "blocks") if runs["async"].get(k))
    detail = f"masters equal ({len(a)} tensors, {grain}), losses equal"
    if name == FP16_CASE and not all(r["skipped_steps"] for r in runs.values()):
        return False, f"no step skipped from a loss scale of 2**24 ({detail})"
    if name == FP16_CASE:
        detail += f", {runs['async']['skipped_steps']} of {PREFLIGHT_STEPS} steps skipped, masters finite"
    return True, detail


def finish_preflight(started: dict) -> dict:
    results, failures = {}, {}
    for variant, (child, folder) in started["children"].items():
        code = _wait(child, started["deadline"])
        result = folder / "result.json"
        results[variant] = json.loads(result.read_text()) if result.exists() else {}
        if code != 0:
            failures[variant] = {"message": _exit_message(code, PREFLIGHT_TIMEOUT, folder / "log.txt"),
                                 "log_tail": _tail(folder / "log.txt")}
    cases = []
    for name, overrides in PREFLIGHT.items():
        runs = {v: results[v].get(name) or {"error": failures.get(v, {}).get("message", "no result")}
                for v in VARIANTS}
        try:
            passed, detail = _compare(name, runs)
        except Exception as exc:
            passed, detail = False, f"comparison failed: {_first_line(exc)}"
        warned = sorted({w for run in runs.values() for w in run.get("warnings", [])})
        cases.append({"case": name, "overrides": list(overrides), "passed": passed, "detail": detail,
                      "nondeterministic_warnings": warned, **{v: runs[v] for v in VARIANTS}})
        print(f"pre-flight {name}: {'PASS' if passed else 'FAIL'} ({detail})", flush=True)
    seconds = round(time.time() - started["at"], 1)
    print(f"pre-flight: {sum(c['passed'] for c in cases)} of {len(cases)} cases passed in {seconds:.0f} s", flush=True)
    return {"cases": cases, "children_failed": failures, "seconds": seconds}


def _overrides(spec: PlanSpec, args, model: Path, offload_dir: Path) -> tuple[list[str], int]:
    warmup = min(args.warmup, args.warmup if spec.max_warmup is None else spec.max_warmup)
    steps = min(args.steps, spec.max_timed_steps or args.steps)
    own = [item.format(offload_dir=offload_dir) for item in spec.overrides]
    resolution = args.sdxl_resolution if spec.family == "sdxl" else args.resolution
    return _common(args, model, resolution, warmup + steps) + own + args.set, warmup


def _others_bytes(device: str) -> int:
    """GPU memory in use before a child starts: this process's context and anything else on the card."""
    if device != "cuda":
        return 0
    import torch

    free, total = torch.cuda.mem_get_info()
    return total - free


def run_plan(name: str, args, work: Path, model: Path, images: Path, deadline: float) -> dict:
    spec, plan_dir = PLANS[name], work / name
    offload_dir = plan_dir / "offload"
    offload_dir.mkdir(parents=True)
    own = spec.timeout if args.device == "cuda" else float("inf")  # the CPU may train sd15 for minutes a plan
    timeout = min(args.plan_timeout or own, deadline - time.time())
    overrides, warmup = _overrides(spec, args, model, offload_dir)
    child_spec = {"kind": "plan", "device": args.device, "preset": spec.preset, "capped": spec.capped,
                  "overrides": overrides, "data": str(images), "out": str(plan_dir / "out"),
                  "result": str(plan_dir / "result.json"), "with_saves": args.with_saves, "timeout": timeout,
                  "others": _others_bytes(args.device), "deterministic": args.deterministic}
    started = time.time()
    returncode = _wait(_start(child_spec, plan_dir), started + timeout)
    result = plan_dir / "result.json"
    row = json.loads(result.read_text()) if result.exists() else {"status": "error", "step_seconds": []}
    if returncode != 0 and row["status"] == "ok":  # measured, then crashed or hung on the way out: a finding too
        row["message"] = f"finished, then {_exit_message(returncode, timeout, plan_dir / 'log.txt')}"
    elif returncode != 0 or not result.exists():
        row.update(status="timeout" if returncode is None else "error",
                   message=f"{_exit_message(returncode, timeout, plan_dir / 'log.txt')}, after "
                           f"{len(row.get('step_seconds') or [])} steps")
    row.update(plan=name, preset=spec.preset, overrides=list(spec.overrides), about=spec.about, warmup=warmup,
               wall_seconds=round(time.time() - started, 1))
    for key, mean in (("step_seconds", "seconds_per_step"), ("forward_backward_seconds", "forward_backward_mean"),
                      ("optimizer_seconds", "optimizer_mean")):
        timed = (row.get(key) or [])[warmup:] or (row.get(key) or [])[1:]  # one entry a step: no accumulation
        row[mean] = round(statistics.mean(timed), 4) if timed else None
    if row["status"] != "ok" or row.get("message"):
        row["log_tail"] = _tail(plan_dir / "log.txt")
    shutil.rmtree(plan_dir / "out", ignore_errors=True)
    shutil.rmtree(offload_dir, ignore_errors=True)
    return row


def _relative(a: list[float], b: list[float]) -> float:
    return max((abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b, strict=False)), default=0.0)


def _loss_goals(rows: dict[str, dict]) -> list[dict]:
    """Races show in the losses: the same math must agree, and a repeat of a plan must equal it exactly."""
    same = {p: rows[p]["losses"][:5] for p in SAME_MATH if len(rows.get(p, {}).get("losses") or []) >= 5}
    ref = "rtx3050" if "rtx3050" in same or not same else next(iter(same))
    worst = max(((_relative(v, same[ref]), p) for p, v in same.items() if p != ref), default=None)
    goals = [{"plan": ", ".join(same) or "-", "goal": f"same math: first 5 losses within 1e-3 of {ref}'s",
              "value": worst and worst[0], "passed": None if worst is None else worst[0] <= 1e-3,
              "shown": "-" if worst is None else f"worst {worst[0]:.2g} ({worst[1]})"}]
    a, b = (rows.get(p, {}).get("losses") if rows.get(p, {}).get("status") == "ok" else None
            for p in ("rtx3050", "rtx3050-repeat"))
    shown, gap = "-", None
    if a is not None and b is not None:
        gap = _relative(b, a)
        differ = [i + 1 for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y]
        shown = (f"equal, {len(a)} steps" if a == b else f"{len(a)} vs {len(b)} steps" if not differ
                 else f"differ from step {differ[0]}, worst {gap:.2g}")
    return goals + [{"plan": "rtx3050-repeat", "goal": "losses equal rtx3050's exactly", "value": gap,
                     "passed": None if gap is None else a == b, "shown": shown}]


def judge(rows: list[dict], dry_run: bool = False) -> list[dict]:
    """Add speed_vs_baseline and the estimate's error to every row; return the goals with their values and
    verdicts. A CPU dry run judges the losses only: its speed and memory say nothing about a GPU."""
    measured = {row["plan"]: row for row in rows if row["status"] == "ok"}
    base = measured.get("baseline", {}).get("seconds_per_step")
    for row in rows:
        mine = measured.get(row["plan"]) is row and row.get("seconds_per_step")
        row["speed_vs_baseline"] = round(base / row["seconds_per_step"], 3) if base and mine else None
        estimate, peak = row.get("estimate_reserved_bytes"), row.get("peak_reserved_bytes")
        if estimate and peak:
            row["estimate_error"], row["estimate_error_bytes"] = round(estimate / peak - 1, 3), estimate - peak
            row["estimate_within"] = abs(estimate - peak) <= max(0.10 * peak, 256 * MIB)
    goals = []
    for plan, what, key, limit in GOALS:
        value = measured.get(plan, {}).get(key)
        passed = None if value is None or dry_run else (value >= limit if "speed" in key else value <= limit)
        shown = "-" if value is None else (f"{value:.2f}x" if "speed" in key else f"{value / GIB:.2f} GiB")
        goals.append({"plan": plan, "goal": what, "value": value, "passed": passed, "shown": shown})
    judged = [row for row in measured.values() if "estimate_within" in row]
    worst = max(judged, key=lambda row: abs(row["estimate_error_bytes"]), default=None)
    goals.append({"plan": "every plan", "goal": "estimate within max(10%, 256 MiB) of peak reserved",
                  "value": worst and worst["estimate_error_bytes"],
                  "passed": None if worst is None or dry_run else all(row["estimate_within"] for row in judged),
                  "shown": "-" if worst is None else f"{sum(r['estimate_within'] for r in judged)} of {len(judged)} "
                                                     f"within; worst {worst['plan']} {_error(worst)}"})
    return goals + _loss_goals({row["plan"]: row for row in rows})


def _gib(value) -> str:
    return "-" if value is None else f"{value / GIB:.2f}"


def _num(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _error(row: dict) -> str:
    error = row.get("estimate_error")
    return "-" if error is None else f"{error:+.0%} ({row['estimate_error_bytes'] / MIB:+.0f} MiB)"


def _markdown_table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)] + [
        "| " + " | ".join(str(cell).replace("|", "/") for cell in row) + " |" for row in rows] + [""]


def _plan_cells(r: dict) -> list[str]:
    return [r["plan"], _num(r.get("cap_gib"), "g"), r["status"] + (f": {r['message']}" if r.get("message") else ""),
            _gib(r.get("peak_reserved_bytes")), _gib(r.get("estimate_reserved_bytes")), _error(r),
            _gib(r.get("peak_allocated_bytes")), _num(r.get("seconds_per_step"), ".3f"),
            _num(r.get("speed_vs_baseline"), ".2f"), _num(r.get("forward_backward_mean"), ".3f"),
            _num(r.get("optimizer_mean"), ".3f"), r["about"]]


def _detail_cells(r: dict) -> list[str]:
    stats = r.get("memory_stats") or {}
    return [r["plan"], " ".join(f"{x:.6g}" for x in (r.get("losses") or [])[:5]) or "-",
            _num(stats.get("num_alloc_retries"), "d"), _num(stats.get("num_ooms"), "d"),
            _gib(stats.get("inactive_split_bytes.all.peak")), _gib(r.get("outside_torch_bytes")),
            _gib(r.get("host_peak_rss_bytes")), _gib(r.get("estimate_host_bytes"))]


def table(meta: dict, preflight: dict, rows: list[dict], goals: list[dict]) -> str:
    lines = [f"## sdtune GPU check, {meta['date']}", "",
             f"{meta['gpu']}; torch {meta['torch']}, diffusers {meta['diffusers']}, transformers "
             f"{meta['transformers']}; {meta['arch']} at {meta['resolution']} px, each preset's batch, "
             f"{meta['warmup']} "
             f"warm-up + {meta['steps']} timed steps{'; deterministic kernels' if meta['deterministic'] else ''}"
             f"; {meta.get('wall_seconds', 0):.0f} s in all", "",
             f"Pre-flight: tiny model at 64 px, {PREFLIGHT_STEPS} steps, async against SDTUNE_OFFLOAD_SYNC=1", ""]
    cases = [[c["case"], " ".join(c["overrides"]).format(offload_dir="<scratch>"), "PASS" if c["passed"] else "FAIL",
              "; warned: ".join([c["detail"], *c["nondeterministic_warnings"]])] for c in preflight.get("cases", [])]
    lines += _markdown_table(["case", "overrides", "verdict", "detail"], cases) if cases else ["(skipped)", ""]
    lines += _markdown_table(["plan", "cap GiB", "status", "peak reserved GiB", "estimate GiB", "estimate error",
                              "peak allocated GiB", "s/step", "vs baseline", "fwd+bwd s", "optimizer s", "what"],
                             [_plan_cells(r) for r in rows])
    lines += _markdown_table(["plan", "first 5 losses", "alloc retries", "OOMs", "inactive split peak GiB",
                              "outside torch GiB", "host peak RSS GiB", "host estimate GiB"],
                             [_detail_cells(r) for r in rows])
    verdicts = {True: "PASS", False: "FAIL", None: "not judged" if meta["device"] == "cpu" else "not measured"}
    lines += _markdown_table(["goal", "plan", "measured", "verdict"],
                             [[g["goal"], g["plan"], g["shown"], verdicts[g["passed"]]] for g in goals])
    return "\n".join(lines).rstrip()


def _versions() -> dict:
    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "missing"

    return {name: version(name) for name in ("torch", "diffusers", "transformers")}


def prepare_model(args, work: Path, tiny: Path, family: str = "sd") -> Path:
    """The model of `family`'s plans: --model, the tiny test model (--arch tiny), or a random pipeline of
    --arch (SD) or sdxl, built on the device."""
    if args.model and family == "sd":
        return Path(args.model)
    if args.arch == "tiny":
        from support.testing import save_tiny_sdxl_pipeline

        return tiny if family == "sd" else save_tiny_sdxl_pipeline(work / "tiny-sdxl")
    import gc

    from sdtune.toy.random_pipeline import build_random_pipeline

    folder = build_random_pipeline(args.arch if family == "sd" else "sdxl", work / f"model-{family}",
                                   device=args.device)
    if args.device == "cuda":
        import torch

        gc.collect()
        torch.cuda.empty_cache()  # the children need the memory; this process keeps only its context
    return folder


def _family_model(args, work: Path, tiny: Path, family: str) -> tuple[Path | None, Path | str]:
    """(model, images) for a family's plans, or (None, why not) when the model cannot be built."""
    from support.testing import make_image_folder

    try:
        started = time.time()
        model = prepare_model(args, work, tiny, family)
        size = args.sdxl_resolution if family == "sdxl" else args.resolution
        images = make_image_folder(work / f"images-{family}", count=8, size=size)
        print(f"{family} model and images ready in {time.time() - started:.0f} s", flush=True)
        return model, images
    except Exception as exc:
        traceback.print_exc()
        return None, f"no {family} model: {_first_line(exc)}"


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
    parser.add_argument("--steps", type=int, default=None, help="timed steps per plan (default 12; 4 on the CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 3; 1 on the CPU)")
    parser.add_argument("--resolution", type=int, default=None, help="pixels (default 512; 64 on the CPU)")
    parser.add_argument("--sdxl-resolution", type=int, default=None,
                        help="pixels of the SDXL plans (default 1024; 64 on the CPU)")
    parser.add_argument("--arch", default=None, choices=["sd15", "sd21", "tiny"],
                        help="random model to build (default sd15; tiny on the CPU)")
    parser.add_argument("--model", help="use this diffusers folder instead of building a random one")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="one more override for every plan (repeatable), as `sdtune train --set`")
    parser.add_argument("--preflight", action=argparse.BooleanOptionalAction, default=True,
                        help="compare the async offload paths with SDTUNE_OFFLOAD_SYNC=1 first (default on)")
    parser.add_argument("--deterministic", action="store_true",
                        help="plans under strict torch.use_deterministic_algorithms (to tell kernels from races)")
    parser.add_argument("--plan-timeout", type=float, help="seconds per plan (default: 90, nvme 120; on the CPU none)")
    parser.add_argument("--budget", type=float, default=470, help="seconds for everything; later plans are skipped")
    parser.add_argument("--with-saves", action="store_true", help="keep the end-of-run checkpoint and export")
    parser.add_argument("--workdir", default=None, help="parent folder of the scratch folder (default: temp)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (model, logs)")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cpu = args.device == "cpu"
    for key, gpu_value, cpu_value in (("steps", 12, 4), ("warmup", 3, 1), ("resolution", 512, 64),
                                      ("sdxl_resolution", 1024, 64), ("arch", "sd15", "tiny")):
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
        spec = json.loads(args.child.read_text())
        return (plan_child if spec["kind"] == "plan" else preflight_child)(spec)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA GPU is visible; use --device cpu --arch tiny for a dry run")
    started = time.time()
    deadline = started + args.budget
    work = Path(tempfile.mkdtemp(prefix="sdtune-gpu-check-", dir=args.workdir))
    from support.testing import make_image_folder, save_tiny_pipeline

    tiny = save_tiny_pipeline(work / "tiny")
    pending = start_preflight(args, work, tiny, make_image_folder(work / "images-64", size=64)) if (
        args.preflight) else None
    try:
        model = prepare_model(args, work, tiny)  # SD1.5 builds while the pre-flight runs
        images, no_model = make_image_folder(work / "images", count=8, size=args.resolution), None
        print(f"model and images ready in {time.time() - started:.0f} s ({work})", flush=True)
    except Exception as exc:  # the pre-flight's results still count: report them, skip the plans
        traceback.print_exc()
        model = images = None
        no_model = f"no model: {_first_line(exc)}"
    preflight = finish_preflight(pending) if pending else {}
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), **_versions(),
            "device": args.device, "arch": args.arch if not args.model else args.model, "resolution": args.resolution,
            "steps": args.steps, "warmup": args.warmup, "gpu": "CPU dry run (no GPU, no caps)",
            "deterministic": args.deterministic, "budget_seconds": args.budget,
            "offload_sync": os.environ.get("SDTUNE_OFFLOAD_SYNC", ""),  # set: the plans copy synchronously too
            "workdir_filesystem": filesystem(work), "extra_overrides": args.set, "model_error": no_model}
    rows: list[dict] = []

    def write() -> list[dict]:
        meta["wall_seconds"] = round(time.time() - started, 1)
        goals = judge(rows, dry_run=args.device == "cpu")
        output_path().write_text(json.dumps({"meta": meta, "preflight": preflight, "goals": goals, "plans": rows},
                                            indent=2) + "\n")
        return goals

    goals = write()
    models = {"sd": (model, images)}
    for name in args.plans:
        family = PLANS[name].family
        if family not in models and not no_model and deadline - time.time() >= 30:
            models[family] = _family_model(args, work, tiny, family)  # after the SD plans: built when first needed
        model, images = models.get(family, (None, None))
        if no_model or model is None or deadline - time.time() < 30:
            why = no_model or (images if model is None else "time budget spent")
            rows.append({"plan": name, "status": "skipped", "message": why, "about": PLANS[name].about})
        else:
            rows.append(run_plan(name, args, work, model, images, deadline - 5))
        row = rows[-1]
        print(f"{name}: {row['status']} {row.get('message', '')} s/step={row.get('seconds_per_step')} "
              f"reserved={_gib(row.get('peak_reserved_bytes'))} GiB", flush=True)
        if row.get("gpu"):
            meta["gpu"] = f"{row['gpu']} ({row['gpu_total_bytes'] / GIB:.1f} GiB)"
        goals = write()
    report = table(meta, preflight, rows, goals)
    output_path().with_suffix(".md").write_text(report + "\n")
    print("\n" + report)
    print(f"\nwrote {output_path()} and {output_path().with_suffix('.md')}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
