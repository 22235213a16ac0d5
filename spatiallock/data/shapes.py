"""Drawing for the synthetic domain: the 16 categories, low-contrast backgrounds, anti-aliased shapes."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (212.0, 38.0, 38.0),
    "green": (38.0, 164.0, 58.0),
    "blue": (40.0, 78.0, 218.0),
    "yellow": (238.0, 206.0, 34.0),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
BACKGROUNDS: tuple[str, ...] = ("gradient", "stripes", "checker", "noise")
SUPERSAMPLE = 4


def synth_categories() -> list[dict]:
    """COCO category entries: ids 1..16 named "<colour> <shape>", supercategory the shape."""
    return [
        {"id": 1 + c * len(SHAPES) + s, "name": f"{colour} {shape}", "supercategory": shape}
        for c, colour in enumerate(COLOURS)
        for s, shape in enumerate(SHAPES)
    ]


def category_id(colour: str, shape: str) -> int:
    """The COCO id of a colour and shape, as numbered by `synth_categories`."""
    return 1 + list(COLOURS).index(colour) * len(SHAPES) + SHAPES.index(shape)


def unit_outline(shape: str, rng: np.random.Generator) -> np.ndarray:
    """Polygon (k, 2) of one shape with mild random rotation and proportions, centred, larger side 1."""
    if shape == "circle":
        t = np.linspace(0.0, 2.0 * math.pi, 40, endpoint=False)
        points, max_turn = np.stack([np.cos(t), np.sin(t)], axis=1), 0.0
    elif shape == "square":
        points, max_turn = np.array([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]]), 15.0
    elif shape == "triangle":
        h = math.sqrt(3.0) / 2.0
        points = np.array([[0.0, -1.0], [h, 0.5], [-h, 0.5]]) * [1.0, rng.uniform(0.9, 1.1)]
        max_turn = 15.0
    elif shape == "diamond":
        half_width = rng.uniform(0.6, 0.8)
        points, max_turn = np.array([[0.0, -1.0], [half_width, 0.0], [0.0, 1.0], [-half_width, 0.0]]), 10.0
    else:
        raise ValueError(f"unknown shape {shape!r}")
    if max_turn:
        a = math.radians(rng.uniform(-max_turn, max_turn))
        points = points @ np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]])
    low, high = points.min(axis=0), points.max(axis=0)
    return (points - (low + high) / 2.0) / (high - low).max()


def rasterise(polygon: np.ndarray, size: int) -> tuple[np.ndarray, tuple[slice, slice]]:
    """Anti-aliased coverage in [0, 1] of a polygon given in pixels, over its bounding region of the image.

    Returns the coverage (h, w) float32 and the (rows, columns) slices of that region.
    """
    x0, y0 = (max(0, math.floor(v)) for v in polygon.min(axis=0))
    x1, y1 = (min(size, math.ceil(v)) for v in polygon.max(axis=0))
    canvas = Image.new("L", ((x1 - x0) * SUPERSAMPLE, (y1 - y0) * SUPERSAMPLE), 0)
    points = [tuple(p) for p in ((polygon - [x0, y0]) * SUPERSAMPLE).tolist()]
    ImageDraw.Draw(canvas).polygon(points, fill=255)
    coverage = np.asarray(canvas.reduce(SUPERSAMPLE), dtype=np.float32) / 255.0
    return coverage, (slice(y0, y1), slice(x0, x1))


def object_colour(colour: str, rng: np.random.Generator) -> np.ndarray:
    """A shade of one of the four colours: brightness and per-channel jitter small enough to keep the hue."""
    base = np.array(COLOURS[colour], dtype=np.float32)
    return np.clip(base * rng.uniform(0.82, 1.08) + rng.normal(0.0, 7.0, 3), 0.0, 255.0).astype(np.float32)


def shaded_fill(rgb: np.ndarray, region: tuple[slice, slice], rng: np.random.Generator) -> np.ndarray:
    """Colour field (h, w, 3) over a region with a gentle linear shading of up to +-8% across it."""
    h, w = region[0].stop - region[0].start, region[1].stop - region[1].start
    angle = rng.uniform(0.0, 2.0 * math.pi)
    ramp = np.cos(angle) * np.linspace(-1.0, 1.0, w)[None, :] + np.sin(angle) * np.linspace(-1.0, 1.0, h)[:, None]
    strength = rng.uniform(0.0, 0.08)
    return rgb[None, None, :] * (1.0 + strength * ramp / math.sqrt(2.0))[:, :, None].astype(np.float32)


def _pattern(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Blend weights (size, size) in [0, 1] for a background pattern."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    angle = rng.uniform(0.0, math.pi)
    along = xs * math.cos(angle) + ys * math.sin(angle)
    if kind == "gradient":
        return (along - along.min()) / max(float(np.ptp(along)), 1e-6)
    if kind == "stripes":
        period = rng.uniform(size / 9.0, size / 3.5)
        return 0.5 + 0.5 * np.tanh(3.0 * np.sin(2.0 * math.pi * along / period + rng.uniform(0.0, 2.0 * math.pi)))
    if kind == "checker":
        cell = int(rng.integers(max(2, size // 10), max(3, size // 4) + 1))
        dx, dy = rng.integers(0, cell, 2)
        return (((xs + dx) // cell + (ys + dy) // cell) % 2).astype(np.float32)
    if kind == "noise":
        k = int(rng.integers(3, 8))
        coarse = Image.fromarray(rng.random((k, k), dtype=np.float32))
        field = np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)
        return (field - field.min()) / max(float(np.ptp(field)), 1e-6)
    raise ValueError(f"unknown background {kind!r}")


def background(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Background image (size, size, 3) float32: a pattern between two greyish tones of low contrast."""
    grey = rng.uniform(80.0, 190.0)
    first = grey + rng.normal(0.0, 6.0, 3)
    second = first + rng.choice([-1.0, 1.0]) * rng.uniform(14.0, 36.0) + rng.normal(0.0, 4.0, 3)
    weights = _pattern(kind, size, rng)[:, :, None]
    return (first + (second - first) * weights).astype(np.float32)
