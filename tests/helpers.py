"""Helpers shared by the training tests: run `sdtune train` as a user would, or prepare a run in-process."""

import json

from safetensors.torch import load_file
from typer.testing import CliRunner

from sdtune import trainer
from sdtune.cli import app
from sdtune.config import load_config

runner = CliRunner()


def train(model, images, out, *extra):
    result = runner.invoke(app, ["train", "--preset", "cpu", "--data", str(images), "--model", str(model),
                                 "--out", str(out), *extra])
    assert result.exit_code == 0, result.output
    return json.loads((out / "summary.json").read_text())


def final_unet(out):
    return load_file(out / "unet" / "diffusion_pytorch_model.safetensors")


def prepared(model, images, out, *overrides):
    cfg, info = load_config("cpu", [f"model.pretrained={model}", *overrides])
    return trainer.prepare(cfg, info, str(images), str(out), resume=False, log=lambda m: None)
