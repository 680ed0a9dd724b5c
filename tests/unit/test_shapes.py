"""The procedural scorer agrees with the renderer and is not fooled by noise or blank images."""

import random

import numpy as np
import pytest
from PIL import Image

from sdtune.toy import shapes
from sdtune.toy.shapes import Spec, mean_scores, render, score_image


def test_rendered_truth_scores_full_marks_and_wrong_prompts_do_not():
    rng = random.Random(0)
    for spec in shapes.all_specs(shapes.SHAPES):
        for _ in range(3):
            image = render(spec, rng)
            assert score_image(image, spec)["total"] == 1.0, spec
            other_shape = Spec(shapes.SHAPES[(shapes.SHAPES.index(spec.shape) + 1) % 4], spec.colour, spec.background)
            assert score_image(image, other_shape)["shape"] == 0.0
            other_colour = Spec(spec.shape, "green" if spec.colour != "green" else "red", spec.background)
            assert score_image(image, other_colour)["colour"] == 0.0


@pytest.mark.parametrize("make", [
    lambda i: np.random.RandomState(i).randint(0, 255, (64, 64, 3)),       # colour noise
    lambda i: np.full((64, 64, 3), 245),                                    # blank page
    lambda i: np.random.RandomState(i).normal(128, 40, (64, 64, 3)),        # grey noise
])
def test_noise_and_blank_images_have_no_object(make):
    images = [Image.fromarray(make(i).clip(0, 255).astype(np.uint8)) for i in range(8)]
    scores = mean_scores([score_image(im, Spec("circle", "red", "white")) for im in images])
    assert scores["colour"] == 0 and scores["shape"] == 0


def test_captions_parse_back():
    for spec in shapes.all_specs(shapes.SHAPES):
        assert Spec.parse(spec.caption) == spec


def test_templates_tell_the_shapes_apart():
    rng = random.Random(3)
    for shape in shapes.SHAPES:
        image = np.asarray(render(Spec(shape, "red", "white"), rng), dtype=float)
        match = shapes.shape_match(np.sqrt(((image - [220, 40, 40]) ** 2).sum(-1)) < 100)
        assert max(match, key=match.get) == shape and match[shape] > 0.85, (shape, match)
        assert sorted(match.values())[-2] < match[shape] - 0.1


def test_soft_edged_shapes_keep_their_identity():
    """Generated images are blurrier than the renderer's; a blurred star is still a star, a circle a circle."""
    from PIL import ImageFilter

    rng = random.Random(11)
    for shape in shapes.SHAPES:
        spec = Spec(shape, "blue", "white")
        scores = [score_image(render(spec, rng).filter(ImageFilter.GaussianBlur(1.5)), spec) for _ in range(6)]
        assert mean_scores(scores)["shape"] >= 5 / 6, shape
