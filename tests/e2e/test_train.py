"""The training recipe end to end on tiny models: `sdtune train` as a user runs it, plus equivalences."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file
from support.helpers import assert_resume_is_bitwise, prepared, runner, train

from sdtune.cli import app
from sdtune.config import load_config
from sdtune.train import loop as trainer

# Losses of `sdtune train --preset cpu` on the tiny SD1 model, seed 0 (see test_recipe_losses_are_pinned).
PINNED_SD1 = [1.26998, 1.33946, 1.15630, 1.13383, 1.16955, 0.97919]
PINNED_SD2 = [0.24551, 0.79558, 0.58544, 0.53564, 0.19523, 0.65149]


def test_recipe_losses_are_pinned(tiny_sd1, tiny_sd2, images, tmp_path):
    sd1 = train(tiny_sd1, images, tmp_path / "sd1", "--max-steps", "6")
    sd2 = train(tiny_sd2, images, tmp_path / "sd2", "--max-steps", "6")
    assert sd1["losses"] == pytest.approx(PINNED_SD1, rel=1e-3)
    assert sd2["losses"] == pytest.approx(PINNED_SD2, rel=1e-3)
    assert sd1["steps"] == 6 and sd1["skipped_steps"] == 0 and sd1["peak_memory_bytes"] > 0


def _fixed_batch_loss(run, batches=8) -> float:
    """Mean loss over micro-batches 0..7: the same images, noise and timesteps every time it is asked."""
    value = sum(trainer.micro_step(run, k) for k in range(batches)) / batches
    run.optimizer.zero_grad(set_to_none=True)
    return value


@pytest.mark.parametrize("version", [1, 2])
def test_training_fits_a_small_dataset(version, tiny_sd1, tiny_sd2, tmp_path):
    """Epsilon (SD1) and v-prediction (SD2) targets are learnable: the loss on fixed batches falls."""
    from support.testing import make_image_folder

    images = make_image_folder(tmp_path / "two", count=2)
    run = prepared(tiny_sd1 if version == 1 else tiny_sd2, images, tmp_path / "out", "train.max_steps=60",
                    "train.learning_rate=1e-3")
    assert run.components.prediction_type == ("epsilon" if version == 1 else "v_prediction")
    before = _fixed_batch_loss(run)
    trainer.loop(run)
    assert _fixed_batch_loss(run) < 0.7 * before


def test_train_step_profiles_its_phases_without_changing_the_loss(tiny_sd1, images, tmp_path, monkeypatch):
    """The public step: its loss, whether it stepped, the progress it leaves; SDTUNE_PROFILE=1 adds each
    phase's seconds and changes no loss (the step after it is the same too)."""
    plain = prepared(tiny_sd1, images, tmp_path / "plain", "train.max_steps=2")
    results = [trainer.train_step(plain) for _ in range(2)]
    assert all(r.stepped and not r.bad and r.phases == {} for r in results)
    assert plain.step == 2 and plain.losses == [r.loss for r in results] and plain.skipped_steps == 0
    monkeypatch.setenv("SDTUNE_PROFILE", "1")
    profiled = prepared(tiny_sd1, images, tmp_path / "profiled", "train.max_steps=2")
    timed = [trainer.train_step(profiled) for _ in range(2)]
    assert [r.loss for r in timed] == [r.loss for r in results]
    timings = ("data_seconds", "forward_backward_seconds", "optimizer_seconds")
    assert all(sorted(r.phases) == sorted([*timings, "host_wait_seconds"]) for r in timed)
    assert all(min(r.phases[key] for key in timings) > 0 for r in timed)
    assert all(r.phases["host_wait_seconds"] == 0.0 for r in timed)  # the in-device tier has no worker to wait for
    offloaded = prepared(tiny_sd1, images, tmp_path / "offloaded", "train.max_steps=1", "memory.optimizer_offload=cpu")
    phases = trainer.train_step(offloaded).phases  # the host tier's waits: part of forward+backward and the step
    assert 0 <= phases["host_wait_seconds"] <= phases["forward_backward_seconds"] + phases["optimizer_seconds"]


def test_output_folder_loads_with_plain_diffusers_and_samples(tiny_sd1, images, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "out"
    summary = train(tiny_sd1, images, out, "--max-steps", "2")
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoints", "config.toml", "metrics.jsonl", "model_index.json", "scheduler",
        "summary.json", "text_encoder", "tokenizer", "unet", "vae"]
    # no model.safetensors: ComfyUI and A1111 assume 32 GroupNorm groups, the tiny VAE has 8
    assert not summary["single_file"]["written"] and "GroupNorm" in summary["single_file"]["reason"]
    pipe = StableDiffusionPipeline.from_pretrained(out)
    trained = load_file(out / "checkpoints" / "step-000002" / "unet.safetensors")
    for name, tensor in pipe.unet.state_dict().items():
        assert torch.equal(tensor, trained[name]), name
    base = StableDiffusionPipeline.from_pretrained(tiny_sd1).unet.state_dict()
    assert any(not torch.equal(base[k], v) for k, v in trained.items())  # training changed the weights
    image = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
    assert load_config(str(out / "config.toml"))[0].train.max_steps == 2  # the resolved plan is a preset too


def test_sample_writes_the_pngs_it_promises(tiny_sd1, tmp_path):
    from PIL import Image

    result = runner.invoke(app, ["sample", "--ckpt", str(tiny_sd1), "--prompt", "a blue square", "--num-images",
                                 "3", "--steps", "2", "--seed", "5", "--out", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in (tmp_path / "s").iterdir())
    assert names == ["000-seed5.png", "001-seed6.png", "002-seed7.png", "grid.png"]
    width, height = Image.open(tmp_path / "s" / "grid.png").size
    assert width == 128 and height > 128  # 3 images in a 2x2 grid, each below its prompt and seed
    result = runner.invoke(app, ["sample", "--ckpt", str(tiny_sd1), "--prompt", "x", "--num-images", "1",
                                 "--steps", "2", "--height", "96", "--width", "64", "--out", str(tmp_path / "t")])
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "t" / "000-seed0.png").size == (64, 96)


def test_resume_continues_exactly(tiny_sd1, images, tmp_path):
    """A run killed after its step-3 checkpoint, resumed, ends where the uninterrupted run ends."""
    assert_resume_is_bitwise(tiny_sd1, images, tmp_path, "--max-steps", "6", "--set", "output.checkpoint_every=3",
                             "--set", "train.lr_scheduler=cosine", "--set", "train.lr_warmup_steps=2",
                             last=6, resume_from=3)


def test_resuming_a_finished_run_says_so_and_keeps_its_speed(tiny_sd1, images, tmp_path):
    first = train(tiny_sd1, images, tmp_path / "out", "--max-steps", "2")
    result = runner.invoke(app, ["train", "--preset", "cpu", "--data", str(images), "--model", str(tiny_sd1),
                                 "--out", str(tmp_path / "out"), "--max-steps", "2", "--resume"])
    assert result.exit_code == 0, result.output
    assert "nothing left to train: the checkpoint is at step 2 of 2" in result.output
    again = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert again["losses"] == first["losses"] and again["seconds_per_step"] > 0
    assert f"{again['seconds_per_step']:.3f} s/step" in result.output and "0.000 s/step" not in result.output


def test_resume_refuses_a_changed_plan_and_fresh_runs_refuse_a_used_folder(tiny_sd1, images, tmp_path):
    out = tmp_path / "out"
    train(tiny_sd1, images, out, "--max-steps", "2")
    base = ["train", "--preset", "cpu", "--data", str(images), "--model", str(tiny_sd1), "--out", str(out)]
    result = runner.invoke(app, [*base, "--max-steps", "4"])
    assert result.exit_code == 2 and "--resume" in result.output
    result = runner.invoke(app, [*base, "--resume", "--set", "train.learning_rate=1e-3"])
    assert result.exit_code == 2 and "train.learning_rate: 0.0001 -> 0.001" in result.output
    assert train(tiny_sd1, images, out, "--max-steps", "4", "--resume")["steps"] == 4


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_sd1, images, tmp_path):
    runs = [prepared(tiny_sd1, images, tmp_path / f"o{flag}", f"memory.gradient_checkpointing={flag}")
            for flag in ("false", "true")]
    assert runs[1].components.unet.is_gradient_checkpointing and not runs[0].components.unet.is_gradient_checkpointing
    losses = [trainer.micro_step(run, 0) for run in runs]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    grads = [dict(run.components.unet.named_parameters()) for run in runs]
    for name, param in grads[0].items():
        torch.testing.assert_close(param.grad, grads[1][name].grad, rtol=1e-5, atol=1e-7, msg=name)


def test_fp16_loss_scaling_skips_overflowing_steps(tiny_sd1, images, tmp_path):
    run = prepared(tiny_sd1, images, tmp_path / "o", "memory.precision=fp16", "train.max_steps=6")
    assert run.scaler.is_enabled() and run.components.vae.dtype == torch.float16
    # A scale that guarantees fp16 overflow in backward, backing off fast so later steps go through.
    run = dataclasses.replace(run, scaler=torch.amp.GradScaler("cpu", init_scale=2.0**40, backoff_factor=2.0**-8))
    before = {k: v.clone() for k, v in run.components.unet.state_dict().items()}
    assert not trainer.train_step(run).stepped
    assert run.scaler.get_scale() == 2.0**32
    assert all(torch.equal(before[k], v) for k, v in run.components.unet.state_dict().items())
    trainer.loop(run)  # the scale backs off until steps go through
    assert run.step == run.cfg.train.max_steps and run.skipped_steps >= 1
    assert all(torch.isfinite(torch.tensor(run.losses)))
    assert any(not torch.equal(before[k], v) for k, v in run.components.unet.state_dict().items())


def test_checkpoints_every_n_steps_keep_the_newest_and_validation_grids(tiny_sd1, images, tmp_path):
    out = tmp_path / "out"
    train(tiny_sd1, images, out, "--max-steps", "4", "--set", "output.checkpoint_every=1",
          "--set", "output.keep_checkpoints=2", "--set", "output.sample_every=2", "--set", "output.sample_steps=2",
          "--set", "output.sample_prompts=['a red circle', 'a blue square', 'a star']")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000003", "step-000004"]
    assert sorted(p.name for p in (out / "checkpoints" / "step-000004").iterdir()) == [
        "config.toml", "state.json", "training_state.pt", "unet.safetensors"]
    from PIL import Image

    grids = sorted(p.name for p in (out / "samples").iterdir())
    assert grids == ["step-000002", "step-000002.png", "step-000004", "step-000004.png"]  # each image, the grid
    width, height = Image.open(out / "samples" / "step-000004.png").size
    assert width == 128 and height > 128  # three prompts in a 2x2 grid, each image below its prompt


@pytest.mark.parametrize("overrides", [
    ["memory.optimizer=adamw8bit"],
    ["memory.precision=bf16"],
    ["train.gradient_accumulation_steps=2", "train.snr_gamma=5.0", "train.noise_offset=0.1",
     "data.center_crop=false", "data.random_flip=true"],
])
def test_other_levers_train(tiny_sd1, images, tmp_path, overrides):
    run = prepared(tiny_sd1, images, tmp_path / "o", "train.max_steps=3", *overrides)
    before = {k: v.clone() for k, v in run.components.unet.state_dict().items()}
    trainer.loop(run)
    assert len(run.losses) == 3 and all(0 < value < 10 for value in run.losses)
    assert any(not torch.equal(before[k], v) for k, v in run.components.unet.state_dict().items())


def test_xformers_asked_for_but_missing_is_a_clear_error(monkeypatch):
    import sdtune.plan as memory
    from sdtune.config import MemoryConfig
    from sdtune.errors import SdtuneError

    monkeypatch.setattr(memory, "_xformers_installed", lambda: False)
    with pytest.raises(SdtuneError, match=r"xformers is not installed.*sdtune\[xformers\].*attention=sdpa"):
        memory.resolve_plan(MemoryConfig(device="cpu", attention="xformers"))
    assert memory.resolve_plan(MemoryConfig(device="cpu", attention="auto")).attention == "sdpa"
