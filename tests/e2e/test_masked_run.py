"""`sdtune train` with data.masked_loss and a mask folder, as a kohya user brings one: masks under the images'
names (inside the data folder, where they are not trained on as images), one image without a mask."""

import json

from PIL import Image
from support.helpers import runner
from support.testing import make_image_folder

from sdtune.cli import app


def test_a_masked_run_with_a_mask_folder_trains_and_validates(tiny_sd1, tmp_path):
    data = make_image_folder(tmp_path / "data", count=4)
    masks = data / "masks"
    masks.mkdir()
    for i in range(3):  # img003 has none
        half = Image.new("L", (64, 64), 0)
        half.paste(255, (32, 0, 64, 64))
        half.save(masks / f"img{i:03d}.png")
    out = tmp_path / "out"
    result = runner.invoke(app, ["train", "--preset", "cpu", "--data", str(data), "--model", str(tiny_sd1),
                                 "--out", str(out), "--max-steps", "2", "--set", "data.masked_loss=true",
                                 "--set", f"data.mask_dir={masks}", "--set", "data.cache_latents=true",
                                 "--set", "data.random_flip=true", "--set", "data.validation_split=0.25",
                                 "--set", "output.validate_every=2"])
    assert result.exit_code == 0, result.output
    assert "4 images from" in result.output  # not the masks: they are no training images
    assert "masks/ (the run's output, class, validation or mask folder, or another subset's)" in result.output
    unmasked = [line for line in result.output.splitlines() if "have no file in data.mask_dir" in line]
    assert len(unmasked) == 1 and "img003.png: they train unmasked" in unmasked[0]  # in one of the two sets
    rows = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    assert len(rows) == 2 and all(0 < row["loss"] < 10 for row in rows)
    assert any("validation_loss" in row for row in rows)
