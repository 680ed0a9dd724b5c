"""What the benchmark scripts share: a summary of repeated timings and where results are written."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def summarize(seconds: list[float]) -> dict:
    return {"median_s": statistics.median(seconds), "min_s": min(seconds), "max_s": max(seconds)}


def trainer_step_times(cfg, info, data: Path, out: Path) -> list[float]:
    """Seconds of each step of the real trainer on `cfg`, the first (warm-up) step left out."""
    import time

    from sdtune import trainer

    run = trainer.prepare(cfg, info, str(data), str(out), resume=False, log=lambda message: None)
    marks = [time.perf_counter()]
    trainer.loop(run, lambda run, seconds_per_step: marks.append(time.perf_counter()))
    if hasattr(run.optimizer, "close"):  # the nvme tier's state file
        run.optimizer.close()
    return [b - a for a, b in zip(marks, marks[1:], strict=False)][1:]


def save_results(name: str, rows) -> Path:
    """Write `rows` as bench/results/NAME.json (the folder is git-ignored); returns the path."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(rows, indent=2) + "\n")
    return path
