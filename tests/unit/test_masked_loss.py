"""Masked loss (data.masked_loss): the mask is the image's alpha channel or its file in data.mask_dir, placed as
the image is, area-averaged to the latent grid as kohya's sd-scripts does, and only the white part trains."""

import dataclasses
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from support.helpers import prepared, said

from sdtune.config import DataConfig
from sdtune.data.batches import MicroBatch
from sdtune.data.masks import to_latent_grid
from sdtune.data.scan import scan_all
from sdtune.data.stream import BatchStream, ImageFailed
from sdtune.errors import SdtuneError
from sdtune.train import loop as trainer
from sdtune.train import objective

SIZE = 64  # the tiny SD 1.x VAE: an 8 x 8 latent grid


def _cfg(tmp_path, **kwargs) -> DataConfig:
    return DataConfig(resolution=SIZE, masked_loss=True, cache_dir=str(tmp_path / "cache"), loader_threads=0, **kwargs)


def _noise_image(size, seed, mode="RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    array = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(array.squeeze(-1) if channels == 1 else array, mode)


def _half_transparent(folder, count=2):
    """Images whose left half is transparent (alpha 0) and right half opaque."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        im = _noise_image((SIZE, SIZE), i, "RGBA")
        alpha = np.full((SIZE, SIZE), 255, np.uint8)
        alpha[:, : SIZE // 2] = 0
        im.putalpha(Image.fromarray(alpha))
        im.save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text("a red circle")
    return folder


def apply_masked_loss_kohya(loss, alpha_masks):
    """sd-scripts, library/custom_train_functions.py `apply_masked_loss`, the alpha_masks branch (the batch's
    `alpha_masks` are [B, H, W] in [0, 1]: library/train_util.py, `img[:, :, 3].astype(np.float32) / 255.0`)."""
    mask_image = alpha_masks.to(dtype=loss.dtype).unsqueeze(1)  # add channel dimension
    mask_image = torch.nn.functional.interpolate(mask_image, size=loss.shape[2:], mode="area")
    return loss * mask_image


def test_the_mask_is_the_alpha_channel_flipped_with_the_image_and_area_averaged_as_kohya_does(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rgba = _noise_image((SIZE, SIZE), 7, "RGBA")
    rgba.save(folder / "a.png")
    cfg = _cfg(tmp_path)
    stream = BatchStream(scan_all(folder, cfg).examples, cfg, batch_size=1, seed=0)
    item = stream.items(0)[0]
    for flip in (False, True):
        _, masks = stream.pixels_and_masks([dataclasses.replace(item, flip=flip)])
        alpha = np.asarray(rgba)[:, :, 3]  # kohya: img[:, :, 3] of the image loaded as RGBA, flipped with it
        alpha = alpha[:, ::-1].copy() if flip else alpha
        alpha_masks = torch.FloatTensor(alpha.astype(np.float32) / 255.0)[None]
        expected = apply_masked_loss_kohya(torch.ones(1, 4, 8, 8), alpha_masks)
        assert torch.allclose(to_latent_grid(masks, (8, 8)).expand(1, 4, 8, 8), expected, atol=1e-6)


def test_a_mask_file_is_resized_cropped_and_flipped_exactly_as_its_image(tmp_path):
    """A gray image whose mask file is the same picture: every placed mask pixel is the image's pixel."""
    folder, masks = tmp_path / "images" / "10_cat", tmp_path / "masks" / "10_cat"
    folder.mkdir(parents=True)
    masks.mkdir(parents=True)
    gray = _noise_image((150, 90), 3, "L")  # resized to its bucket, then cropped
    gray.convert("RGB").save(folder / "a.png")
    gray.save(masks / "a.tif")  # another suffix, the same relative name
    cfg = _cfg(tmp_path, mask_dir=str(tmp_path / "masks"), center_crop=False)
    scan = scan_all(folder.parent, cfg)
    stream = BatchStream(scan.examples, cfg, batch_size=1, seed=0)
    item = stream.items(0)[0]
    assert item.resized != item.bucket  # the test resizes and crops
    for flip in (False, True):
        placed = dataclasses.replace(item, flip=flip)
        pixels, mask = stream.pixels_and_masks([placed])
        assert mask.shape == (1, 1, item.bucket[1], item.bucket[0])
        assert torch.allclose(mask[0, 0] * 2 - 1, pixels[0, 0], atol=1e-6)  # the image's own pixels, placed alike


def test_a_colour_mask_file_counts_by_its_red_channel_as_kohyas_conditioning_image(tmp_path):
    folder, masks = tmp_path / "images", tmp_path / "masks"
    folder.mkdir()
    masks.mkdir()
    _noise_image((SIZE, SIZE), 1).save(folder / "a.png")
    colour = _noise_image((SIZE, SIZE), 2)  # R, G and B differ: luminance would weigh otherwise
    colour.save(masks / "a.png")
    cfg = _cfg(tmp_path, mask_dir=str(masks))
    stream = BatchStream(scan_all(folder, cfg).examples, cfg, batch_size=1, seed=0)
    _, mask = stream.pixels_and_masks(stream.items(0))
    # sd-scripts: the conditioning image through IMAGE_TRANSFORMS (ToTensor, Normalize([0.5], [0.5]); train_util.py),
    # then apply_masked_loss's conditioning branch (custom_train_functions.py)
    conditioning_images = torch.from_numpy(np.asarray(colour, np.float32) / 255.0).permute(2, 0, 1)[None] * 2 - 1
    mask_image = conditioning_images[:, 0].unsqueeze(1)  # use R channel
    mask_image = mask_image / 2 + 0.5
    expected = torch.nn.functional.interpolate(mask_image, size=(8, 8), mode="area")
    assert torch.allclose(to_latent_grid(mask, (8, 8)), expected, atol=1e-6)


def test_images_without_a_mask_train_unmasked_said_once_and_a_wrong_sized_mask_skips_its_image(tmp_path, caplog):
    folder, masks = tmp_path / "images", tmp_path / "masks"
    folder.mkdir()
    masks.mkdir()
    for name in ("a", "b", "c"):
        _noise_image((SIZE, SIZE), ord(name)).save(folder / f"{name}.png")
    Image.new("L", (SIZE, SIZE), 0).save(masks / "a.png")
    Image.new("L", (SIZE, SIZE // 2), 0).save(masks / "b.webp")  # not its image's size
    caplog.set_level(logging.INFO, logger="sdtune")
    cfg = _cfg(tmp_path, mask_dir=str(masks))
    stream = BatchStream(scan_all(folder, cfg).examples, cfg, batch_size=3, seed=0)
    assert said(caplog) == [f"masked loss: 1 of 3 images have no file in data.mask_dir, e.g. {folder / 'c.png'}: "
                            "they train unmasked"]
    items = sorted(stream.items(0), key=lambda item: item.example.image.name)[::2]  # a and c
    _, mask = stream.pixels_and_masks(items)
    assert mask[0].max() == 0 and mask[1].min() == 1  # a: its black mask; c: ones
    with pytest.raises(ImageFailed):
        stream.pixels_and_masks(stream.items(0))
    assert said(caplog)[-1] == f"skipping {folder / 'b.png'}: its mask {masks / 'b.webp'} is 64x32 px, the image 64x64"
    with pytest.raises(SdtuneError, match="data.mask_dir .*nowhere does not exist"):
        BatchStream(stream.examples, dataclasses.replace(cfg, mask_dir=str(tmp_path / "nowhere")), 3, 0)
    with pytest.raises(SdtuneError, match="data.mask_dir is set but data.masked_loss is false"):
        dataclasses.replace(cfg, masked_loss=False)


def _per_cell(run, items, mask_on: bool, monkeypatch) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(the squared error per latent cell, the mask, the loss) of `items` as the loop computes it."""
    seen = {}
    real = objective.diffusion_loss

    def capture(prediction, target_, weights=None, mask=None, *rest):
        seen["error"], seen["mask"] = (prediction.float() - target_.float()).pow(2), mask
        return real(prediction, target_, weights, mask, *rest)

    monkeypatch.setattr(objective, "diffusion_loss", capture)
    latents, mask = run.features.latents_and_mask(run.stream, items, torch.Generator().manual_seed(0))
    batch = MicroBatch(items, latents, torch.Generator().manual_seed(1), len(items), slice(None),
                       mask if mask_on else None)
    with torch.no_grad():
        value = trainer.loss(run, batch).item()
    return seen["error"], mask, value


@pytest.mark.parametrize("cache", [False, True], ids=["loaded", "cached"])
def test_a_half_black_mask_trains_only_the_white_half(tiny_sd1, tmp_path, cache, monkeypatch):
    images = _half_transparent(tmp_path / "images")
    sets = ["data.masked_loss=true", "data.random_flip=true", f"data.resolution={SIZE}", "train.batch_size=2",
            f"data.cache_latents={str(cache).lower()}", f"data.cache_dir={tmp_path / 'cache'}"]
    with prepared(tiny_sd1, images, tmp_path / "out", *sets) as run:
        first, second = run.stream.items(0)
        items = [dataclasses.replace(first, flip=False), dataclasses.replace(second, flip=True)]
        error, mask, masked = _per_cell(run, items, True, monkeypatch)
        plain_error, _, plain = _per_cell(run, items, False, monkeypatch)
    assert torch.equal(error, plain_error)  # the same latents, noise and timesteps: only the weighting differs
    assert mask.shape == (2, 1, 8, 8)
    left, right = mask[..., :4], mask[..., 4:]
    assert (left[0] == 0).all() and (right[0] == 1).all()  # transparent left half
    assert (left[1] == 1).all() and (right[1] == 0).all()  # the flipped image: its mask flipped with it
    per_cell = error * mask
    assert (per_cell[0, ..., :4] == 0).all() and torch.equal(per_cell[0, ..., 4:], plain_error[0, ..., 4:])
    assert (per_cell[1, ..., 4:] == 0).all() and torch.equal(per_cell[1, ..., :4], plain_error[1, ..., :4])
    assert masked == pytest.approx(per_cell.mean().item(), rel=1e-6)  # kohya: multiplied in, not renormalised
    assert 0 < masked < plain


def test_the_latent_cache_keeps_each_mask_and_an_edited_mask_encodes_again(tiny_sd1, tmp_path, caplog):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for i in range(2):
        _noise_image((SIZE, SIZE), i).save(images / f"img{i}.png")
    cache = ["data.cache_latents=true", f"data.cache_dir={tmp_path / 'cache'}", f"data.resolution={SIZE}",
             "train.batch_size=2"]
    masked = [*cache, "data.masked_loss=true", f"data.mask_dir={masks}"]
    caplog.set_level(logging.INFO, logger="sdtune")
    with prepared(tiny_sd1, images, tmp_path / "plain", *cache):
        pass
    with prepared(tiny_sd1, images, tmp_path / "no-masks", *masked):  # without a mask: the unmasked entries
        pass
    Image.new("L", (SIZE, SIZE), 0).save(masks / "img0.png")
    with prepared(tiny_sd1, images, tmp_path / "black", *masked) as run:
        black = run.features.latents_and_mask(run.stream, run.stream.items(0), torch.Generator())[1]
    Image.new("L", (SIZE, SIZE), 255).save(masks / "img0.png")
    with prepared(tiny_sd1, images, tmp_path / "white", *masked) as run:
        white = run.features.latents_and_mask(run.stream, run.stream.items(0), torch.Generator())[1]
    reused = [line for line in said(caplog) if line.startswith("latent cache:")]
    assert reused == ["latent cache: 0 of 2 latents reused", "latent cache: 2 of 2 latents reused",
                      "latent cache: 1 of 2 latents reused", "latent cache: 1 of 2 latents reused"]
    assert sorted(m.max().item() for m in black) == [0, 1] and (white == 1).all()


def test_kohyas_conditioning_data_dir_is_each_subsets_own_mask_folder(tmp_path, monkeypatch):
    # review of issue 29: sd-scripts' docs/masked_loss_README.md names each subset's masks with
    # `conditioning_data_dir`; sdtune refused it ("ControlNet datasets need a ControlNet trainer"). Two subsets
    # with an image of one name (a.png), each mask in its own folder: each image takes its own subset's mask.
    from sdtune.config import load_config
    from sdtune.data.scan import joined, scan_subsets

    for name, black in (("hoge", (0, 0, SIZE // 2, SIZE)), ("fuga", (SIZE // 2, 0, SIZE, SIZE))):
        (tmp_path / name).mkdir()
        (tmp_path / f"{name}_mask").mkdir()
        _noise_image((SIZE, SIZE), len(name)).save(tmp_path / name / "a.png")
        mask = Image.new("L", (SIZE, SIZE), 255)
        mask.paste(0, black)
        mask.save(tmp_path / f"{name}_mask" / "a.png")
    subsets = [f"[[datasets.subsets]]\nimage_dir = '{name}'\nconditioning_data_dir = '{name}_mask'\n"
               for name in ("hoge", "fuga")]
    (tmp_path / "dataset.toml").write_text("[[datasets]]\nresolution = 64\n" + "".join(subsets))
    monkeypatch.chdir(tmp_path)  # relative folders, as kohya's are read
    cfg = load_config("cpu", [f"data.cache_dir={tmp_path / 'cache'}"], dataset="dataset.toml")[0].data
    assert cfg.masked_loss and [s.mask_dir for s in cfg.subsets] == [str(tmp_path / "hoge_mask"),
                                                                        str(tmp_path / "fuga_mask")]
    stream = BatchStream(joined(scan_subsets(cfg)).examples, dataclasses.replace(cfg, random_flip=False), 2, seed=0)
    items = sorted(stream.items(0), key=lambda item: item.example.subset)
    _, masks = stream.pixels_and_masks(items)
    assert masks[0, 0, :, :SIZE // 2].max() == 0 and masks[0, 0, :, SIZE // 2:].min() == 1  # hoge: left black
    assert masks[1, 0, :, SIZE // 2:].max() == 0 and masks[1, 0, :, :SIZE // 2].min() == 1  # fuga: right black
    # a held-out image of data.validation_split is weighted by its own subset's mask too
    from sdtune.config import Config
    from sdtune.train.validation import Validation

    held = Validation(stream.examples, Config(data=dataclasses.replace(cfg, validation_split=0.5))).stream
    assert [held.masks.source(e) for e in held.examples] == [tmp_path / "hoge_mask" / "a.png",
                                                             tmp_path / "fuga_mask" / "a.png"]


def test_data_check_leaves_a_mask_folder_inside_the_images_out_as_train_does(tmp_path):
    # review of issue 29: `sdtune data check` excluded the class and validation folders but not data.mask_dir,
    # so it counted the masks as training images (6 images where training reads 3)
    from support.helpers import runner

    from sdtune.cli import app

    (tmp_path / "masks").mkdir(parents=True)
    for name in ("a", "b", "c"):
        _noise_image((SIZE, SIZE), ord(name)).save(tmp_path / f"{name}.png")
        Image.new("L", (SIZE, SIZE), 255).save(tmp_path / "masks" / f"{name}.png")
    result = runner.invoke(app, ["data", "check", str(tmp_path), "--preset", "cpu", "--set", "data.masked_loss=true",
                                 "--set", f"data.mask_dir={tmp_path / 'masks'}"])
    assert result.exit_code == 0, result.output
    assert f"3 images in {tmp_path}: 3 usable" in result.output.splitlines()
