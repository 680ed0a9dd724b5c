"""Intermediate saves (`output.save_every`, `output.save_every_epochs`): files a client loads, per step, apart
from the resume state; a LoRA run's in kohya's layout, a full fine-tune's as the single file."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from support.helpers import final_unet, fused_unet, runner, train

from sdtune.cli import app

LORA = ("--set", "train.method=lora", "--set", "lora.rank=4", "--set", "lora.alpha=8",
        "--set", "train.learning_rate=1e-3")


def _metadata(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


@pytest.mark.parametrize("ema", [False, True], ids=["plain", "ema"])
def test_lora_saves_are_kohya_files_that_diffusers_loads_and_each_is_that_steps_export(tiny_sd1, images, tmp_path,
                                                                                       ema):
    """A save at step 2 of a 4-step run is the LoRA file a 2-step run exports (with EMA: the average), the
    save at the last step the run's own; kohya's names, alpha and metadata; diffusers' kohya loader reads it."""
    out, short = tmp_path / "out", tmp_path / "short"
    extra = (*LORA, *(("--set", "train.ema_decay=0.5") if ema else ()))
    train(tiny_sd1, images, out, "--max-steps", "4", "--set", "output.save_every=2", *extra)
    train(tiny_sd1, images, short, "--max-steps", "2", *extra)
    saves = out / "saves"
    assert sorted(p.name for p in saves.iterdir()) == ["step-000002.safetensors", "step-000004.safetensors"]
    first, last = load_file(saves / "step-000002.safetensors"), load_file(saves / "step-000004.safetensors")
    for save, export in ((first, short / "lora.safetensors"), (last, out / "lora.safetensors")):
        exported = load_file(export)
        assert save.keys() == exported.keys() and all(torch.equal(save[k], exported[k]) for k in save)
    assert all(k.startswith("lora_unet_") for k in first)
    assert {float(v) for k, v in first.items() if k.endswith(".alpha")} == {8.0}
    meta = _metadata(saves / "step-000002.safetensors")
    assert (meta["ss_steps"], meta["ss_network_dim"], meta["ss_network_alpha"]) == ("2", "4", "8.0")

    from sdtune.family.load import load_components

    plain = load_components(str(tiny_sd1)).unet.state_dict()
    at_2 = fused_unet(tiny_sd1, saves, "step-000002.safetensors")
    at_4 = fused_unet(tiny_sd1, saves, "step-000004.safetensors")
    changed = [k for k in plain if not torch.equal(plain[k], at_2[k])]
    assert changed and all(".to_" in k for k in changed)
    assert any(not torch.equal(at_2[k], at_4[k]) for k in changed)


def test_lora_saves_every_epochs_follow_the_epoch_of_accumulated_steps(tiny_sd1, images, tmp_path):
    """Six images, one a micro-batch, two micro-batches a step: an epoch is 3 steps; every second one ends at 6."""
    out = tmp_path / "out"
    train(tiny_sd1, images, out, "--max-steps", "7", *LORA, "--set", "train.batch_size=1",
          "--set", "train.gradient_accumulation_steps=2", "--set", "output.save_every_epochs=2")
    assert [p.name for p in (out / "saves").iterdir()] == ["step-000006.safetensors"]
    assert _metadata(out / "saves" / "step-000006.safetensors")["ss_epoch"] == "2"


def test_a_model_no_client_reads_writes_no_saves_and_says_so_once(tiny_sd1, images, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["train", "--preset", "cpu", "--data", str(images), "--model", str(tiny_sd1),
                                 "--out", str(out), "--max-steps", "3", "--set", "output.save_every=1"])
    assert result.exit_code == 0, result.output
    said = [line for line in result.output.splitlines() if "no saves will be written" in line]
    assert len(said) == 1 and "model.safetensors" in said[0], result.output
    assert not (out / "saves").exists()


STREAMED = ("--set", "memory.optimizer_offload=nvme", "--set", "memory.param_offload=cpu",
            "--set", "memory.gradient_checkpointing=true")


@pytest.mark.parametrize("extra", [(), ("--set", "memory.optimizer_offload=cpu", "--set", "train.ema_decay=0.5"),
                                   STREAMED], ids=["plain", "host-tier-ema", "nvme-streamed"])
def test_full_saves_are_single_files_from_single_file_reads(tiny_sd1, images, tmp_path, monkeypatch, extra):
    """sdtune-tiny has no client-readable sizes; with the clients' check passed (as for SD1.5's sizes), the
    save at step 2 of a 4-step run is the model.safetensors a 2-step run exports (with EMA: the average),
    `from_single_file` reads it, the last save is the run's own export, and the run trains exactly as
    without saves."""
    from diffusers import StableDiffusionPipeline

    from sdtune.export import clients as single_file_clients

    monkeypatch.setattr(single_file_clients, "unreadable_reason", lambda *args, **kwargs: None)
    if extra == STREAMED:
        (tmp_path / "state").mkdir()
        extra = (*extra, "--set", f"memory.offload_dir={tmp_path / 'state'}")
    out, plain, short = tmp_path / "out", tmp_path / "plain", tmp_path / "short"
    train(tiny_sd1, images, out, "--max-steps", "4", "--set", "output.save_every=2", *extra)
    train(tiny_sd1, images, plain, "--max-steps", "4", *extra)
    train(tiny_sd1, images, short, "--max-steps", "2", *extra)
    a, b = final_unet(out), final_unet(plain)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the saves changed nothing of the training

    saves = out / "saves"
    assert sorted(p.name for p in saves.iterdir()) == ["step-000002.safetensors", "step-000004.safetensors"]
    for save, export in ((saves / "step-000002.safetensors", short), (saves / "step-000004.safetensors", out)):
        written, exported = load_file(save), load_file(export / "model.safetensors")
        assert written.keys() == exported.keys() and all(torch.equal(written[k], exported[k]) for k in written)

    pipe = StableDiffusionPipeline.from_single_file(str(saves / "step-000002.safetensors"), config=str(tiny_sd1),
                                                    local_files_only=True, safety_checker=None,
                                                    requires_safety_checker=False)
    trained, loaded = final_unet(short), pipe.unet.state_dict()
    assert trained.keys() == loaded.keys()
    assert all(torch.equal(v.half(), loaded[k].half()) for k, v in trained.items())


def test_a_save_the_disk_has_no_room_for_is_one_line(tiny_sd1, images, tmp_path, monkeypatch):
    from sdtune.util import files

    monkeypatch.setattr(files, "free_bytes", lambda folder: 1000)
    out = tmp_path / "out"
    result = runner.invoke(app, ["train", "--preset", "cpu", "--data", str(images), "--model", str(tiny_sd1),
                                 "--out", str(out), "--max-steps", "2", *LORA, "--set", "output.save_every=1"])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "not enough disk space for the save step-000001.safetensors" in result.output
    assert not any((out / "saves").glob("*"))
