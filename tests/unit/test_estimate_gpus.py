"""`estimate-vram --gpus N`: per-card figures for DDP (each card as one) and FSDP2 (1/N of the fp32 UNet,
its gradients and AdamW state, plus gathered units), and one line for a plan that cannot run on N."""

import json

import pytest
from typer.testing import CliRunner

from sdtune.cli import app
from sdtune.config import load_config
from sdtune.estimate import estimate

runner = CliRunner()


def _estimate(model, gpus, *sets):
    cfg, info = load_config("cpu", [f"model.pretrained={model}", *sets])
    return estimate(cfg, info, device="cuda", gpus=gpus)


def test_ddp_cards_each_hold_what_one_card_holds(tiny_sd1):
    one, two = _estimate(tiny_sd1, 1), _estimate(tiny_sd1, 2)
    assert two.distributed == "ddp" and two.gpus == 2
    assert two.categories == one.categories and two.total == one.total
    assert any("per card" in note for note in two.notes)


def test_fsdp_shards_the_fp32_weights_gradients_and_adamw_state(tiny_sd1):
    from diffusers import UNet2DConditionModel

    params = sum(p.numel() for p in UNet2DConditionModel.from_pretrained(tiny_sd1 / "unet").parameters())
    two, four = (_estimate(tiny_sd1, n, "memory.distributed=fsdp") for n in (2, 4))
    assert two.distributed == four.distributed == "fsdp"
    # the gathered units are the same on any number of cards: the difference is the fp32 shards
    assert two.categories["weights"] - four.categories["weights"] == pytest.approx(4 * params / 4, abs=4)
    assert two.categories["optimizer_state"] - four.categories["optimizer_state"] == pytest.approx(
        8 * params / 4, rel=1e-3)  # AdamW's two fp32 moments (and a step count per tensor)
    assert four.categories["weights"] < 4 * params / 4 + 2 * 4 * params / 3  # at most two units gathered, fp32
    one = _estimate(tiny_sd1, 1)
    assert four.total < one.total and four.categories["activations"] == one.categories["activations"]
    # each rank loads only its shards of the fp32 UNet (tests/multiprocess: ..._reads_only_its_shards)
    assert two.host_ram - four.host_ram == pytest.approx(4 * params / 4, abs=8)


def test_fsdp_cpu_offload_moves_the_shards_to_host_ram(tiny_sd1):
    kept, offloaded = (_estimate(tiny_sd1, 2, "memory.distributed=fsdp", *extra)
                       for extra in ([], ["memory.optimizer_offload=cpu"]))
    assert offloaded.categories["optimizer_state"] == 0
    assert offloaded.categories["weights"] < kept.categories["weights"]
    assert offloaded.host_ram > kept.host_ram


def test_the_cli_prints_per_card_figures_and_refuses_a_plan_that_cannot_run_on_n(tiny_sd1):
    shown = runner.invoke(app, ["estimate-vram", "--model", str(tiny_sd1), "--preset", "rtx4090", "--gpus", "2"])
    assert shown.exit_code == 0, shown.output
    assert "on each of 2 cards (ddp)" in shown.output
    doc = runner.invoke(app, ["estimate-vram", "--model", str(tiny_sd1), "--preset", "rtx4090", "--gpus", "2",
                              "--set", "memory.distributed=fsdp", "--json"])
    assert json.loads(doc.output)["estimates"][0]["distributed"] == "fsdp"
    refused = runner.invoke(app, ["estimate-vram", "--model", str(tiny_sd1), "--preset", "rtx3050", "--gpus", "2"])
    assert refused.exit_code == 2
    assert "memory.distributed (auto)=ddp" in refused.output and "memory.optimizer_offload=cpu" in refused.output
