"""memory.compile=blocks (regional compilation of the UNet's transformer layers) trains what the uncompiled
UNet trains, under gradient checkpointing and a host optimizer tier, and a resumed run may turn it on.

Compiled with torch.compile's "aot_eager" backend (`sdtune.train.compile.BACKEND`): the same graph capture
and autograd as inductor without its C++ code generation, which takes about a minute a graph on this CPU
(bench/compile_blocks.py measures inductor). Dynamo's cache is reset first: it is one per process, and the
graphs of an earlier test would count against its limits. The refusals (weight streaming, several
processes) are rows of tests/unit/test_rules.py. One compiled run (its compile is most of this file's
time): LoRA, LoHa, LoKr, DoRA, the nvme tier, fused_backward, bf16, fp16, a textual inversion and sampling
between steps were tried the same way by hand and trained as uncompiled.
"""

import logging
import shutil

import pytest
import torch
from support.helpers import prepared, said

import sdtune.train.compile as compile_blocks
from sdtune.config import load_config
from sdtune.train import loop as trainer


@pytest.fixture(autouse=True)
def _aot_eager(monkeypatch):
    torch._dynamo.reset()
    monkeypatch.setattr(compile_blocks, "BACKEND", "aot_eager")
    yield
    torch._dynamo.reset()


def test_a_resumed_run_with_compiled_blocks_trains_as_the_uncompiled_run(tiny_sd1, images, tmp_path, caplog):
    """Steps 3-4 resumed with memory.compile=blocks (neutral on resume) after steps 1-2 without it, under
    gradient checkpointing and the host optimizer tier: the losses and weights of a straight uncompiled run,
    and one line saying what the first compiled step compiled."""
    caplog.set_level(logging.INFO, logger="sdtune")
    sets = ["train.max_steps=4", "output.checkpoint_every=2", "memory.gradient_checkpointing=true",
            "memory.optimizer_offload=cpu"]
    straight = prepared(tiny_sd1, images, tmp_path / "straight", *sets)
    assert straight.placement.compiled is None
    trainer.loop(straight)
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step-000004")
    cfg, info = load_config("cpu", [f"model.pretrained={tiny_sd1}", *sets, "memory.compile=blocks"])
    resumed = trainer.prepare(cfg, info, str(images), str(tmp_path / "resumed"), resume=True)
    assert resumed.step == 2
    trainer.loop(resumed)
    assert resumed.losses == pytest.approx(straight.losses, rel=1e-5)
    a, b = trainer.fp32_weights(straight), trainer.fp32_weights(resumed)
    assert all(torch.allclose(a[name], b[name], rtol=1e-4, atol=1e-6) for name in a)
    graphs, _ = resumed.placement.compiled.compiled()
    assert graphs >= 1  # compiled for real, not run eagerly after a failed or refused compile
    lines = [line for line in said(caplog) if line.startswith("compiled ")]
    assert len(lines) == 1 and lines[0].startswith(f"compiled 6 blocks ({graphs} distinct) in "), lines
