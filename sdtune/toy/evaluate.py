"""Score a model on the shapes language: generate a fixed prompt set with fixed seeds, score each image.

    report = score_model("sdtune-tiny", shapes.all_specs(shapes.BASE_SHAPES))
    report.mean        # {'background': ..., 'colour': ..., 'shape': ..., 'total': ...}
    report.grid.save("grid.png")

The prompts and seeds are fixed, so two models (before and after a fine-tune) are compared on the
same draws of the same noise.
"""

from __future__ import annotations

from dataclasses import dataclass

from sdtune.toy import shapes

GUIDANCE = 4.0  # classifier-free guidance scale used for scoring and the demo
STEPS = 25
SEEDS = (0, 1)


@dataclass
class Report:
    mean: dict[str, float]
    scores: list[dict[str, float]]
    images: list
    grid: object


def score_model(model, specs: list[shapes.Spec], seeds=SEEDS, steps: int = STEPS,
                guidance: float = GUIDANCE) -> Report:
    """`model` is a folder/bundled name or an already built pipeline; one image per (spec, seed)."""
    from sdtune.family.load import assemble_pipeline, load_components
    from sdtune.sample import generate, make_grid

    pipe = assemble_pipeline(load_components(model)) if isinstance(model, str) else model
    draws = [(spec, seed) for seed in seeds for spec in specs]
    images = generate(pipe, [spec.caption for spec, _ in draws], [seed for _, seed in draws], steps=steps,
                      guidance=guidance, batch_size=len(draws))
    scores = [shapes.score_image(image, spec) for image, (spec, _) in zip(images, draws, strict=True)]
    return Report(shapes.mean_scores(scores), scores, images, make_grid(images, columns=len(specs)))
