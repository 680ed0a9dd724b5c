"""The sdtune demo: teach the bundled sdtune-tiny model a shape it has never seen, twice, and measure it.

    make demo                          # or: python examples/demo.py
    python examples/demo.py --make-data   # rewrite examples/star/ and examples/shapes/ (seeded)

sdtune-tiny was pretrained on circles, squares and triangles. `examples/star/` holds 24 pictures of
stars with captions ("a red star on the white background"), three of every colour on every background.
`examples/shapes/` holds 48 of the old shapes, two of every shape x colour x background: the class
images of DreamBooth prior preservation (`data.class_dir`), so the model learns "star" without drawing
stars for everything else. The demo scores the base model on star prompts and on its old prompts, then
fine-tunes it with the real command line twice, side by side, as a full fine-tune (`sdtune train --preset
cpu ...`) and as a LoRA (`--set train.method=lora`). The full run's folder is scored as sdtune loads it; the
LoRA is scored through plain diffusers (`StableDiffusionPipeline.from_pretrained(<sdtune-tiny>)` then
`pipe.load_lora_weights(<the run's folder>)`), on the same prompts and seeds. Grids of every model go
to `demo-out/`, the figures to `demo-out/scores.json`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "star"      # instance images: stars only
CLASS = ROOT / "examples" / "shapes"   # class images: every old shape, colour and background
OUT = ROOT / "demo-out"
BASE = ROOT / "sdtune" / "assets" / "sdtune-tiny"  # the bundled model, a plain diffusers folder

# Both runs: batch 8 instance + 8 class images a step, latents and caption embeddings cached once.
COMMON = ["--preset", "cpu", "--data", str(DATA),
          "--set", "train.batch_size=8", "--set", "data.caption_dropout=0.1",
          "--set", "data.cache_latents=true", "--set", "data.cache_text=true",
          "--set", f"data.cache_dir={OUT / 'cache'}",
          "--set", f"data.class_dir={CLASS}", "--set", "data.num_class_images=48",
          "--set", "output.checkpoint_every=0"]
FULL = ["--out", str(OUT / "full"), "--max-steps", "300", "--set", "train.prior_loss_weight=1.0",
        "--set", "train.learning_rate=1e-3", "--set", "train.lr_scheduler=cosine", "--set", "train.snr_gamma=5"]
# The LoRA's adapters on the ResNet convolutions carry most of what it learns here (this UNet attends only
# at 8x8 and 4x4 latents); a prior weight above 1 keeps the old shapes from sliding.
LORA = ["--out", str(OUT / "lora"), "--max-steps", "300", "--set", "train.method=lora",
        "--set", "train.prior_loss_weight=1.3",
        "--set", "lora.rank=8", "--set", "lora.alpha=12", "--set", "lora.target=attention+conv",
        "--set", "train.learning_rate=1e-2", "--set", "train.lr_scheduler=cosine",
        "--set", "train.lr_warmup_steps=30", "--set", "train.snr_gamma=5"]
TRAIN = [*COMMON, *FULL]        # the full fine-tune's `sdtune train` arguments (tests/test_tiny.py runs them)
LORA_TRAIN = [*COMMON, *LORA]   # the LoRA run's
PROMPT_SETS = ("star (new)", "old shapes")


def make_data() -> None:
    """Rewrite examples/star/ (3 x every star spec, seed 7) and examples/shapes/ (2 x every old spec, seed 8)."""
    from sdtune.toy import shapes

    for folder, kinds, per, seed in ((DATA, shapes.NEW_SHAPES, 3, 7), (CLASS, shapes.BASE_SHAPES, 2, 8)):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        rng, specs = random.Random(seed), shapes.all_specs(kinds)
        for i, spec in enumerate(spec for _ in range(per) for spec in specs):
            shapes.render(spec, rng).save(folder / f"{i:05d}.png")
            (folder / f"{i:05d}.txt").write_text(spec.caption)
        print(f"wrote {per * len(specs)} images to {folder}")


def score(model, label: str, console) -> dict:
    """`model`: a name/folder or a built pipeline. Mean scores per prompt set; grids to OUT/label-*.png."""
    from sdtune.toy import shapes
    from sdtune.toy.evaluate import score_model

    results = {}
    for name, specs in zip(PROMPT_SETS, (shapes.all_specs(shapes.NEW_SHAPES), shapes.all_specs(shapes.BASE_SHAPES)),
                           strict=True):
        with console.status(f"scoring {label} on {name} prompts"):
            report = score_model(model, specs)
        report.grid.save(OUT / f"{label}-{name.split()[0]}.png")
        results[name] = report.mean
    return results


def train_side_by_side(runs: dict[str, list[str]], console) -> dict[str, float]:
    """`sdtune train ARGS` of every run at once, each in its own process with one thread (a tiny model
    gains little from a second thread, and one thread computes the same figures on any machine); their
    output goes to OUT/NAME.log. Seconds each took. A rerun continues (or re-exports) a run's --out."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    started, processes = time.perf_counter(), {}
    for name, args in runs.items():
        console.print("[bold]$ sdtune train " + " ".join(args).replace(str(ROOT) + "/", ""))
        command = [sys.executable, "-m", "sdtune.cli", "train", *args]
        if Path(args[args.index("--out") + 1]).exists():
            command.append("--resume")
        with open(OUT / f"{name}.log", "w") as log:
            processes[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    seconds = {}
    with console.status(f"training {' and '.join(runs)} side by side, one thread each "
                        f"(progress in {', '.join(f'{OUT.name}/{n}.log' for n in runs)})"):
        while len(seconds) < len(processes):
            for name, process in processes.items():
                if name not in seconds and process.poll() is not None:
                    if process.returncode:
                        sys.exit(f"sdtune train ({name}) failed; see {OUT / f'{name}.log'}")
                    seconds[name] = time.perf_counter() - started
            time.sleep(0.2)
    return seconds


def lora_pipeline(folder: Path):
    """The base model in plain diffusers with the LoRA run's pytorch_lora_weights.safetensors loaded: no sdtune."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging
    from transformers.utils import logging as transformers_logging

    for library in (logging, transformers_logging):  # loading bars, and "no LoRA keys for CLIPTextModel"
        library.set_verbosity_error()                  # (this LoRA is the UNet's only)
        library.disable_progress_bar()
    pipe = StableDiffusionPipeline.from_pretrained(BASE, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(folder)
    return pipe


def main() -> None:
    if sys.argv[1:] == ["--make-data"]:
        return make_data()
    import torch
    from rich.console import Console
    from rich.table import Table

    console = Console()
    torch.set_num_threads(1)  # as the training runs: the scores are then the same on any machine
    torch.manual_seed(0)
    OUT.mkdir(exist_ok=True)
    started = time.perf_counter()
    scores = {"before": score("sdtune-tiny", "before", console)}
    seconds = train_side_by_side({"full": TRAIN, "lora": LORA_TRAIN}, console)
    scores["after full"] = score(str(OUT / "full"), "after-full", console)
    console.print(f"[bold]diffusers:[/] StableDiffusionPipeline.from_pretrained('{BASE.relative_to(ROOT)}')"
                  f".load_lora_weights('{(OUT / 'lora').relative_to(ROOT)}')")
    scores["after LoRA"] = score(lora_pipeline(OUT / "lora"), "after-lora", console)

    table = Table("prompts", "model", "total", "background", "colour", "shape",
                  title="concept score (1.0 = every image matches its prompt)")
    for name in PROMPT_SETS:
        for when, result in scores.items():
            table.add_row(name, when, *(f"{result[name][k]:.2f}" for k in ("total", "background", "colour", "shape")),
                          end_section=when == "after LoRA")
    console.print(table)
    total = time.perf_counter() - started
    (OUT / "scores.json").write_text(json.dumps(
        {**{when: result for when, result in scores.items()},
         "train_seconds": {k: round(v, 1) for k, v in seconds.items()}, "demo_seconds": round(total, 1)}, indent=2))
    console.print(f"grids in {OUT}/ (before-*.png, after-full-*.png, after-lora-*.png for star and old); "
                  f"training took {seconds['full']:.0f} s (full) and {seconds['lora']:.0f} s (LoRA); "
                  f"demo took {total:.0f} s")


if __name__ == "__main__":
    main()
