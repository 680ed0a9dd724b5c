"""What sdtune tells a user about their own choices: the low-resolution warning names presets of the model's
size, and an EXIF-rotated photo's size is reported as it is seen (and bucketed), not as it is stored."""

import logging
import types

import pytest
from PIL import Image
from support.helpers import said
from typer.testing import CliRunner

from sdtune.cli import app
from sdtune.config import DataConfig, load_config
from sdtune.data.scan import scan_all
from sdtune.train.loop import _check_resolution

runner = CliRunner()


def _model(sample_size: int):
    """What `_check_resolution` reads of a model: the UNet's latent size and the VAE's downscale (4 levels: 8x)."""
    return types.SimpleNamespace(unet=types.SimpleNamespace(config=types.SimpleNamespace(sample_size=sample_size)),
                                 vae=types.SimpleNamespace(config=types.SimpleNamespace(block_out_channels=[0] * 4)))


def _warning(caplog, sample_size: int, preset: str, *sets: str) -> str:
    caplog.clear()
    caplog.set_level(logging.INFO, logger="sdtune")
    _check_resolution(_model(sample_size), load_config(preset, list(sets))[0])
    (line,) = said(caplog)
    return line


def test_the_low_resolution_warning_names_presets_made_for_the_models_size(caplog):
    sd15 = _warning(caplog, 64, "rtx3050", "data.resolution=256")  # SD1.5: 512 px
    assert "trained at 512 px and data.resolution is 256" in sd15
    assert "a preset made for 512 px (rtx2070, rtx3050, rtx3080, rtx4090)" in sd15 and "sdxl" not in sd15
    lora = _warning(caplog, 64, "lora-4gb", "data.resolution=256")
    assert "(lora-4gb, lora-6gb)" in lora and "rtx" not in lora
    sdxl = _warning(caplog, 128, "rtx3050")  # SDXL (1024 px) on an SD-card plan
    assert "(sdxl-4gb, sdxl-8gb, sdxl-12gb, sdxl-16gb, sdxl-24gb)" in sdxl and "rtx" not in sdxl
    sd21 = _warning(caplog, 96, "rtx3050")  # SD 2.1 at 768 px: no preset is made for it
    assert sd21.endswith("would learn to draw at the smaller size; --set data.resolution=768")


def _phone_photo(path, size, orientation=6):
    exif = Image.Exif()
    exif[0x0112] = orientation  # 6: turn 90 degrees clockwise to view, so width and height swap
    Image.new("RGB", size, "red").save(path, exif=exif.tobytes())


@pytest.mark.parametrize("check", ["decode", "headers"])
def test_an_exif_rotated_image_is_reported_and_bucketed_as_seen(tmp_path, check):
    _phone_photo(tmp_path / "small.jpg", (120, 40))   # stored landscape, seen 40 x 120 (portrait)
    _phone_photo(tmp_path / "big.jpg", (192, 128))    # seen 128 x 192
    cfg = DataConfig(resolution=128, min_side=48, scan_cache=False, check_images=check)
    scan = scan_all(tmp_path, cfg)
    (skip,) = scan.skipped
    assert skip.kind == "too small" and skip.detail.startswith("40x120: shorter side under 48 px")
    (example,) = scan.examples
    assert tuple(example.size) == (128, 192)


def test_data_check_shows_the_rotated_sizes_as_seen(tmp_path):
    _phone_photo(tmp_path / "small.jpg", (120, 40))
    _phone_photo(tmp_path / "big.jpg", (192, 128))
    result = runner.invoke(app, ["data", "check", str(tmp_path), "--preset", "cpu", "--set", "data.resolution=128",
                                 "--set", "data.min_side=48", "--set", "data.scan_cache=false"])
    assert result.exit_code == 0, result.output
    assert "small.jpg (too small): 40x120:" in result.output
    rows = [line.split() for line in result.output.splitlines() if " x " in line and line.strip()[:1].isdigit()]
    (width, _, height, *_), = rows
    assert int(width) < int(height)  # a portrait bucket, as the photo is seen
