"""EMA weights (`train.ema_decay`): the average a user would compute by hand from the checkpoints' raw
weights, the same with the weights offloaded to host RAM or to an nvme file, resumed bit for bit, exported
as the model, used for the sample grids, counted by the estimator."""

import pytest
import torch
from safetensors.torch import load_file
from support.helpers import assert_resume_is_bitwise, final_unet, train

from sdtune.config import TrainConfig, load_config
from sdtune.train import ema as ema_module

STEPS = 4
RUN = ["--max-steps", str(STEPS), "--set", "output.checkpoint_every=1", "--set", f"output.keep_checkpoints={STEPS}",
       "--set", "output.single_file=false", "--set", "train.ema_decay=0.9", "--set", "train.ema_power=0.75"]


def _ema_runs(tiny_sd1, images, root, offload: str, *extra) -> dict:
    sets = []
    if offload != "none":
        sets = ["--set", f"memory.optimizer_offload={offload}"]
        if offload == "nvme":
            sets += ["--set", f"memory.offload_dir={root / 'nvme'}"]
    out = root / offload
    train(tiny_sd1, images, out, *RUN, *sets, *extra)
    return out


@pytest.fixture(scope="module")
def runs(tiny_sd1, images, tmp_path_factory):
    root = tmp_path_factory.mktemp("ema")
    return {tier: _ema_runs(tiny_sd1, images, root, tier) for tier in ("none", "cpu", "nvme")}


def raw(out, step):
    return load_file(out / "checkpoints" / f"step-{step:06d}" / "unet.safetensors")


def hand_average(out, steps, every=1) -> dict:
    """diffusers' EMAModel with warm-up, computed from the raw weights each checkpoint kept."""
    average, updates = None, 0
    for step in range(1, steps + 1):
        if step % every:
            continue
        updates += 1
        decay = 0.0 if updates == 1 else min(0.9, 1 - (1 + (updates - 1)) ** -0.75)
        weights = raw(out, step)
        average = ({k: v.clone() for k, v in weights.items()} if average is None
                   else {k: decay * average[k] + (1 - decay) * weights[k] for k in weights})
    return average


def test_the_decay_warms_up_as_diffusers_ema_model_does():
    from diffusers.training_utils import EMAModel

    train = TrainConfig(ema_decay=0.999, ema_power=0.75, ema_inv_gamma=1.0)
    reference = EMAModel([torch.nn.Parameter(torch.zeros(1))], decay=0.999, use_ema_warmup=True, power=0.75)
    for update in range(1, 50):
        assert ema_module.ema_decay(update, train) == pytest.approx(reference.get_decay(update), abs=1e-12)


def test_the_exported_model_is_the_average_a_user_computes_from_the_raw_weights(runs):
    out = runs["none"]
    expected, exported = hand_average(out, STEPS), final_unet(out)
    assert max((exported[k] - expected[k]).abs().max().item() for k in expected) < 1e-6
    assert any(not torch.equal(exported[k], raw(out, STEPS)[k]) for k in expected)  # not the raw weights
    kept = load_file(out / "checkpoints" / f"step-{STEPS:06d}" / "ema.safetensors")
    assert all(torch.equal(kept[f"unet.{k}"], exported[k]) for k in exported)


@pytest.mark.parametrize("tier", ["cpu", "nvme"])
def test_offloaded_ema_equals_the_in_device_ema(runs, tier):
    a, b = final_unet(runs["none"]), final_unet(runs[tier])
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-7


def test_ema_every_updates_after_every_nth_step(tiny_sd1, images, tmp_path):
    out = tmp_path / "every"
    train(tiny_sd1, images, out, *RUN, "--set", "train.ema_every=2")
    expected, exported = hand_average(out, STEPS, every=2), final_unet(out)
    assert max((exported[k] - expected[k]).abs().max().item() for k in expected) < 1e-6


@pytest.mark.parametrize("offload", ["none", "cpu"])
def test_a_resumed_run_ends_with_the_same_average_bit_for_bit(tiny_sd1, images, tmp_path, offload):
    assert_resume_is_bitwise(tiny_sd1, images, tmp_path, *RUN, "--set", f"memory.optimizer_offload={offload}",
                             last=STEPS, resume_from=2)


def test_a_lora_exports_its_averaged_adapters(tiny_sd1, images, tmp_path):
    out = tmp_path / "lora"
    train(tiny_sd1, images, out, *RUN, "--set", "train.method=lora", "--set", "train.learning_rate=1e-2")
    kept = load_file(out / "checkpoints" / f"step-{STEPS:06d}" / "ema.safetensors")
    trained = load_file(out / "checkpoints" / f"step-{STEPS:06d}" / "lora.safetensors")
    assert set(kept) == set(trained) and any(not torch.equal(kept[k], trained[k]) for k in kept)
    exported = load_file(out / "pytorch_lora_weights.safetensors")
    assert sorted(v.float().sum().item() for v in exported.values()) == pytest.approx(
        sorted(v.sum().item() for k, v in kept.items() if "lora" in k), rel=1e-5)


@pytest.mark.parametrize("offload", ["none", "cpu"])
def test_the_average_is_applied_for_a_while_and_the_weights_come_back_exactly(tiny_sd1, images, tmp_path, offload):
    from support.helpers import prepared

    run = prepared(tiny_sd1, images, tmp_path / "out", "train.ema_decay=0.5", "train.max_steps=2",
                   f"memory.optimizer_offload={offload}")
    with run:
        from sdtune.train import loop as trainer

        trainer.loop(run)
        params = dict(run.components.unet.named_parameters())
        before = {k: p.detach().clone() for k, p in params.items()}
        average = run.ema.weights()
        with run.ema.applied():
            assert all(torch.equal(p.detach().float(), average[f"unet.{k}"].to(p.dtype).float())
                       for k, p in params.items())
        assert all(torch.equal(p.detach(), before[k]) for k, p in params.items())


def test_the_estimator_counts_the_average_where_the_tier_keeps_it(tiny_sd1):
    from sdtune.estimate import estimate

    def figures(*sets):
        cfg, info = load_config("cpu", [f"model.pretrained={tiny_sd1}", *sets])
        result = estimate(cfg, info, device="cpu")
        return result.categories["optimizer_state"], result.host_ram

    numel = sum(p.numel() for p in __import__("sdtune.family.meta", fromlist=["meta_model"]).meta_model(
        str(tiny_sd1)).unet.parameters())
    device_off, host_off = figures()
    device_on, _ = figures("train.ema_decay=0.999")
    assert device_on - device_off == 4 * numel
    _, cpu_off = figures("memory.optimizer_offload=cpu")
    _, cpu_on = figures("memory.optimizer_offload=cpu", "train.ema_decay=0.999")
    assert cpu_on - cpu_off == 4 * numel
