"""`sdtune` as a user runs it, in a subprocess, and what a run leaves on disk: the GPU tests' only way in.

A few lines of wrapper (`python -c WRAPPER ARGS` is `python -m sdtune ARGS`) set what the product has no
switch for, with torch's public calls: deterministic kernels, so that two runs of the same math give the
same bits (SDPA held to its math backend: its flash and memory-efficient backward are not deterministic),
and on CUDA an allocator cap at a card's size (`torch.cuda.set_per_process_memory_fraction`) and, for the
race pre-flight, GPU sleeps on the offload engine's streams (tests/support/delay_streams.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WRAPPER = """
import os, runpy, sys
import torch
if os.environ.get("TEST_DETERMINISTIC"):
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    for name in ("enable_flash_sdp", "enable_mem_efficient_sdp", "enable_cudnn_sdp"):
        if hasattr(torch.backends.cuda, name):
            getattr(torch.backends.cuda, name)(False)
cap = float(os.environ.get("TEST_CAP_GIB") or 0)
if cap and torch.cuda.is_available():
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap * 2**30 / total))
if os.environ.get("TEST_DELAY_STREAMS"):
    sys.path.insert(0, os.environ["TEST_SUPPORT"])
    import delay_streams
    delay_streams.install()
sys.argv = ["sdtune", *sys.argv[1:]]
runpy.run_module("sdtune", run_name="__main__")
"""


def sdtune(args: list[str], *, cwd: Path, env: dict | None = None, timeout: float = 600,
           deterministic: bool = False, cap_gib: float = 0.0) -> subprocess.CompletedProcess:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # this checkout's sdtune
    full = {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "CUBLAS_WORKSPACE_CONFIG": ":4096:8", "TEST_DETERMINISTIC": "1" if deterministic else "",
            "TEST_CAP_GIB": str(cap_gib), "TEST_SUPPORT": str(Path(__file__).parent), **(env or {})}
    return subprocess.run([sys.executable, "-c", WRAPPER, *args], cwd=cwd, env=full, capture_output=True,
                          text=True, timeout=timeout)


def sets(*overrides: str) -> list[str]:
    return [flag for value in overrides for flag in ("--set", value)]


def train(model, data, out: Path, preset: str, overrides: list[str], steps: int, **kwargs) -> dict:
    """`sdtune train`, which must succeed; its summary.json."""
    args = ["train", "--preset", preset, "--model", str(model), "--data", str(data), "--out", str(out),
            "--max-steps", str(steps), *sets(*overrides)]
    done = sdtune(args, cwd=out.parent, **kwargs)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())


def estimate(model, preset: str, overrides: list[str], *, cwd: Path) -> dict:
    """`sdtune estimate-vram --json` for one plan: its one estimate."""
    done = sdtune(["estimate-vram", "--model", str(model), "--preset", preset, *sets(*overrides), "--json"], cwd=cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    (entry,) = json.loads(done.stdout)["estimates"]
    return entry


def step_losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def kept_weights(out: Path) -> dict:
    """Every tensor of the run's last checkpoint, kept with output.keep_final_state=true (its fp32 weights,
    the EMA with train.ema_decay), by file and name."""
    from safetensors.torch import load_file

    files = sorted((out / "checkpoints").rglob("*.safetensors"))
    return {f"{path.relative_to(out)}/{key}": value for path in files for key, value in load_file(path).items()}


def random_sd15(folder: Path) -> Path:
    """A random SD1.5-architecture pipeline (sdtune.toy.random_pipeline), built on the GPU in seconds."""
    code = ("import sys; from sdtune.toy.random_pipeline import build_random_pipeline as build; "
            "build('sd15', sys.argv[1], device='cuda')")
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    subprocess.run([sys.executable, "-c", code, str(folder)], check=True, timeout=300,
                   env={**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1"})
    return folder


def on(device: str, *values):
    """A test's parameters for `device`: marked gpu on CUDA (`pytest -m gpu tests/gpu`; skipped without one),
    a dry run of the same code on the CPU."""
    return pytest.param(device, *values, marks=[pytest.mark.gpu] if device == "cuda" else [],
                        id="-".join([device, *map(str, values)]))
