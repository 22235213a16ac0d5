"""Layouts: a caption plus objects (label, normalised xyxy box), read from JSON or COCO files and checked.

The layout file of the command line is `{"caption": str, "objects": [{"label": str, "box": [x0, y0, x1, y1]}]}`
or a list of such objects; a COCO instances file is accepted wherever a list is. Every check names the field
that failed (`layouts[3].objects[1].box`), so a user can find it in a file of thousands.
"""

from __future__ import annotations

import difflib
import json
import math
import unicodedata
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from spatiallock.errors import SpatialLockError
from spatiallock.files import read_json

MAX_OBJECTS = 30  # objects in one layout (the grounding tokens of one image)


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


def finite_number(value: object, where: str) -> float:
    """A finite number as a float, or `SpatialLockError` naming `where`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpatialLockError(f"{where}: {excerpt(value)} is not a number")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise SpatialLockError(
            f"{where}: {excerpt(value) if isinstance(value, int) else value} is not a finite number"
        )
    return number


def check_box(box: object, where: str) -> tuple[float, float, float, float]:
    """A normalised xyxy box, or `SpatialLockError` naming `where` and what is wrong."""
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        raise SpatialLockError(f"{where}: expected [x0, y0, x1, y1], got {excerpt(box)}")
    numbers = [finite_number(value, where) for value in box]
    x0, y0, x1, y1 = numbers
    if min(x0, y0, x1, y1) < 0 or max(x0, y0, x1, y1) > 1:
        raise SpatialLockError(f"{where}: {excerpt(list(box))} lies outside [0, 1] (boxes are normalised)")
    if x1 <= x0 or y1 <= y0:
        what = "has zero area" if x1 == x0 or y1 == y0 else "is inverted (x0 < x1 and y0 < y1 needed)"
        raise SpatialLockError(f"{where}: {excerpt(list(box))} {what}")
    return x0, y0, x1, y1


# characters that show nothing alone: a label made only of them names nothing (control, format, private and
# unassigned characters, separators, lone combining marks, and the blank letters Unicode classes as letters)
_BLANK_LETTERS = frozenset("\u115f\u1160\u3164\uffa0\u2800")


def _visible(char: str) -> bool:
    return not (char.isspace() or char in _BLANK_LETTERS or unicodedata.category(char)[0] in "CZM")


def check_text(text: str, where: str) -> str:
    """`text`, or `SpatialLockError` when it is no valid Unicode (a lone surrogate such as "\\ud800", which JSON
    allows and no tokenizer takes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise SpatialLockError(f"{where}: not valid Unicode ({ascii(err.object[err.start : err.end])})") from None
    return text


def check_label(label: object, where: str) -> str:
    """A label with its white space collapsed, or `SpatialLockError` when it is not a string or shows nothing."""
    if not isinstance(label, str):
        raise SpatialLockError(f"{where}: expected a string, got {excerpt(label)}")
    check_text(label, where)
    if not label.strip():
        raise SpatialLockError(f"{where}: empty label")
    if not any(_visible(char) for char in label):
        raise SpatialLockError(f"{where}: empty label (only invisible characters: {ascii(label)[:60]})")
    return " ".join(label.split())


LAYOUT_KEYS = ("caption", "objects")
OBJECT_KEYS = ("label", "box")


def _note_unknown(data: dict, known: Sequence[str], where: str, unknown: dict[str, list[str]] | None) -> None:
    """Record `data`'s keys outside `known` (key -> where it was found), to be reported once per file."""
    if unknown is None:
        return
    for key in data:
        if key not in known:
            unknown.setdefault(str(key), []).append(where)


def warn_unknown_keys(unknown: dict[str, list[str]], name: str) -> None:
    """One warning for every unknown key (a misspelled "object" would otherwise silently drop every box)."""
    for key, places in unknown.items():
        near = difflib.get_close_matches(key, LAYOUT_KEYS + OBJECT_KEYS, n=1, cutoff=0.6)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        more = f" and {len(places) - 1} more places" if len(places) > 1 else ""
        warnings.warn(
            f"{name}: unknown key {excerpt(key)} ignored at {places[0]}{more}{hint}; known keys: "
            f"{', '.join(LAYOUT_KEYS)} and, per object, {', '.join(OBJECT_KEYS)}",
            stacklevel=3,
        )


def parse_layout(
    data: object, where: str = "layout", max_objects: int = MAX_OBJECTS, unknown: dict[str, list[str]] | None = None
) -> Layout:
    """One layout from its JSON value; `SpatialLockError` naming the field on any problem. Keys outside the format
    are recorded in `unknown` (key -> where), when given."""
    if not isinstance(data, dict):
        raise SpatialLockError(f"{where}: expected an object with 'caption' and 'objects', got a {_kind(data)}")
    if "caption" not in data:
        raise SpatialLockError(f"{where}.caption: missing")
    _note_unknown(data, LAYOUT_KEYS, where, unknown)
    caption = data["caption"]
    if not isinstance(caption, str):
        raise SpatialLockError(f"{where}.caption: expected a string, got {excerpt(caption)}")
    check_text(caption, f"{where}.caption")
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
        for key in OBJECT_KEYS:
            if key not in obj:
                raise SpatialLockError(f"{here}.{key}: missing")
        _note_unknown(obj, OBJECT_KEYS, here, unknown)
        labels.append(check_label(obj["label"], f"{here}.label"))
        boxes.append(check_box(obj["box"], f"{here}.box"))
    return Layout(" ".join(caption.split()), tuple(labels), tuple(boxes))


def parse_layouts(
    data: object, where: str = "layouts", max_objects: int = MAX_OBJECTS, unknown: dict[str, list[str]] | None = None
) -> list[Layout]:
    """A layout or a list of layouts from JSON values (a single layout gives a list of one)."""
    if isinstance(data, dict):
        return [parse_layout(data, where.rstrip("s") if where.endswith("s") else where, max_objects, unknown)]
    if not isinstance(data, list):
        raise SpatialLockError(f"{where}: expected a layout object or a list of them, got a {_kind(data)}")
    if not data:
        raise SpatialLockError(f"{where}: the list is empty")
    return [parse_layout(item, f"{where}[{i}]", max_objects, unknown) for i, item in enumerate(data)]


def is_coco_instances(data: object) -> bool:
    keys = ("images", "annotations", "categories")
    return isinstance(data, dict) and all(isinstance(data.get(k), list) for k in keys)


def _is_id(value: object) -> bool:
    """A COCO id: an integer or a string (what a JSON key can be), never a list or a bool."""
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf


def layouts_from_coco(
    instances: dict, captions: dict | None = None, name: str = "instances", max_objects: int = MAX_OBJECTS
) -> list[Layout]:
    """One layout per image of a COCO instances file (images without objects are skipped).

    Boxes are normalised by the image size; labels are category names; the caption is the image's first
    caption from `captions` when given, else the labels joined ("a red circle, a blue square").
    """
    categories = {}
    for i, cat in enumerate(instances["categories"]):
        if not isinstance(cat, dict) or not _is_id(cat.get("id")) or not isinstance(cat.get("name"), str):
            raise SpatialLockError(f"{name}: categories[{i}]: needs 'id' (an integer) and 'name' (a string)")
        categories[cat["id"]] = (i, cat["name"])
    texts: dict[int, str] = {}
    caption_list = captions.get("annotations", []) if isinstance(captions, dict) else []
    for ann in caption_list if isinstance(caption_list, list) else []:
        if isinstance(ann, dict) and _is_id(ann.get("image_id")) and isinstance(ann.get("caption"), str):
            text = check_text(ann["caption"], f"{name}: captions of image {excerpt(ann['image_id'])}")
            texts.setdefault(ann["image_id"], " ".join(text.split()))
    per_image: dict[int, list[tuple[int, dict]]] = {}
    for i, ann in enumerate(instances["annotations"]):
        if not isinstance(ann, dict):
            raise SpatialLockError(f"{name}: annotations[{i}]: expected an object")
        if not _is_id(ann.get("image_id")):
            raise SpatialLockError(
                f"{name}: annotations[{i}].image_id: expected an id, got {excerpt(ann.get('image_id'))}"
            )
        per_image.setdefault(ann["image_id"], []).append((i, ann))
    layouts, trimmed = [], 0
    for k, image in enumerate(instances["images"]):
        if not isinstance(image, dict) or not {"id", "width", "height"} <= image.keys():
            raise SpatialLockError(f"{name}: images[{k}]: needs 'id', 'width' and 'height'")
        if not _is_id(image["id"]):
            raise SpatialLockError(f"{name}: images[{k}].id: expected an id, got {excerpt(image['id'])}")
        for key in ("width", "height"):
            if not _positive(image[key]):
                raise SpatialLockError(
                    f"{name}: images[{k}].{key}: expected a positive number, got {excerpt(image[key])}"
                )
        width, height = image["width"], image["height"]
        labels, boxes = [], []
        for i, ann in per_image.get(image["id"], []):
            if ann.get("iscrowd", 0):
                continue
            where = f"{name}: annotations[{i}]"
            category = ann.get("category_id")
            if not _is_id(category) or category not in categories:
                raise SpatialLockError(f"{where}.category_id: {excerpt(category)} is not a category")
            bbox = ann.get("bbox")
            if not isinstance(bbox, list) or len(bbox) != 4:
                raise SpatialLockError(f"{where}.bbox: expected [x, y, w, h], got {excerpt(bbox)}")
            x, y, w, h = (finite_number(v, f"{where}.bbox") for v in bbox)
            box = [x / width, y / height, (x + w) / width, (y + h) / height]
            boxes.append(check_box([min(max(v, 0.0), 1.0) for v in box], f"{where}.bbox"))
            c, label = categories[category]
            check_label(label, f"{name}: categories[{c}].name")  # kept as written: it is the data set's category
            labels.append(label)
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
    Keys outside the layout format are reported by one warning each.
    """
    path = Path(path)
    data = read_json(path, "layout JSON file")
    if is_coco_instances(data):
        captions = None
        sibling = path.with_name(path.name.replace("instances", "captions", 1))
        if "instances" in path.name and sibling.is_file():
            captions = read_json(sibling, "COCO captions file")
        return layouts_from_coco(data, captions, path.name, max_objects)
    unknown: dict[str, list[str]] = {}
    try:
        layouts = parse_layouts(data, "layouts", max_objects, unknown)
    except SpatialLockError as err:
        raise SpatialLockError(f"{path}: {err}") from None
    warn_unknown_keys(unknown, str(path))
    return layouts


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


def quoted(text: str, limit: int = 60) -> str:
    """`repr(text)` as an error line shows a label or caption: cut to about `limit` characters."""
    shown = repr(text)
    return shown if len(shown) <= limit else shown[: limit - 4] + "...'"


def excerpt(value: object, limit: int = 60) -> str:
    """`value` as JSON, cut to `limit` characters: an error line stays one short line whatever the file holds."""
    try:
        text = json.dumps(value)
    except (ValueError, RecursionError):
        text = repr(type(value).__name__)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _kind(value: object) -> str:
    return {dict: "JSON object", list: "JSON list", str: "string", type(None): "null"}.get(
        type(value), type(value).__name__
    )
