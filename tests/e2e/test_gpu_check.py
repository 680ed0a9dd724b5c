"""`bench/gpu_check.py`, the script a lent GPU runs first, in its CPU dry run: the pre-flight and two plans
must come out measured, so that a rare device session is never spent on a script that rotted."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out, work = tmp_path_factory.mktemp("out"), tmp_path_factory.mktemp("work")
    env = {**os.environ, "OUT": str(out), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "bench/gpu_check.py", "--device", "cpu", "--plans", "cpu,rtx3050-ema",
                             "--workdir", str(work)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (out / "gpu_check.md").is_file()
    return json.loads((out / "gpu_check.json").read_text())


def test_every_pre_flight_case_compares_the_two_variants(report):
    cases = {case["case"]: case for case in report["preflight"]["cases"]}
    assert all(case["passed"] for case in cases.values()), [c["detail"] for c in cases.values()]
    tensors = {name: int(re.search(r"masters equal \((\d+) tensors", case["detail"]).group(1))
               for name, case in cases.items()}
    # the EMA case compares the moving average too: one more tensor per master
    assert tensors["ema-step-in-backward"] == 2 * tensors["bf16-step-in-backward"]


def test_each_plan_trains_and_is_timed_in_its_parts(report):
    plans = {row["plan"]: row for row in report["plans"]}
    assert set(plans) == {"cpu", "rtx3050-ema"}
    for row in plans.values():
        assert row["status"] == "ok", row["message"]
        assert len(row["forward_backward_seconds"]) == len(row["step_seconds"]) == len(row["optimizer_seconds"])
        assert row["seconds_per_step"] > 0 and row["estimate_reserved_bytes"] > 0
    assert plans["rtx3050-ema"]["applied"]["optimizer_offload"] == "cpu"
