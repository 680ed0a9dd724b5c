"""Checkpoints: written whole or not at all, damage detected, failures leave the previous one, no pickle code."""

import errno
import json
import logging
import pickle
import shutil

import pytest
import torch
from support.helpers import final_unet, prepared, said, train

from sdtune.errors import SdtuneError
from sdtune.train import checkpoint as run_checkpoint
from sdtune.train import loop as trainer
from sdtune.train import store as checkpoint
from sdtune.util.files import sha256_file

ARGS = ("--max-steps", "4", "--set", "output.checkpoint_every=2", "--set", "output.keep_checkpoints=3")


def test_a_damaged_newest_checkpoint_is_passed_over_with_a_warning(tiny_sd1, images, tmp_path, caplog):
    straight = tmp_path / "straight"
    expected = train(tiny_sd1, images, straight, *ARGS)
    damaged = tmp_path / "damaged"
    shutil.copytree(straight, damaged)
    newest = damaged / "checkpoints" / "step-000004"
    weights = bytearray((newest / "unet.safetensors").read_bytes())
    weights[-10] ^= 0xFF  # one flipped bit of a weight: the size is right, the checksum is not
    (newest / "unet.safetensors").write_bytes(bytes(weights))
    caplog.set_level(logging.INFO, logger="sdtune")
    assert checkpoint.latest_checkpoint(damaged).name == "step-000002"
    messages = said(caplog)
    assert "step-000004 is damaged (unet.safetensors does not match its checksum)" in messages[0]
    assert messages[0].startswith("warning: ")
    (damaged / "checkpoints" / "step-000006.tmp").mkdir()  # a save that was killed half way
    shutil.rmtree(newest)
    resumed = train(tiny_sd1, images, damaged, *ARGS, "--resume")
    assert resumed["losses"] == expected["losses"]
    a, b = final_unet(straight), final_unet(damaged)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_failed_write_keeps_the_previous_checkpoint_newest(tiny_sd1, images, tmp_path, monkeypatch):
    run = prepared(tiny_sd1, images, tmp_path / "out", "train.max_steps=4", "output.checkpoint_every=2")
    real_save = torch.save
    calls = []

    def disk_full_on_second_save(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full_on_second_save)
    with pytest.raises(SdtuneError, match=r"disk full: checkpoint step-000004 in \S+checkpoints needs [\d.]+ \w+ "
                                          r"and [\d.]+ \w+ is free; step-000002 is intact"):
        trainer.loop(run)
    root = checkpoint.checkpoint_root(tmp_path / "out")
    assert sorted(p.name for p in root.iterdir()) == ["step-000002"]  # no half-written step-000004(.tmp)
    assert checkpoint.verify(root / "step-000002") is None


def test_a_checkpoint_whose_unpickling_would_run_code_is_refused(tiny_sd1, images, tmp_path):
    out = tmp_path / "out"
    train(tiny_sd1, images, out, "--max-steps", "2", "--set", "output.checkpoint_every=2")
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))  # a pickle that creates a file when loaded

    target = out / "checkpoints" / "step-000002"
    (target / "training_state.pt").write_bytes(pickle.dumps(Exploit()))
    state = json.loads((target / "state.json").read_text())  # make the manifest agree, as an attacker would
    state["manifest"]["training_state.pt"] = {"bytes": (target / "training_state.pt").stat().st_size,
                                              "sha256": sha256_file(target / "training_state.pt")}
    (target / "state.json").write_text(json.dumps(state))
    run = prepared(tiny_sd1, images, tmp_path / "fresh", "train.max_steps=4")
    with pytest.raises(SdtuneError, match="checkpoint .*step-000002 is unreadable"):
        checkpoint.load_checkpoint(target, parts=run_checkpoint.parts(run))
    assert not marker.exists()


def test_every_file_of_a_checkpoint_is_in_its_manifest(tiny_sd1, images, tmp_path):
    out = tmp_path / "out"
    train(tiny_sd1, images, out, "--max-steps", "2", "--set", "output.checkpoint_every=2")
    path = out / "checkpoints" / "step-000002"
    manifest = json.loads((path / "state.json").read_text())["manifest"]
    assert sorted(manifest) == sorted(p.name for p in path.iterdir() if p.name != "state.json")
    assert checkpoint.verify(path) is None
