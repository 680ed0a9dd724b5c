"""`sdtune estimate-vram` and `sdtune presets` end to end with the real estimator: a step of each shipped plan
traced on the meta device at full size (tens of seconds each on 2 cores, hence outside the unit tier, whose
tests/unit/test_estimate_cli.py checks the same command around a fake estimator)."""

import dataclasses
import json

import pytest
from typer.testing import CliRunner

from sdtune.cli import app
from sdtune.config import load_config
from sdtune.estimate import auto

runner = CliRunner()
GIB = 2**30
GPU_PRESETS = ["rtx2070", "rtx3050", "rtx3080", "rtx4090"]
CATEGORIES = ("weights", "frozen", "gradients", "optimizer_state", "activations", "temporaries",
              "allocator_overhead", "cuda_context")


@pytest.fixture(autouse=True)
def plenty_of_host_ram(monkeypatch):
    monkeypatch.setattr(auto, "host_ram", lambda: 64 * GIB)


def test_real_estimate_table_and_json():
    result = runner.invoke(app, ["estimate-vram"])
    assert result.exit_code == 0, result.output
    for label in ("weights", "optimizer state", "activations", "peak reserved", "total", "host RAM"):
        assert label in result.stdout
    assert "fits 8 GB" in result.stdout or "does not fit 8 GB" in result.stdout
    result = runner.invoke(app, ["estimate-vram", "--model", "sd15", "--json"])
    assert result.exit_code == 0, result.output
    (entry,) = json.loads(result.stdout)["estimates"]
    assert list(entry["categories"]) == list(CATEGORIES)
    assert entry["peak_allocated"] == sum(entry["categories"][k] for k in CATEGORIES[:6])
    assert entry["total"] == entry["peak_reserved"] + entry["categories"]["cuda_context"]
    assert (entry["preset"], entry["resolution"], entry["batch_size"], entry["device"]) == ("rtx3050", 512, 4, "cuda")
    assert entry["fits"] == (entry["total"] <= 8 * GIB)


def test_real_estimate_every_gpu_preset():
    result = runner.invoke(app, ["estimate-vram", "--preset", "all", "--json"])
    assert result.exit_code == 0, result.output
    estimates = json.loads(result.stdout)["estimates"]
    assert [e["preset"] for e in estimates] == GPU_PRESETS
    totals = {e["preset"]: e["total"] for e in estimates}
    assert totals["rtx4090"] > totals["rtx3050"]  # nothing offloaded, nothing recomputed


def test_real_estimate_bad_model_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    for model, word in ((str(tmp_path / "missing"), "missing"), (str(tmp_path / "empty"), "model_index.json"),
                        ("sd99", "sd99")):
        result = runner.invoke(app, ["estimate-vram", "--model", model])
        assert result.exit_code == 2, result.output
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and word in lines[0], result.output


def test_presets_say_when_equal_vram_hides_a_host_ram_difference():
    """With the real estimator: sdxl-8gb and sdxl-12gb need the same VRAM, and 12.9 vs 35.2 GiB of host RAM
    (sdxl-8gb keeps AdamW's state on disk)."""
    from sdtune.cli import _same_vram_notes
    from sdtune.estimate import estimate

    estimates = [estimate(*load_config(name)) for name in ("sdxl-8gb", "sdxl-12gb")]
    (note,) = _same_vram_notes(estimates)
    assert note.startswith("sdxl-8gb and sdxl-12gb need the same VRAM (6.5 GiB) but not the same host RAM: "
                           "sdxl-8gb 12.9 GiB (and 28.7 GiB of disk), sdxl-12gb 3"), note


def test_a_presets_estimate_is_remembered_until_the_plan_changes(monkeypatch, tmp_path):
    """`sdtune presets` traces each plan once; the next listing reads the figures back, the same."""
    from sdtune import estimate as module

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cfg, info = load_config("lora-4gb")
    first = module.remembered(cfg, info)
    traced = []
    monkeypatch.setattr(module, "estimate", lambda *args, **kwargs: traced.append(args) or first)
    again = module.remembered(cfg, info)
    assert dataclasses.replace(again, seconds=first.seconds) == first and traced == []  # its seconds: the lookup's
    assert len(list((tmp_path / "sdtune" / "estimates").iterdir())) == 1
    module.remembered(*load_config("lora-4gb", ["data.resolution=768"]))
    assert len(traced) == 1  # another plan, another trace
