"""How well sdtune-tiny draws its pretraining prompts, against the same pipeline with a random UNet.

    .venv/bin/python bench/tiny_scores.py        # prints a table, writes bench/results/tiny_scores.json

Both models get the same 24 prompts (3 shapes x 4 colours x 2 backgrounds) and the same seeds; the
score is the procedural one of `sdtune.toy.shapes` (1.0 = background, colour and shape all as asked).
"""

from __future__ import annotations

import torch
from _common import save_results
from rich.console import Console
from rich.table import Table

from sdtune.family.load import assemble_pipeline, load_components
from sdtune.toy import shapes, tiny
from sdtune.toy.evaluate import score_model

SEEDS = (0, 1, 2)


def main() -> None:
    torch.set_num_threads(1)
    specs = shapes.all_specs(shapes.BASE_SHAPES)
    random_unet = load_components("sdtune-tiny")
    random_unet.unet = tiny.architecture(seed=123)["unet"]
    results = {
        "random UNet": score_model(assemble_pipeline(random_unet), specs, seeds=SEEDS).mean,
        "sdtune-tiny": score_model("sdtune-tiny", specs, seeds=SEEDS).mean,
    }
    table = Table("model", "total", "background", "colour", "shape",
                  title=f"pretraining prompts: {len(specs)} prompts x {len(SEEDS)} seeds")
    for name, mean in results.items():
        table.add_row(name, *(f"{mean[k]:.2f}" for k in ("total", "background", "colour", "shape")))
    Console().print(table)
    save_results("tiny_scores", results)


if __name__ == "__main__":
    main()
