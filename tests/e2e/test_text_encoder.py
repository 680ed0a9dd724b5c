"""Text encoder training (`train.text_encoder_lr`): the encoder trains in fp32 at its own rate, is exported
with the UNet and checkpointed, resumes bit for bit, and refuses what cannot serve it."""

import pytest
import torch
from safetensors.torch import load_file
from support.helpers import assert_resume_is_bitwise, runner, train

from sdtune.cli import app

RUN = ["--max-steps", "3", "--set", "output.checkpoint_every=1", "--set", "output.single_file=false",
       "--set", "train.text_encoder_lr=1e-3"]


def encoder(folder, part="text_encoder"):
    """A text encoder's weights by transformers 5's names (an export writes 4.x's `text_model.` for old clients)."""
    return {k.removeprefix("text_model."): v for k, v in load_file(folder / part / "model.safetensors").items()}


def test_the_text_encoder_trains_and_is_exported(tiny_sd1, images, tmp_path):
    out = tmp_path / "out"
    train(tiny_sd1, images, out, *RUN)
    base, trained = encoder(tiny_sd1), encoder(out)
    assert set(base) == set(trained)
    changed = [k for k in base if not torch.equal(base[k].float(), trained[k].float())]
    assert len(changed) > len(base) // 2
    kept = load_file(out / "checkpoints" / "step-000003" / "text_encoders.safetensors")
    assert all(torch.equal(kept[f"text_encoder.{k}"], trained[k].float()) for k in trained)


def test_a_resumed_run_trains_the_text_encoder_bit_for_bit(tiny_sd1, images, tmp_path):
    assert_resume_is_bitwise(tiny_sd1, images, tmp_path, *RUN, last=3, resume_from=1)
    a, b = encoder(tmp_path / "straight"), encoder(tmp_path / "killed")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sdxl_trains_both_encoders(tiny_sdxl, images, tmp_path):
    out = tmp_path / "xl"
    train(tiny_sdxl, images, out, *RUN[:2], *RUN[4:], "--set", "data.resolution=64")
    for part in ("text_encoder", "text_encoder_2"):
        base, trained = encoder(tiny_sdxl, part), encoder(out, part)
        assert any(not torch.equal(base[k].float(), trained[k].float()) for k in base)


@pytest.mark.parametrize(("sets", "keys"), [
    (["data.cache_text=true"], ("train.text_encoder_lr", "data.cache_text")),
    (["memory.optimizer_offload=cpu"], ("train.text_encoder_lr", "memory.optimizer_offload=cpu")),
    (["train.method=lora"], ("train.text_encoder_lr", "lora.text_encoder")),
])
def test_what_cannot_serve_a_training_text_encoder_is_one_line(tiny_sd1, images, tmp_path, sets, keys):
    args = ["train", "--preset", "cpu", "--data", str(images), "--model", str(tiny_sd1), "--out", str(tmp_path / "o"),
            "--set", "train.text_encoder_lr=1e-4", *[x for s in sets for x in ("--set", s)]]
    result = runner.invoke(app, args)
    assert result.exit_code != 0
    assert all(key in result.output for key in keys), result.output


def test_the_estimator_counts_the_training_encoder(tiny_sd1):
    from sdtune.config import load_config
    from sdtune.estimate import estimate
    from sdtune.family.meta import meta_model

    def categories(*sets):
        cfg, info = load_config("cpu", [f"model.pretrained={tiny_sd1}", *sets])
        return estimate(cfg, info, device="cpu").categories

    frozen, trained = categories(), categories("train.text_encoder_lr=1e-5")
    encoder = sum(p.numel() for p in meta_model(str(tiny_sd1)).text_encoders[0].parameters())
    assert trained["weights"] - frozen["weights"] == 4 * encoder  # its fp32 weights, trained now
    assert frozen["frozen"] - trained["frozen"] == 4 * encoder    # (the cpu preset's fp32: no longer frozen)
    assert trained["optimizer_state"] - frozen["optimizer_state"] >= 8 * encoder  # AdamW's two moments
