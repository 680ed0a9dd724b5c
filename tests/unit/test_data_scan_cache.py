"""Large folders: a warm scan opens no image (the scan cache), a changed file is checked again, and
data.check_images=headers starts without decoding, the loader reporting and replacing a broken file."""

import io
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image
from support.helpers import said

from sdtune.config import DataConfig
from sdtune.data import BatchStream, ImageFailed
from sdtune.data import scan as scan_module
from sdtune.data.scan import scan_all


def _png(path, colour=(200, 30, 30), size=(64, 64)):
    Image.new("RGB", size, colour).save(path)


def _truncated_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 64).convert("RGB").save(buf, "JPEG")
    return buf.getvalue()[: len(buf.getvalue()) * 2 // 3]


@pytest.fixture
def folder(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(5):
        _png(data / f"{i}.png")
    (data / "broken.jpg").write_bytes(_truncated_jpeg())
    return data


@pytest.fixture
def no_checks(monkeypatch):
    """Make any image check fail the test: what a warm scan must not do."""
    def check(*args, **kwargs):
        raise AssertionError("an image was checked again")

    return lambda: monkeypatch.setattr(scan_module, "check_image", check)


def _cfg(tmp_path, **kwargs):
    return DataConfig(resolution=64, cache_dir=str(tmp_path / "cache"), **kwargs)


def test_a_warm_scan_opens_no_image_and_finds_the_same(folder, tmp_path, no_checks):
    cold = scan_all(folder, _cfg(tmp_path))
    assert [s.kind for s in cold.skipped] == ["corrupt"] and len(cold.examples) == 5
    no_checks()
    warm = scan_all(folder, _cfg(tmp_path))
    assert warm.examples == cold.examples and warm.skipped == cold.skipped


def test_a_changed_or_new_file_is_checked_again(folder, tmp_path):
    scan_all(folder, _cfg(tmp_path))
    (folder / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")  # broken since the last scan
    _png(folder / "new.png", size=(96, 64))
    (folder / "broken.jpg").unlink()
    _png(folder / "broken.jpg")  # mended (a PNG under a .jpg name is read by its content)
    later = scan_all(folder, _cfg(tmp_path))
    assert [(s.path.name, s.kind) for s in later.skipped] == [("0.png", "corrupt")]
    assert {e.image.name: e.size for e in later.examples}["new.png"] == (96, 64)
    assert len(later.examples) == 6


def test_scan_cache_off_keeps_nothing_and_checks_every_time(folder, tmp_path, monkeypatch):
    checked = []
    real = scan_module.check_image

    def counted(path, *args, **kwargs):
        checked.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(scan_module, "check_image", counted)
    first = scan_all(folder, _cfg(tmp_path, scan_cache=False))
    assert sorted(checked) == sorted(p.name for p in folder.iterdir())  # every image, the broken one too
    checked.clear()
    again = scan_all(folder, _cfg(tmp_path, scan_cache=False))
    assert sorted(checked) == sorted(p.name for p in folder.iterdir())  # and every one again: nothing remembered
    assert again.examples == first.examples and not (tmp_path / "cache").exists()


def test_another_check_mode_is_its_own_entry(folder, tmp_path):
    scan_all(folder, _cfg(tmp_path, check_images="headers"))
    assert len(scan_all(folder, _cfg(tmp_path)).skipped) == 1  # decoding finds what headers did not


def test_headers_only_starts_without_decoding_and_the_loader_reports_and_replaces_a_broken_file(folder, tmp_path,
                                                                                                 caplog):
    cfg = _cfg(tmp_path, check_images="headers")
    scan = scan_all(folder, cfg)
    assert not scan.skipped and len(scan.examples) == 6  # the truncated JPEG's header is fine
    caplog.set_level(logging.INFO, logger="sdtune")
    stream = BatchStream(scan.examples, cfg, batch_size=6, seed=0)
    with pytest.raises(ImageFailed):
        stream.pixels(stream.items(0))
    reported = said(caplog)
    assert len(reported) == 1 and "broken.jpg" in reported[0]
    pixels = stream.pixels(stream.items(0))  # the same batch, the broken file replaced from its bucket
    assert pixels.shape[0] == 6 and "broken.jpg" not in {i.example.image.name for i in stream.items(0)}


def test_a_warm_start_with_cached_latents_reads_no_image_bytes(tiny_sd1, images, tmp_path, monkeypatch):
    """The latent cache keys an image by its content: the digest is remembered by (path, size, mtime)."""
    from support.helpers import prepared

    import sdtune.util.files

    sets = ["data.cache_latents=true", f"data.cache_dir={tmp_path / 'cache'}", "data.resolution=64"]
    with prepared(tiny_sd1, images, tmp_path / "cold", *sets):
        pass
    real = sdtune.util.files.sha256_file

    def no_image_reads(path):
        assert Path(path).suffix != ".png", f"{path} was read again"
        return real(path)

    monkeypatch.setattr(sdtune.util.files, "sha256_file", no_image_reads)
    with prepared(tiny_sd1, images, tmp_path / "warm", *sets) as run:  # every latent found by its digest
        run.features.latents(run.stream, run.stream.items(0), torch.Generator().manual_seed(0))
