"""Start-up on a large folder: the scan and the first step, cold and warm, decoding and headers only.

    .venv/bin/python bench/large_folder.py [--images 10000]

A folder of `--images` generated JPEGs (512 x 384, with captions) and the bundled sdtune-tiny on the CPU,
one thread. Each row is a fresh `trainer.prepare` (scan, model load, plan) followed by one training
step, timed separately:
- decode, cold: every image opened and decoded before step 1 (what every run did before the scan cache);
- decode, warm: the same folder again: the scan cache (by path, size and mtime) answers for every image;
- headers, cold: `data.check_images=headers` on an empty cache: headers only, no decoding.
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch
from _common import save_results

from sdtune.config import load_config
from sdtune.train import loop as trainer


def write_folder(folder: Path, count: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True)
    rng = random.Random(0)
    tiles = [Image.frombytes("RGB", (64, 48), rng.randbytes(64 * 48 * 3)).resize((512, 384)) for _ in range(16)]
    for i in range(count):
        tiles[i % len(tiles)].save(folder / f"{i:06d}.jpg", quality=85)
        (folder / f"{i:06d}.txt").write_text("a photo")


def start(data: Path, out: Path, cache: Path, check: str) -> tuple[float, float]:
    """Seconds of `trainer.prepare` and of the first step."""
    cfg, info = load_config("cpu", ["model.pretrained=sdtune-tiny", "train.max_steps=1", "train.batch_size=2",
                                    f"data.cache_dir={cache}", f"data.check_images={check}",
                                    "output.checkpoint_every=0"])
    shutil.rmtree(out, ignore_errors=True)
    began = time.perf_counter()
    with trainer.prepare(cfg, info, str(data), str(out), resume=False) as run:
        prepared = time.perf_counter()
        trainer.loop(run)
    return prepared - began, time.perf_counter() - prepared


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=10_000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp())
    made = time.perf_counter()
    write_folder(tmp / "images", args.images)
    print(f"{args.images:,} images written in {time.perf_counter() - made:.1f} s")
    rows = {}
    for name, cache, check in (("decode, cold", "a", "decode"), ("decode, warm", "a", "decode"),
                               ("headers, cold", "b", "headers")):
        rows[name] = start(tmp / "images", tmp / "out", tmp / cache, check)
    cold = sum(rows["decode, cold"])
    print(f"| start-up ({args.images:,} images) | prepare (scan, load) s | first step s | to step 1 s | vs cold |")
    print("| --- | --- | --- | --- | --- |")
    for name, (prepare, step) in rows.items():
        print(f"| {name} | {prepare:.1f} | {step:.2f} | {prepare + step:.1f} | {cold / (prepare + step):.1f}x |")
    path = save_results("large_folder", {name: {"prepare_s": p, "first_step_s": s} for name, (p, s) in rows.items()})
    print(f"results: {path}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
