"""sdtune-tiny, the bundled pretrained model: it loads with plain diffusers, its VAE reconstructs the
shapes world, it draws what its prompts say, and a short fine-tune teaches it a new shape."""

import random

import pytest
import torch
from typer.testing import CliRunner

from sdtune.cli import app
from sdtune.toy import shapes
from sdtune.toy.evaluate import score_model
from sdtune.toy.tiny import ASSET, render_batch

VAE_MSE_BOUND = 0.015  # measured 0.0067 on rendered shapes in [-1, 1]; an untrained VAE gives ~0.85
BASE_SCORE_BOUND = 0.9  # measured 1.00 on 24 prompts x 3 seeds; a random UNet scores 0.17
STAR_GAIN = 0.1  # the demo recipe measured 0.06 -> 0.25 of star images drawn as stars (16 images)


def test_shipped_folder_is_small_safetensors_and_loads_with_plain_diffusers():
    from diffusers import StableDiffusionPipeline

    files = [p for p in ASSET.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 25 * 2**20
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".ckpt")]
    pipe = StableDiffusionPipeline.from_pretrained(ASSET)
    image = pipe("a red circle on the white background", num_inference_steps=2,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)


def test_the_pretraining_recipe_runs_end_to_end_at_toy_scale(tmp_path):
    """`python -m sdtune.toy.tiny` (an hour at full scale) on 2 VAE and 2 UNet steps: a loadable folder with
    the shipped layout, and none of the run's own files."""
    from diffusers import StableDiffusionPipeline

    from sdtune.toy.tiny import pretrain

    lines = []
    out = pretrain(tmp_path / "tiny", vae_steps=2, unet_steps=2, images=16, log=lines.append)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ASSET.iterdir())
    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    shipped = StableDiffusionPipeline.from_pretrained(ASSET, local_files_only=True)
    assert {k: v for k, v in pipe.unet.config.items() if k != "_name_or_path"} == \
        {k: v for k, v in shipped.unet.config.items() if k != "_name_or_path"}
    assert any("sdtune-tiny written to" in line for line in lines)


def test_vae_round_trip_error_is_small():
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(ASSET, subfolder="vae")
    x = render_batch(32, random.Random(99), shapes.all_specs(shapes.SHAPES))
    with torch.no_grad():
        reconstruction = vae.decode(vae.encode(x).latent_dist.mode()).sample
    assert (reconstruction - x).pow(2).mean().item() < VAE_MSE_BOUND


def test_base_model_draws_what_its_prompts_say():
    report = score_model("sdtune-tiny", shapes.all_specs(shapes.BASE_SHAPES), seeds=(0,))
    assert report.mean["total"] > BASE_SCORE_BOUND


def _demo_recipe() -> list[str]:
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "examples" / "demo.py"
    spec = importlib.util.spec_from_file_location("demo", path)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    return demo.TRAIN


@pytest.mark.slow
def test_the_demo_fine_tune_teaches_the_new_shape_and_keeps_the_old(tmp_path):
    """`make demo`'s own command, run as the demo runs it: the star score rises, old prompts hold."""
    star, old = shapes.all_specs(shapes.NEW_SHAPES), shapes.all_specs(shapes.BASE_SHAPES)
    before = score_model("sdtune-tiny", star).mean["shape"]
    recipe = _demo_recipe()
    recipe[recipe.index("--out") + 1] = str(tmp_path / "out")
    result = CliRunner().invoke(app, ["train", *recipe])
    assert result.exit_code == 0, result.output
    after = score_model(str(tmp_path / "out"), star).mean["shape"]
    assert after >= before + STAR_GAIN, (before, after)
    assert score_model(str(tmp_path / "out"), old, seeds=(0,)).mean["total"] >= 0.8
