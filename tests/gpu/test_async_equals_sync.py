"""The offload engine's asynchronous copies (side streams, events, prefetch) against the same run with
`SDTUNE_OFFLOAD_SYNC=1`, where every copy is synchronous: the losses and every kept weight (the fp32 masters
and the EMA) must be equal bit for bit. A difference is a race. The asynchronous run is made twice, with GPU
sleeps on the copy streams and then on the compute stream (tests/support/delay_streams.py), so that a missing
wait shows even where the GPU outruns Python. Under deterministic kernels (tests/support/cli_runs.py), one
subprocess a run, on a random SD1.5 at 256 px; the CPU dry run (copies are synchronous there anyway, and
nothing is delayed) checks the plumbing on the tiny model with one case."""

import math
import os

import pytest
import torch
from support.cli_runs import kept_weights, on, step_losses, train

STEPS = 4
CASES = {  # overrides on rtx3050, each a path of the engine with its own copies and waits
    "bf16-clip": ("memory.optimizer_offload=cpu", "train.max_grad_norm=1.0"),
    "bf16-step-in-backward": ("memory.optimizer_offload=cpu", "train.max_grad_norm=0"),
    "nvme": ("memory.optimizer_offload=nvme", "memory.offload_dir=offload"),
    "weight-streaming": ("memory.param_offload=cpu", "memory.gradient_checkpointing=true",
                         "memory.optimizer_offload=cpu"),
    "fp16": ("memory.precision=fp16", "memory.optimizer_offload=cpu"),
    "ema-step-in-backward": ("memory.optimizer_offload=cpu", "train.max_grad_norm=0", "train.ema_decay=0.9"),
}
COMMON = ("train.batch_size=1", "train.gradient_accumulation_steps=1", "train.lr_warmup_steps=0",
          "output.checkpoint_every=0", "output.keep_final_state=true", "output.single_file=false",
          "output.save_precision=fp32", "output.sample_every=0", "memory.attention=sdpa")
# ~1 ms of an H100's or a consumer card's ~2 GHz clock at each side-stream block: longer than Python takes
# between queueing a copy and queueing what reads it
DELAY_CYCLES = int(os.environ.get("GPU_CHECK_DELAY_CYCLES") or 2_000_000)


def _run(model, data, folder, resolution, overrides, delay: str):
    """One run: `delay` "sync" (every copy synchronous) or a delay_streams mode (copies, compute)."""
    folder.mkdir()
    (folder / "offload").mkdir()  # the nvme case's memory.offload_dir, relative to where sdtune runs
    env = {"SDTUNE_OFFLOAD_SYNC": "1", "TEST_DELAY_STREAMS": ""} if delay == "sync" else {
        "SDTUNE_OFFLOAD_SYNC": "", "TEST_DELAY_STREAMS": f"{delay}:{DELAY_CYCLES}",
        "TEST_DELAY_STREAMS_COUNT": str(folder / "sleeps")}
    summary = train(model, data, folder / "out", "rtx3050", [*COMMON, f"data.resolution={resolution}", *overrides],
                    STEPS, env=env, deterministic=True)
    if torch.cuda.is_available() and delay != "sync":  # the sleeps reached the engine's copies
        assert int((folder / "sleeps").read_text()) >= STEPS, f"{delay}: no side-stream block was delayed"
    return summary, step_losses(folder / "out"), kept_weights(folder / "out")


def _assert_equal(asynchronous, synchronous, case: str, delay: str) -> None:
    (summary, losses, weights), (_, sync_losses, sync_weights) = asynchronous, synchronous
    assert len(losses) == STEPS and losses == sync_losses, f"{delay} late: losses {losses} != {sync_losses}"
    assert summary["optimizer_offload"] == [o for o in CASES[case] if "optimizer_offload" in o][0].split("=")[1]
    assert weights and weights.keys() == sync_weights.keys()
    different = [key for key in weights if not torch.equal(weights[key], sync_weights[key])]
    assert not different, f"{delay} late: {len(different)} of {len(weights)} tensors differ, first {different[:3]}"


@pytest.mark.parametrize(("device", "case"), [on("cuda", name) for name in CASES] + [on("cpu", "ema-step-in-backward")])
def test_the_asynchronous_copies_give_what_synchronous_ones_give(device, case, model_and_data, tmp_path):
    model, data, resolution, extra = model_and_data
    resolution = min(resolution, 256)
    overrides = [*CASES[case], *extra]
    synchronous = _run(model, data, tmp_path / "sync", resolution, overrides, "sync")
    for delay in ("copies", "compute") if device == "cuda" else ("copies",):  # the CPU has no streams to delay
        _assert_equal(_run(model, data, tmp_path / delay, resolution, overrides, delay), synchronous, case, delay)
    _, losses, weights = synchronous
    assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())
    assert all(math.isfinite(loss) for loss in losses)
    if "ema" in case:  # the average is kept and compared too: one tensor per trained one
        assert sum("ema" in key for key in weights) == sum("ema" not in key for key in weights)
