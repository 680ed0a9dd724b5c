"""Peak host RAM and step time of each optimizer-offload tier, side by side, each in a fresh process.

    .venv/bin/python bench/offload_tiers.py [--params 100_000_000] [--steps 5] [--tiers none,cpu,nvme] [--json]

A model of `--params` fp32 parameters (a stack of square Linear layers, compute device = CPU) trains
`--steps` AdamW steps (one thread; median of all but the first) with `memory.optimizer_offload` = none
(torch's fused AdamW), cpu (`OffloadAdamW`) and nvme (`NvmeAdamW`, state file in a temporary folder under
`--dir`). Each tier runs in its own child process so that its peak resident set size (`ru_maxrss`) is its
own; "added" is the peak minus the RSS of the process before the model is built (Python and torch). The
children run with glibc's mmap threshold fixed at 1 MiB (`MALLOC` below), the same for every tier. On the
CPU the "device" weights are host memory too, so every tier also holds a 4-byte working copy of each
parameter; what differs is where the 16 bytes of master, gradient and moments go: all in RAM (none, cpu)
or 12 of them in the state file (nvme). `tests/e2e/test_offload.py` runs this at a small size.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from _common import save_results

TIERS = ("none", "cpu", "nvme")
# glibc raises its mmap threshold after large frees and then keeps freed blocks in the heap: RSS would
# show what the allocator retains rather than what each tier holds. A fixed threshold returns them.
MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(2**20)}


def child(tier: str, params: int, steps: int, directory: str, bucket_mb: int) -> dict:
    import torch

    torch.set_num_threads(1)  # on this 2-core machine two threads make small steps several times slower
    torch.manual_seed(0)
    start = _peak_rss()
    width = 2048
    layers = max(1, params // (width * width))
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])
    kwargs = dict(lr=1e-4)
    if tier == "none":
        optimizer = torch.optim.AdamW(model.parameters(), fused=True, **kwargs)
    elif tier == "cpu":
        from sdtune.offload import OffloadAdamW

        optimizer = OffloadAdamW(list(model.parameters()), device="cpu", dtype=torch.float32, bucket_mb=bucket_mb,
                                 **kwargs)
    else:
        from sdtune.offload import NvmeAdamW

        optimizer = NvmeAdamW(list(model.parameters()), offload_dir=directory, device="cpu", dtype=torch.float32,
                              bucket_mb=bucket_mb, **kwargs)
    x = torch.randn(8, width, dtype=next(model.parameters()).dtype)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    peak = _peak_rss()
    return {"tier": tier, "params": layers * width * width, "peak_rss_bytes": peak, "added_rss_bytes": peak - start,
            "seconds_per_step": statistics.median(times[1:] or times)}


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(tiers: list[str], params: int, steps: int, directory: str, bucket_mb: int) -> list[dict]:
    rows = []
    for tier in tiers:
        out = subprocess.run([sys.executable, __file__, "--child", tier, "--params", str(params), "--steps",
                              str(steps), "--dir", directory, "--bucket-mb", str(bucket_mb)],
                             check=True, capture_output=True, text=True, env={**os.environ, **MALLOC}).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params", type=float, default=100e6)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--bucket-mb", type=int, default=32)
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="folder for the nvme tier's state file")
    parser.add_argument("--tiers", default=",".join(TIERS), help="comma-separated, from none,cpu,nvme")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON only")
    parser.add_argument("--child", choices=TIERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, int(args.params), args.steps, args.dir, args.bucket_mb)))
        return
    rows = measure(args.tiers.split(","), int(args.params), args.steps, args.dir, args.bucket_mb)
    if args.json:
        print(json.dumps(rows))
        return
    base = rows[0]
    print(f"{rows[0]['params']:,} fp32 parameters, {args.steps} steps, {args.bucket_mb} MB buckets, one process each")
    print(f"{'tier':6s} {'peak RSS':>10s} {'added':>10s} {'vs none':>8s} {'s/step':>8s} {'speed vs none':>14s}")
    for row in rows:
        row["added_rss_vs_none"] = row["added_rss_bytes"] / base["added_rss_bytes"]
        row["speed_vs_none"] = base["seconds_per_step"] / row["seconds_per_step"]
        print(f"{row['tier']:6s} {row['peak_rss_bytes'] / 2**30:6.2f} GiB {row['added_rss_bytes'] / 2**30:6.2f} GiB "
              f"{row['added_rss_vs_none']:8.2f} {row['seconds_per_step']:8.3f} {row['speed_vs_none']:14.2f}")
    save_results("offload_tiers", rows)


if __name__ == "__main__":
    main()
