"""What a user coming from kohya's sd-scripts does without thinking, and what it does here (issue 26, items 7
and 8): `--max-steps 1` under a long warm-up, `train.max_epochs` with repeat folders, the moving-average
loss, an output folder inside the data folder, very large photos, multi-line caption files, captions
longer than the text encoder reads."""

import json
import math

import pytest
from support.helpers import assert_resume_is_bitwise, runner
from support.testing import make_image_folder

from sdtune.cli import app


@pytest.fixture
def repeats(tmp_path):
    """2 images at the top and 3 in a kohya `3_` folder: 2 + 3 x 3 = 11 images an epoch, one 64 px bucket."""
    root = make_image_folder(tmp_path / "data", count=2)
    make_image_folder(root / "3_shapes", count=3, seed=1)
    return root


def _run(model, data, out, *extra):
    result = runner.invoke(app, ["train", "--preset", "cpu", "--data", str(data), "--model", str(model),
                                 "--out", str(out), *extra])
    assert result.exit_code == 0, result.output
    return result.output, json.loads((out / "summary.json").read_text())


def test_a_warmup_longer_than_the_run_is_cut_to_it_with_a_note(tiny_sd1, images, tmp_path):
    output, summary = _run(tiny_sd1, images, tmp_path / "out", "--max-steps", "2",
                           "--set", "train.lr_warmup_steps=100")
    assert summary["steps"] == 2
    assert "train.lr_warmup_steps=100 is longer than the run: the learning rate warms up over its 2 steps" in output
    rates = [json.loads(line)["learning_rate"] for line in (tmp_path / "out" / "metrics.jsonl").open()]
    assert rates == pytest.approx([0.0, 0.5e-4])  # 0, then half of the cpu preset's 1e-4: over 2 steps, not 100


def test_max_epochs_counts_repeats_and_overrides_max_steps(tiny_sd1, repeats, tmp_path):
    output, summary = _run(tiny_sd1, repeats, tmp_path / "out", "--max-steps", "50", "--set", "train.max_epochs=2")
    per_epoch = math.ceil((2 + 3 * 3) / 2)  # batch 2 (the cpu preset), one bucket
    assert (summary["steps"], summary["epoch"], summary["steps_per_epoch"]) == (2 * per_epoch, 2, per_epoch)
    assert f"train.max_epochs=2: {2 * per_epoch} steps ({per_epoch} an epoch); it overrides train.max_steps=50" \
        in output
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").open()]
    assert [row["epoch"] for row in rows] == [1] * per_epoch + [2] * per_epoch
    for i, row in enumerate(rows):  # kohya's avr_loss: the mean of the last epoch's step losses
        window = summary["losses"][max(0, i + 1 - per_epoch):i + 1]
        assert row["average_loss"] == pytest.approx(sum(window) / len(window))


def test_epochs_are_real_passes_when_the_accumulation_does_not_divide_them(tiny_sd1, tmp_path):
    """5 images, batch 1, 2 micro-batches a step: an epoch is 2.5 steps. 3 epochs are 8 steps (16
    micro-batches: every image 3 times, and one of a fourth pass), not 3 x ceil(2.5) = 9 (3.6 passes); each
    step says the pass it ends, and the saves of every epoch come after the steps that end passes 1, 2, 3
    (micro-batches 5, 10, 15: steps 3, 5 and 8)."""
    from safetensors import safe_open

    data = make_image_folder(tmp_path / "data", count=5)
    out = tmp_path / "out"
    output, summary = _run(tiny_sd1, data, out, "--set", "train.max_epochs=3", "--set", "train.batch_size=1",
                           "--set", "train.gradient_accumulation_steps=2", "--set", "output.save_every_epochs=1",
                           "--set", "train.method=lora", "--set", "lora.rank=4")
    assert "train.max_epochs=3: 8 steps (2.5 an epoch; 5 batches an epoch, 2 a step" in output
    assert (summary["steps"], summary["epoch"], summary["steps_per_epoch"]) == (8, 3, 2.5)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    assert [row["epoch"] for row in rows] == [1, 1, 1, 2, 2, 3, 3, 3]
    saved = sorted(p.name for p in (out / "saves").iterdir())
    assert saved == ["step-000003.safetensors", "step-000005.safetensors", "step-000008.safetensors"]
    epochs = []
    for name in saved:
        with safe_open(str(out / "saves" / name), "pt") as f:
            epochs.append(f.metadata()["ss_epoch"])
    assert epochs == ["1", "2", "3"]


def test_a_run_by_epochs_resumes_exactly(tiny_sd1, repeats, tmp_path):
    # batch 4: 3 steps an epoch, 6 in all; the run is cut after step 2 and resumed from its checkpoint
    assert_resume_is_bitwise(tiny_sd1, repeats, tmp_path, "--set", "train.max_epochs=2", "--set", "train.batch_size=4",
                             "--set", "output.checkpoint_every=2", last=6, resume_from=2)


def test_an_output_folder_inside_the_data_folder_is_never_training_data(tiny_sd1, tmp_path):
    data = make_image_folder(tmp_path / "data", count=3)
    first, _ = _run(tiny_sd1, data, data / "out", "--max-steps", "1", "--set", "output.sample_every=1",
                    "--set", "output.sample_prompts=['a red circle']", "--set", "output.sample_steps=1")
    assert "3 images from" in first and (data / "out" / "samples" / "step-000001.png").is_file()
    second, _ = _run(tiny_sd1, data, data / "2_again", "--max-steps", "1")  # a kohya repeat folder's name, too
    assert "3 images from" in second  # not the first run's sample grid, nor anything in its own --out
    assert "note: not searched for training images: out/ (an sdtune output folder: config.toml beside " in second
    check = runner.invoke(app, ["data", "check", str(data), "--preset", "cpu"])
    assert "3 images in" in check.output and "3 usable" in check.output, check.output
    assert "note: not searched for training images: 2_again/" in check.output


@pytest.fixture(scope="module")
def camera_photo(tmp_path_factory):
    """A 108-megapixel JPEG (12000 x 9000, a medium-format camera's size; grey, so it writes in a second)."""
    from PIL import Image

    path = tmp_path_factory.mktemp("photo") / "100mp.jpg"
    Image.new("L", (12000, 9000), 90).save(path, quality=50)
    return path.parent


def test_a_100_megapixel_photo_is_trained_and_decoded_small(camera_photo, tmp_path):
    """Pillow warns above 89.5 MP, and the scan refused what Pillow warns about: data.max_pixels decides now."""
    from sdtune.config import DataConfig
    from sdtune.data import BatchStream
    from sdtune.data.images import open_scaled
    from sdtune.data.scan import scan_all, scan_folder

    cfg = DataConfig(resolution=512, cache_dir=str(tmp_path))
    [example] = scan_folder(camera_photo, cfg).examples
    assert example.size == (12000, 9000)
    stream = BatchStream([example], cfg, batch_size=1, seed=0)
    [item] = stream.items(0)
    assert tuple(stream.pixels([item]).shape) == (1, 3, item.bucket[1], item.bucket[0])
    seen, image = open_scaled(example.image, item.resized)  # what the loader decodes: 1/8 scale, not 108 MP
    assert seen == (12000, 9000) and image.size == (1500, 1125) and min(image.size) >= 2 * min(item.resized)

    lower = DataConfig(resolution=512, cache_dir=str(tmp_path), max_pixels=100_000_000)
    [skip] = scan_all(camera_photo, lower).skipped
    assert skip.kind == "too large" and "over data.max_pixels=100,000,000" in skip.detail


def test_a_multi_line_caption_file_is_its_first_line_as_kohya_reads_it(tmp_path):
    """kohya's sd-scripts (library/train_util.py, read_caption) takes `lines[0].strip()` of a caption file;
    its wildcard mode keeps the other lines as alternatives. Joining them made one long caption instead."""
    from sdtune.config import DataConfig
    from sdtune.data.scan import scan_folder

    data = make_image_folder(tmp_path / "data", count=3)
    (data / "img000.txt").write_text("\n  sks dog, red collar \nsks dog, on grass\na photo of sks dog\n")
    scan = scan_folder(data, DataConfig(resolution=64, cache_dir=str(tmp_path)))
    assert scan.examples[0].caption == "sks dog, red collar"
    [warning] = scan.warnings
    assert warning.startswith("1 caption file has more than one line (img000.txt): only the first is the caption")


def _long_caption(data):
    """img001's caption: 40 tags of 4 CLIP tokens each ("tag", "number", one per digit, ","): 191 tokens."""
    (data / "img001.txt").write_text(", ".join(f"tag number {i}" for i in range(40)))


def test_data_check_counts_the_captions_cut_at_the_token_limit_and_shows_one(tmp_path):
    data = make_image_folder(tmp_path / "data", count=3)
    _long_caption(data)
    # rtx3050's model is a hub id: CLIP's tokenizer (bundled, offline) measures, as every SD text encoder reads
    result = runner.invoke(app, ["data", "check", str(data), "--set", "data.resolution=64"])
    assert result.exit_code == 0, result.output
    assert ('1 of 3 captions are longer than the 77 tokens the text encoder reads (its start and end tokens '
            'included): the rest is cut and never trained; e.g. img001.png (191 tokens): "... tag number 13, '
            'tag number 14, tag number 15, tag number 16," | cut: "tag number 17, tag number 18,') in result.output
    tiny = runner.invoke(app, ["data", "check", str(data), "--preset", "cpu"])  # sdtune-tiny reads 16 tokens
    assert "1 of 3 captions are longer than the 16 tokens" in tiny.output and "sdtune-tiny's tokenizer" in tiny.output
    (data / "img001.txt").write_text("a red circle")
    result = runner.invoke(app, ["data", "check", str(data), "--set", "data.resolution=64"])
    assert "every caption fits the 77 tokens the text encoder reads" in result.output


def test_train_says_how_many_captions_are_cut(tiny_sd1, tmp_path):
    data = make_image_folder(tmp_path / "data", count=3)
    _long_caption(data)
    output, _ = _run(tiny_sd1, data, tmp_path / "out", "--max-steps", "1")
    [line] = [line for line in output.splitlines() if "captions are longer" in line]
    assert line.startswith("warning: 1 of 3 captions are longer than the 77 tokens") and "e.g. img001.png (" in line
