"""Samples a person can read: grids labelled with their prompts, AUTOMATIC1111's `parameters` in every PNG,
a negative prompt, a grid before step 1, and one prompt given by --set."""

import numpy as np
from PIL import Image
from support.helpers import runner, train

from sdtune.cli import app
from sdtune.config import load_config
from sdtune.sample import _label_font, _wrap, make_grid, parameters


def _sample(model, out, *extra):
    result = runner.invoke(app, ["sample", "--ckpt", str(model), "--prompt", "a red circle", "--num-images", "2",
                                 "--steps", "2", "--out", str(out), *extra])
    assert result.exit_code == 0, result.output
    return out


def test_parameters_are_written_as_automatic1111_writes_them():
    text = parameters("a photo of sks dog", negative="blurry, low quality", steps=30, guidance=7.5, seed=0,
                      size=(512, 512), sampler="EulerDiscreteScheduler", model="out")
    assert text == ("a photo of sks dog\nNegative prompt: blurry, low quality\n"
                    "Steps: 30, Sampler: Euler, CFG scale: 7.5, Seed: 0, Size: 512x512, Model: out")
    # no negative prompt: no line for it; a value with a comma or colon is quoted, as A1111's quote() does
    text = parameters("a cat", steps=2, guidance=1.0, seed=3, size=(64, 96), sampler="PNDMScheduler", model="a, b")
    assert text == 'a cat\nSteps: 2, Sampler: PLMS, CFG scale: 1.0, Seed: 3, Size: 64x96, Model: "a, b"'


def test_a_label_band_grows_the_grid_and_wraps_long_prompts_inside_each_image():
    images = [Image.new("RGB", (64, 64), "red")] * 3
    plain = make_grid(images)
    prompt = "a red circle on the white background, highly detailed photograph"
    labelled = make_grid(images, labels=[prompt, "a star", "a blue square"])
    assert plain.size == (128, 128) and labelled.width == 128 and labelled.height > 128
    font = _label_font()
    lines = _wrap(prompt, font, 64 - 6)
    assert len(lines) > 3 and all(font.getlength(line) <= 58 for line in lines)
    assert "".join(lines).replace(" ", "") == prompt.replace(" ", "")  # every word, a long one cut where it must
    assert lines[:3] == ["a red", "circle on", "the white"]  # at spaces where they fit
    band = np.asarray(labelled.convert("L"))[: labelled.height // 2 - 64, :64]
    assert (band < 128).any()  # text is drawn above the first image
    assert (np.asarray(labelled)[labelled.height // 2 - 64: labelled.height // 2, :64] == [255, 0, 0]).all()


def test_sample_writes_parameters_into_every_png_and_the_negative_prompt_changes_the_images(tiny_sd1, tmp_path):
    plain = _sample(tiny_sd1, tmp_path / "plain")
    negative = _sample(tiny_sd1, tmp_path / "negative", "--negative-prompt", "a blue square")
    first = Image.open(negative / "000-seed0.png")
    assert first.text["parameters"] == ("a red circle\nNegative prompt: a blue square\nSteps: 2, Sampler: DDIM, "
                                        "CFG scale: 7.5, Seed: 0, Size: 64x64, Model: model")
    assert Image.open(negative / "001-seed1.png").text["parameters"].count("Seed: 1,") == 1
    assert "Negative prompt" not in Image.open(plain / "000-seed0.png").text["parameters"]
    grid = Image.open(negative / "grid.png")
    assert grid.text["parameters"] == first.text["parameters"] and grid.width == 128 and grid.height > 64
    a, b = (np.asarray(Image.open(folder / "000-seed0.png"), dtype=np.int16) for folder in (plain, negative))
    assert np.abs(a - b).max() > 0  # the negative prompt takes the unconditional branch's place


def test_one_prompt_by_set_is_a_one_item_list():
    cfg, _ = load_config("cpu", ["output.sample_prompts=a photo of sks dog, best quality"])
    assert cfg.output.sample_prompts == ("a photo of sks dog, best quality",)
    cfg, _ = load_config("cpu", ["output.sample_prompts=['a', 'b']"])
    assert cfg.output.sample_prompts == ("a", "b")


def test_training_samples_at_step_0_labelled_with_parameters_and_the_negative_prompt(tiny_sd1, images, tmp_path):
    out = tmp_path / "out"
    train(tiny_sd1, images, out, "--max-steps", "2", "--set", "output.sample_at_start=true",
          "--set", "output.sample_every=2", "--set", "output.sample_steps=2",
          "--set", "output.sample_prompts=a red circle on the white background",
          "--set", "output.sample_negative_prompt=a blue square")
    samples = out / "samples"
    assert sorted(p.name for p in samples.iterdir()) == ["step-000000", "step-000000.png", "step-000002",
                                                         "step-000002.png"]
    image, grid = Image.open(samples / "step-000002" / "00.png"), Image.open(samples / "step-000002.png")
    assert image.size == (64, 64) and grid.width == 64 and grid.height > 64  # one image below its prompt
    text = image.text["parameters"]
    assert text.startswith("a red circle on the white background\nNegative prompt: a blue square\nSteps: 2, ")
    assert "Seed: 0, Size: 64x64, Model: out, Training step: 2, Base model: model" in text
    assert grid.text["parameters"] == text
    assert "Training step: 0," in Image.open(samples / "step-000000" / "00.png").text["parameters"]


def test_training_draws_each_prompt_of_a_kohya_prompt_file_with_its_own_settings(tiny_sd1, images, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# kohya's format\n"
                       "a red circle --n a star --w 96 --h 64 --d 3 --s 2 --l 5.5 --ss euler_a\n\n"
                       "a blue square --W 64 --H 80 --D 7 --S 3 --L 9 --ss dpmsolver++\n"
                       "a red circle --n a star --w 96 --h 64 --d 4 --s 2 --l 5.5 --ss euler_a\n"  # another seed
                       "a red circle --n a star --w 96 --h 64 --d 3 --s 2 --l 5.5\n", encoding="utf-8")  # DDIM
    out = tmp_path / "out"
    train(tiny_sd1, images, out, "--max-steps", "1", "--set", "output.sample_every=1",
          "--set", f"output.sample_prompts_file={prompts}")
    folder = out / "samples" / "step-000001"
    red, blue, reseeded, ddim = (Image.open(folder / f"{i:02d}.png") for i in range(4))
    assert (red.size, blue.size) == ((96, 64), (64, 80))
    assert red.text["parameters"] == ("a red circle\nNegative prompt: a star\nSteps: 2, Sampler: Euler a, CFG scale: "
                                      "5.5, Seed: 3, Size: 96x64, Model: out, Training step: 1, Base model: model")
    assert blue.text["parameters"] == ("a blue square\nSteps: 3, Sampler: DPM++ 2M, CFG scale: 9.0, Seed: 7, "
                                       "Size: 64x80, Model: out, Training step: 1, Base model: model")
    assert "Sampler: DDIM, CFG scale: 5.5, Seed: 3," in ddim.text["parameters"]
    pixels = [np.asarray(image, dtype=np.int16) for image in (red, reseeded, ddim)]
    assert np.abs(pixels[0] - pixels[1]).max() > 0 and np.abs(pixels[0] - pixels[2]).max() > 0  # seed, sampler
    grid = Image.open(out / "samples" / "step-000001.png")
    assert grid.width == 2 * 96 and grid.height > 2 * 80  # 2x2 cells as large as the largest image, labelled
    assert grid.text["parameters"] == red.text["parameters"]
