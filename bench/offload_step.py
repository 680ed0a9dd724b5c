"""CPU optimizer offload: how fast the host AdamW step runs against what memory bandwidth allows (a roofline).

    .venv/bin/python bench/offload_step.py [--params 50_000_000] [--threads 1] [--rounds 5]

The bound: the bytes one step must move over the streaming bandwidth of this machine on the same threads,
both measured in this run. The step reads the fp32 weight and both moments and the gradient in the
working precision, and writes the weight, both moments and the new weight cast to the working precision:
24 + 2 x itemsize bytes a parameter (28 in bf16, the presets' precision on a GPU; 32 in fp32). The
bandwidth is the best of STREAM-like kernels over fp32 tensors of the same size (copy, scale, add, a
three-stream addcmul, and torch's fused AdamW kernel alone on an fp32 gradient), in bytes counted as STREAM
counts them (no write-allocate traffic).

Each step row is timed on two paths: `cpu path`, what a CPU run does (the cast goes to the working weights,
a separate buffer), and `gpu path`, the host's work in a GPU run (the cast goes back into the staging buffer
the gradient came from; the upload to the device is the copy engine's work, so it is left out). `main's loop`
is the pass before issue 30 (chunks of 2**20 values, an upcast copy even of fp32 gradients), kept here as
the reference. Every row runs once per round, rounds interleaved (other processes disturb each round
alike); medians of `--rounds`. Wall time and this thread's CPU time are both shown; the bandwidth and the
ratios use `--clock` (default `cpu`: the thread's CPU time, which counts its memory stalls but not the time
other processes held the core; on a quiet machine the two agree). The last rows compare torch's fused
AdamW per tensor and the moving average (`ema=True`) kept in the host pass against the same step followed
by a separate pass over the average.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import save_results

from sdtune.offload import OffloadAdamW, layout
from sdtune.offload.layout import Scaling, adamw_kernel

MAIN_CHUNK = 2**20  # main's chunk before issue 30


def main_update(opt, bucket, scratch, step, scaling) -> None:
    """main's `OffloadAdamW._update` before issue 30 (chunks of 2**20, every gradient copied to scratch)."""
    master, state = bucket.master, opt.state[bucket.master]
    group, out = opt._step_settings(), bucket.device_flat if opt._cast_in_place else bucket.staging
    for start in range(0, len(master), MAIN_CHUNK):
        part = slice(start, min(start + MAIN_CHUNK, len(master)))
        grad = scratch[:part.stop - part.start].copy_(bucket.staging[part])
        scaling.apply(grad)
        adamw_kernel(master[part], grad, state["exp_avg"][part], state["exp_avg_sq"][part], step, group)
        out[part].copy_(master[part])


def host_pass(opt, update, gpu_path: bool = False, ema_decay: float | None = None) -> None:
    """One step's host pass over every bucket, by `update` ("main": main's loop; otherwise the tier's own).
    `gpu_path`: the new weights go back into the staging buffer, and the upload (the copy engine's work on a
    GPU) is left out; `ema_decay`: the moving average is updated in the pass."""
    opt._cast_in_place, opt.ema_decay = not gpu_path, ema_decay
    for bucket in opt._buckets:
        state = opt.state[bucket.master]
        state["step"] += 1
        if update == "main":
            main_update(opt, bucket, opt._bench_scratch, state["step"], Scaling())
        elif update == "kernel":  # the chunked AdamW kernel alone, on a gradient already upcast (in L2)
            pieces = [t.split(layout.STEP_CHUNK) for t in (bucket.master, state["exp_avg"], state["exp_avg_sq"])]
            for new, moment, moment_sq in zip(*pieces, strict=True):
                adamw_kernel(new, opt._scratch[:len(new)], moment, moment_sq, state["step"], opt._step_settings())
        elif gpu_path:
            with_upload, opt._upload = opt._upload, lambda bucket: None
            opt._update(bucket, bucket.master, state["exp_avg"], state["exp_avg_sq"], state["step"], Scaling())
            opt._upload = with_upload
        else:
            opt._update(bucket, bucket.master, state["exp_avg"], state["exp_avg_sq"], state["step"], Scaling())


def tier(n: int, dtype: torch.dtype) -> OffloadAdamW:
    """An `OffloadAdamW` over 100 tensors of n / 100 values with staged gradients (and a moving average)."""
    params = [torch.nn.Parameter(torch.randn(n // 100)) for _ in range(100)]
    opt = OffloadAdamW(params, device="cpu", dtype=dtype, lr=1e-4, ema=True)
    opt._staging.tensor.copy_(torch.randn(len(opt._staging.tensor)))
    opt._bench_scratch = torch.empty(MAIN_CHUNK)
    return opt


def bandwidth_kernels(n: int) -> dict:
    """STREAM-like kernels over fp32 tensors of `n` values: name -> (function, bytes a value)."""
    a, b, c, d = (torch.randn(n).abs() for _ in range(4))
    step, group = torch.tensor(2.0), {"betas": (0.9, 0.999), "lr": 1e-4, "weight_decay": 1e-2, "eps": 1e-8}
    return {
        "copy b = a": (lambda: b.copy_(a), 8),
        "scale a *= s": (lambda: a.mul_(1.0), 8),
        "add a += b": (lambda: a.add_(b), 12),
        "addcmul a += b * c": (lambda: a.addcmul_(b, c, value=1e-9), 16),
        "fused AdamW kernel, fp32 gradient": (lambda: adamw_kernel(a, b, c, d, step, group), 28),
    }


def cast_rows(n: int) -> dict:
    """The bf16 casts of one step alone, on one chunk kept in L2 (no memory traffic): what they cost a step in
    compute, which separate passes on one thread cannot hide behind the AdamW kernel's memory stalls."""
    wide, narrow = torch.randn(layout.STEP_CHUNK), torch.randn(layout.STEP_CHUNK).bfloat16()
    times = range(n // layout.STEP_CHUNK)

    def upcast():
        for _ in times:
            wide.copy_(narrow)

    def downcast():
        for _ in times:
            narrow.copy_(wide)
    return {"bf16 -> fp32 upcast in L2 (compute only)": (lambda: None, upcast),
            "fp32 -> bf16 cast in L2 (compute only)": (lambda: None, downcast)}


def timed_rounds(rows: dict, rounds: int) -> dict:
    """Run each row's (setup, fn) once per round, interleaved; {name: (wall seconds, cpu seconds)} lists."""
    times = {name: ([], []) for name in rows}
    for _ in range(rounds + 1):  # the first round is a warm-up
        for name, (setup, fn) in rows.items():
            setup()
            wall, cpu = time.perf_counter(), time.thread_time()
            fn()
            times[name][0].append(time.perf_counter() - wall)
            times[name][1].append(time.thread_time() - cpu)
    return {name: (wall[1:], cpu[1:]) for name, (wall, cpu) in times.items()}


def step_rows(n: int) -> tuple[dict, dict, OffloadAdamW]:
    """The host step's rows, {name: (setup, fn)}, each row's bytes a parameter, and the fp32 tier."""
    rows, nbytes, none = {}, {}, lambda: None
    for dtype in (torch.bfloat16, torch.float32):
        opt, short = tier(n, dtype), str(dtype).removeprefix("torch.")
        for gpu_path in (False, True):
            for update in ("main", "now"):
                name = f"{short} {'gpu' if gpu_path else 'cpu'} path, " + (
                    "main's loop" if update == "main" else "this branch")
                rows[name] = (none, lambda opt=opt, update=update, gpu_path=gpu_path: host_pass(opt, update, gpu_path))
                nbytes[name] = 24 + 2 * dtype.itemsize
        if dtype == torch.bfloat16:
            rows["bf16: the chunked AdamW kernel alone"] = (none, lambda opt=opt: host_pass(opt, "kernel", True))
            nbytes["bf16: the chunked AdamW kernel alone"] = 24
    return rows, nbytes, opt


def comparison_rows(n: int, offload: OffloadAdamW) -> dict:
    """torch's fused AdamW per tensor, and the moving average in `offload`'s pass or in a pass of its own."""
    plain_params = [torch.nn.Parameter(torch.randn(n // 100)) for _ in range(100)]
    plain = torch.optim.AdamW(plain_params, lr=1e-4, fused=True)

    def separate_pass():
        host_pass(offload, "now")
        for bucket in offload._buckets:
            bucket.ema.lerp_(bucket.master, 0.001)

    def backward():
        sum(p.sum() for p in plain_params).backward()

    return {"torch fused AdamW, per tensor (fp32)": (backward, plain.step),
            "fp32 cpu path, then a separate EMA pass": (lambda: None, separate_pass),
            "fp32 cpu path with EMA in the pass": (lambda: None, lambda: host_pass(offload, "now", ema_decay=0.999))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params", type=int, default=50_000_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n = args.params
    kernels = bandwidth_kernels(n)
    steps, nbytes, fp32_tier = step_rows(n)
    rows = {**{name: (lambda: None, fn) for name, (fn, _) in kernels.items()}, **steps,
            **cast_rows(n), **comparison_rows(n, fp32_tier)}
    nbytes.update({name: size for name, (_, size) in kernels.items()})
    nbytes.update({name: 0 for name in rows if "compute only" in name})
    nbytes.update({name: 28 if name.startswith("torch") else 40 for name in rows if name not in nbytes})  # EMA: +8
    times = timed_rounds(rows, args.rounds)
    results = {name: {"wall_s": statistics.median(w), "cpu_s": statistics.median(c), "bytes_per_param": nbytes[name]}
               for name, (w, c) in times.items()}
    clock = f"{args.clock}_s"
    bandwidth = max(n * results[name]["bytes_per_param"] / results[name][clock] for name in kernels)
    print(f"{n:,} parameters, {torch.get_num_threads()} thread(s), median of {args.rounds} interleaved rounds; "
          f"streaming bandwidth {bandwidth / 1e9:.1f} GB/s (the best kernel below); step chunk "
          f"{layout.STEP_CHUNK} values; ratios by {args.clock} time")
    print(f"{'row':44s} {'B/param':>7s} {'wall ms':>8s} {'cpu ms':>8s} {'GB/s':>6s} {'bound ms':>8s} {'vs bound':>8s}")
    for name, row in results.items():
        row["bound_s"] = n * row["bytes_per_param"] / bandwidth
        row["vs_bound"] = row["bound_s"] / row[clock]
        row["gb_per_s"] = n * row["bytes_per_param"] / row[clock] / 1e9
        print(f"{name:44s} {row['bytes_per_param']:7d} {row['wall_s'] * 1e3:8.1f} {row['cpu_s'] * 1e3:8.1f} "
              f"{row['gb_per_s']:6.1f} {row['bound_s'] * 1e3:8.1f} {row['vs_bound']:8.2f}")
    summary(results, clock)
    save_results("offload_step", results)


def summary(results: dict, clock: str) -> None:
    """What the bf16 step can reach as separate torch passes on one thread: the memory bound plus the casts."""
    bound = results["bfloat16 gpu path, this branch"]["bound_s"]
    casts = sum(row[clock] for name, row in results.items() if "compute only" in name)
    for path in ("gpu", "cpu"):
        now, before = (results[f"bfloat16 {path} path, {which}"] for which in ("this branch", "main's loop"))
        print(f"bf16 {path} path: {now['vs_bound']:.2f} of the bound (main's loop {before['vs_bound']:.2f}, "
              f"{before[clock] / now[clock]:.2f}x faster now); bound + casts ({bound * 1e3:.1f} + {casts * 1e3:.1f} "
              f"ms) allows {bound / (bound + casts):.2f}, of which this is {(bound + casts) / now[clock]:.2f}")


if __name__ == "__main__":
    main()
