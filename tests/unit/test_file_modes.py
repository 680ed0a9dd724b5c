"""What sdtune exports is readable as the umask says: safetensors' own writer makes 0600 files, which a
container or another user could not read beside the 0644 JSON."""

import os
import stat

import pytest

from sdtune.export import export_pipeline, export_single_file
from sdtune.family.load import load_components


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def _modes(folder) -> dict:
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*")}


def test_the_exported_pipeline_and_single_file_follow_the_umask(tiny_sd1, tmp_path, umask_022):
    components = load_components(str(tiny_sd1))
    out = tmp_path / "out"
    export_pipeline(components, out)
    assert export_single_file(components, out, force=True).path == out / "model.safetensors"
    modes = _modes(out)
    assert "unet/diffusion_pytorch_model.safetensors" in modes and "model.safetensors" in modes
    assert {name: mode for name, mode in modes.items() if (out / name).is_file() and mode != 0o644} == {}
    assert {name: mode for name, mode in modes.items() if (out / name).is_dir() and mode != 0o755} == {}


def test_sampled_images_follow_the_umask(tiny_sd1, tmp_path, umask_022):
    from sdtune.sample import sample

    result = sample(str(tiny_sd1), "a red circle", num_images=1, steps=1, out_dir=str(tmp_path / "samples"))
    assert {stat.S_IMODE(p.stat().st_mode) for p in [*result.images, result.grid]} == {0o644}


def test_everything_a_training_run_writes_follows_the_umask(tiny_sd1, images, tmp_path, umask_022):
    from support.helpers import train

    out, cache = tmp_path / "out", tmp_path / "cache"
    train(tiny_sd1, images, out, "--max-steps", "2", "--set", "output.checkpoint_every=1",
          "--set", "data.cache_latents=true", "--set", "data.cache_text=true", "--set", f"data.cache_dir={cache}")
    written = {out / name: mode for name, mode in _modes(out).items()}
    written |= {cache / name: mode for name, mode in _modes(cache).items()}
    assert any(p.parent.parent.name == "checkpoints" and p.suffix == ".safetensors" for p in written)
    assert any(cache / "latents" in p.parents and p.suffix == ".safetensors" for p in written)
    wrong = {str(p): oct(mode) for p, mode in written.items() if mode != (0o755 if p.is_dir() else 0o644)}
    assert wrong == {}


def test_a_safetensors_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    import safetensors.torch
    import torch
    from safetensors.torch import load_file

    from sdtune.util.files import save_safetensors

    path = tmp_path / "entry.safetensors"
    save_safetensors({"x": torch.ones(3)}, path)

    def broken(tensors, filename, metadata=None):
        open(filename, "wb").write(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="No space"):
        save_safetensors({"x": torch.zeros(3)}, path)
    assert torch.equal(load_file(path)["x"], torch.ones(3)) and [p.name for p in tmp_path.iterdir()] == [path.name]
