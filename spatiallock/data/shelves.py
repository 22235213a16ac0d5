"""The shelves scene: a domain where where an object goes has rules, and a checker that is their ground truth.

Uniformly scattered shapes have no plausible or implausible place. Here every object stands on a shelf: two or
three boards across the image (the lowest is the floor), objects resting on them. The rules, all in image
fractions (boxes are normalised xyxy, y down):

- **support**: the box's bottom lies on a board's top surface (within `CONTACT`) and its horizontal extent lies
  on that board (no overhang beyond `CONTACT`);
- **size**: its height is `HEIGHT_SHARE` (35 % to 85 %) of the clearance above that board (up to the underside
  of the board above it, or to the top of the image): objects fit their shelf, none touches the board above;
- **proportions**: its width over height suits the shape named by the label's last word (`ASPECT`);
- **no heavy overlap**: it covers no other object by more than `MAX_OVERLAP` of the smaller box's area;
- **inside**: it lies inside the image.

`plausible(scene, box, label)` says whether a box keeps all of them; `violations` names the ones it breaks. The
scenes are drawn with the same checker, so every object in the data set is plausible where it stands. For each
image the data set also has a copy with one object removed and, for that object's label, positive boxes (places
it could go back, its own among them) and negative boxes (each breaks at least one rule): what a location model
learns from and what Direct Preference Optimization pairs.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from spatiallock.data.captions import CaptionObject, make_captions
from spatiallock.data.shapes import (
    BACKGROUNDS,
    COLOURS,
    SHAPES,
    background,
    category_id,
    object_colour,
    rasterise,
    shaded_fill,
    unit_outline,
)

Box = tuple[float, float, float, float]

CONTACT = 0.025  # how far a box's bottom may sit from a board's top, and overhang its ends (image fraction)
HEIGHT_SHARE = (0.35, 0.85)  # an object's height as a share of its shelf's clearance
MAX_OVERLAP = 0.1  # the largest intersection with another object, as a share of the smaller box's area
ASPECT: dict[str, tuple[float, float]] = {  # width / height of a box, per shape
    "circle": (0.85, 1.18),
    "square": (0.85, 1.18),
    "triangle": (0.85, 1.35),
    "diamond": (0.55, 0.85),
}
RULES = ("inside", "support", "size", "proportions", "overlap")
BOARD = np.array([118.0, 84.0, 52.0], dtype=np.float32)  # the boards' wood tone


@dataclass(frozen=True)
class Shelf:
    """One board: its top surface at height `y`, from `x0` to `x1`, `thickness` deep (image fractions)."""

    x0: float
    x1: float
    y: float
    thickness: float

    def as_list(self) -> list[float]:
        return [round(self.x0, 4), round(self.x1, 4), round(self.y, 4), round(self.thickness, 4)]


@dataclass(frozen=True)
class ShelfScene:
    """What the checker needs of an image: its boards and the objects already in it (label, normalised box)."""

    shelves: tuple[Shelf, ...]
    objects: tuple[tuple[str, Box], ...] = ()

    def clearance(self, shelf: Shelf) -> float:
        """Free height above `shelf`: up to the underside of the nearest board above that spans over it."""
        above = [
            s.y + s.thickness
            for s in self.shelves
            if s.y + s.thickness <= shelf.y and s.x0 < shelf.x1 and shelf.x0 < s.x1
        ]
        return shelf.y - max(above, default=0.0)

    def without(self, index: int) -> ShelfScene:
        """The same scene with object `index` taken out."""
        return ShelfScene(self.shelves, self.objects[:index] + self.objects[index + 1 :])


def shape_of(label: str) -> str:
    """The shape a label names by its last word ("red circle" -> "circle"); ValueError for any other label."""
    shape = label.strip().split()[-1] if label.strip() else ""
    if shape not in ASPECT:
        raise ValueError(f"label {label!r}: its last word must be one of {', '.join(ASPECT)}")
    return shape


def support_of(scene: ShelfScene, box: Box) -> Shelf | None:
    """The board a box stands on, or None."""
    x0, _, x1, y1 = box
    for shelf in scene.shelves:
        if abs(y1 - shelf.y) <= CONTACT and shelf.x0 - CONTACT <= x0 and x1 <= shelf.x1 + CONTACT:
            return shelf
    return None


def _intersection(a: Box, b: Box) -> float:
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def violations(scene: ShelfScene, box: Sequence[float], label: str) -> list[str]:
    """The rules (`RULES`) a box for an object labelled `label` breaks in `scene`; empty when it is plausible."""
    shape = shape_of(label)
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
        return ["inside"]
    broken = []
    shelf = support_of(scene, (x0, y0, x1, y1))
    if shelf is None:
        broken.append("support")
    else:
        low, high = HEIGHT_SHARE
        clearance = scene.clearance(shelf)
        if not low * clearance <= y1 - y0 <= high * clearance:
            broken.append("size")
    low, high = ASPECT[shape]
    if not low <= (x1 - x0) / (y1 - y0) <= high:
        broken.append("proportions")
    area = (x1 - x0) * (y1 - y0)
    for _, other in scene.objects:
        smaller = min(area, (other[2] - other[0]) * (other[3] - other[1]))
        if _intersection((x0, y0, x1, y1), other) > MAX_OVERLAP * smaller:
            broken.append("overlap")
            break
    return broken


def plausible(scene: ShelfScene, box: Sequence[float], label: str) -> bool:
    """Whether an object labelled `label` may stand in `box` (normalised xyxy) in `scene`: the ground truth."""
    return not violations(scene, box, label)


def scene_from_coco(image: dict, annotations: Sequence[dict], names: dict[int, str]) -> ShelfScene:
    """The checker's view of one image of a shelves data set: `image["shelves"]` and its annotations (COCO
    pixel xywh boxes, category ids named by `names`)."""
    if "shelves" not in image:
        raise ValueError(f"image {image.get('id')}: no `shelves` entry (not a shelves data set)")
    w, h = float(image["width"]), float(image["height"])
    objects = tuple(
        (names[a["category_id"]], (a["bbox"][0] / w, a["bbox"][1] / h, (a["bbox"][0] + a["bbox"][2]) / w,
                                   (a["bbox"][1] + a["bbox"][3]) / h))
        for a in annotations
    )  # fmt: skip
    return ShelfScene(tuple(Shelf(*values) for values in image["shelves"]), objects)


# ---------------------------------------------------------------------------------------------------- drawing


def draw_shelves(rng: np.random.Generator) -> tuple[Shelf, ...]:
    """Two or three boards, the lowest the floor across the whole image, the others across most of it."""
    count = int(rng.integers(2, 4))
    floor = rng.uniform(0.88, 0.95)
    gap = (floor - 0.04) / count
    shelves = [Shelf(0.0, 1.0, floor, rng.uniform(0.03, 0.05))]
    for k in range(1, count):
        y = floor - k * gap + rng.uniform(-0.03, 0.03)
        x0 = rng.uniform(0.0, 0.3) if rng.random() < 0.5 else 0.0
        x1 = rng.uniform(0.7, 1.0) if rng.random() < 0.5 else 1.0
        shelves.append(Shelf(x0, x1, y, rng.uniform(0.03, 0.045)))
    return tuple(shelves)


def sample_box(rng: np.random.Generator, scene: ShelfScene, label: str, margin: float = 0.1) -> Box:
    """A box for `label` standing on a random board, sized and proportioned inside the rules (with `margin` of
    each range kept clear of its ends). It may still overlap an object: check it."""
    shelf = scene.shelves[int(rng.integers(len(scene.shelves)))]
    low, high = HEIGHT_SHARE
    span = high - low
    height = rng.uniform(low + margin * span, high - margin * span) * scene.clearance(shelf)
    low, high = ASPECT[shape_of(label)]
    span = high - low
    width = min(height * rng.uniform(low + margin * span, high - margin * span), shelf.x1 - shelf.x0)
    x0 = rng.uniform(shelf.x0, shelf.x1 - width)
    return (x0, shelf.y - height, x0 + width, shelf.y)


def _outline_in(shape: str, box: Box, size: int, rng: np.random.Generator) -> np.ndarray:
    """The shape's outline (k, 2) in pixels, stretched to fill `box` exactly."""
    outline = unit_outline(shape, rng)
    low, high = outline.min(axis=0), outline.max(axis=0)
    unit = (outline - low) / (high - low)
    x0, y0, x1, y1 = box
    return (unit * [x1 - x0, y1 - y0] + [x0, y0]) * size


@dataclass
class ShelfPlan:
    """Everything of one image decided before painting, so it can be painted with or without an object."""

    size: int
    kind: str
    canvas: np.ndarray
    noise: np.ndarray
    scene: ShelfScene
    paint: list[tuple[str, str, np.ndarray, np.ndarray, int]]  # colour, shape, polygon (pixels), rgb, shading seed

    def render(self, skip: int | None = None) -> np.ndarray:
        canvas = self.canvas.copy()
        for index, (_, _, polygon, rgb, shading) in enumerate(self.paint):
            if index == skip:
                continue
            coverage, region = rasterise(polygon, self.size)
            fill = shaded_fill(rgb, region, np.random.default_rng(shading))
            alpha = coverage[:, :, None]
            canvas[region] = canvas[region] * (1.0 - alpha) + fill * alpha
        return np.clip(np.rint(canvas + self.noise), 0, 255).astype(np.uint8)


def plan_scene(rng: np.random.Generator, size: int, min_objects: int, max_objects: int, tries: int = 30) -> ShelfPlan:
    """Decide one shelves scene: background, boards, and objects placed where the checker allows."""
    kind = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    canvas = background(kind, size, rng)
    shelves = draw_shelves(rng)
    tone = BOARD * rng.uniform(0.8, 1.15)
    for shelf in shelves:
        rows = slice(round(shelf.y * size), max(round(shelf.y * size) + 1, round((shelf.y + shelf.thickness) * size)))
        columns = slice(round(shelf.x0 * size), round(shelf.x1 * size))
        canvas[rows, columns] = tone + rng.normal(0.0, 4.0, 3)
    scene = ShelfScene(shelves)
    paint = []
    for _ in range(int(rng.integers(min_objects, max_objects + 1))):
        colour, shape = list(COLOURS)[int(rng.integers(len(COLOURS)))], SHAPES[int(rng.integers(len(SHAPES)))]
        label = f"{colour} {shape}"
        for _ in range(tries):
            box = sample_box(rng, scene, label)
            if plausible(scene, box, label):
                break
        else:
            continue  # no room for this one: the scene keeps fewer
        polygon = _outline_in(shape, box, size, rng)
        scene = ShelfScene(shelves, (*scene.objects, (label, box)))
        paint.append((colour, shape, polygon, object_colour(colour, rng), int(rng.integers(2**31))))
    noise = rng.normal(0.0, 2.0, canvas.shape).astype(np.float32)
    return ShelfPlan(size, kind, canvas, noise, scene, paint)


def placement_boxes(
    rng: np.random.Generator, scene: ShelfScene, label: str, own: Box, count: int = 8
) -> tuple[list[Box], list[Box]]:
    """Positive boxes for `label` in `scene` (`own`, the removed object's box, first, then others the checker
    accepts) and as many negatives, each breaking a rule: lifted off its board, too tall for its shelf, the
    wrong proportions, on top of another object, or anywhere at all."""
    positives = [own]
    for _ in range(count * 20):
        if len(positives) >= count:
            break
        box = sample_box(rng, scene, label, margin=0.03)  # clear of the ranges' ends, so rounding keeps it
        if plausible(scene, box, label):
            positives.append(box)
    negatives: list[Box] = []
    for attempt in range(count * 20):
        if len(negatives) >= count:
            break
        x0, y0, x1, y1 = positives[attempt % len(positives)]
        kind = attempt % 5
        if kind == 0:  # floating: lifted off the board
            lift = rng.uniform(0.06, 0.25)
            box = (x0, y0 - lift, x1, y1 - lift)
        elif kind == 1:  # too tall for the shelf, proportions kept
            grow = rng.uniform(1.3, 2.2)
            width, height = (x1 - x0) * grow, (y1 - y0) * grow
            box = (x0, y1 - height, x0 + width, y1)
        elif kind == 2:  # wrong proportions
            stretch = rng.choice([0.45, 1.8]) * rng.uniform(0.9, 1.1)
            box = (x0, y0, x0 + (x1 - x0) * stretch, y1)
        elif kind == 3 and scene.objects:  # on top of another object
            _, other = scene.objects[int(rng.integers(len(scene.objects)))]
            cx, cy = (other[0] + other[2]) / 2, (other[1] + other[3]) / 2
            box = (cx - (x1 - x0) / 2, cy - (y1 - y0) / 2, cx + (x1 - x0) / 2, cy + (y1 - y0) / 2)
        else:  # anywhere
            w, h = rng.uniform(0.08, 0.4, 2)
            left, top = rng.uniform(0.0, 1.0 - w), rng.uniform(0.0, 1.0 - h)
            box = (left, top, left + w, top + h)
        box = tuple(min(max(v, 0.0), 1.0) for v in box)
        if box[2] > box[0] and box[3] > box[1] and not plausible(scene, box, label):
            negatives.append(box)
    return positives, negatives


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _rounded(box: Sequence[float]) -> list[float]:
    return [round(float(v), 4) for v in box]


def render_shelf_record(
    rng: np.random.Generator, image_id: int, size: int, min_objects: int, max_objects: int, captions: int,
    removed_name: str,
) -> tuple[dict[str, bytes], dict]:  # fmt: skip
    """The files (full image, and the copy with one object removed, under `removed_name`) and COCO entries of
    one shelves image: image (with its `shelves`), annotations without ids, captions, and its `placement`."""
    plan = plan_scene(rng, size, min_objects, max_objects)
    file_name = f"{image_id:012d}.png"
    files = {file_name: _png(plan.render())}
    annotations = []
    for (colour, shape, polygon, *_), (_, box) in zip(plan.paint, plan.scene.objects):
        x0, y0, x1, y1 = (round(min(max(v * size, 0.0), size), 2) for v in box)
        xs, ys = polygon[:, 0], polygon[:, 1]
        annotations.append({
            "image_id": image_id, "category_id": category_id(colour, shape),
            "bbox": [x0, y0, round(x1 - x0, 2), round(y1 - y0, 2)],
            "area": round(0.5 * abs(float(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1)))), 2),
            "iscrowd": 0, "segmentation": [[round(float(v), 2) for v in polygon.reshape(-1)]],
        })  # fmt: skip
    caption_objects = [CaptionObject(c, s, tuple(v * size for v in box)) for (c, s, *_), (_, box) in
                       zip(plan.paint, plan.scene.objects)]  # fmt: skip
    texts = make_captions(caption_objects, plan.kind, size, rng, captions)
    image = {
        "id": image_id, "file_name": file_name, "height": size, "width": size, "license": 1,
        "shelves": [shelf.as_list() for shelf in plan.scene.shelves],
    }  # fmt: skip
    placement = None
    if plan.paint:
        index = int(rng.integers(len(plan.paint)))
        label, own = plan.scene.objects[index]
        positives, negatives = placement_boxes(rng, plan.scene.without(index), label, own)
        files[removed_name] = _png(plan.render(skip=index))
        colour, shape = plan.paint[index][:2]
        placement = {
            "image_id": image_id, "file_name": removed_name, "label": label,
            "category_id": category_id(colour, shape), "removed": index, "removed_box": _rounded(own),
            "positives": [_rounded(b) for b in positives], "negatives": [_rounded(b) for b in negatives],
        }  # fmt: skip
    return files, {"image": image, "annotations": annotations, "captions": texts, "placement": placement}


def rules_info() -> dict:
    """The rules' constants, recorded in every placements file."""
    return {
        "contact": CONTACT, "height_share": list(HEIGHT_SHARE), "max_overlap": MAX_OVERLAP,
        "aspect": {k: list(v) for k, v in ASPECT.items()}, "rules": list(RULES),
    }  # fmt: skip
