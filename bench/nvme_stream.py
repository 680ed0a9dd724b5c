"""NVMe tier: how fast `NvmeAdamW` streams its state file against plain sequential reads and writes.

    .venv/bin/python bench/nvme_stream.py [--params 100_000_000] [--dir /path/on/nvme] [--repeats 3]

One optimizer step must read and write the whole state file (12 bytes a parameter: master weight and
two AdamW moments). Side by side on the same file, median of `--repeats`:
- `sequential read+write`: the baseline, one thread reading each bucket's bytes into a buffer and writing
  them back, in order, with the same `os.preadv` / `os.pwrite` calls;
- `copy_file_range`: the kernel copying the file to a second file (`shutil.copyfile`), same bytes in and out;
- `NvmeAdamW streaming`: the optimizer's read-ahead / write-behind ring with no AdamW work, i.e. the I/O
  machinery alone;
- `NvmeAdamW.step`: the real step (streaming plus the fused AdamW kernel and the weights' copy back).
The ratio is the baseline's time over each row's: 1.0 means as fast as the plain sequential pass. On a
machine with RAM to spare the file sits in the page cache, so this measures the streaming machinery
against the same syscalls rather than the disk; point `--dir` at the real NVMe drive on a training box.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _common import save_results, summarize

from sdtune.offload import NvmeAdamW


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params", type=float, default=100e6)
    parser.add_argument("--bucket-mb", type=int, default=32)
    parser.add_argument("--dir", default=tempfile.gettempdir())
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    n = int(args.params)
    chunk = args.bucket_mb * 2**20 // 4
    params = [torch.nn.Parameter(torch.randn(min(chunk, n - i))) for i in range(0, n, chunk)]
    optimizer = NvmeAdamW(params, offload_dir=args.dir, device="cpu", dtype=torch.float32, lr=1e-4,
                          bucket_mb=args.bucket_mb)
    for p in params:
        p.grad = None
    sum(p.sum() for p in params).backward()
    state_file = optimizer._file
    buffer = torch.empty(3 * chunk)

    def sequential():
        for index in range(len(state_file.offsets)):
            region = buffer[:3 * len(optimizer._buckets[index].master)]
            state_file.read(index, region)
            state_file.write(index, region)

    copy_target = Path(tempfile.mkdtemp(dir=args.dir)) / "copy.bin"
    results = {
        "sequential read+write (baseline)": timed(sequential, args.repeats),
        "copy_file_range": timed(lambda: shutil.copyfile(state_file.path, copy_target), args.repeats),
        "NvmeAdamW streaming": timed(lambda: optimizer._stream_buckets(lambda bucket, state: True), args.repeats),
        "NvmeAdamW.step": timed(optimizer.step, args.repeats),
    }
    shutil.rmtree(copy_target.parent)
    nbytes = 2 * state_file.size
    base = statistics.median(results["sequential read+write (baseline)"])
    rows = {}
    print(f"{n:,} parameters: {state_file.size / 2**30:.2f} GiB state read and written per step "
          f"({args.bucket_mb} MB buckets, {os.path.dirname(state_file.path)}), median of {args.repeats}")
    for name, times in results.items():
        median = statistics.median(times)
        rows[name] = {**summarize(times), "gb_per_s": nbytes / median / 1e9, "vs_baseline": base / median}
        print(f"{name:34s} {median:7.3f} s  {rows[name]['gb_per_s']:6.2f} GB/s  {rows[name]['vs_baseline']:.2f}x")
    optimizer.close()
    save_results("nvme_stream", rows)


if __name__ == "__main__":
    main()
