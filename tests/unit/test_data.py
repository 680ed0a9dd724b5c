import pytest
import torch
from PIL import Image
from support.helpers import batch

from sdtune.config import DataConfig
from sdtune.data import BatchStream, scan_folder
from sdtune.errors import SdtuneError


def test_captions_from_sidecar_else_file_name(tmp_path):
    Image.new("RGB", (80, 64), "red").save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes("\ufeffa red square\n".encode())
    nested = tmp_path / "sub"
    nested.mkdir()
    Image.new("RGB", (64, 64), "blue").save(nested / "blue_sky-photo.jpg")
    scan = scan_folder(tmp_path, DataConfig(resolution=64))
    assert [(e.image.name, e.caption) for e in scan.examples] == [("a.png", "a red square"),
                                                                 ("blue_sky-photo.jpg", "blue sky photo")]


def test_bad_files_are_reported_and_skipped(tmp_path):
    Image.new("RGB", (64, 64)).save(tmp_path / "good.png")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    scan = scan_folder(tmp_path, DataConfig(resolution=64))
    assert [e.image.name for e in scan.examples] == ["good.png"]
    assert {s.path.name: s.kind for s in scan.skipped} == {"empty.png": "empty", "text.jpg": "not an image"}


def test_no_usable_images_is_an_error(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(SdtuneError, match="no usable images"):
        scan_folder(tmp_path, DataConfig())
    with pytest.raises(SdtuneError, match="does not exist"):
        scan_folder(tmp_path / "missing", DataConfig())


def test_batches_are_deterministic_cropped_and_cover_every_image(images):
    cfg = DataConfig(resolution=32, center_crop=False, random_flip=True)
    scan = scan_folder(images, cfg)
    a, b = BatchStream(scan.examples, cfg, 2, seed=3), BatchStream(scan.examples, cfg, 2, seed=3)
    pixels, captions = batch(a, 5)
    assert pixels.shape == (2, 3, 32, 32) and -1 <= pixels.min() and pixels.max() <= 1
    later_first = batch(b, 5)  # asked cold, out of order: same result
    assert torch.equal(pixels, later_first[0]) and captions == later_first[1]
    n = len(scan.examples)
    epoch = [c for i in range(n // 2) for c in batch(a, i)[1]]
    assert sorted(epoch) == sorted(e.caption for e in scan.examples)


def test_caption_dropout_empties_a_seeded_share_of_captions(images):
    cfg = DataConfig(resolution=32, caption_dropout=0.5)
    scan = scan_folder(images, cfg)
    captions = [c for i in range(40) for c in batch(BatchStream(scan.examples, cfg, 2, seed=1), i)[1]]
    assert 20 < captions.count("") < 60
    again = [c for i in range(40) for c in batch(BatchStream(scan.examples, cfg, 2, seed=1), i)[1]]
    assert captions == again
    with pytest.raises(SdtuneError, match="caption_dropout"):
        DataConfig(caption_dropout=1.0)
