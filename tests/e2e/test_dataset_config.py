"""sd-scripts' own example dataset config (docs/config_README-en.md: [general] and its DreamBooth dataset, two
character subsets and a regularisation subset), unmodified apart from its paths: `sdtune data check` shows each
subset, `sdtune train --data dataset.toml` trains on the tiny model, and the run resumes from its own
config.toml with the dataset file gone, exactly as it would have gone on."""

import json
import shutil

from support.helpers import KEEP_ALL, runner
from support.helpers import train as train_cli
from support.kohya_example import dreambooth_part
from support.testing import make_image_folder

from sdtune.cli import app

TINY = ("--set", "data.resolution=64")  # the tiny model's size; the file's 512 stands otherwise


def example(tmp_path):
    make_image_folder(tmp_path / "hoge", count=3, seed=1)
    make_image_folder(tmp_path / "fuga", count=2, seed=2, captions=False)
    make_image_folder(tmp_path / "reg", count=2, seed=3, captions=False)
    path = tmp_path / "dataset.toml"
    path.write_text(dreambooth_part(tmp_path.as_posix()))
    return path


def test_data_check_shows_each_subset_of_the_readme_example(tmp_path):
    result = runner.invoke(app, ["data", "check", str(example(tmp_path)), "--preset", "cpu", *TINY])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert f"subset 1: {tmp_path.as_posix()}/hoge: 3 images, x 1 repeats = 3; captions: 3 sidecar" in lines
    assert f"subset 2: {tmp_path.as_posix()}/fuga: 2 images, x 1 repeats = 2; captions: 2 fixed" in lines
    assert (f"subset 3: {tmp_path.as_posix()}/reg: 2 images, x 1 repeats = 2, is_reg (class images); captions: "
            "2 fixed") in lines
    assert "  e.g. img000.png: 'fuga boy'" in lines and "  e.g. img000.png: 'human'" in lines


def test_the_readme_example_trains_and_resumes_from_its_config_toml_without_the_file(tiny_sd1, tmp_path):
    dataset = example(tmp_path)
    straight = train_cli(tiny_sd1, dataset, tmp_path / "straight", "--max-steps", "3", *TINY)
    killed = tmp_path / "killed"
    first = train_cli(tiny_sd1, dataset, killed, "--max-steps", "2", *TINY)
    assert first["losses"] == straight["losses"][:2]
    config = (killed / "config.toml").read_text()
    assert config.count("[[data.subsets]]") == 3 and "batch_size = 4" in config and "is_reg = true" in config
    shutil.copy(killed / "config.toml", tmp_path / "run.toml")
    dataset.unlink()
    resumed = runner.invoke(app, ["train", "--preset", str(tmp_path / "run.toml"), "--out", str(killed),
                                  "--max-steps", "3", "--resume", *KEEP_ALL])
    assert resumed.exit_code == 0, resumed.output
    assert "prior preservation: 2 class images from the is_reg subsets" in resumed.output
    assert json.loads((killed / "summary.json").read_text())["losses"] == straight["losses"]
