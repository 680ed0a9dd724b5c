"""Validation loss (`data.validation_split`, `data.validation_dir`, `output.validate_every`): a seeded
held-out share that training never sees, evaluated at fixed timesteps and noise, so that identical runs,
and a resumed run, log identical figures; logged in metrics.jsonl (and TensorBoard)."""

import json
import shutil

import pytest
from support.helpers import runner, train

from sdtune.cli import app
from sdtune.config import load_config
from sdtune.data import scan_folder
from sdtune.errors import SdtuneError
from sdtune.train.validation import hold_out

RUN = ["--max-steps", "4", "--set", "output.checkpoint_every=2", "--set", "output.single_file=false",
       "--set", "data.validation_split=0.34", "--set", "output.validate_every=2"]


def validation_losses(out) -> dict:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["validation_loss"] for row in rows if row["validation_loss"] is not None}


@pytest.fixture(scope="module")
def straight(tiny_sd1, images, tmp_path_factory):
    out = tmp_path_factory.mktemp("validation") / "straight"
    train(tiny_sd1, images, out, *RUN)
    return out


def test_the_held_out_share_is_seeded_and_never_trained_on(images):
    examples = scan_folder(images, load_config("cpu")[0].data).examples
    kept, held = hold_out(examples, 0.34, seed=0)
    assert len(held) == 2 and len(kept) == len(examples) - 2
    assert {e.image for e in kept}.isdisjoint(e.image for e in held)
    assert hold_out(examples, 0.34, seed=0) == (kept, held)
    assert hold_out(examples, 0.34, seed=1)[1] != held
    with pytest.raises(SdtuneError, match="leaves none to train on"):
        hold_out(examples[:1], 0.5, seed=0)


def test_the_validation_loss_is_logged_every_n_steps(straight):
    losses = validation_losses(straight)
    assert sorted(losses) == [2, 4]
    assert all(value > 0 for value in losses.values())


def test_two_identical_runs_and_a_resumed_run_log_the_same_validation_loss(tiny_sd1, images, straight, tmp_path):
    again = tmp_path / "again"
    train(tiny_sd1, images, again, *RUN)
    assert validation_losses(again) == validation_losses(straight)
    killed = tmp_path / "killed"
    shutil.copytree(straight, killed)
    shutil.rmtree(killed / "checkpoints" / "step-000004")
    shutil.rmtree(killed / "unet")
    train(tiny_sd1, images, killed, *RUN, "--resume")
    assert validation_losses(killed) == validation_losses(straight)


def test_a_validation_folder_and_the_ema_loss(tiny_sd1, images, tmp_path):
    out = tmp_path / "dir"
    sets = [*RUN[:6], "--set", f"data.validation_dir={images}", "--set", "output.validate_every=2",
            "--set", "train.ema_decay=0.9"]
    train(tiny_sd1, images, out, *sets)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evaluated = [row for row in rows if row["validation_loss"] is not None]
    assert [row["step"] for row in evaluated] == [2, 4]
    assert all(row["ema_validation_loss"] > 0 for row in evaluated)
    assert evaluated[-1]["ema_validation_loss"] != evaluated[-1]["validation_loss"]


@pytest.mark.parametrize(("sets", "message"), [
    (["output.validate_every=5"], "output.validate_every is set but there is no validation set"),
    (["data.validation_split=1.5"], "data.validation_split must be in"),
    (["data.validation_split=0.2", "data.validation_dir=x"], "both set"),
])
def test_a_validation_setting_that_cannot_work_is_one_line(tiny_sd1, images, tmp_path, sets, message):
    args = ["train", "--preset", "cpu", "--data", str(images), "--model", str(tiny_sd1), "--out", str(tmp_path / "o")]
    result = runner.invoke(app, [*args, *[x for s in sets for x in ("--set", s)]])
    assert result.exit_code != 0 and message in result.output
