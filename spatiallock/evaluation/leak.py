"""The leak test: does a perception part see the image, or the layout it is told?

A part scores images against layouts: `part(images, layouts)` gives one detection dict per image ("boxes" (n, 4)
normalised xyxy, "scores" (n,), "labels" (n,) category ids), as `Detector.detect` does. Its leak score, on the same
images:

    ap_requested   COCO AP against the layouts the images were made from, each told to the part
    ap_shuffled    COCO AP against a shuffled layout (another image's), told to the part in its place

A part that sees only pixels finds the objects that are in the image, so it scores the shuffled layouts near zero.
A part that reports the layout it is told (the PoG head on features of a U-Net grounded by that layout) scores them
as well as the real ones: it cannot tell a training signal or a selection anything about the image. LayoutBench's
"shuffled ground truth" row is the same test for evaluators.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from PIL import Image

from spatiallock.evaluation.detector import coco_ap, to_coco_results
from spatiallock.layout import Layout

Part = Callable[[Sequence[Image.Image], Sequence[Layout]], list[dict]]
LEAK_LIMIT = 0.05  # the most ap_shuffled a part used by default may score


@dataclass(frozen=True)
class LeakScore:
    component: str
    ap_requested: float
    ap_shuffled: float
    used_by_default: bool

    @property
    def leaks(self) -> bool:
        return self.ap_shuffled > LEAK_LIMIT

    def as_dict(self) -> dict:
        return {**asdict(self), "ap_requested": round(self.ap_requested, 4), "ap_shuffled": round(self.ap_shuffled, 4)}


def derangement(n: int, seed: int = 0) -> list[int]:
    """A random permutation of range(n) that moves every index (Sattolo's algorithm: one cycle through all)."""
    if n < 2:
        raise ValueError(f"a shuffled layout needs at least 2 images, got {n}")
    order = list(range(n))
    rng = random.Random(seed)
    for i in range(n - 1, 0, -1):
        j = rng.randrange(i)  # j < i: nothing stays in place
        order[i], order[j] = order[j], order[i]
    return order


def layout_ap(
    detections: Sequence[dict], layouts: Sequence[Layout], sizes: Sequence[tuple[int, int]], categories: list[dict]
) -> float:
    """COCO AP (IoU 0.5:0.95) of `detections` against `layouts` as ground truth, one per image of `sizes`."""
    ids = {c["name"]: c["id"] for c in categories}
    instances: dict = {"images": [], "annotations": [], "categories": categories}
    for n, (layout, (width, height)) in enumerate(zip(layouts, sizes, strict=True)):
        instances["images"].append({"id": n + 1, "width": width, "height": height})
        for label, (x0, y0, x1, y1) in zip(layout.labels, layout.boxes):
            bbox = [x0 * width, y0 * height, (x1 - x0) * width, (y1 - y0) * height]
            instances["annotations"].append({"image_id": n + 1, "category_id": ids[label], "bbox": bbox})
    results = to_coco_results(list(detections), list(range(1, len(sizes) + 1)), sizes)
    return coco_ap(instances, results)["ap"]


def leak_score(
    part: Part,
    images: Sequence[Image.Image],
    layouts: Sequence[Layout],
    categories: list[dict],
    component: str,
    used_by_default: bool,
    seed: int = 0,
) -> LeakScore:
    """`part`'s AP on `images` against their own `layouts` and against a derangement of them (see the module)."""
    if len(images) != len(layouts):
        raise ValueError(f"{len(images)} images for {len(layouts)} layouts")
    sizes = [image.size for image in images]
    shuffled = [layouts[i] for i in derangement(len(layouts), seed)]
    requested = layout_ap(part(images, layouts), layouts, sizes, categories)
    other = layout_ap(part(images, shuffled), shuffled, sizes, categories)
    return LeakScore(component, requested, other, used_by_default)


def detector_part(detector, score_threshold: float | None = None) -> Part:
    """A `Detector` as a part: it is never told the layout."""

    def part(images: Sequence[Image.Image], layouts: Sequence[Layout]) -> list[dict]:
        return detector.detect(list(images), score_threshold=score_threshold)

    return part
