"""CPU optimizer offload: how fast the host AdamW step runs against what memory bandwidth allows.

    .venv/bin/python bench/offload_step.py [--params 50_000_000] [--threads 1]

A fused AdamW step must read the fp32 weight, gradient and two moments (16 bytes a parameter) and write
the weight and both moments back in place (12 bytes). The baseline moves the same 28 bytes a parameter,
in place too, with three plain streaming kernels (`w += g`, `m *= b1`, `v *= b2`) in the same process, so
the ratio says how close the step is to the memory-bandwidth bound of this machine. (Copies into fresh
buffers are no bound: writing a new buffer also reads it into the cache first, so they move more bytes.)
Also times `OffloadAdamW.step` (step plus the copy back to the compute device, here the CPU) against
torch's own fused AdamW on the same parameters held per tensor, and with `ema=True` (`train.ema_decay`
with an offload tier): the moving average updated chunk by chunk inside that host pass, against the same
step followed by a separate pass over the whole average (`ema.lerp_(master)`, as an EMA kept apart does).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import save_results, summarize

from sdtune.offload import OffloadAdamW


def timed(fn, repeats: int, setup=lambda: None) -> list[float]:
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        setup()
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times[1:]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params", type=int, default=50_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n = args.params
    w, g, m, v = (torch.randn(n) for _ in range(4))

    def bandwidth():  # read 4 tensors and write 3 of them in place: the bytes of one AdamW step
        w.add_(g)
        m.mul_(0.9)
        v.mul_(0.999)

    shapes = [(n // 100,)] * 100  # a model's worth of separate tensors
    plain_params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    plain = torch.optim.AdamW(plain_params, lr=1e-4, fused=True)
    offload_params = [torch.nn.Parameter(p.detach().clone()) for p in plain_params]
    offload = OffloadAdamW(offload_params, device="cpu", dtype=torch.float32, lr=1e-4)
    ema_params = [torch.nn.Parameter(p.detach().clone()) for p in plain_params]
    with_ema = OffloadAdamW(ema_params, device="cpu", dtype=torch.float32, lr=1e-4, ema=True)
    with_ema.ema_decay = 0.999  # what `sdtune.train.ema.HostEMA` sets before a due step

    averages = [bucket.master.clone() for bucket in offload._buckets]

    def separate_pass():  # the step, then the average updated over every master in a pass of its own
        offload.step()
        with torch.no_grad():
            for bucket, average in zip(offload._buckets, averages, strict=True):
                average.lerp_(bucket.master, 0.001)

    def backward(params):  # gradients of ones, through the real hooks for the offload optimizer
        return lambda: sum(p.sum() for p in params).backward()

    results = {
        "bandwidth baseline (same bytes)": timed(bandwidth, args.repeats),
        "torch fused AdamW": timed(plain.step, args.repeats, backward(plain_params)),
        "OffloadAdamW.step": timed(offload.step, args.repeats, backward(offload_params)),
        "step, then a separate EMA pass": timed(separate_pass, args.repeats, backward(offload_params)),
        "OffloadAdamW.step with EMA": timed(with_ema.step, args.repeats, backward(ema_params)),
    }
    rows = {name: {**summarize(t), "params_per_s": n / statistics.median(t)} for name, t in results.items()}
    base = rows["bandwidth baseline (same bytes)"]["median_s"]
    print(f"{n:,} parameters, {torch.get_num_threads()} threads, median of {args.repeats}")
    for name, row in rows.items():
        row["vs_bandwidth"] = base / row["median_s"]
        print(f"{name:34s} {row['median_s'] * 1e3:8.1f} ms  {row['params_per_s'] / 1e6:8.1f} M params/s  "
              f"{row['vs_bandwidth']:.2f} of the bandwidth bound")
    ema = rows["OffloadAdamW.step with EMA"]["median_s"]
    print(f"EMA in the host pass costs {ema / rows['OffloadAdamW.step']['median_s']:.2f}x the step without it; "
          f"a separate pass costs {rows['step, then a separate EMA pass']['median_s'] / ema:.2f}x the in-pass one")
    save_results("offload_step", rows)


if __name__ == "__main__":
    main()
