"""LoRA training and DreamBooth prior preservation on the tiny SD 1.x model."""

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from support.helpers import fused_unet, prepared, runner, train

from sdtune.cli import app
from sdtune.errors import SdtuneError
from sdtune.train import loop as trainer

LORA = ("--set", "train.method=lora", "--set", "lora.rank=4", "--set", "lora.alpha=8", "--set",
        "train.learning_rate=1e-3", "--set", "output.checkpoint_every=2")


def test_lora_files_load_in_diffusers_and_agree(tiny_sd1, images, tmp_path):
    from sdtune.family.load import load_components

    out = tmp_path / "out"
    summary = train(tiny_sd1, images, out, "--max-steps", "4", *LORA)
    assert summary["method"] == "lora" and not (out / "unet").exists()
    base = load_components(str(tiny_sd1)).unet.state_dict()
    from_diffusers = fused_unet(tiny_sd1, out, "pytorch_lora_weights.safetensors")
    from_kohya = fused_unet(tiny_sd1, out, "lora.safetensors")
    changed = [k for k in base if not torch.equal(base[k], from_diffusers[k])]
    assert changed and all(".to_" in k for k in changed)
    assert all(torch.allclose(from_diffusers[k], from_kohya[k], rtol=0, atol=1e-6) for k in base)
    checkpoint = load_file(out / "checkpoints" / "step-000004" / "lora.safetensors")
    assert checkpoint and all("lora_" in k for k in checkpoint)  # only what trains, not the base


def _draw(pipe):
    return pipe(["a red circle", "a blue square"], num_inference_steps=3, output_type="np",
                generator=[torch.Generator().manual_seed(s) for s in (0, 1)]).images


@pytest.mark.parametrize("fixture, extra", [
    ("tiny_sd1", ()), ("tiny_sd2", ()),
    ("tiny_sd1", ("--set", "lora.target=attention+conv", "--set", "lora.text_encoder=true")),
    ("tiny_sd1", ("--set", "lora.dora=true", "--set", "lora.target=attention+conv", "--set", "lora.conv_rank=2")),
], ids=["sd1", "sd2", "sd1-conv-text-encoder", "sd1-dora-conv"])
def test_each_lora_file_in_plain_diffusers_draws_what_sdtune_merge_draws(fixture, extra, images, tmp_path, request):
    """`load_lora_weights` of either file into the plain base pipeline (unfused: peft's layers at run time)
    gives the images of the merged model `sdtune merge` writes, to float precision; and not the base's.
    Every adapter is loaded: none of peft's "missing target modules" warnings."""
    import warnings

    from diffusers import StableDiffusionPipeline

    tiny = request.getfixturevalue(fixture)
    out, merged = tmp_path / "out", tmp_path / "merged"
    train(tiny, images, out, "--max-steps", "6", *LORA, "--set", "train.learning_rate=1e-2", *extra)
    result = runner.invoke(app, ["merge", "--ckpt", str(out), "--out", str(merged)])
    assert result.exit_code == 0, result.output
    expected = _draw(StableDiffusionPipeline.from_pretrained(merged))
    base = StableDiffusionPipeline.from_pretrained(tiny)
    assert np.abs(_draw(base) - expected).max() > 1e-3  # the LoRA changes the pictures
    dora = "lora.dora=true" in extra  # diffusers drops a kohya file's dora_scale: its peft-named file only
    for weight_name in ("pytorch_lora_weights.safetensors",) + (() if dora else ("lora.safetensors",)):
        pipe = StableDiffusionPipeline.from_pretrained(tiny)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # peft: "... additional target modules ..."
            pipe.load_lora_weights(str(out), weight_name=weight_name)
        np.testing.assert_allclose(_draw(pipe), expected, rtol=0, atol=1e-4, err_msg=weight_name)


@pytest.mark.parametrize("extra", [
    (), ("--set", "lora.text_encoder=true", "--set", "lora.target=attention+conv"),
    ("--set", "memory.param_offload=cpu", "--set", "memory.gradient_checkpointing=true"),
    ("--set", "lora.dora=true", "--set", "lora.text_encoder=true", "--set", "lora.target=attention+conv"),
], ids=["attention", "conv+text-encoder", "streamed-base", "dora-conv-text-encoder"])
def test_lora_resume_is_bitwise(tiny_sd1, images, tmp_path, extra):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    expected = train(tiny_sd1, images, straight, "--max-steps", "4", *LORA, *extra)
    shutil.copytree(straight, killed)
    shutil.rmtree(killed / "checkpoints" / "step-000004")
    resumed = train(tiny_sd1, images, killed, "--max-steps", "4", *LORA, *extra, "--resume")
    assert resumed["losses"] == expected["losses"]
    a, b = (load_file(p / "pytorch_lora_weights.safetensors") for p in (straight, killed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    if "lora.text_encoder=true" in extra:
        assert any(k.startswith("text_encoder.") for k in a) and any("conv1" in k for k in a)


def test_sdxl_lora_with_both_text_encoders_loads_in_plain_diffusers(tiny_sdxl, images, tmp_path):
    """SDXL: the UNet's and both text encoders' adapters train, and diffusers' own loader applies them."""
    from diffusers import StableDiffusionXLPipeline

    out = tmp_path / "out"
    summary = train(tiny_sdxl, images, out, "--max-steps", "3", *LORA, "--set", "lora.text_encoder=true")
    assert summary["method"] == "lora" and summary["model_family"] == "sdxl"
    saved = load_file(out / "pytorch_lora_weights.safetensors")
    assert {k.split(".")[0] for k in saved} == {"unet", "text_encoder", "text_encoder_2"}
    kohya = load_file(out / "lora.safetensors")
    assert {k.split("_")[1] for k in kohya} >= {"unet", "te1", "te2"}
    base = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    pipe.load_lora_weights(str(out))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    for name in ("unet", "text_encoder_2"):
        before, after = getattr(base, name).state_dict(), getattr(pipe, name).state_dict()
        changed = [k for k in before if not torch.equal(before[k], after[k])]
        assert changed and all(any(t in k for t in ("to_", "_proj")) for k in changed), name
    result = runner.invoke(app, ["sample", "--ckpt", str(out), "--prompt", "a red circle", "--num-images", "1",
                                 "--steps", "2", "--out", str(tmp_path / "samples")])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("method", ["full", "lora"])
def test_prior_preservation_loss_is_instance_plus_weight_times_class(tiny_sd1, images, tmp_path, method):
    """Micro-batch 0 pairs the instance stream's batch 0 with the class stream's (images from data.class_dir);
    its loss, and its gradient, are those of instance + 0.7 x class, each half with its own noise seed."""
    classes = tmp_path / "class"
    shutil.copytree(images, classes)  # the user's own class images: none is generated
    run = prepared(tiny_sd1, images, tmp_path / "out", f"data.class_dir={classes}", "data.num_class_images=2",
                   "train.prior_loss_weight=0.7", f"train.method={method}", "train.batch_size=2")
    assert all(classes in item.example.image.parents for item in run.class_stream.items(0))
    assert not any(classes in item.example.image.parents for item in run.stream.items(0))
    params = [p for p in run.placement.unet.parameters() if p.requires_grad] if method == "full" else \
        list(run.placement.weights().values())
    assert trainer.micro_batch_seed(run.cfg.train.seed, 0) == run.cfg.train.seed * 1_000_003
    instance = trainer.micro_batch_loss(run, run.stream, 0)
    prior = trainer.micro_batch_loss(run, run.class_stream, 0, salt=trainer.CLASS_SEED)
    (instance + 0.7 * prior).backward()
    expected = [p.grad.clone() for p in params]
    run.tier.zero_grad()
    total = trainer.micro_step(run, 0)
    assert total == pytest.approx(instance.item() + 0.7 * prior.item(), rel=1e-6)
    assert abs(instance.item() - prior.item()) > 1e-4  # two different batches
    for want, p in zip(expected, params, strict=True):
        torch.testing.assert_close(p.grad, want, rtol=1e-5, atol=1e-7)
    run.placement.close()


def test_lora_refuses_offload_levers():
    from sdtune.config import load_config

    with pytest.raises(SdtuneError, match="memory.optimizer_offload"):
        load_config("cpu", ["train.method=lora", "memory.optimizer_offload=cpu"])


def test_prior_preservation_generates_missing_class_images(tiny_sd1, images, tmp_path):
    classes = tmp_path / "class"
    args = ("--max-steps", "2", "--set", f"data.class_dir={classes}", "--set", "data.class_prompt=a shape",
            "--set", "data.num_class_images=2", "--set", "output.sample_steps=2")
    summary = train(tiny_sd1, images, tmp_path / "out", *args)
    assert sorted(p.name for p in classes.iterdir()) == ["class-00000.png", "class-00000.txt",
                                                         "class-00001.png", "class-00001.txt"]
    assert (classes / "class-00001.txt").read_text() == "a shape"
    (classes / "class-00001.png").unlink()  # an interrupted generation: only the missing one is drawn again
    first = (classes / "class-00000.png").read_bytes()
    train(tiny_sd1, images, tmp_path / "again", *args)
    assert (classes / "class-00001.png").is_file() and (classes / "class-00000.png").read_bytes() == first
    assert summary["steps"] == 2
