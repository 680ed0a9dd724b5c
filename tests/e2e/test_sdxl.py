"""SDXL end to end on a tiny SDXL pipeline built from configs: train, export, load with plain diffusers,
sample; captions encoded as diffusers' own pipeline encodes them; time ids from each image's real size and
crop; caches exact; resume bitwise with offload and weight streaming."""

import json
import logging

import pytest
import torch
from PIL import Image
from support.helpers import assert_resume_is_bitwise, final_unet, prepared, runner, said, train

from sdtune.cli import app
from sdtune.config import DataConfig
from sdtune.data import BatchStream, Example
from sdtune.family.load import load_components
from sdtune.family.sdxl import time_ids
from sdtune.train import loop as trainer


def test_captions_are_encoded_as_the_sdxl_pipeline_encodes_prompts(tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    components = load_components(str(tiny_sdxl))
    assert components.family.name == "sdxl" and len(components.text_encoders) == 2
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    captions = ["a red circle on the white background", "a blue square"]
    hidden, _, pooled, _ = pipe.encode_prompt(captions, device="cpu", do_classifier_free_guidance=False)
    cond = components.family.encode(components, captions)
    assert torch.equal(cond.hidden, hidden) and torch.equal(cond.pooled, pooled)
    assert cond.hidden.shape[-1] == components.unet.config.cross_attention_dim  # both encoders, concatenated
    dropped = components.family.encode(components, ["", captions[1]])  # caption dropout: zeros, as the pipeline's
    assert not dropped.hidden[0].any() and not dropped.pooled[0].any()  # unconditional prompt
    assert torch.equal(dropped.pooled[1], pooled[1])


def test_time_ids_follow_each_images_size_resize_crop_and_flip(tmp_path):
    Image.new("RGB", (300, 100)).save(tmp_path / "wide.png")
    example = Example(tmp_path / "wide.png", "wide", size=(300, 100))
    cfg = DataConfig(resolution=128, center_crop=False, random_flip=True, buckets=False)
    stream = BatchStream([example], cfg, batch_size=1, seed=0)
    items = [stream.items(k)[0] for k in range(40)]
    for item in items:
        assert item.resized == (384, 128) and item.bucket == (128, 128)
        left, top, right, _ = item.crop
        expected_left = 384 - right if item.flip else left
        assert time_ids(item) == [100, 300, top, expected_left, 128, 128]
    assert len({time_ids(item)[3] for item in items}) > 5  # random crops: the corner moves
    assert {item.flip for item in items} == {False, True}


def test_train_export_load_with_plain_diffusers_and_sample(tiny_sdxl, images, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    out = tmp_path / "out"
    summary = train(tiny_sdxl, images, out, "--max-steps", "3")
    assert summary["model_family"] == "sdxl" and summary["pipeline_class"] == "StableDiffusionXLPipeline"
    assert all(torch.isfinite(torch.tensor(summary["losses"])))
    pipe = StableDiffusionXLPipeline.from_pretrained(out)
    base = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    trained = final_unet(out)
    assert any(not torch.equal(trained[k], v) for k, v in base.unet.state_dict().items())
    assert all(torch.equal(pipe.text_encoder_2.state_dict()[k], v) for k, v in base.text_encoder_2.state_dict().items())
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    result = runner.invoke(app, ["sample", "--ckpt", str(out), "--prompt", "a red circle", "--num-images", "2",
                                 "--steps", "2", "--out", str(tmp_path / "samples")])
    assert result.exit_code == 0, result.output
    grid = Image.open(tmp_path / "samples" / "grid.png")
    assert grid.width == 128 and grid.height > 64  # two images side by side, below their prompt and seed


def test_cached_latents_and_text_train_exactly_as_uncached(tiny_sdxl, images, tmp_path):
    sets = ["train.max_steps=3", "data.caption_dropout=0.3", f"data.cache_dir={tmp_path / 'cache'}"]
    plain = prepared(tiny_sdxl, images, tmp_path / "plain", *sets)
    trainer.loop(plain)
    cached = prepared(tiny_sdxl, images, tmp_path / "cached", *sets, "data.cache_latents=true", "data.cache_text=true")
    trainer.loop(cached)
    assert cached.losses == pytest.approx(plain.losses, rel=1e-4)
    entries = list((tmp_path / "cache" / "text").rglob("*.safetensors"))
    from safetensors.torch import load_file

    assert entries and all(set(load_file(e)) == {"hidden", "pooled"} for e in entries)


@pytest.mark.parametrize("levers", [
    [], ["memory.optimizer_offload=cpu", "memory.param_offload=cpu", "memory.gradient_checkpointing=true"],
    ["memory.optimizer_offload=nvme", "memory.offload_dir={tmp}", "memory.param_offload=cpu",
     "memory.gradient_checkpointing=true"],
], ids=["in-device", "cpu-offload+streaming", "nvme-offload+streaming"])
def test_resume_is_bitwise(tiny_sdxl, images, tmp_path, levers):
    sets = [arg for lever in levers for arg in ("--set", lever.format(tmp=tmp_path))]
    assert_resume_is_bitwise(tiny_sdxl, images, tmp_path, "--max-steps", "4", "--set", "output.checkpoint_every=2",
                             *sets, last=4, resume_from=2)


def test_sdxls_vae_decodes_in_fp32_under_fp16_unless_it_is_fp16_safe(tiny_sdxl, tiny_sd1, tmp_path):
    sdxl, sd = load_components(str(tiny_sdxl)), load_components(str(tiny_sd1))
    assert sdxl.vae.config.force_upcast and sd.vae.config.force_upcast  # diffusers' default: SD ignores it
    assert sdxl.family.vae_dtype(sdxl.vae, torch.float16) == torch.float32
    assert sdxl.family.vae_dtype(sdxl.vae, torch.bfloat16) == torch.bfloat16
    assert sd.family.vae_dtype(sd.vae, torch.float16) == torch.float16
    safe = tmp_path / "fp16-safe-vae"
    sdxl.vae.register_to_config(force_upcast=False)
    sdxl.vae.save_pretrained(safe)
    assert sdxl.family.vae_dtype(sdxl.vae, torch.float16) == torch.float16
    args = ["sample", "--ckpt", str(tiny_sdxl), "--prompt", "a red circle", "--num-images", "1", "--steps", "1"]
    result = runner.invoke(app, [*args, "--vae", str(safe), "--out", str(tmp_path / "samples")])
    assert result.exit_code == 0, result.output
    missing = runner.invoke(app, [*args, "--vae", str(tmp_path), "--out", str(tmp_path / "s2")])
    assert missing.exit_code == 2 and "is not a diffusers VAE folder" in missing.output


def test_a_plan_well_below_the_models_native_size_says_so(tiny_sdxl, images, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="sdtune")
    cfg_args = ["data.resolution=32", "data.min_side=32", "train.max_steps=1"]
    from sdtune.config import load_config

    cfg, info = load_config("cpu", [f"model.pretrained={tiny_sdxl}", *cfg_args])
    trainer.prepare(cfg, info, str(images), str(tmp_path / "out"), resume=False).close()
    lines = said(caplog)
    assert any("trained at 64 px and data.resolution is 32" in line for line in lines)
    caplog.clear()
    cfg, info = load_config("cpu", [f"model.pretrained={tiny_sdxl}", "train.max_steps=1"])
    trainer.prepare(cfg, info, str(images), str(tmp_path / "out2"), resume=False).close()
    assert not any("trained at" in line for line in said(caplog))


def test_an_sdxl_single_file_trains_with_its_configs(tiny_sdxl, images, tmp_path):
    """`--model sd_xl_base_1.0.safetensors --set model.config=DIR`: the sgm-layout file sdtune writes (as
    Stability's is) loads as SDXL, equal to fp16 precision, and trains; an SD config for it is refused."""
    from sdtune.export import export_single_file

    original = load_components(str(tiny_sdxl))
    path = export_single_file(original, tmp_path, force=True).path
    loaded = load_components(str(path), config=str(tiny_sdxl))
    assert loaded.family.name == "sdxl"
    for name in ("unet", "vae"):
        reference = getattr(original, name).state_dict()
        for key, value in getattr(loaded, name).state_dict().items():
            assert torch.equal(value, reference[key].half().float()), (name, key)
    result = runner.invoke(app, ["train", "--preset", "cpu", "--data", str(images), "--model", str(path),
                                 "--set", f"model.config={tiny_sdxl}", "--out", str(tmp_path / "out"),
                                 "--max-steps", "1"])
    assert result.exit_code == 0, result.output
    assert "model.safetensors not written: " in result.output  # the tiny sizes are not SDXL base's


def test_an_sd_config_for_an_sdxl_file_is_refused(tiny_sdxl, tiny_sd1, tmp_path):
    from sdtune.errors import SdtuneError
    from sdtune.export import export_single_file

    path = export_single_file(load_components(str(tiny_sdxl)), tmp_path, force=True).path
    with pytest.raises(SdtuneError, match="different model families"):
        load_components(str(path), config=str(tiny_sd1))
