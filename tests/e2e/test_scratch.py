"""Pretraining from scratch: `model.init=random` trains a UNet of `model.architecture` from random weights
on the base model's VAE and text encoder; the architecture must fit them."""

import json

import pytest
import torch
from support.helpers import final_unet, runner, train

from sdtune.cli import app
from sdtune.config import load_config
from sdtune.errors import SdtuneError
from sdtune.estimate import estimate
from sdtune.family.scratch import random_unet

TINY_STEP = ["--max-steps", "1", "--set", "train.learning_rate=1e-12", "--set", "output.single_file=false"]


def _architecture(tiny_sd1, folder, **changes):
    config = json.loads((tiny_sd1 / "unet" / "config.json").read_text())
    config.update(changes)
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_random_init_starts_from_the_seeded_architecture_not_the_base_weights(tiny_sd1, images, tmp_path):
    train(tiny_sd1, images, tmp_path / "out", *TINY_STEP, "--set", "model.init=random", "--set", "train.seed=3")
    trained, base = final_unet(tmp_path / "out"), final_unet(tiny_sd1)
    drawn = random_unet("", str(tiny_sd1), seed=3).state_dict()
    assert all(torch.allclose(trained[k], drawn[k], atol=1e-9) for k in drawn)  # one step of lr 1e-12 from it
    assert not any(torch.equal(trained[k], base[k]) for k in base if k.endswith("conv1.weight"))
    again, other = (random_unet("", str(tiny_sd1), seed=seed).state_dict() for seed in (3, 4))
    assert all(torch.equal(drawn[k], again[k]) for k in drawn)
    assert not all(torch.equal(drawn[k], other[k]) for k in drawn)


def test_an_architecture_folder_sets_the_trained_unets_shape(tiny_sd1, images, tmp_path):
    # another, smaller UNet for the same encoders
    arch = _architecture(tiny_sd1, tmp_path / "arch", block_out_channels=[32, 32], layers_per_block=1)
    train(tiny_sd1, images, tmp_path / "out", *TINY_STEP, "--set", "model.init=random",
          "--set", f"model.architecture={arch}")
    written = json.loads((tmp_path / "out" / "unet" / "config.json").read_text())
    assert written["block_out_channels"] == [32, 32] and written["layers_per_block"] == 1
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.from_pretrained(tmp_path / "out", safety_checker=None)  # it loads as any pipeline


def test_an_architecture_that_does_not_fit_the_encoders_is_one_line(tiny_sd1, images, tmp_path):
    result = runner.invoke(app, ["train", "--preset", "cpu", "--data", str(images), "--model", str(tiny_sd1),
                                 "--out", str(tmp_path / "out"), *TINY_STEP, "--set", "model.init=random",
                                 "--set", "model.architecture=sd15"])
    assert result.exit_code == 2
    assert "model.architecture sd15 does not fit the base model sd" in result.output
    assert "text embeddings 768 wide and the text encoder(s) give 32" in result.output


def test_an_architecture_needs_init_random():
    with pytest.raises(SdtuneError, match="set model.init=random"):
        load_config("cpu", ["model.architecture=sd15"])


def test_the_estimate_counts_the_architecture_trained_from_scratch(tiny_sd1, tmp_path):
    from sdtune.family.archs import build_part

    arch = _architecture(tiny_sd1, tmp_path / "arch", block_out_channels=[64, 128])
    scratch, info = load_config("cpu", [f"model.pretrained={tiny_sd1}", "model.init=random",
                                        f"model.architecture={arch}"])
    params = sum(p.numel() for p in build_part(arch, "diffusers", "UNet2DConditionModel").parameters())
    assert estimate(scratch, info, device="cpu").categories["weights"] == 4 * params
    unfit, info = load_config("cpu", [f"model.pretrained={tiny_sd1}", "model.init=random", "model.architecture=sd15"])
    with pytest.raises(SdtuneError, match="text embeddings 768 wide and the text encoder"):
        estimate(unfit, info, device="cpu")
