import json
import pickle

import pytest

from sdtune.errors import SdtuneError
from sdtune.family.load import classify_source, load_components


def test_sources_are_classified(tiny_sd1, tmp_path):
    assert classify_source(str(tiny_sd1)) == "folder"
    assert classify_source("stable-diffusion-v1-5/stable-diffusion-v1-5") == "hub"
    (tmp_path / "m.safetensors").write_bytes(b"")
    assert classify_source(str(tmp_path / "m.safetensors")) == "single_file"


@pytest.mark.parametrize("name, message", [
    ("missing", "does not exist"),
    ("plain_folder", "no model_index.json"),
    ("notes.txt", "neither a diffusers folder nor a .safetensors"),
    ("model.ckpt", "pickle checkpoint"),
])
def test_bad_model_paths_get_one_clear_line(tmp_path, name, message):
    (tmp_path / "plain_folder").mkdir()
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / "model.ckpt").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(SdtuneError, match=message):
        classify_source(str(tmp_path / name))


def test_loads_sd1_and_reads_v_prediction_from_sd2(tiny_sd1, tiny_sd2):
    assert load_components(str(tiny_sd1)).prediction_type == "epsilon"
    assert load_components(str(tiny_sd2)).prediction_type == "v_prediction"


def test_other_pipeline_families_are_refused(tiny_sd1, tmp_path):
    import shutil

    other = tmp_path / "flux"
    shutil.copytree(tiny_sd1, other)
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxPipeline"}))
    with pytest.raises(SdtuneError, match="is a FluxPipeline; sdtune trains Stable Diffusion 1.x, 2.x .* and SDXL"):
        load_components(str(other))


def test_an_unreadable_single_file_is_one_line(tmp_path):
    (tmp_path / "m.safetensors").write_bytes(b"")
    with pytest.raises(SdtuneError, match="is not a readable .safetensors file"):
        load_components(str(tmp_path / "m.safetensors"))


def test_unreachable_hub_id_is_one_line():
    with pytest.raises(SdtuneError, match="could not fetch 'nobody/no-such-model'"):
        load_components("nobody/no-such-model")


def test_single_file_checkpoint_loads_and_trains(tiny_sd1, images, tmp_path):
    """A single .safetensors file plus a local config folder: loaded offline, trainable with `sdtune train`."""
    import torch
    from typer.testing import CliRunner

    from sdtune.cli import app
    from sdtune.export.single_file import pipeline_to_single_file

    original = load_components(str(tiny_sd1))
    path = pipeline_to_single_file(original.unet, original.vae, original.text_encoder, tmp_path / "m.safetensors")
    loaded = load_components(str(path), config=str(tiny_sd1))
    for part in ("unet", "vae", "text_encoder"):
        reference = getattr(original, part).state_dict()
        assert all(torch.equal(reference[k], v) for k, v in getattr(loaded, part).state_dict().items()), part
    result = CliRunner().invoke(app, ["train", "--preset", "cpu", "--data", str(images), "--model", str(path),
                                      "--set", f"model.config={tiny_sd1}", "--out", str(tmp_path / "out"),
                                      "--max-steps", "2"])
    assert result.exit_code == 0, result.output
    assert "model.safetensors not written: " in result.output  # the tiny model's sizes are not SD 1.5's
