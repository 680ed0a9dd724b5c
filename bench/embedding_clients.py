"""Whether ComfyUI's own embedding loader reads sdtune's `embedding.safetensors`: the textual-inversion check
of issue 28, run against ComfyUI's source rather than a transcription of it.

    .venv/bin/python bench/embedding_clients.py --comfy /path/to/ComfyUI   # a checkout, or a bare git dir

Trains a 2-vector embedding for 2 steps on the tiny SD1 and SDXL models of tests/support/testing.py (CPU,
fp32), then runs ComfyUI's `load_embed` (comfy/sd1_clip.py, the function and its helpers taken from the
source as they are; the rest of ComfyUI is not imported) on each file as ComfyUI's tokenizers call it: SD1's
with `embedding_key="clip_l"`, SDXL's first with "clip_l" and its second with "clip_g" (comfy/sdxl_clip.py).
Per file and key: the shape ComfyUI gets and whether it equals the vectors sdtune trained. Results to
bench/results/embedding_clients.json.
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import os
import subprocess
import tempfile
import traceback
import zipfile
from pathlib import Path

import torch
from _common import save_results
from safetensors.torch import load_file
from support.testing import make_image_folder, save_tiny_pipeline, save_tiny_sdxl_pipeline

from sdtune.config import load_config

HELPERS = ("safe_load_embed_zip", "expand_directory_list", "bundled_embed", "load_embed")
CALLS = {"sd1": [("emb_params", "clip_l")], "sdxl": [("clip_l", "clip_l"), ("clip_g", "clip_g")]}  # file key, ComfyUI's


def comfy_load_embed(comfy: Path):
    """ComfyUI's `load_embed`, compiled from its source with the helpers it calls."""
    path = comfy / "comfy" / "sd1_clip.py"
    source = path.read_text() if path.is_file() else subprocess.run(
        ["git", "-C", str(comfy), "show", "HEAD:comfy/sd1_clip.py"], check=True, capture_output=True, text=True).stdout
    tree = ast.parse(source)
    code = "\n\n".join(ast.get_source_segment(source, node) for node in tree.body
                       if isinstance(node, ast.FunctionDef) and node.name in HELPERS)
    namespace = {"os": os, "torch": torch, "logging": logging, "traceback": traceback, "zipfile": zipfile,
                 "json": json}
    exec(compile(code, str(path), "exec"), namespace)  # noqa: S102 (ComfyUI's own code, the point of the check)
    return namespace["load_embed"]


def trained_file(family: str, tmp: Path, images: Path) -> Path:
    from sdtune.export.run_output import export_run
    from sdtune.train import loop as trainer

    model = (save_tiny_pipeline(tmp / family, version=1) if family == "sd1"
             else save_tiny_sdxl_pipeline(tmp / family))
    cfg, info = load_config("cpu", [f"model.pretrained={model}", "train.method=embedding", "embedding.token=<sks>",
                                    "embedding.vectors=2", "train.max_steps=2", "train.learning_rate=1e-2"])
    run = trainer.prepare(cfg, info, str(images), str(tmp / f"out-{family}"), resume=False)
    trainer.loop(run)
    export_run(run, "bench")
    return tmp / f"out-{family}" / "embedding.safetensors"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--comfy", type=Path, required=True, help="a ComfyUI checkout or bare git directory")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_embed, tmp = comfy_load_embed(args.comfy), Path(tempfile.mkdtemp())
    images = make_image_folder(tmp / "images", count=4)
    for caption in images.glob("*.txt"):
        caption.write_text(caption.read_text().replace("a ", "a <sks> ", 1))
    rows = {}
    for family, calls in CALLS.items():
        path = trained_file(family, tmp, images)
        saved = load_file(path)
        for key, comfy_key in calls:
            got = load_embed(path.stem, str(path.parent), saved[key].shape[-1], comfy_key)
            rows[f"{family} {key}"] = {"comfy_embedding_key": comfy_key, "shape": list(got.shape),
                                       "equal_to_trained": bool(torch.equal(got, saved[key]))}
    print("| file, key | ComfyUI's embedding_key | shape ComfyUI reads | equal to the trained vectors |")
    print("| --- | --- | --- | --- |")
    for name, row in rows.items():
        print(f"| {name} | {row['comfy_embedding_key']} | {row['shape']} | {row['equal_to_trained']} |")
    save_results("embedding_clients", rows)


if __name__ == "__main__":
    main()
