"""memory.compile=blocks (regional compilation of the UNet's transformer layers) trains what the uncompiled
UNet trains, under gradient checkpointing, a host optimizer tier and LoRA, and a resumed run may turn it on.

Compiled with torch.compile's "aot_eager" backend (`sdtune.train.compile.BACKEND`): the same graph capture
and autograd as inductor without its C++ code generation, which takes about a minute a graph on this CPU
(bench/compile_blocks.py measures inductor). Dynamo's cache is reset first: it is one per process, and the
graphs of an earlier test would count against its limits. The refusals (weight streaming, several
processes) are rows of tests/unit/test_rules.py.
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


def test_compiled_blocks_train_as_the_uncompiled_unet(tiny_sd1, images, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="sdtune")
    sets = ["train.max_steps=2", "memory.gradient_checkpointing=true", "memory.optimizer_offload=cpu"]
    plain = prepared(tiny_sd1, images, tmp_path / "plain", *sets)
    compiled = prepared(tiny_sd1, images, tmp_path / "compiled", *sets, "memory.compile=blocks")
    assert plain.placement.compiled is None
    for run in (plain, compiled):
        trainer.loop(run)
    assert compiled.losses == pytest.approx(plain.losses, rel=1e-5)
    a, b = trainer.fp32_weights(plain), trainer.fp32_weights(compiled)
    assert all(torch.allclose(a[name], b[name], rtol=1e-4, atol=1e-6) for name in a)
    graphs, _ = compiled.placement.compiled.compiled()
    assert graphs >= 1  # compiled for real, not run eagerly after a failed or refused compile
    lines = [line for line in said(caplog) if line.startswith("compiled ")]
    assert len(lines) == 1 and lines[0].startswith(f"compiled 6 blocks ({graphs} distinct) in "), lines


def test_a_resumed_lora_run_may_turn_compile_on(tiny_sd1, images, tmp_path):
    """memory.compile is neutral on resume: steps 3-4 compiled after 1-2 uncompiled give the losses of a
    straight uncompiled run."""
    sets = ["train.max_steps=4", "output.checkpoint_every=2", "train.method=lora", "lora.rank=4",
            "memory.gradient_checkpointing=true"]
    straight = prepared(tiny_sd1, images, tmp_path / "straight", *sets)
    trainer.loop(straight)
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step-000004")
    cfg, info = load_config("cpu", [f"model.pretrained={tiny_sd1}", *sets, "memory.compile=blocks"])
    resumed = trainer.prepare(cfg, info, str(images), str(tmp_path / "resumed"), resume=True)
    assert resumed.step == 2 and resumed.placement.compiled is not None
    trainer.loop(resumed)
    assert resumed.losses == pytest.approx(straight.losses, rel=1e-5)
    assert resumed.placement.compiled.compiled()[0] >= 1
