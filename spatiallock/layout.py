"""Layouts: a caption plus objects (label, normalised xyxy box), read from JSON or COCO files and checked.

The layout file of the command line is `{"caption": str, "objects": [{"label": str, "box": [x0, y0, x1, y1]}]}`
or a list of such objects; a COCO instances file is accepted wherever a list is. Every check names the field
that failed (`layouts[3].objects[1].box`), so a user can find it in a file of thousands.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from spatiallock.errors import SpatialLockError
from spatiallock.models.grounding import MAX_OBJECTS


@dataclass(frozen=True)
class Layout:
    """One request: a caption and its objects. Boxes are (x0, y0, x1, y1) in [0, 1], x0 < x1, y0 < y1."""

    caption: str
    labels: tuple[str, ...] = ()
    boxes: tuple[tuple[float, float, float, float], ...] = ()
    image_id: int | None = None  # set when read from a COCO file
    meta: dict = field(default_factory=dict, compare=False)

    def __len__(self) -> int:
        return len(self.labels)

    def to_json(self) -> dict:
        objects = [{"label": label, "box": list(box)} for label, box in zip(self.labels, self.boxes)]
        return {"caption": self.caption, "objects": objects}


def check_box(box: object, where: str) -> tuple[float, float, float, float]:
    """A normalised xyxy box, or `SpatialLockError` naming `where` and what is wrong."""
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        raise SpatialLockError(f"{where}: expected [x0, y0, x1, y1], got {json.dumps(box)}")
    for value in box:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpatialLockError(f"{where}: {json.dumps(value)} is not a number")
        if not math.isfinite(value):
            raise SpatialLockError(f"{where}: {value} is not a finite number")
    x0, y0, x1, y1 = (float(v) for v in box)
    if min(x0, y0, x1, y1) < 0 or max(x0, y0, x1, y1) > 1:
        raise SpatialLockError(f"{where}: {list(box)} lies outside [0, 1] (boxes are normalised)")
    if x1 <= x0 or y1 <= y0:
        what = "has zero area" if x1 == x0 or y1 == y0 else "is inverted (x0 < x1 and y0 < y1 needed)"
        raise SpatialLockError(f"{where}: {list(box)} {what}")
    return x0, y0, x1, y1


def check_label(label: object, where: str) -> str:
    if not isinstance(label, str):
        raise SpatialLockError(f"{where}: expected a string, got {json.dumps(label)}")
    if not label.strip():
        raise SpatialLockError(f"{where}: empty label")
    return " ".join(label.split())


def parse_layout(data: object, where: str = "layout", max_objects: int = MAX_OBJECTS) -> Layout:
    """One layout from its JSON value; `SpatialLockError` naming the field on any problem."""
    if not isinstance(data, dict):
        raise SpatialLockError(f"{where}: expected an object with 'caption' and 'objects', got a {_kind(data)}")
    if "caption" not in data:
        raise SpatialLockError(f"{where}.caption: missing")
    caption = data["caption"]
    if not isinstance(caption, str):
        raise SpatialLockError(f"{where}.caption: expected a string, got {json.dumps(caption)}")
    objects = data.get("objects", [])
    if not isinstance(objects, list):
        raise SpatialLockError(f"{where}.objects: expected a list, got a {_kind(objects)}")
    if len(objects) > max_objects:
        raise SpatialLockError(f"{where}.objects: {len(objects)} objects, at most {max_objects} are supported")
    labels, boxes = [], []
    for i, obj in enumerate(objects):
        here = f"{where}.objects[{i}]"
        if not isinstance(obj, dict):
            raise SpatialLockError(f"{here}: expected an object with 'label' and 'box', got a {_kind(obj)}")
        for key in ("label", "box"):
            if key not in obj:
                raise SpatialLockError(f"{here}.{key}: missing")
        labels.append(check_label(obj["label"], f"{here}.label"))
        boxes.append(check_box(obj["box"], f"{here}.box"))
    return Layout(" ".join(caption.split()), tuple(labels), tuple(boxes))


def parse_layouts(data: object, where: str = "layouts", max_objects: int = MAX_OBJECTS) -> list[Layout]:
    """A layout or a list of layouts from JSON values (a single layout gives a list of one)."""
    if isinstance(data, dict):
        return [parse_layout(data, where.rstrip("s") if where.endswith("s") else where, max_objects)]
    if not isinstance(data, list):
        raise SpatialLockError(f"{where}: expected a layout object or a list of them, got a {_kind(data)}")
    if not data:
        raise SpatialLockError(f"{where}: the list is empty")
    return [parse_layout(item, f"{where}[{i}]", max_objects) for i, item in enumerate(data)]


def is_coco_instances(data: object) -> bool:
    keys = ("images", "annotations", "categories")
    return isinstance(data, dict) and all(isinstance(data.get(k), list) for k in keys)


def layouts_from_coco(
    instances: dict, captions: dict | None = None, name: str = "instances", max_objects: int = MAX_OBJECTS
) -> list[Layout]:
    """One layout per image of a COCO instances file (images without objects are skipped).

    Boxes are normalised by the image size; labels are category names; the caption is the image's first
    caption from `captions` when given, else the labels joined ("a red circle, a blue square").
    """
    categories = {}
    for i, cat in enumerate(instances["categories"]):
        if not isinstance(cat, dict) or "id" not in cat or not isinstance(cat.get("name"), str):
            raise SpatialLockError(f"{name}: categories[{i}]: needs 'id' and 'name'")
        categories[cat["id"]] = cat["name"]
    texts: dict[int, str] = {}
    for ann in (captions or {}).get("annotations", []):
        if isinstance(ann, dict) and isinstance(ann.get("caption"), str):
            texts.setdefault(ann.get("image_id"), " ".join(ann["caption"].split()))
    per_image: dict[int, list[tuple[int, dict]]] = {}
    for i, ann in enumerate(instances["annotations"]):
        if not isinstance(ann, dict):
            raise SpatialLockError(f"{name}: annotations[{i}]: expected an object")
        per_image.setdefault(ann.get("image_id"), []).append((i, ann))
    layouts, trimmed = [], 0
    for k, image in enumerate(instances["images"]):
        if not isinstance(image, dict) or not {"id", "width", "height"} <= image.keys():
            raise SpatialLockError(f"{name}: images[{k}]: needs 'id', 'width' and 'height'")
        width, height = image["width"], image["height"]
        labels, boxes = [], []
        for i, ann in per_image.get(image["id"], []):
            if ann.get("iscrowd", 0):
                continue
            where = f"{name}: annotations[{i}]"
            if ann.get("category_id") not in categories:
                raise SpatialLockError(f"{where}.category_id: {ann.get('category_id')!r} is not a category")
            bbox = ann.get("bbox")
            if not isinstance(bbox, list) or len(bbox) != 4 or not all(isinstance(v, (int, float)) for v in bbox):
                raise SpatialLockError(f"{where}.bbox: expected [x, y, w, h], got {json.dumps(bbox)}")
            x, y, w, h = bbox
            box = [x / width, y / height, (x + w) / width, (y + h) / height]
            boxes.append(check_box([min(max(v, 0.0), 1.0) for v in box], f"{where}.bbox"))
            labels.append(categories[ann["category_id"]])
        if not labels:
            continue
        if len(labels) > max_objects:  # as the training data set does: keep the largest, and say so
            areas = [(b[2] - b[0]) * (b[3] - b[1]) for b in boxes]
            keep = sorted(sorted(range(len(boxes)), key=lambda j: -areas[j])[:max_objects])
            labels, boxes = [labels[j] for j in keep], [boxes[j] for j in keep]
            trimmed += 1
        caption = texts.get(image["id"]) or ", ".join(f"a {label}" for label in labels)
        meta = {"file_name": image.get("file_name"), "width": width, "height": height}
        layouts.append(Layout(caption, tuple(labels), tuple(boxes), image_id=image["id"], meta=meta))
    if not layouts:
        raise SpatialLockError(f"{name}: no image with objects")
    if trimmed:
        warnings.warn(
            f"{name}: {trimmed} images have more than {max_objects} objects; their {max_objects} largest are used",
            stacklevel=2,
        )
    return layouts


def read_layouts(path: str | Path, max_objects: int = MAX_OBJECTS) -> list[Layout]:
    """Layouts from a layout JSON file (one or a list) or a COCO instances file.

    For a COCO file `instances_<split>.json`, captions come from `captions_<split>.json` beside it when present.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpatialLockError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise SpatialLockError(f"{path}: is a folder, expected a layout JSON file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SpatialLockError(f"{path}: malformed JSON: {err}") from None
    if is_coco_instances(data):
        captions = None
        sibling = path.with_name(path.name.replace("instances", "captions", 1))
        if "instances" in path.name and sibling.is_file():
            try:
                captions = json.loads(sibling.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise SpatialLockError(f"{sibling}: malformed JSON: {err}") from None
        return layouts_from_coco(data, captions, path.name, max_objects)
    try:
        return parse_layouts(data, "layouts", max_objects)
    except SpatialLockError as err:
        raise SpatialLockError(f"{path}: {err}") from None


def pad_layouts(layouts: Sequence[Layout], slots: int | None = None) -> tuple[list[list[str]], list[list[list]]]:
    """Per-layout phrases and boxes padded to a common number of slots ("" and zero boxes)."""
    slots = slots or max((len(layout) for layout in layouts), default=0)
    phrases = [list(layout.labels) + [""] * (slots - len(layout)) for layout in layouts]
    boxes = [[list(b) for b in layout.boxes] + [[0.0] * 4] * (slots - len(layout)) for layout in layouts]
    return phrases, boxes


def as_layouts(
    prompt: str | Sequence[str],
    phrases: Sequence[str] | Sequence[Sequence[str]] | None,
    boxes: Iterable | None,
) -> list[Layout]:
    """Pipeline arguments (one or a batch of prompts, phrases and boxes) -> checked layouts."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    phrases = [] if phrases is None else list(phrases)
    boxes = [] if boxes is None else [list(b) for b in boxes]
    single = not phrases or isinstance(phrases[0], str)
    if single:
        phrases, boxes = [phrases] * len(prompts), [boxes] * len(prompts)
    if len(phrases) != len(prompts) or len(boxes) != len(prompts):
        raise SpatialLockError(
            f"phrases/boxes: {len(phrases)} phrase lists and {len(boxes)} box lists for {len(prompts)} prompts"
        )
    layouts = []
    for i, (caption, labels, bxs) in enumerate(zip(prompts, phrases, boxes)):
        if len(labels) != len(bxs):
            raise SpatialLockError(f"layouts[{i}]: {len(labels)} phrases but {len(bxs)} boxes")
        objects = [{"label": label, "box": list(box)} for label, box in zip(labels, bxs)]
        layouts.append(parse_layout({"caption": caption, "objects": objects}, f"layouts[{i}]"))
    return layouts


def _kind(value: object) -> str:
    return {dict: "JSON object", list: "JSON list", str: "string", type(None): "null"}.get(
        type(value), type(value).__name__
    )
