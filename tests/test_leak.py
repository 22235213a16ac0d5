"""The leak test (spatiallock.evaluation.leak): a part that copies the layout it is told scores the shuffled
layouts as high as the real ones; a part that sees only pixels scores them near zero."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from spatiallock.evaluation.detector import Detector, DetectorConfig
from spatiallock.evaluation.leak import LEAK_LIMIT, derangement, detector_part, leak_score
from spatiallock.layout import Layout

LABELS = ["red square", "green square", "blue square", "yellow square"]
COLOURS = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (230, 220, 30)]
CATEGORIES = [{"id": i + 1, "name": name} for i, name in enumerate(LABELS)]
SIZE = 64
CELLS = [(0.05, 0.05, 0.45, 0.45), (0.55, 0.05, 0.95, 0.45), (0.05, 0.55, 0.45, 0.95), (0.55, 0.55, 0.95, 0.95)]


def scenes(n: int = 12, seed: int = 0) -> tuple[list[Image.Image], list[Layout]]:
    """Images with one to three coloured squares in distinct cells, jittered, and the layouts they were drawn from."""
    rng = random.Random(seed)
    images, layouts = [], []
    for _ in range(n):
        k = rng.randint(1, 3)
        cells, labels = rng.sample(range(4), k), rng.sample(range(4), k)
        boxes = []
        for cell in cells:
            x0, y0, x1, y1 = CELLS[cell]
            dx, dy, shrink = rng.uniform(-0.04, 0.04), rng.uniform(-0.04, 0.04), rng.uniform(0.0, 0.12)
            boxes.append((x0 + dx + shrink, y0 + dy, x1 + dx, y1 + dy - shrink))
        pixels = np.full((SIZE, SIZE, 3), 128, dtype=np.uint8)
        snapped = []
        for label, (x0, y0, x1, y1) in zip(labels, boxes):
            a, b, c, d = (round(v * SIZE) for v in (x0, y0, x1, y1))
            pixels[b:d, a:c] = COLOURS[label]
            snapped.append((a / SIZE, b / SIZE, c / SIZE, d / SIZE))
        images.append(Image.fromarray(pixels))
        layouts.append(Layout("squares", tuple(LABELS[i] for i in labels), tuple(snapped)))
    return images, layouts


def copies_the_layout(images, layouts) -> list[dict]:
    """A part that reports whatever layout it is told (what a head on grounded features can learn to do)."""
    return [
        {"boxes": torch.tensor(layout.boxes), "scores": torch.ones(len(layout.boxes)),
         "labels": torch.tensor([LABELS.index(label) + 1 for label in layout.labels])}
        for layout in layouts
    ]  # fmt: skip


def sees_pixels(images, layouts) -> list[dict]:
    """A part that finds each colour's square in the pixels and ignores the layout."""
    found = []
    for image in images:
        pixels = np.asarray(image)
        boxes, labels = [], []
        for n, colour in enumerate(COLOURS):
            ys, xs = np.nonzero((pixels == colour).all(axis=-1))
            if len(xs):
                boxes.append([xs.min() / SIZE, ys.min() / SIZE, (xs.max() + 1) / SIZE, (ys.max() + 1) / SIZE])
                labels.append(n + 1)
        found.append({"boxes": torch.tensor(boxes).reshape(-1, 4), "scores": torch.ones(len(boxes)),
                      "labels": torch.tensor(labels, dtype=torch.long)})  # fmt: skip
    return found


def test_a_part_that_copies_the_layout_leaks_and_one_that_sees_pixels_does_not():
    images, layouts = scenes()
    copy = leak_score(copies_the_layout, images, layouts, CATEGORIES, "copy", used_by_default=False)
    seen = leak_score(sees_pixels, images, layouts, CATEGORIES, "pixels", used_by_default=True)
    assert copy.ap_requested > 0.99 and copy.ap_shuffled > 0.99 and copy.leaks
    assert seen.ap_requested > 0.99 and seen.ap_shuffled <= LEAK_LIMIT and not seen.leaks
    assert seen.as_dict() == {"component": "pixels", "ap_requested": round(seen.ap_requested, 4),
                              "ap_shuffled": round(seen.ap_shuffled, 4), "used_by_default": True}  # fmt: skip


def test_the_shuffle_moves_every_layout():
    for n in (2, 3, 10, 50):
        for seed in range(5):
            order = derangement(n, seed)
            assert sorted(order) == list(range(n)) and all(order[i] != i for i in range(n))
    assert derangement(10, 1) == derangement(10, 1) and derangement(10, 1) != derangement(10, 2)
    with pytest.raises(ValueError, match="at least 2 images"):
        derangement(1)


def test_a_detector_is_never_told_the_layout():
    torch.manual_seed(0)
    config = DetectorConfig(categories=CATEGORIES, image_size=32)
    part = detector_part(Detector(config).eval(), score_threshold=0.0)
    images, layouts = scenes(4)
    first, second = part(images, layouts), part(images, layouts[::-1])
    assert sum(len(found["boxes"]) for found in first) > 0  # something to compare
    for a, b in zip(first, second):
        assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"])
