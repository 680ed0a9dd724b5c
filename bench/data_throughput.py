"""Data pipeline throughput: images/s of the scan, of the first (encoding) pass, and of the cached path.

    .venv/bin/python bench/data_throughput.py [--images 96] [--resolution 256]

On a folder of synthetic JPEGs of mixed aspect ratios (1-2 megapixels, as from a phone), with the bundled
sdtune-tiny's VAE and text encoder on the CPU, one thread:
- scan: discovery, decode checks and captions (`scan_folder`);
- uncached: what every micro-batch costs without caches: open, resize, crop, VAE encode, text encode;
- first pass: filling the latent and text caches (the same work, done once, plus hashing and writing);
- cached: what a micro-batch costs with both caches warm: read the stored latents and embeddings.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch
from _common import save_results

from sdtune.config import load_config
from sdtune.data import BatchStream, scan_folder
from sdtune.data.features import Features
from sdtune.family.load import load_components
from sdtune.plan import make_plan


def write_images(folder: Path, count: int) -> Path:
    from PIL import Image

    folder.mkdir(parents=True)
    rng = random.Random(0)
    for i in range(count):
        w, h = rng.choice([(1600, 1200), (1200, 1600), (1280, 1280), (1920, 1080)])
        noise = Image.frombytes("RGB", (w // 8, h // 8), rng.randbytes(w * h * 3 // 64))  # detail to decode
        noise.resize((w, h), Image.BICUBIC).save(folder / f"photo_{i}.jpg", quality=90)
    return folder


def timed_images(count: int, fn) -> float:
    started = time.perf_counter()
    fn()
    return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--resolution", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp())
    data = write_images(tmp / "images", args.images)
    cfg, info = load_config("cpu", ["model.pretrained=sdtune-tiny", f"data.resolution={args.resolution}",
                                    "train.batch_size=4", f"data.cache_dir={tmp / 'cache'}", "data.scan_cache=false"])
    rows = {}
    scan = None

    def do_scan():
        nonlocal scan
        scan = scan_folder(data, cfg.data)

    rows["scan"] = timed_images(args.images, do_scan)
    components = load_components("sdtune-tiny")
    plan = make_plan(cfg.memory, "cpu", "sdpa")
    stream = BatchStream(scan.examples, cfg.data, 4, seed=0)
    batches = stream.batches_per_epoch
    plain = Features(components, cfg.data, plan)

    def epoch(features):
        for k in range(batches):
            items = stream.items(k)
            features.latents(stream, items, torch.Generator().manual_seed(k))
            features.text([item.caption for item in items])

    rows["uncached (images/s)"] = timed_images(4 * batches, lambda: epoch(plain))
    cached_cfg = load_config("cpu", ["model.pretrained=sdtune-tiny", f"data.resolution={args.resolution}",
                                     "train.batch_size=4", f"data.cache_dir={tmp / 'cache'}",
                                     "data.cache_latents=true", "data.cache_text=true"])[0]
    cached = Features(components, cached_cfg.data, plan)
    rows["first pass, filling the caches (images/s)"] = timed_images(args.images,
                                                                     lambda: cached.prepare([(stream, scan.examples)]))
    rows["cached (images/s)"] = timed_images(4 * batches, lambda: epoch(cached))
    rows["scan"] = rows.pop("scan")
    print(f"{args.images} JPEGs of 1.6-2.1 MP, resolution {args.resolution}, sdtune-tiny encoders, one thread")
    for name, value in rows.items():
        print(f"{name:42s} {value:8.1f} images/s")
    save_results("data_throughput", rows)


if __name__ == "__main__":
    main()
