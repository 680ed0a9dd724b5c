"""A machine without CUDA: a GPU preset is refused with why and how to train on the CPU on purpose, never
silently trained on the CPU; `--preset auto` says loudly when it falls back to the bundled toy model."""

import io
import logging

import pytest
import torch
from rich.console import Console
from support.helpers import said
from typer.testing import CliRunner

from sdtune import cli
from sdtune.cli import app
from sdtune.config import load_config
from sdtune.errors import SdtuneError
from sdtune.estimate import auto
from sdtune.plan import resolve_plan

runner = CliRunner()


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in result.output, result.output
    return lines[0]


@pytest.mark.parametrize(("cuda_build", "why"), [(None, "CPU-only build (torch.version.cuda is None)"),
                                                 ("12.4", "built for CUDA 12.4 but torch.cuda.is_available() "
                                                          "is False: no GPU driver is loaded")])
def test_a_gpu_preset_without_cuda_is_one_line_saying_why(no_cuda, monkeypatch, cuda_build, why, tiny_sd1, images,
                                                          tmp_path):
    monkeypatch.setattr(torch.version, "cuda", cuda_build)
    out = tmp_path / "out"
    result = runner.invoke(app, ["train", "--preset", "rtx3050", "--data", str(images), "--model", str(tiny_sd1),
                                 "--out", str(out), "--max-steps", "1"])
    line = _one_error_line(result)
    assert "--preset rtx3050 is a GPU plan (RTX 3050, 8 GB) but CUDA was not found" in line
    assert why in line and "--preset cpu or --set memory.device=cpu" in line
    assert not (out / "config.toml").exists()  # refused before anything was loaded or written


def test_every_gpu_preset_is_refused_without_cuda_and_runs_on_the_cpu_when_asked(no_cuda):
    for name in auto.gpu_presets("sd") + auto.gpu_presets("sdxl") + auto.gpu_presets("sd", "lora"):
        cfg, info = load_config(name)
        with pytest.raises(SdtuneError, match="CUDA was not found"):
            resolve_plan(cfg.memory, preset=info)
        cfg, info = load_config(name, ["memory.device=cpu", "memory.attention=sdpa"])
        assert resolve_plan(cfg.memory, preset=info).device == "cpu"
    with pytest.raises(SdtuneError, match="memory.device=cuda but CUDA was not found"):
        resolve_plan(load_config("cpu", ["memory.device=cuda"])[0].memory)


def test_a_plan_for_no_card_falls_back_to_the_cpu_aloud(no_cuda, tmp_path, caplog):
    """A .toml of the user's own that names no card, with memory.device=auto: the CPU, and a line says so."""
    mine = tmp_path / "mine.toml"
    mine.write_text('[memory]\ndevice = "auto"\n')
    cfg, info = load_config(str(mine))
    caplog.set_level(logging.INFO, logger="sdtune")
    assert resolve_plan(cfg.memory, report=True, preset=info).device == "cpu"
    assert said(caplog) == ["memory.device=auto: no CUDA GPU, training on the CPU"]


def test_preset_auto_without_a_model_on_the_cpu_warns_of_the_toy_model(no_cuda):
    pick = auto.pick_plan(["train.max_steps=3"])
    assert pick.preset == "cpu"
    assert "no --model given" in pick.warning and "sdtune-tiny, the 64-px toy model" in pick.warning
    assert auto.pick_plan(["model.pretrained=/some/model"]).warning == ""
    assert auto.pick_plan([], model="sd15").warning == ""


def test_train_preset_auto_prints_the_toy_model_warning_in_yellow(no_cuda, monkeypatch, images, tmp_path):
    seen = {}

    def attempt(cfg, info, data, out, **kwargs):
        seen["model"] = cfg.model.pretrained
        return {"steps": 1, "final_loss": 0.1, "seconds_per_step": 0.1, "peak_memory_bytes": 2**30,
                "peak_memory_kind": "process_max_rss", "skipped_steps": 0, "pipeline_class": "StableDiffusionPipeline",
                "disk": {"output_bytes": 0, "checkpoint_bytes": 0, "checkpoints_kept": False}}

    monkeypatch.setattr("sdtune.run.attempt", attempt)
    screen = io.StringIO()
    monkeypatch.setattr(cli, "console", Console(file=screen, force_terminal=True, color_system="standard",
                                                width=200, highlight=False, soft_wrap=True))
    result = runner.invoke(app, ["train", "--preset", "auto", "--data", str(images), "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert seen["model"] == "sdtune-tiny"
    warning = next(line for line in screen.getvalue().splitlines() if "no --model given" in line)
    assert warning.startswith("\x1b[1;33mwarning:\x1b[0m")  # bold yellow
