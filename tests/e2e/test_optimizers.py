"""Optimizers beyond AdamW (`memory.optimizer`: adafactor, prodigy, lion) and stepping inside backward
(`memory.fused_backward`): each trains the tiny model, resumes bit for bit, steps in backward exactly as
after it, is counted by the estimator, and refuses the plans it cannot run in one line naming both keys."""

import json

import pytest
import torch
from safetensors.torch import load_file
from support.helpers import assert_resume_is_bitwise, final_unet, runner, train

from sdtune.cli import app
from sdtune.config import load_config
from sdtune.errors import SdtuneError

NEW = ["adafactor", "prodigy", "lion"]
RATES = {"adafactor": 1e-4, "prodigy": 1.0, "lion": 1e-5, "adamw": 1e-4}
RUN = ["--max-steps", "3", "--set", "output.checkpoint_every=1", "--set", "output.single_file=false"]


def optimizer(name):
    return ["--set", f"memory.optimizer={name}", "--set", f"train.learning_rate={RATES[name]}"]


@pytest.mark.parametrize("name", NEW)
def test_each_optimizer_trains_and_resumes_bit_for_bit(tiny_sd1, images, tmp_path, name):
    assert_resume_is_bitwise(tiny_sd1, images, tmp_path, *RUN, *optimizer(name), last=3, resume_from=1)
    start = load_file(tiny_sd1 / "unet" / "diffusion_pytorch_model.safetensors")
    trained = final_unet(tmp_path / "straight")
    assert sum(not torch.equal(start[k].float(), trained[k]) for k in start) > len(start) // 2


@pytest.mark.parametrize("name", ["adamw", "adafactor", "lion", "adamw8bit"])
def test_stepping_inside_backward_trains_what_the_step_after_backward_trains(tiny_sd1, images, tmp_path, name):
    """Bit for bit: each parameter's optimizer does what the whole model's does to it; the warm-up proves
    that the LR schedule reaches the per-parameter optimizers."""
    if name == "adamw8bit":
        pytest.importorskip("bitsandbytes")
    rate = ["--set", f"memory.optimizer={name}", "--set", f"train.learning_rate={RATES.get(name, 1e-4)}"]
    common = [*RUN, *rate, "--set", "train.max_grad_norm=0", "--set", "train.lr_warmup_steps=2"]
    after = train(tiny_sd1, images, tmp_path / "after", *common)
    inside = train(tiny_sd1, images, tmp_path / "inside", *common, "--set", "memory.fused_backward=true")
    assert inside["losses"] == after["losses"]
    a, b = final_unet(tmp_path / "after"), final_unet(tmp_path / "inside")
    assert all(torch.equal(a[k], b[k]) for k in a)
    start = load_file(tiny_sd1 / "unet" / "diffusion_pytorch_model.safetensors")
    assert not all(torch.equal(start[k].float(), b[k]) for k in start)
    norms = {run: [json.loads(line)["grad_norm"] for line in (tmp_path / run / "metrics.jsonl").open()]
             for run in ("after", "inside")}
    assert None not in norms["after"] and set(norms["inside"]) == {None}  # the gradients were gone: stepped inside


def test_stepping_inside_backward_resumes_bit_for_bit(tiny_sd1, images, tmp_path):
    assert_resume_is_bitwise(tiny_sd1, images, tmp_path, *RUN, *optimizer("lion"), "--set", "train.max_grad_norm=0",
                             "--set", "memory.fused_backward=true", last=3, resume_from=1)


@pytest.mark.parametrize("name", ["prodigy", "lion"])
def test_a_missing_package_is_one_line_naming_its_extra(tiny_sd1, images, tmp_path, monkeypatch, name):
    import sys

    module = {"prodigy": "prodigyopt", "lion": "lion_pytorch"}[name]
    monkeypatch.setitem(sys.modules, module, None)  # as if it were not installed: importing it fails
    result = runner.invoke(app, ["train", "--preset", "cpu", "--data", str(images), "--model", str(tiny_sd1),
                                 "--out", str(tmp_path / "o"), *RUN, *optimizer(name)])
    assert result.exit_code != 0
    line = next(line for line in result.output.splitlines() if f"memory.optimizer={name} needs" in line)
    assert f"pip install 'sdtune[{name}]'" in line and "Traceback" not in result.output


@pytest.mark.parametrize(("sets", "keys"), [
    (["memory.optimizer=lion", "memory.optimizer_offload=cpu"],
     ("memory.optimizer_offload=cpu", "memory.optimizer=lion")),
    (["memory.optimizer=prodigy", "memory.fused_backward=true", "train.max_grad_norm=0"],
     ("memory.fused_backward", "memory.optimizer=prodigy")),
    (["memory.fused_backward=true"], ("memory.fused_backward", "train.max_grad_norm")),
    (["memory.fused_backward=true", "train.max_grad_norm=0", "train.gradient_accumulation_steps=2"],
     ("memory.fused_backward", "train.gradient_accumulation_steps")),
    (["memory.fused_backward=true", "train.max_grad_norm=0", "memory.precision=fp16"],
     ("memory.fused_backward", "memory.precision")),
])
def test_plans_an_optimizer_cannot_run_are_one_line_naming_both_keys(sets, keys):
    with pytest.raises(SdtuneError) as error:
        load_config("cpu", sets)
    assert all(key in str(error.value) for key in keys), str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(("sets", "keys"), [
    (["memory.distributed=fsdp", "memory.optimizer=lion"], ("memory.distributed=fsdp", "memory.optimizer=lion")),
    (["memory.distributed=ddp", "memory.fused_backward=true", "train.max_grad_norm=0"],
     ("memory.distributed=ddp", "memory.fused_backward")),
])
def test_several_processes_refuse_what_they_cannot_split(sets, keys):
    from sdtune.plan import resolve_mode
    from sdtune.util.world import World

    cfg, _ = load_config("cpu", sets)
    with pytest.raises(SdtuneError) as error:
        resolve_mode(cfg, World(rank=0, size=2))
    assert all(key in str(error.value) for key in keys), str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("name", ["adamw", *NEW])
def test_each_byte_model_is_what_the_optimizer_holds_after_a_step(name):
    """`state_bytes` counts every tensor of the optimizer's state: moments, factors, p0, step counts."""
    from sdtune.optim.in_device import build
    from sdtune.optim.tier import IN_DEVICE

    torch.manual_seed(0)
    shapes = [(6, 4, 3, 3), (6, 5), (3, 2, 7), (6,)]  # a convolution, a linear, a 3-D tensor, a bias
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in shapes]
    optimizer = build(name, params, load_config("cpu", [f"train.learning_rate={RATES[name]}"])[0].train)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    held = sum(t.nbytes for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t))
    assert held == IN_DEVICE[name].state_bytes(shapes)


def test_the_estimator_counts_each_optimizer_by_its_byte_model(tiny_sd1):
    from sdtune.estimate import estimate
    from sdtune.family.meta import meta_model
    from sdtune.optim.tier import IN_DEVICE

    def categories(*sets):
        cfg, info = load_config("cpu", [f"model.pretrained={tiny_sd1}", *sets])
        return estimate(cfg, info, device="cpu").categories

    shapes = [p.shape for p in meta_model(str(tiny_sd1)).unet.parameters()]
    numel, largest = sum(s.numel() for s in shapes), max(s.numel() for s in shapes)
    state = {name: categories(f"memory.optimizer={name}")["optimizer_state"] for name in ["adamw", *NEW]}
    assert state == {name: IN_DEVICE[name].footprint(shapes, itemsize=4).device for name in state}
    assert state["lion"] == 4 * numel + 2 * 4 * largest  # one moment; two temporaries in its step
    assert state["prodigy"] > state["adamw"] > state["lion"] > state["adafactor"]
    assert categories("train.ema_decay=0.999")["optimizer_state"] == state["adamw"] + 4 * numel
    fused, plain = categories("memory.fused_backward=true", "train.max_grad_norm=0"), categories()
    assert fused["gradients"] < plain["gradients"] / 4  # one parameter's gradient at a time, not all


def test_stepping_inside_backward_reaches_the_schedule_and_stops_with_its_tier():
    """The facade's param groups are the per-parameter optimizers' own; a closed tier's hooks are gone."""
    from sdtune.optim.in_device import InBackward, build
    from sdtune.optim.tier import Tier

    train_cfg = load_config("cpu", ["train.learning_rate=0.1", "train.weight_decay=0"])[0].train
    weight = torch.nn.Parameter(torch.ones(3))
    tier = Tier(InBackward([weight], lambda group: build("lion", group, train_cfg)), in_backward=True)
    assert tier.optimizer.param_groups[0] is tier.optimizer.inner[0].param_groups[0]
    (2 * weight).sum().backward()
    assert weight.grad is None and torch.allclose(weight, torch.full((3,), 0.9))
    tier.close()
    (2 * weight).sum().backward()
    assert torch.allclose(weight, torch.full((3,), 0.9)) and weight.grad is not None
