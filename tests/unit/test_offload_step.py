"""The host tier's AdamW pass, made in cache-sized chunks, changes no number."""

from __future__ import annotations

import pytest
import torch

from sdtune.offload import OffloadAdamW, layout


def _trained(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Masters and moving averages after three clipped steps of a 4,680-parameter model."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    opt = OffloadAdamW(model.parameters(), device="cpu", dtype=dtype, lr=1e-2, max_grad_norm=0.05, ema=True)
    opt.ema_decay = 0.9
    for _ in range(3):
        model(torch.randn(4, 64, dtype=dtype)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return {**opt.master_weights(model), **{f"ema.{k}": v.clone() for k, v in opt.ema_weights(model).items()}}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_host_step_in_chunks_equals_one_pass_over_the_whole_bucket(monkeypatch, dtype):
    """Chunks of 1,000 values (the bucket's 4,680 split unevenly), against one chunk for the whole bucket:
    bf16 gradients upcast chunk by chunk, fp32 ones unscaled and clipped in place."""
    monkeypatch.setattr(layout, "STEP_CHUNK", 1000)
    chunked = _trained(dtype)
    monkeypatch.setattr(layout, "STEP_CHUNK", 10**9)
    whole = _trained(dtype)
    torch.manual_seed(0)
    initial = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8)).state_dict()
    assert all(not torch.equal(chunked[name], weight) for name, weight in initial.items())  # it trained
    for name, weight in whole.items():
        assert torch.equal(chunked[name], weight), name
