"""Latent and text caches: the same training as without them, reused across runs, invalidated by changes."""

import pytest
from support.helpers import prepared

from sdtune.train import loop as trainer


def _run(model, images, out, cache_dir, *sets, steps=3):
    run = prepared(model, images, out, f"train.max_steps={steps}", f"data.cache_dir={cache_dir}", *sets)
    trainer.loop(run)
    return run


def _count_calls(monkeypatch, module, name):
    calls = []
    original = getattr(module, name)

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(module, name, counting)
    return calls


CACHED = ["data.cache_latents=true", "data.cache_text=true"]


@pytest.mark.parametrize("flip", ["false", "true"])
def test_cached_training_equals_uncached(tiny_sd1, images, tmp_path, flip):
    sets = [f"data.random_flip={flip}", "data.caption_dropout=0.3"]
    plain = _run(tiny_sd1, images, tmp_path / "plain", tmp_path / "cache", *sets)
    cached = _run(tiny_sd1, images, tmp_path / "cached", tmp_path / "cache", *sets, *CACHED)
    assert cached.losses == pytest.approx(plain.losses, rel=1e-4)
    stored = list((tmp_path / "cache" / "latents").rglob("*.safetensors"))
    assert len(stored) == 6 * (2 if flip == "true" else 1)  # every image, both ways round when flipping


def test_a_second_run_calls_no_encoder_and_changes_invalidate(tiny_sd1, images, tmp_path, monkeypatch):
    import shutil

    from diffusers import AutoencoderKL
    from PIL import Image
    from transformers import CLIPTextModel

    images = shutil.copytree(images, tmp_path / "images")  # this test edits a file
    _run(tiny_sd1, images, tmp_path / "first", tmp_path / "cache", *CACHED, steps=1)
    encodes = _count_calls(monkeypatch, AutoencoderKL, "encode")
    embeds = _count_calls(monkeypatch, CLIPTextModel, "forward")
    _run(tiny_sd1, images, tmp_path / "second", tmp_path / "cache", *CACHED, steps=2)
    assert encodes == [] and embeds == []
    changed = sorted(images.glob("*.png"))[0]
    Image.new("RGB", (64, 64), (255, 0, 0)).save(changed)  # new content under the same name
    _run(tiny_sd1, images, tmp_path / "third", tmp_path / "cache", *CACHED, steps=1)
    assert len(encodes) == 1  # the changed file's latent missed the cache and was encoded again
    other = _run(tiny_sd1, images, tmp_path / "fourth", tmp_path / "cache", *CACHED, "data.random_flip=true", steps=1)
    assert other.features.latent_cache is not None and len(encodes) > 1  # flipped crops were not cached yet
