"""sdtune-tiny, the bundled pretrained model: it loads with plain diffusers, its VAE reconstructs the
shapes world, it draws what its prompts say, and a short fine-tune teaches it a new shape."""

import logging
import random

import pytest
import torch
from support.helpers import said
from typer.testing import CliRunner

from sdtune.cli import app
from sdtune.toy import shapes
from sdtune.toy.evaluate import score_model
from sdtune.toy.tiny import ASSET, render_batch

VAE_MSE_BOUND = 0.015  # measured 0.0067 on rendered shapes in [-1, 1]; an untrained VAE gives ~0.85
BASE_SCORE_BOUND = 0.9  # measured 1.00 on 24 prompts x 3 seeds; a random UNet scores 0.17
STAR_GAIN = 0.1  # the demo's recipes measured 0.06 -> 0.69 (full) and 0.50 (LoRA) of 16 star images drawn as stars


def test_shipped_folder_is_small_safetensors_and_loads_with_plain_diffusers():
    from diffusers import StableDiffusionPipeline

    files = [p for p in ASSET.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 25 * 2**20
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".ckpt")]
    pipe = StableDiffusionPipeline.from_pretrained(ASSET)
    image = pipe("a red circle on the white background", num_inference_steps=2,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)


def test_the_pretraining_recipe_runs_end_to_end_at_toy_scale(tmp_path, caplog):
    """`python -m sdtune.toy.tiny` (an hour at full scale) on 2 VAE and 2 UNet steps: a loadable folder with
    the shipped layout, and none of the run's own files."""
    from diffusers import StableDiffusionPipeline

    from sdtune.toy.tiny import pretrain

    caplog.set_level(logging.INFO, logger="sdtune")
    out = pretrain(tmp_path / "tiny", vae_steps=2, unet_steps=2, images=16)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ASSET.iterdir())
    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    shipped = StableDiffusionPipeline.from_pretrained(ASSET, local_files_only=True)
    assert {k: v for k, v in pipe.unet.config.items() if k != "_name_or_path"} == \
        {k: v for k, v in shipped.unet.config.items() if k != "_name_or_path"}
    assert any("sdtune-tiny written to" in line for line in said(caplog))


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


def _demo_recipe(name: str, out) -> list[str]:
    """`make demo`'s `sdtune train` arguments for its run `name` (TRAIN: the full fine-tune, LORA_TRAIN),
    writing into `out` (its run folder and caches) instead of demo-out/."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[2] / "examples" / "demo.py"
    spec = importlib.util.spec_from_file_location("demo", path)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    recipe = list(getattr(demo, name))
    recipe[recipe.index("--out") + 1] = str(out / "run")
    return [f"data.cache_dir={out / 'cache'}" if arg.startswith("data.cache_dir=") else arg for arg in recipe]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["TRAIN", "LORA_TRAIN"])
def test_the_demo_fine_tunes_teach_the_new_shape_and_keep_the_old(tmp_path, name):
    """`make demo`'s own commands, run as the demo runs them: the star score rises, old prompts hold. The
    LoRA is scored as the demo scores it, through plain diffusers' `load_lora_weights`."""
    from diffusers import StableDiffusionPipeline

    star, old = shapes.all_specs(shapes.NEW_SHAPES), shapes.all_specs(shapes.BASE_SHAPES)
    before = score_model("sdtune-tiny", star).mean["shape"]
    result = CliRunner().invoke(app, ["train", *_demo_recipe(name, tmp_path)])
    assert result.exit_code == 0, result.output
    model = str(tmp_path / "run")
    if name == "LORA_TRAIN":
        model = StableDiffusionPipeline.from_pretrained(ASSET, safety_checker=None, requires_safety_checker=False)
        model.load_lora_weights(str(tmp_path / "run"))
    after = score_model(model, star).mean["shape"]
    assert after >= before + STAR_GAIN, (before, after)
    assert score_model(model, old, seeds=(0,)).mean["total"] >= 0.8
