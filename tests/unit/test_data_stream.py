"""Aspect-ratio buckets and the batch stream: bucket limits, assignment, fitting, the data order (single-bucket
batches, repeats, determinism and resume), augmentation rates, and images that vanish mid-run."""

import dataclasses
import logging
import math
import random
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image
from support.helpers import batch, said

from sdtune.config import DataConfig
from sdtune.data import BatchStream, Example, assign, fit, make_buckets, scan_folder
from sdtune.errors import SdtuneError

# resolution 128: buckets (64, 128), (128, 64), (128, 128)
MIXED = {"wide": [(128, 64), (200, 96), (160, 70), (256, 128)], "tall": [(64, 128), (70, 150), (96, 180)],
         "square": [(64, 64), (100, 90), (130, 140)]}


def example(path, caption, size, repeats=1):
    return Example(path, caption, size=size, repeats=repeats)


def write_image(path, size, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture
def mixed(tmp_path):
    """A folder of 10 images in three aspect groups; each file name (its caption) says its group."""
    for group, sizes in MIXED.items():
        for i, size in enumerate(sizes):
            write_image(tmp_path / f"{group}_{i}.png", size, seed=len(group) * 10 + i)
    return tmp_path


def group(caption: str) -> str:
    return caption.split()[0]


# ---------------------------------------------------------------------------------------------------------
# Buckets


def valid(size, cfg, step):
    w, h = size
    return (w % step == 0 and h % step == 0 and w * h <= cfg.resolution ** 2
            and max(w, h) <= cfg.max_ratio * min(w, h)
            and cfg.smallest_side <= min(w, h) and max(w, h) <= cfg.largest_side)


@pytest.mark.parametrize("resolution", [64, 128, 256, 320, 512, 576, 768, 1024, 96, 200])
@pytest.mark.parametrize("limits", [{}, {"max_ratio": 1.0}, {"max_ratio": 1.5}, {"max_ratio": 3.0},
                                    {"min_side": 256, "max_side": 640}, {"max_side": 512}])
def test_buckets_obey_every_limit_and_keep_the_largest_of_each_aspect(resolution, limits):
    cfg = DataConfig(resolution=resolution, **limits)
    step = 64 if resolution % 64 == 0 else 8
    try:
        buckets = make_buckets(cfg)
    except SdtuneError:  # only when no size at all satisfies the limits
        sides = range(step, 4 * resolution + 1, step)
        assert not [s for s in ((w, h) for w in sides for h in sides) if valid(s, cfg, step)]
        return
    assert buckets == sorted(set(buckets)) and buckets
    assert all(valid(b, cfg, step) for b in buckets)
    assert {(h, w) for w, h in buckets} == set(buckets)  # portrait for every landscape bucket
    by_aspect = Counter(Fraction(w, h) for w, h in buckets)
    assert max(by_aspect.values()) == 1
    for w, h in buckets:  # no larger size of the same aspect fits
        g = math.gcd(w // step, h // step)
        unit_w, unit_h = w // g, h // g
        assert not valid((w + unit_w, h + unit_h), cfg, step)
    if cfg.smallest_side <= resolution <= cfg.largest_side:
        assert (resolution, resolution) in buckets


def test_bucket_special_cases():
    assert make_buckets(DataConfig(resolution=64)) == [(64, 64)]  # the cpu preset keeps its square images
    assert make_buckets(DataConfig(resolution=128)) == [(64, 128), (128, 64), (128, 128)]
    assert make_buckets(DataConfig(resolution=512)) == [(320, 640), (384, 640), (448, 576), (512, 512),
                                                        (576, 448), (640, 320), (640, 384)]
    assert make_buckets(DataConfig(resolution=768, buckets=False)) == [(768, 768)]
    with pytest.raises(SdtuneError, match="data.min_side"):
        make_buckets(DataConfig(resolution=512, min_side=600))


def test_assign_picks_the_closest_aspect_ratio():
    buckets = make_buckets(DataConfig(resolution=512))
    assert assign((4032, 3024), buckets) == (576, 448)  # a landscape phone photo
    assert assign((3024, 4032), buckets) == (448, 576)
    assert assign((5000, 500), buckets) == (640, 320)  # beyond the ratio limit: the most extreme bucket
    assert assign((333, 333), buckets) == (512, 512)
    rng = random.Random(0)
    for _ in range(500):
        size = (rng.randint(16, 4000), rng.randint(16, 4000))
        chosen = assign(size, buckets)
        distance = [abs(math.log(b[0] / b[1]) - math.log(size[0] / size[1])) for b in (chosen, *buckets)]
        assert distance[0] <= min(distance[1:]) + 1e-12
    assert assign((128, 64), [(64, 64), (256, 64)]) == (256, 64)  # halfway in log ratio: the larger area
    assert assign((128, 64), [(256, 64), (64, 64)]) == (256, 64)


def test_fit_covers_the_bucket_keeps_the_aspect_and_crops_exactly_the_bucket():
    rng = random.Random(1)
    buckets = make_buckets(DataConfig(resolution=512))
    lefts = set()
    for _ in range(300):
        size = (rng.randint(20, 3000), rng.randint(20, 3000))
        bucket = assign(size, buckets)
        for center in (True, False):
            (rw, rh), (left, top, right, bottom) = fit(size, bucket, center, rng)
            assert (right - left, bottom - top) == bucket
            assert 0 <= left and right <= rw and 0 <= top and bottom <= rh
            assert rw == bucket[0] or rh == bucket[1]  # covers it with no more scaling than needed
            assert abs(rw / rh - size[0] / size[1]) <= size[0] / size[1] * 2 / min(bucket)  # rounding only
            if center:
                assert abs(left - (rw - right)) <= 1 and abs(top - (rh - bottom)) <= 1
            else:
                lefts.add(left / max(1, rw - bucket[0]))
    assert len(lefts) > 50  # random crops move


# ---------------------------------------------------------------------------------------------------------
# The data order


def test_batches_never_mix_buckets_and_match_each_images_bucket(mixed):
    cfg = DataConfig(resolution=128)
    scan = scan_folder(mixed, cfg)
    stream = BatchStream(scan.examples, cfg, batch_size=2, seed=0)
    assert stream.batches_per_epoch == 2 + 2 + 2
    expected = {"wide": (128, 64), "tall": (64, 128), "square": (128, 128)}
    for k in range(3 * stream.batches_per_epoch):
        items = stream.items(k)
        assert len(items) == 2 and len({item.bucket for item in items}) == 1
        assert {expected[group(item.example.caption)] for item in items} == {items[0].bucket}
    pixels, captions = batch(stream, 4)
    w, h = stream.items(4)[0].bucket
    assert pixels.shape == (2, 3, h, w) and pixels.dtype == torch.float32
    assert -1 <= pixels.min() and pixels.max() <= 1


def test_without_buckets_every_image_is_cropped_square(mixed):
    cfg = DataConfig(resolution=128, buckets=False)
    stream = BatchStream(scan_folder(mixed, cfg).examples, cfg, batch_size=3, seed=0)
    assert stream.batches_per_epoch == 4
    assert {item.bucket for k in range(8) for item in stream.items(k)} == {(128, 128)}
    assert batch(stream, 1)[0].shape == (3, 3, 128, 128)


def test_every_example_appears_repeats_times_per_epoch(tmp_path):
    sizes = [(64, 64)] * 3 + [(128, 64)] * 2 + [(64, 128)]
    examples = [example(write_image(tmp_path / f"{i}.png", size), f"image {i}", size, repeats=1 + i % 3)
                for i, size in enumerate(sizes)]
    cfg = DataConfig(resolution=128)
    # entries per bucket: square 1+2+3 = 6, wide 1+2 = 3, tall 3; batches of 3
    stream = BatchStream(examples, cfg, batch_size=3, seed=5)
    assert stream.batches_per_epoch == 4
    for epoch in range(3):
        seen = Counter(item.example.caption for k in range(4 * epoch, 4 * epoch + 4) for item in stream.items(k))
        assert seen == Counter({e.caption: e.repeats for e in examples})
    # batches of 4: square 6 -> 4 + (2 + 2 filled), wide 3 -> 3 + 1 filled, tall 3 -> 3 + 1 filled
    stream = BatchStream(examples, cfg, batch_size=4, seed=5)
    assert stream.batches_per_epoch == 4
    for epoch in range(3):
        seen = Counter(item.example.caption for k in range(4 * epoch, 4 * epoch + 4) for item in stream.items(k))
        assert all(seen[e.caption] >= e.repeats for e in examples) and seen.total() == 16


def test_a_bucket_smaller_than_a_batch_repeats_its_images(tmp_path):
    examples = [example(write_image(tmp_path / "only.png", (128, 64)), "only", (128, 64)),
                example(write_image(tmp_path / "sq.png", (64, 64)), "square", (64, 64))]
    stream = BatchStream(examples, DataConfig(resolution=128), batch_size=4, seed=0)
    assert stream.batches_per_epoch == 2
    batches = [[item.example.caption for item in stream.items(k)] for k in range(2)]
    assert sorted(batches) == [["only"] * 4, ["square"] * 4]
    assert batch(stream, 0)[0].shape[0] == 4


def test_the_order_is_a_function_of_seed_and_index_alone(mixed):
    cfg = DataConfig(resolution=128, center_crop=False, random_flip=True, caption_dropout=0.2)
    examples = scan_folder(mixed, cfg).examples
    a, b = BatchStream(examples, cfg, 2, seed=3), BatchStream(examples, cfg, 2, seed=3)
    run = [a.items(k) for k in range(20)]
    assert run == [b.items(k) for k in range(20)]
    for k in (13, 2, 19, 7):  # resume: a fresh stream asked for batch k first, out of order
        fresh = BatchStream(examples, cfg, 2, seed=3)
        assert fresh.items(k) == run[k]
        pixels, captions = batch(fresh, k)
        assert torch.equal(pixels, batch(a, k)[0]) and captions == [item.caption for item in run[k]]
    other = [BatchStream(examples, cfg, 2, seed=4).items(k) for k in range(20)]
    assert other != run
    epochs = [[tuple(i.example.caption for i in run[k]) for k in range(e * 6, e * 6 + 6)] for e in range(3)]
    assert epochs[0] != epochs[1]  # each epoch has its own order


def test_flip_crop_and_caption_dropout_rates_and_what_they_do(mixed):
    cfg = DataConfig(resolution=128, center_crop=False, random_flip=True, caption_dropout=0.25)
    stream = BatchStream(scan_folder(mixed, cfg).examples, cfg, 2, seed=0)
    items = [item for k in range(300) for item in stream.items(k)]
    assert 0.42 < sum(item.flip for item in items) / len(items) < 0.58
    assert 0.19 < sum(item.caption == "" for item in items) / len(items) < 0.31
    flipped = next(item for item in items if item.flip)
    plain = dataclasses.replace(flipped, flip=False)
    assert torch.equal(stream.pixels([flipped]), stream.pixels([plain]).flip(-1))
    crops = {item.crop for item in items if group(item.example.caption) == "wide"}
    assert len(crops) > 3  # random windows
    centered = DataConfig(resolution=128)
    plain_stream = BatchStream(scan_folder(mixed, centered).examples, centered, 2, seed=0)
    plain_items = [item for k in range(60) for item in plain_stream.items(k)]
    assert not any(item.flip for item in plain_items) and all(item.caption for item in plain_items)


def test_tags_are_shuffled_keeping_the_first_ones(tmp_path):
    examples = [example(write_image(tmp_path / "a.png", (64, 64)), "sks dog, red, sitting, grass, sunny",
                        (64, 64))]
    cfg = DataConfig(resolution=64, shuffle_tags=True, keep_tags=1)
    stream = BatchStream(examples, cfg, 1, seed=0)
    captions = [stream.items(k)[0].caption for k in range(30)]
    assert all(c.startswith("sks dog, ") for c in captions)
    assert {tuple(sorted(c.split(", "))) for c in captions} == {("grass", "red", "sitting", "sks dog", "sunny")}
    assert len(set(captions)) > 5


def test_a_vanished_or_broken_file_is_reported_once_and_replaced_from_its_bucket(mixed, caplog):
    cfg = DataConfig(resolution=128)
    examples = scan_folder(mixed, cfg).examples
    caplog.set_level(logging.INFO, logger="sdtune")
    stream = BatchStream(examples, cfg, 2, seed=0)
    (mixed / "wide_1.png").unlink()
    (mixed / "tall_0.png").write_bytes(b"\x89PNG broken")
    for k in range(3 * stream.batches_per_epoch):
        pixels, captions = batch(stream, k)
        assert len(captions) == 2 and "wide 1" not in captions and "tall 0" not in captions
        assert pixels.shape[0] == 2
    warnings = said(caplog)
    assert sorted(w.split(":")[0] for w in warnings) == [f"skipping {mixed / 'tall_0.png'}",
                                                          f"skipping {mixed / 'wide_1.png'}"]
    assert batch(BatchStream(examples, cfg, 2, seed=0), 5)[1] == batch(stream, 5)[1]
    for name in ("tall_1.png", "tall_2.png"):  # the whole bucket gone: a clear error
        (mixed / name).unlink()
    with pytest.raises(SdtuneError, match="64x128 bucket"):
        for k in range(stream.batches_per_epoch):
            batch(stream, k)


def test_a_file_changed_since_the_scan_is_skipped(tmp_path, caplog):
    examples = [example(write_image(tmp_path / f"{i}.png", (64, 64), seed=i), f"image {i}", (64, 64))
                for i in range(3)]
    write_image(tmp_path / "1.png", (80, 64))  # replaced by a different picture
    caplog.set_level(logging.INFO, logger="sdtune")
    stream = BatchStream(examples, DataConfig(resolution=64), 2, seed=0)
    captions = [c for k in range(6) for c in batch(stream, k)[1]]
    warnings = said(caplog)
    assert "image 1" not in captions and len(warnings) == 1 and "changed since the scan" in warnings[0]


def test_background_decoding_gives_the_pixels_the_loop_would_decode(images):
    cfg = DataConfig(resolution=64)
    scan = scan_folder(images, cfg)
    ahead = BatchStream(scan.examples, dataclasses.replace(cfg, loader_threads=2), batch_size=2, seed=0)
    inline = BatchStream(scan.examples, dataclasses.replace(cfg, loader_threads=0), batch_size=2, seed=0)
    for index in range(3):
        ahead.prefetch(ahead.items(index))
    assert len(ahead._ahead) == 3
    for index in range(3):
        assert torch.equal(ahead.pixels(ahead.items(index)), inline.pixels(inline.items(index)))
    assert not ahead._ahead  # each prefetched batch is taken once


def test_a_file_that_breaks_before_its_background_decode_is_reported_once_and_replaced(tmp_path, caplog):
    for i in range(4):
        Image.new("RGB", (64, 64), (60 * i, 0, 0)).save(tmp_path / f"{i}.png")
    cfg = DataConfig(resolution=64, loader_threads=2)
    scan = scan_folder(tmp_path, cfg)
    caplog.set_level(logging.INFO, logger="sdtune")
    stream = BatchStream(scan.examples, cfg, batch_size=4, seed=0)
    (tmp_path / "2.png").write_bytes(b"broken")
    stream.prefetch(stream.items(0))
    pixels, _ = batch(stream, 0)  # as the loop takes it: ImageFailed, then the batch again
    reported = said(caplog)
    assert pixels.shape[0] == 4 and len(reported) == 1 and "2.png" in reported[0]
