"""The command line as a user meets it: help, and one clear line (no traceback) for every user error."""

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from sdtune.cli import app

runner = CliRunner()


def test_help_is_instant_and_imports_no_torch():
    code = ("import sys; from sdtune.cli import app; "
            "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
    for command in ([], ["train"], ["sample"], ["presets"]):
        result = runner.invoke(app, [*command, "--help"])
        assert result.exit_code == 0 and "Usage" in result.output


def test_train_help_lists_every_option():
    output = runner.invoke(app, ["train", "--help"]).output
    for option in ("--preset", "--data", "--model", "--out", "--max-steps", "--resume", "--set"):
        assert option in output


def test_presets_resolves_one():
    """The listing (which estimates every preset) is tested in test_estimate_cli, with a fake estimator."""
    shown = runner.invoke(app, ["presets", "rtx2070"])
    assert shown.exit_code == 0
    assert 'precision = "fp16"' in shown.output and "gradient_checkpointing = true" in shown.output


def _user_error(args, tmp_path, *words):
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for word in words:
        assert word in lines[0]


@pytest.fixture
def empty_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"


def test_user_errors_are_one_line(tmp_path, images, tiny_sd1, empty_dir):
    train = ["train", "--preset", "cpu", "--out", str(tmp_path / "out")]
    _user_error([*train, "--data", str(tmp_path / "nope")], tmp_path, "nope", "does not exist")
    _user_error([*train, "--data", str(empty_dir), "--model", str(tiny_sd1)], tmp_path, "no usable images")
    _user_error(["train", "--preset", "rtx9000", "--data", str(images)], tmp_path, "unknown preset", "rtx3050")
    _user_error([*train, "--data", str(images), "--set", "train.lerning_rate=1"], tmp_path,
                "train.lerning_rate", "train.learning_rate")
    _user_error([*train, "--data", str(images), "--set", "train.batch_size=big"], tmp_path,
                "train.batch_size", "integer")
    _user_error([*train, "--data", str(images), "--model", str(empty_dir)], tmp_path, "model_index.json")
    _user_error([*train, "--data", str(images), "--model", str(tmp_path / "missing")], tmp_path, "does not exist")
    _user_error([*train, "--data", str(images), "--set", 'model.pretrained=""'], tmp_path, "no base model", "--model")
    _user_error(["sample", "--ckpt", str(empty_dir), "--prompt", "x"], tmp_path, "model_index.json")
    _user_error(["sample", "--ckpt", str(tiny_sd1), "--prompt", "x", "--height", "50"], tmp_path, "--height")


def test_a_mistyped_preset_file_names_file_and_key(tmp_path, images):
    preset = tmp_path / "mine.toml"
    preset.write_text("[train]\nmax_stepz = 3  # typo\n")
    _user_error(["train", "--preset", str(preset), "--data", str(images)], tmp_path, "train.max_stepz",
                "mine.toml", "train.max_steps")


def test_the_installed_command_prints_one_line_for_a_user_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "sdtune.cli", "train", "--preset", "cpu", "--data",
                             str(tmp_path / "missing")], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("error:"), result.stderr
