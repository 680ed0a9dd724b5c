"""The sample images drawn during training: each prompt of the run (`Run.samples`, `sdtune.sample_prompts`)
with its own size, seed, steps, CFG scale, negative prompt and sampler, saved with its settings.

    path = draw_samples(run, metrics, evaluation_mode(run))   # OUT/samples/step-NNNNNN.png and its folder

Every PNG carries AUTOMATIC1111's `parameters` (`sdtune.sample.parameters`); the grid shows each image below
its prompt and settings, in cells as large as the largest image; the metrics sinks get the grid.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

from sdtune.sample_prompts import PromptSpec, make_scheduler, sampler_label
from sdtune.train.state import Run


def draw_samples(run: Run, metrics, context: AbstractContextManager) -> Path:
    """The grid of the run's sample prompts at this step, drawn inside `context` (the model ready to draw:
    `loop.evaluation_mode`) with the EMA weights where output.sample_ema asks: a PNG in OUT/samples/, each
    image beside it in a folder of the step's name; the grid goes to `metrics` too."""
    from sdtune.family.load import assemble_pipeline
    from sdtune.sample import generate

    out = run.cfg.output
    averaged = run.ema.applied() if run.ema is not None and out.sample_ema else nullcontext()
    images, samplers = [], []
    with context, averaged:
        pipe = assemble_pipeline(run.components)
        own = pipe.scheduler
        for spec in run.samples:
            pipe.scheduler = make_scheduler(spec.sampler, own.config) if spec.sampler else own
            samplers.append(sampler_label(spec.sampler, pipe.scheduler))
            images += generate(pipe, [spec.prompt], [spec.seed], steps=spec.steps, guidance=spec.guidance,
                               height=spec.height, width=spec.width, negative_prompt=spec.negative,
                               encode=run.components.prompt_encoder())
    path = run.out_dir / "samples" / f"step-{run.step:06d}.png"
    if run.world.main:  # every rank draws (FSDP gathers weights collectively), rank 0 writes
        _save(run, path, images, samplers, metrics)
    return path


def _save(run: Run, path: Path, images: list, samplers: list[str], metrics) -> None:
    from sdtune.sample import make_grid, parameters, save_png

    path.with_suffix("").mkdir(parents=True, exist_ok=True)
    base = Path(run.cfg.model.pretrained).name or run.cfg.model.pretrained
    texts = [parameters(spec.prompt, negative=spec.negative, steps=spec.steps, guidance=spec.guidance,
                        seed=spec.seed, size=image.size, sampler=sampler, model=run.out_dir.resolve().name,
                        extra={"Training step": run.step, "Base model": base})
             for spec, image, sampler in zip(run.samples, images, samplers, strict=True)]
    for i, (image, text) in enumerate(zip(images, texts, strict=True)):
        save_png(image, path.with_suffix("") / f"{i:02d}.png", text)
    labels = [label(spec, image.size, sampler) for spec, image, sampler in zip(run.samples, images, samplers,
                                                                                strict=True)]
    grid = make_grid(images, labels=labels)
    save_png(grid, path, texts[0])  # as A1111 labels its grids: with the first image's parameters
    metrics.image("validation/samples", run.step, grid)


def label(spec: PromptSpec, size: tuple[int, int], sampler: str) -> str:
    """An image's grid label: its prompt, its negative prompt, then its settings."""
    from sdtune.sample import SAMPLER_NAMES

    negative = f"\nnot: {spec.negative}" if spec.negative else ""
    return (f"{spec.prompt}{negative}\n{size[0]}x{size[1]}, seed {spec.seed}, {spec.steps} steps, "
            f"CFG {spec.guidance:g}, {SAMPLER_NAMES.get(sampler, sampler)}")
