"""A procedural world of coloured shapes: captions, a renderer, and a scorer that needs no neural network.

sdtune-tiny is pretrained on this world and the demo teaches it a shape it has never seen. The scorer
checks a generated image against its prompt the way a person would glance at it: is the background
the colour asked for (its border pixels), is the object the colour asked for (the pixels that differ
from the background), and is it the shape asked for (template matching: which shape, drawn to fill the
object's bounding box, overlaps it best; and a star, the one concave shape, by how little of its convex
hull it fills).

    from sdtune.toy.shapes import Spec, render, score_image
    spec = Spec("star", "red", "white")
    image = render(spec, random.Random(0))          # a 64x64 PIL image
    score_image(image, spec)                         # {'background': 1.0, 'colour': 1.0, 'shape': 1.0, ...}
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np

SIZE = 64
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
BACKGROUNDS = {"white": (245, 245, 245), "black": (20, 20, 20)}
BASE_SHAPES = ("circle", "square", "triangle")   # what sdtune-tiny is pretrained on
NEW_SHAPES = ("star",)                          # held out: the demo's new concept
SHAPES = BASE_SHAPES + NEW_SHAPES
WORDS = ("a", "on", "the", "background", *COLOURS, *BACKGROUNDS, *SHAPES)
STAR_SOLIDITY = 0.8  # below it a silhouette is concave enough to be a star (a drawn triangle fills 0.92 of its hull)


@dataclass(frozen=True)
class Spec:
    shape: str
    colour: str
    background: str

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} on the {self.background} background"

    @classmethod
    def parse(cls, caption: str) -> Spec:
        words = caption.split()
        pick = lambda options: next(w for w in words if w in options)  # noqa: E731
        return cls(pick(SHAPES), pick(COLOURS), pick(BACKGROUNDS))


def all_specs(shapes=BASE_SHAPES) -> list[Spec]:
    return [Spec(s, c, b) for s in shapes for c in COLOURS for b in BACKGROUNDS]


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)]
    if shape == "star":  # five points, inner radius 0.45 of the outer
        return [(cx + (r if i % 2 == 0 else 0.45 * r) * math.sin(i * math.pi / 5),
                 cy - (r if i % 2 == 0 else 0.45 * r) * math.cos(i * math.pi / 5)) for i in range(10)]
    raise ValueError(f"unknown shape {shape!r}")


def render(spec: Spec, rng: random.Random, size: int = SIZE):
    """`spec` drawn at a random position and size on a plain background, as a PIL RGB image."""
    from PIL import Image, ImageDraw

    scale = 4  # draw large and downsample: anti-aliased edges, like a photo rather than pixel art
    image = Image.new("RGB", (size * scale, size * scale), BACKGROUNDS[spec.background])
    draw = ImageDraw.Draw(image)
    r = rng.uniform(0.17, 0.32) * size
    cx, cy = rng.uniform(r + 2, size - r - 2), rng.uniform(r + 2, size - r - 2)
    fill = COLOURS[spec.colour]
    if spec.shape == "circle":
        draw.ellipse([v * scale for v in (cx - r, cy - r, cx + r, cy + r)], fill=fill)
    else:
        draw.polygon([(x * scale, y * scale) for x, y in _outline(spec.shape, cx, cy, r)], fill=fill)
    return image.resize((size, size), Image.LANCZOS)


# ---------------------------------------------------------------------------------------------------------
# Scoring


def _nearest(colour: np.ndarray, palette: dict) -> str:
    return min(palette, key=lambda name: float(np.sum((np.asarray(palette[name]) - colour) ** 2)))


def silhouette(shape: str, box: tuple[int, int, int, int], size: int = SIZE) -> np.ndarray:
    """Boolean mask of `shape` drawn by the renderer's own outline to fill the pixel box (x0, y0, x1, y1)."""
    from PIL import Image, ImageDraw

    scale = 4
    x0, y0, x1, y1 = (v * scale for v in box)
    x1, y1 = x1 + scale, y1 + scale  # the box's last pixel is inside it
    canvas = Image.new("L", (size * scale, size * scale), 0)
    draw = ImageDraw.Draw(canvas)
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=255)
    else:
        unit = np.asarray(_outline(shape, 0.0, 0.0, 1.0))
        lo, hi = unit.min(0), unit.max(0)
        points = (unit - lo) / (hi - lo) * [x1 - x0, y1 - y0] + [x0, y0]
        draw.polygon([tuple(p) for p in points], fill=255)
    return np.asarray(canvas.resize((size, size), Image.BILINEAR)) >= 128


def solidity(mask: np.ndarray) -> float:
    """Area of `mask` over the area of its convex hull (pixel corners; monotone chain, shoelace)."""
    ys, xs = np.nonzero(mask)
    corners = sorted({(x + dx, y + dy) for x, y in zip(xs.tolist(), ys.tolist(), strict=True)
                      for dx in (0, 1) for dy in (0, 1)})

    def chain(points):
        out = []
        for p in points:
            while len(out) >= 2 and ((out[-1][0] - out[-2][0]) * (p[1] - out[-2][1])
                                     - (out[-1][1] - out[-2][1]) * (p[0] - out[-2][0])) <= 0:
                out.pop()
            out.append(p)
        return out[:-1]

    hull = np.array(chain(corners) + chain(corners[::-1]), dtype=float)
    x, y = hull[:, 0], hull[:, 1]
    return len(xs) / max(0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))), 1.0)


def shape_match(mask: np.ndarray) -> dict[str, float]:
    """Template matching: intersection over union of `mask` with each shape fitted to its bounding box."""
    ys, xs = np.nonzero(mask)
    box = (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))
    return {shape: float((mask & (t := silhouette(shape, box, mask.shape[0]))).sum() / (mask | t).sum())
            for shape in SHAPES}


def _foreground(array: np.ndarray) -> tuple[str, np.ndarray]:
    border = np.concatenate([array[0], array[-1], array[:, 0], array[:, -1]])
    background = np.median(border, axis=0)
    mask = np.sqrt(((array - background) ** 2).sum(-1)) > 80
    return _nearest(background, BACKGROUNDS), mask


def score_image(image, spec: Spec) -> dict[str, float]:
    """1.0 or 0.0 for background, colour and shape as the prompt asks; 'total' is their mean.

    The object is the region of one palette colour that stands out from the background; its shape is
    the template that overlaps it best. Scattered pixels (noise, texture) or a region that matches no
    template at least half well are no object, and score 0 for colour and shape."""
    array = np.asarray(image.convert("RGB"), dtype=float)
    background, mask = _foreground(array)
    result = {"background": float(background == spec.background), "colour": 0.0, "shape": 0.0}
    if 0.01 * mask.size <= mask.sum() <= 0.6 * mask.size:
        colour = _nearest(np.median(array[mask], axis=0), COLOURS)
        mask &= np.sqrt(((array - np.asarray(COLOURS[colour])) ** 2).sum(-1)) < 100
        match = shape_match(mask) if mask.sum() >= 0.01 * mask.size else {}
        if match and max(match.values()) >= 0.5:
            # the star is the one concave shape: a soft-edged star can overlap a circle's template more
            # than its own, but it never fills its convex hull (a drawn star fills 0.59 of it)
            guess = "star" if solidity(mask) < STAR_SOLIDITY else max(match, key=match.get)
            result["colour"], result["shape"] = float(colour == spec.colour), float(guess == spec.shape)
    result["total"] = (result["background"] + result["colour"] + result["shape"]) / 3
    return result


def mean_scores(scores: list[dict[str, float]]) -> dict[str, float]:
    return {key: sum(s[key] for s in scores) / len(scores) for key in scores[0]}
