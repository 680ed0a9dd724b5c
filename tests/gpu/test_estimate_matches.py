"""`sdtune estimate-vram --json` against what a run of the same plan really reserved, as summary.json
reports it (`torch.cuda.max_memory_reserved` on CUDA): within max(10%, 256 MiB), the estimator's goal. Each
run is capped at its preset's card less the CUDA context, as a real card would be. On a random SD1.5 at
512 px; the CPU dry run (where the peak is the process's RSS, not comparable) checks the plumbing."""

import pytest
from support.cli_runs import estimate, on, step_losses, train

GIB, MIB = 2**30, 2**20
CONTEXT_GIB = 0.5  # what a real card loses to the CUDA context, outside torch's allocator
STEPS = 3
COMMON = ("train.lr_warmup_steps=0", "output.checkpoint_every=0", "output.keep_checkpoints=0",
          "output.single_file=false", "output.sample_every=0")
PLANS = ["rtx3050", "rtx4090", "rtx2070", "rtx3080"]  # the 8 GB full fine-tune first


@pytest.mark.parametrize(("device", "preset"), [on("cuda", name) for name in PLANS] + [on("cpu", "rtx3050")])
def test_the_estimate_is_what_the_run_reserves(device, preset, model_and_data, tmp_path):
    model, data, resolution, extra = model_and_data
    overrides = [*COMMON, f"data.resolution={resolution}", *extra]
    guess = estimate(model, preset, overrides, cwd=tmp_path)
    cap = guess["card_gib"] - CONTEXT_GIB if device == "cuda" else 0.0
    summary = train(model, data, tmp_path / "out", preset, overrides, STEPS, cap_gib=cap)
    assert summary["steps"] == STEPS and len(step_losses(tmp_path / "out")) == STEPS
    measured = summary["peak_memory_bytes"]
    assert measured > 0 and guess["peak_reserved"] > 0
    if device == "cpu":
        assert summary["peak_memory_kind"] == "process_max_rss"
        return
    assert summary["peak_memory_kind"] == "cuda_max_reserved"
    tolerance = max(0.10 * measured, 256 * MIB)
    assert abs(guess["peak_reserved"] - measured) <= tolerance, (
        f"{preset}: estimated {guess['peak_reserved'] / GIB:.2f} GiB, reserved {measured / GIB:.2f} GiB")
