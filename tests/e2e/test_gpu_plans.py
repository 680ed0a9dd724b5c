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
