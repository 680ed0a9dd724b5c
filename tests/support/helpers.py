"""Helpers shared by the training tests: run `sdtune train` as a user would, or prepare a run in-process."""

import json
import logging

from safetensors.torch import load_file
from typer.testing import CliRunner

from sdtune.cli import app
from sdtune.config import load_config
from sdtune.train import loop as trainer

runner = CliRunner()


# The tests that train through `train` read the resume checkpoints a finished run leaves and compare the
# written UNet with fp32 computations: they keep both (the lean defaults, fp16 and no checkpoints kept,
# are tests/e2e/test_disk.py's).
KEEP_ALL = ("--set", "output.keep_final_state=true", "--set", "output.save_precision=fp32")


def said(caplog) -> list[str]:
    """The lines sdtune logged in this test, as `sdtune train` shows them: "warning: " before a warning.
    The test calls `caplog.set_level(logging.INFO, logger="sdtune")` first (the logger is quiet below WARNING
    until then, as for any library)."""
    return [("warning: " if r.levelno >= logging.WARNING else "") + r.getMessage()
            for r in caplog.records if r.name == "sdtune" or r.name.startswith("sdtune.")]


def train(model, images, out, *extra):
    result = runner.invoke(app, ["train", "--preset", "cpu", "--data", str(images), "--model", str(model),
                                 "--out", str(out), *KEEP_ALL, *extra])
    assert result.exit_code == 0, result.output
    return json.loads((out / "summary.json").read_text())


def batch(stream, index):
    """(pixels, captions) of batch `index` as training takes it: a file that fails is replaced from its bucket."""
    from sdtune.data.batches import until_loaded

    def load():
        items = stream.items(index)
        return stream.pixels(items), [item.caption for item in items]

    return until_loaded(load)


def assert_resume_is_bitwise(model, images, tmp_path, *args, last: int, resume_from: int):
    """Train to step `last` straight; copy the run, drop everything after its step-`resume_from`
    checkpoint, resume it: the same losses and the same final UNet, bit for bit."""
    import shutil

    import torch

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    args = ("--set", f"output.keep_checkpoints={last}", *args)  # step `resume_from`'s is still there to resume
    expected = train(model, images, straight, *args)
    shutil.copytree(straight, killed)
    for step in range(resume_from + 1, last + 1):
        shutil.rmtree(killed / "checkpoints" / f"step-{step:06d}", ignore_errors=True)
    assert (killed / "checkpoints" / f"step-{resume_from:06d}").is_dir()
    shutil.rmtree(killed / "unet")
    (killed / "summary.json").unlink()  # a killed run has not written it
    resumed = train(model, images, killed, *args, "--resume")
    assert resumed["losses"] == expected["losses"]
    a, b = final_unet(straight), final_unet(killed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def final_unet(out):
    return load_file(out / "unet" / "diffusion_pytorch_model.safetensors")


class on_step:  # noqa: N801 (used like a function)
    """A metrics logger for `trainer.loop` that calls `function(record)` after every step."""

    def __init__(self, function):
        self.function = function

    def log(self, record):
        self.function(record)

    def image(self, tag, step, image):
        pass


def prepared(model, images, out, *overrides):
    cfg, info = load_config("cpu", [f"model.pretrained={model}", *overrides])
    return trainer.prepare(cfg, info, str(images), str(out), resume=False)


def fused_unet(model, folder, weight_name):
    """The base UNet's weights with the LoRA file `folder/weight_name` fused in by diffusers' own loader."""
    from sdtune.family.load import assemble_pipeline, load_components

    components = load_components(str(model))
    pipe = assemble_pipeline(components)
    pipe.load_lora_weights(str(folder), weight_name=weight_name)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    return components.unet.state_dict()
