"""NVMe tier: how fast `NvmeAdamW` streams its state file against plain sequential reads and writes.

    .venv/bin/python bench/nvme_stream.py [--params 100_000_000] [--dir /path/on/nvme] [--rounds 3] [--cold]

One optimizer step must read and write the whole state file (12 bytes a parameter: master weight and
two AdamW moments). Side by side on the same file, each row once per round, rounds interleaved, medians:
- `sequential read+write`: the disk's baseline, one thread reading each bucket's bytes into a buffer and
  writing them back, in order, with the same `os.preadv` / `os.pwrite` calls;
- `copy_file_range`: the kernel copying the file to a second file (`shutil.copyfile`), same bytes in and out;
- `NvmeAdamW streaming`: the optimizer's read-ahead / write-behind ring with no AdamW work, i.e. the I/O
  machinery alone;
- `NvmeAdamW.step`: the real step (streaming plus the fused AdamW pass and the weights' copy back);
- `host AdamW pass alone`: that pass over the same buckets with the state already in RAM, no I/O: what
  the ring overlaps the I/O with.
The ratio is the baseline's time over each row's: 1.0 means as fast as the plain sequential pass; the
step's best is min(1, ring) / (1 + pass / ring time) if nothing overlapped, 1.0 if all did.
Method: without `--cold` the file sits in the page cache (a machine with RAM to spare), so this measures
the streaming machinery against the same syscalls, not the disk. With `--cold` every timed pass starts
with the file's pages written out and dropped (`fsync`, `posix_fadvise(DONTNEED)`, untimed) and ends with
an `fsync` (timed): reads come from the disk and writes reach it, as on a training box whose RAM cannot
hold the state. Point `--dir` at the real NVMe drive there.
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
from sdtune.offload.layout import Scaling


def drop_cache(*fds: int) -> None:
    """Write each file's dirty pages out and drop its cached pages: the next reads come from the disk."""
    for fd in fds:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def timed_rounds(rows: dict, rounds: int, cold_fds: list[int] | None) -> dict:
    """Each row's function once per round, rows interleaved, after a warm-up round: {name: seconds list}.
    With `cold_fds`, each pass starts with those files out of the page cache and ends with them on disk."""
    times = {name: [] for name in rows}
    for round_ in range(rounds + 1):
        for name, fn in rows.items():
            if cold_fds:
                drop_cache(*cold_fds())
            started = time.perf_counter()
            fn()
            if cold_fds:
                for fd in cold_fds():
                    os.fsync(fd)
            if round_:
                times[name].append(time.perf_counter() - started)
    return times


def sequential_pass(optimizer, buffer: torch.Tensor):
    """Read each bucket's state into `buffer` and write it back, in file order, on this thread."""
    state_file = optimizer._file

    def sequential():
        for index, bucket in enumerate(optimizer._buckets):
            region = buffer[:3 * len(bucket.master)]
            state_file.read(index, region)
            state_file.write(index, region)
    return sequential


def host_pass(optimizer):
    """The step's AdamW pass over every bucket with its state already in RAM (no I/O)."""
    states = [torch.randn(3 * len(bucket.master)).abs_() for bucket in optimizer._buckets]

    def update():
        for bucket, state in zip(optimizer._buckets, states, strict=True):
            optimizer._update(bucket, *state.chunk(3), optimizer._steps, Scaling())
    return update


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params", type=float, default=100e6)
    parser.add_argument("--bucket-mb", type=int, default=32)
    parser.add_argument("--dir", default=tempfile.gettempdir())
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cold", action="store_true", help="every pass reads from and writes to the disk")
    args = parser.parse_args()
    torch.set_num_threads(1)
    n = int(args.params)
    chunk = args.bucket_mb * 2**20 // 4
    params = [torch.nn.Parameter(torch.randn(min(chunk, n - i))) for i in range(0, n, chunk)]
    optimizer = NvmeAdamW(params, offload_dir=args.dir, device="cpu", dtype=torch.float32, lr=1e-4,
                          bucket_mb=args.bucket_mb)
    sum(p.sum() for p in params).backward()  # staged gradients
    state_file = optimizer._file
    copy_target = Path(tempfile.mkdtemp(dir=args.dir)) / "copy.bin"
    copy_target.touch()
    copy_fd = os.open(copy_target, os.O_RDWR)
    rows = {
        "sequential read+write (baseline)": sequential_pass(optimizer, torch.empty(3 * chunk)),
        "copy_file_range": lambda: shutil.copyfile(state_file.path, copy_target),
        "NvmeAdamW streaming": lambda: optimizer._stream_buckets(lambda bucket, state: True),
        "NvmeAdamW step": lambda: optimizer._step_all(Scaling()),
        "host AdamW pass alone (no I/O)": host_pass(optimizer),
    }
    results = timed_rounds(rows, args.rounds, (lambda: [state_file.fd, copy_fd]) if args.cold else None)
    os.close(copy_fd)
    shutil.rmtree(copy_target.parent)
    report(results, n, 2 * state_file.size, args, os.path.dirname(state_file.path))
    optimizer.close()


def report(results: dict, n: int, nbytes: int, args, folder: str) -> None:
    base = statistics.median(results["sequential read+write (baseline)"])
    rows = {}
    method = "cold: from and to the disk" if args.cold else "warm: the file in the page cache"
    print(f"{n:,} parameters: {nbytes / 2 / 2**30:.2f} GiB state read and written per step "
          f"({args.bucket_mb} MB buckets, {folder}, {method}), median of {args.rounds} interleaved rounds")
    for name, times in results.items():
        median = statistics.median(times)
        rows[name] = {**summarize(times), "gb_per_s": nbytes / median / 1e9, "vs_baseline": base / median}
        print(f"{name:34s} {median:7.3f} s  {rows[name]['gb_per_s']:6.2f} GB/s  {rows[name]['vs_baseline']:.2f}x")
    save_results("nvme_stream_cold" if args.cold else "nvme_stream", rows)


if __name__ == "__main__":
    main()
