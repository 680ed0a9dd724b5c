"""Long captions and clip_skip end to end on the tiny models: a run reads the whole caption (cached or not)
and samples with it, `sdtune sample` reads a run's prompts as it trained, and samples drawn from the
family's embeddings are the pipeline's own images where both read prompts alike. The definitions against
kohya's sd-scripts are tests/unit/test_long_captions.py."""

import functools
import logging

import numpy as np
import torch
from safetensors.torch import load_file
from support.helpers import prepared, runner, said
from support.testing import make_image_folder

from sdtune.cli import app
from sdtune.family.load import assemble_pipeline, load_components
from sdtune.sample import generate
from sdtune.train import loop as trainer

LONG = ", ".join(["a red circle on the white background"] * 14)  # ~100 tokens


def test_sdxl_trains_on_long_captions_from_its_text_cache_and_samples_with_them(tiny_sdxl, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="sdtune")
    data = make_image_folder(tmp_path / "data", count=2)
    (data / "img000.txt").write_text(LONG + ", a blue square")
    run = prepared(tiny_sdxl, data, tmp_path / "out", "train.max_steps=2", "data.max_token_length=225",
                   "data.cache_text=true", f"data.cache_dir={tmp_path / 'cache'}", "output.sample_every=2",
                   f"output.sample_prompts=['{LONG}']", "output.sample_steps=2")
    entries = [load_file(e) for e in (tmp_path / "cache" / "text").rglob("*.safetensors")]
    assert entries and all(e["hidden"].shape == (227, 80) and e["pooled"].shape == (32,) for e in entries)
    trainer.loop(run)
    assert len(run.losses) == 2 and all(np.isfinite(run.losses))
    assert (tmp_path / "out" / "samples" / "step-000002.png").is_file()
    assert any(line.startswith("captions are read with max_token_length=225") and "first 75 tokens" in line
               for line in said(caplog))
    # the tail past 77 tokens is read: two captions that differ only there differ in their conditioning
    c = run.components
    with run.features.on_device():
        tails = c.family.encode(c, [LONG + ", a blue square", LONG + ", a green star"]).hidden
    assert not torch.equal(tails[0], tails[1]) and torch.equal(tails[0, :77], tails[1, :77])


def test_sample_reads_a_runs_prompts_as_it_trained(tiny_sd1, tmp_path):
    from support.helpers import train

    data = make_image_folder(tmp_path / "data", count=2)
    out = tmp_path / "out"
    train(tiny_sd1, data, out, "--max-steps", "1", "--set", "data.max_token_length=150", "--set", "train.clip_skip=2")
    result = runner.invoke(app, ["sample", "--ckpt", str(out), "--prompt", LONG, "--num-images", "1", "--steps", "1",
                                 "--out", str(tmp_path / "samples")])
    assert result.exit_code == 0, result.output
    assert "note: prompts are read with max_token_length=150 and clip_skip=2" in result.output
    assert "Clip skip: 2" in result.output or "Clip skip: 2" in _parameters(tmp_path / "samples" / "000-seed0.png")
    plain = runner.invoke(app, ["sample", "--ckpt", str(out), "--prompt", "a star", "--num-images", "1", "--steps",
                                "1", "--out", str(tmp_path / "plain"), "--max-token-length", "75", "--clip-skip", "1"])
    assert plain.exit_code == 0 and "prompts are read" not in plain.output, plain.output


def _parameters(png) -> str:
    from PIL import Image

    return Image.open(png).text["parameters"]


def test_samples_from_the_familys_embeddings_are_the_pipelines_own(tiny_sd1, tiny_sdxl):
    """At 75 tokens and clip_skip 1 the family encodes prompts as the pipeline does, so handing the pipeline
    its embeddings (the path long captions take) draws the same images: prompts, negative prompt, and SDXL's
    pooled embeddings and zeroed empty negative prompt all arrive where the pipeline expects them."""
    for model, negative in ((tiny_sd1, "a blue square"), (tiny_sdxl, "")):
        c = load_components(str(model))
        pipe = assemble_pipeline(c)
        args = dict(steps=2, height=64, width=64, negative_prompt=negative)
        prompts = ["a red circle on the white background", "a star"]
        strings = generate(pipe, prompts, [0, 1], **args)
        embedded = generate(pipe, prompts, [0, 1], encode=functools.partial(c.family.encode, c), **args)
        for a, b in zip(strings, embedded, strict=True):
            assert np.array_equal(np.asarray(a), np.asarray(b))


def test_data_check_measures_captions_at_the_long_limit(tmp_path):
    data = make_image_folder(tmp_path / "data", count=2)
    (data / "img000.txt").write_text(LONG + ", " + LONG)  # ~200 tokens
    short = runner.invoke(app, ["data", "check", str(data), "--set", "data.resolution=64"])
    assert "1 of 2 captions are longer than the 77 tokens" in short.output, short.output
    long = runner.invoke(app, ["data", "check", str(data), "--set", "data.resolution=64",
                               "--set", "data.max_token_length=225"])
    assert "every caption fits the 227 tokens the text encoder reads" in long.output, long.output
