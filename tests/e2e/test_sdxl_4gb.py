"""The `sdxl-4gb` preset (SDXL's UNet weights streamed from host RAM, AdamW's state in an nvme file) trains
on the CPU as the resident plan does: the same config without the two offload keys."""

import pytest
import torch

import sdtune.offload
from sdtune.config import load_config
from sdtune.offload.params import ParamStreamer
from sdtune.train import loop as trainer


def prepared_preset(preset, model, images, out, *overrides):
    cfg, info = load_config(preset, [f"model.pretrained={model}", *overrides])
    return trainer.prepare(cfg, info, str(images), str(out), resume=False)


def _streamer(model, device, optimizer=None, **kwargs) -> ParamStreamer:
    """Blocks of an eighth of the tiny UNet (which fits in one default block)."""
    block_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) // 8
    return ParamStreamer(model, device, optimizer, **{**kwargs, "block_bytes": block_bytes})


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_sdxl_4gb_trains_the_tiny_sdxl_as_the_resident_plan(tiny_sdxl, images, tmp_path, monkeypatch, precision):
    """In fp32 bit for bit. In bf16 (the preset's) within 0.1%: the resident plan autocasts fp32 weights, where
    the offloaded one keeps bf16 working copies, so its norm layers' weights are rounded to bf16 too."""
    monkeypatch.setattr(sdtune.offload, "ParamStreamer", _streamer)  # where the trainer imports it from
    (tmp_path / "state").mkdir()
    common = ["memory.device=cpu", "memory.attention=sdpa", "data.resolution=64", "train.max_steps=3",
              "train.lr_warmup_steps=0", "train.learning_rate=1e-3", "output.checkpoint_every=0",
              f"memory.precision={precision}", f"memory.offload_dir={tmp_path / 'state'}"]
    offloaded = prepared_preset("sdxl-4gb", tiny_sdxl, images, tmp_path / "offloaded", *common)
    resident = prepared_preset("sdxl-4gb", tiny_sdxl, images, tmp_path / "resident", *common,
                               "memory.param_offload=none", "memory.optimizer_offload=none")
    assert isinstance(offloaded.placement.streamer, ParamStreamer) and len(offloaded.placement.streamer.units) > 4
    assert offloaded.tier.name == "nvme" and resident.placement.streamer is None and resident.tier.name == "adamw"
    assert offloaded.plan.working_dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    for run in (resident, offloaded):
        trainer.loop(run)
    a, b = trainer.fp32_weights(resident), trainer.fp32_weights(offloaded)
    assert set(a) == set(b) and len(offloaded.losses) == 3
    if precision == "fp32":
        assert offloaded.losses == resident.losses and all(torch.equal(a[k], b[k]) for k in a)
    else:
        assert offloaded.losses[0] == resident.losses[0]  # the first forward: the same bf16 matmuls
        assert offloaded.losses == pytest.approx(resident.losses, rel=1e-3)
        assert offloaded.losses != pytest.approx(resident.losses, rel=1e-7)  # not the same run twice
