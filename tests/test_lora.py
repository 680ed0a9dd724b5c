"""LoRA training and DreamBooth prior preservation on the tiny SD 1.x model."""

import shutil

import pytest
import torch
from helpers import train
from safetensors.torch import load_file

from sdtune.errors import SdtuneError

LORA = ("--set", "train.method=lora", "--set", "lora.rank=4", "--set", "lora.alpha=8", "--set",
        "train.learning_rate=1e-3", "--set", "output.checkpoint_every=2")


def _fused_unet(model, out, weight_name):
    from sdtune.models import assemble_pipeline, load_components

    components = load_components(str(model))
    pipe = assemble_pipeline(components)
    pipe.load_lora_weights(str(out), weight_name=weight_name)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    return components.unet.state_dict()


def test_lora_files_load_in_diffusers_and_agree(tiny_sd1, images, tmp_path):
    from sdtune.models import load_components

    out = tmp_path / "out"
    summary = train(tiny_sd1, images, out, "--max-steps", "4", *LORA)
    assert summary["method"] == "lora" and not (out / "unet").exists()
    base = load_components(str(tiny_sd1)).unet.state_dict()
    from_diffusers = _fused_unet(tiny_sd1, out, "pytorch_lora_weights.safetensors")
    from_kohya = _fused_unet(tiny_sd1, out, "lora.safetensors")
    changed = [k for k in base if not torch.equal(base[k], from_diffusers[k])]
    assert changed and all(".to_" in k for k in changed)
    assert all(torch.allclose(from_diffusers[k], from_kohya[k], rtol=0, atol=1e-6) for k in base)
    checkpoint = load_file(out / "checkpoints" / "step-000004" / "lora.safetensors")
    assert checkpoint and all("lora_" in k for k in checkpoint)  # only what trains, not the base


def test_lora_resume_is_bitwise(tiny_sd1, images, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    expected = train(tiny_sd1, images, straight, "--max-steps", "4", *LORA)
    shutil.copytree(straight, killed)
    shutil.rmtree(killed / "checkpoints" / "step-000004")
    resumed = train(tiny_sd1, images, killed, "--max-steps", "4", *LORA, "--resume")
    assert resumed["losses"] == expected["losses"]
    a, b = (load_file(p / "pytorch_lora_weights.safetensors") for p in (straight, killed))
    assert all(torch.equal(a[k], b[k]) for k in a)


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
