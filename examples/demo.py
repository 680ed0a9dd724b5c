"""The sdtune demo: teach the bundled sdtune-tiny model a shape it has never seen, and measure it.

    make demo          # or: python examples/demo.py

sdtune-tiny was pretrained on circles, squares and triangles. `examples/star/` holds 24 pictures of
stars with captions ("a red star on the white background") and, in `prior/`, 24 of the old shapes:
prior preservation, as in DreamBooth, so the model learns "star" without drawing stars for everything.
The demo scores the model on star prompts and on its old prompts, fine-tunes it with the real command
line (`sdtune train --preset cpu ...`), scores it again on the same prompts and seeds, and writes
before/after grids to `demo-out/`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "star"
OUT = ROOT / "demo-out"
TRAIN = ["--preset", "cpu", "--data", str(DATA), "--out", str(OUT / "model"), "--max-steps", "600",
         "--set", "train.batch_size=8", "--set", "train.learning_rate=5e-4", "--set", "data.caption_dropout=0.1",
         "--set", "output.checkpoint_every=200"]


def score(model: str, label: str, console) -> dict:
    from sdtune.toy import shapes
    from sdtune.toy.evaluate import score_model

    results = {}
    for name, specs in (("star (new)", shapes.all_specs(shapes.NEW_SHAPES)),
                        ("old shapes", shapes.all_specs(shapes.BASE_SHAPES))):
        with console.status(f"scoring {label} on {name} prompts"):
            report = score_model(model, specs)
        report.grid.save(OUT / f"{label}-{name.split()[0]}.png")
        results[name] = report.mean
    return results


def main() -> None:
    import torch
    from rich.console import Console
    from rich.table import Table

    console = Console()
    torch.manual_seed(0)
    OUT.mkdir(exist_ok=True)
    started = time.perf_counter()
    before = score("sdtune-tiny", "before", console)
    command = [sys.executable, "-m", "sdtune.cli", "train", *TRAIN]
    console.print("[bold]$ sdtune train " + " ".join(TRAIN))
    if (OUT / "model").exists():
        command.append("--resume")  # a rerun continues (or re-exports) the earlier demo run
    subprocess.run(command, check=True)
    after = score(str(OUT / "model"), "after", console)
    table = Table("prompts", "when", "total", "background", "colour", "shape",
                  title="concept score (1.0 = every image matches its prompt)")
    for name in before:
        for when, result in (("before", before[name]), ("after", after[name])):
            table.add_row(name, when, *(f"{result[k]:.2f}" for k in ("total", "background", "colour", "shape")))
    console.print(table)
    (OUT / "scores.json").write_text(json.dumps({"before": before, "after": after}, indent=2))
    console.print(f"grids in {OUT}/ (before-star.png, after-star.png, before-old.png, after-old.png); "
                  f"demo took {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
