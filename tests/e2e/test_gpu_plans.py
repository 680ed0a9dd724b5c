"""`bench/gpu_plans.py`, the plans a GPU session trains, in its CPU dry run: each plan's row is written as it
ends, in the order asked, and a plan the budget cannot hold is listed, not started."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _plans(tmp_path, *args) -> tuple[subprocess.CompletedProcess, list[dict]]:
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "bench/gpu_plans.py", "--dry-run", "--out", str(out),
                           "--workdir", str(tmp_path / "work"), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert (out / "gpu_plans.md").is_file(), done.stdout[-2000:] + done.stderr[-3000:]
    return done, json.loads((out / "gpu_plans.json").read_text())


def test_each_plan_is_trained_estimated_and_measured_in_order(tmp_path, tiny_sd1, tiny_sdxl):
    done, rows = _plans(tmp_path, "--plans", "rtx3050,sdxl-8gb", "--sd-model", str(tiny_sd1),
                        "--sdxl-model", str(tiny_sdxl), "--budget", "900")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert [row["plan"] for row in rows] == ["rtx3050", "sdxl-8gb"]
    for row in rows:
        assert row["status"] == "ok", row["message"]
        assert row["steps"] == 2 and row["seconds_per_step"] > 0 and row["peak_memory_bytes"] > 0
        assert row["estimate_reserved_bytes"] > 0 and row["card_gib"] == 8
    assert [row["optimizer_offload"] for row in rows] == ["cpu", "nvme"]


def test_no_plan_starts_without_the_time_it_needs(tmp_path):
    done, rows = _plans(tmp_path, "--plans", "rtx3050,lora-4gb", "--budget", "5")
    assert done.returncode == 0, done.stderr[-3000:]
    assert [(row["plan"], row["status"]) for row in rows] == [("rtx3050", "not run"), ("lora-4gb", "not run")]
    assert all("s left" in row["message"] for row in rows)
    assert "| lora-4gb | not run |" in (tmp_path / "out" / "gpu_plans.md").read_text()


def _gpu_check():
    """bench/gpu_check.py as a module: its scheduler and writer, run here with fake rows and a fake clock."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


def test_the_dry_run_prints_the_order_the_assumed_seconds_and_their_sum():
    done = subprocess.run([sys.executable, "bench/gpu_check.py", "--dry-run", "--budget", "400", "--rows",
                           "rtx3050,sdxl-8gb,rtx4090,race-canary"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    # rtx3050 builds the SD1.5 (60 s) its followers reuse; sdxl-8gb (its build 180 s + 270 s) cannot fit
    assert lines[2:6] == ["| 1 | rtx3050 | 180 | 180 | yes |", "| 2 | sdxl-8gb | 450 | - | no |",
                          "| 3 | rtx4090 | 120 | 300 | yes |", "| 4 | race-canary | 40 | 340 | yes |"]
    assert lines[6].startswith("Remaining: 1 rows, about 450 s: `python bench/gpu_check.py --rows sdxl-8gb ")
    refused = subprocess.run([sys.executable, "bench/gpu_check.py", "--dry-run", "--rows", "rtx3050,rtx9999"],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "unknown rows rtx9999" in refused.stderr


def test_no_row_starts_without_its_seconds_and_each_is_written_when_it_ends(tmp_path):
    check = _gpu_check()
    rows = [check.Row("a", 100, "sd", "rtx3050"), check.Row("big", 300, "sdxl", "sdxl-8gb"),
            check.Row("b", 100, "sd", "rtx4090"), check.Row("c", 50, test="t.py")]
    now, taken, started = [0.0], {"a": 130, "b": 70, "c": 10}, []  # a: its model's 60 s build and 70 s

    def run(row, seconds):
        started.append((row.name, seconds))
        now[0] += taken[row.name]
        return {"status": "ok", "seconds_per_step": 1.5, "peak_memory_bytes": 5 * 2**30, "cap_gib": 7.5,
                "estimate_reserved_bytes": 5.6 * 2**30, "peak_memory_kind": "cuda_max_reserved"}

    write = check.writer(tmp_path, {"date": "today", "budget_s": 300, "versions": {"torch": "9.9"}})
    seen = []
    results = check.schedule(rows, 300, run, lambda *a: (write(*a), seen.append(len(a[0]))), clock=lambda: now[0])
    assert started == [("a", 160), ("b", 100), ("c", 50)]  # the build once; "big" (480 s) never had its time
    assert [(r["row"], r["status"]) for r in results] == [("a", "ok"), ("big", "not run"), ("b", "ok"), ("c", "ok")]
    assert results[1]["message"] == "needs 480 s, 170 s left" and results[0]["wall_s"] == 130
    assert seen == [1, 2, 3, 4]
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["versions"] == {"torch": "9.9"} and saved["remaining"] == {"seconds": 480, "rows": ["big"]}
    md = (tmp_path / "gpu_check.md").read_text().splitlines()
    assert md[0] == "GPU check, today: torch 9.9"
    assert "| a | ok | 160 | 130.0 | 1.5 | 5.00 | 5.60 | no | 7.5 |  |" in md  # 0.6 GiB off: over 10% and 256 MiB
    assert md[-1].startswith("Remaining: 1 rows, about 480 s: `python bench/gpu_check.py --rows big --budget 300")
    started.clear()
    check.schedule(rows[:1], 100, run, lambda *a: None, clock=lambda: now[0], given=["sd"])  # --sd-model: no build
    assert started == [("a", 100)]


def test_a_pytest_row_reads_its_outcome():
    check = _gpu_check()
    assert check.pytest_status(0, "1 passed in 3.0s") == "ok"
    assert check.pytest_status(0, "1 skipped in 0.1s") == "skipped"
    assert check.pytest_status(1, "E   AssertionError: copies late: 3 of 9 tensors differ\n1 failed in 9s") == "failed"
    assert check._failure("x\nE   AssertionError: copies late: 3 of 9 tensors differ\n") == (
        "AssertionError: copies late: 3 of 9 tensors differ")


def test_the_check_records_the_versions_then_runs_a_row_where_cuda_is_missing(tmp_path):
    done = subprocess.run([sys.executable, "bench/gpu_check.py", "--cpu", "--rows", "race-canary", "--budget", "300",
                           "--out", str(tmp_path), "--workdir", str(tmp_path / "work")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    import torch

    assert saved["versions"]["torch"] == torch.__version__ and saved["versions"]["gpu"] is None
    assert {"cuda", "cudnn", "diffusers", "transformers", "peft", "bitsandbytes"} <= saved["versions"].keys()
    assert [(r["row"], r["status"]) for r in saved["rows"]] == [("race-canary", "skipped")]
    assert "needs a CUDA GPU" in (tmp_path / "gpu_check.log").read_text()
