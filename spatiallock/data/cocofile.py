"""COCO-format files: read with one clear error at the boundary, index the usable images, write atomically.

`build_index` never fails on bad entries: it skips them and counts why, so one broken annotation
cannot end an epoch. Only a file that is not COCO-format at all raises `SpatialLockError`.

Every file is written through a temporary file created exclusively beside it (`atomic_output`): a planted link
at a predictable name is never followed, and readers never see half a file.
"""

from __future__ import annotations

import functools
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from spatiallock.errors import SpatialLockError

REQUIRED_KEYS = {"instances": ("images", "annotations", "categories"), "captions": ("annotations",)}
ENTRY_KEY = {"instances": "bbox", "captions": "caption"}
MAX_SIDE = 1 << 20  # a recorded image width or height beyond this is a broken entry


def read_coco_json(path: str | Path, kind: str) -> dict:
    """Load a COCO `kind` ("instances" or "captions") file; SpatialLockError naming the file if it is not one."""
    from spatiallock.files import read_json

    name = str(path)
    data = read_json(path, f"COCO {kind} file", bad_json="not a JSON file")
    if not isinstance(data, dict):
        raise SpatialLockError(
            f"{name}: not a COCO {kind} file: top level is a JSON {type(data).__name__}, expected an object"
        )
    for key in REQUIRED_KEYS[kind]:
        if key not in data:
            raise SpatialLockError(f"{name}: not a COCO {kind} file: missing key '{key}'")
        if not isinstance(data[key], list):
            raise SpatialLockError(
                f"{name}: not a COCO {kind} file: '{key}' is a {type(data[key]).__name__}, expected a list"
            )
    annotations = data["annotations"]
    if annotations and not any(isinstance(a, dict) and ENTRY_KEY[kind] in a for a in annotations):
        raise SpatialLockError(f"{name}: not a COCO {kind} file: no annotation has the key '{ENTRY_KEY[kind]}'")
    return data


@functools.cache
@dataclass(frozen=True)
class LayoutObject:
    """One object: box (x, y, w, h) in pixels of the recorded image size, and its COCO category id."""

    bbox: tuple[float, float, float, float]
    category_id: int


@dataclass(frozen=True)
class ImageRecord:
    """One usable image: file path, recorded size, objects (largest first) and captions."""

    image_id: int
    path: str
    width: int
    height: int
    objects: tuple[LayoutObject, ...]
    captions: tuple[str, ...]


@dataclass(frozen=True)
class LayoutFilters:
    """Which objects and images to keep. `min_area` is an object's box area over the image area."""

    min_area: float = 0.0
    min_objects: int = 1
    max_objects: int | None = None
    max_boxes: int = 30


@dataclass
class CocoIndex:
    """Usable images, categories sorted by id, and counts of what was skipped (bad data) or filtered out."""

    records: list[ImageRecord]
    categories: list[dict]
    skipped: dict[str, int] = field(default_factory=dict)
    filtered: dict[str, int] = field(default_factory=dict)


def _is_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: object) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


def _id_of(value: object) -> int | None:
    """`value` if it is an id (an int, not a bool), else None: lists or dicts as ids must not reach a dict lookup."""
    return value if _is_id(value) else None


def _clean_box(bbox: object, width: int, height: int) -> tuple[float, float, float, float] | None:
    """The box clipped to the image, or None if it is malformed, empty, or lies outside the image."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(_number(v) for v in bbox):
        return None
    x, y, w, h = (float(v) for v in bbox)
    x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, float(width)), min(y + h, float(height))
    if w <= 0 or h <= 0 or x1 <= x0 or y1 <= y0:
        return None
    return x0, y0, x1 - x0, y1 - y0


def _images(entries: list, root: str, skipped: Counter) -> dict[int, dict]:
    images: dict[int, dict] = {}
    for entry in entries:
        if not isinstance(entry, dict) or not _is_id(entry.get("id")) or not isinstance(entry.get("file_name"), str):
            skipped["bad_image_entry"] += 1
        elif not all(_is_id(entry.get(k)) and 0 < entry[k] <= MAX_SIDE for k in ("width", "height")):
            skipped["bad_image_entry"] += 1
        elif entry["id"] in images:
            skipped["duplicate_image_id"] += 1
        else:
            images[entry["id"]] = {**entry, "path": os.path.join(root, entry["file_name"])}
    return images


def _categories(entries: list, skipped: Counter) -> dict[int, dict]:
    categories: dict[int, dict] = {}
    for entry in entries:
        if not isinstance(entry, dict) or not _is_id(entry.get("id")) or not isinstance(entry.get("name"), str):
            skipped["bad_category_entry"] += 1
        elif entry["id"] in categories:
            skipped["duplicate_category_id"] += 1
        else:
            categories[entry["id"]] = {
                "id": entry["id"],
                "name": entry["name"],
                "supercategory": entry.get("supercategory", ""),
            }
    return categories


def _objects(
    entries: list, images: dict, categories: dict, filters: LayoutFilters, skipped: Counter, filtered: Counter
) -> dict[int, list[LayoutObject]]:
    objects: dict[int, list[LayoutObject]] = {}
    seen: set[int] = set()
    for ann in entries:
        if not isinstance(ann, dict) or not _is_id(ann.get("id")):
            skipped["bad_annotation_entry"] += 1
            continue
        if ann["id"] in seen:
            skipped["duplicate_annotation_id"] += 1
            continue
        seen.add(ann["id"])
        image = images.get(_id_of(ann.get("image_id")))
        if image is None:
            skipped["unknown_image_id"] += 1
        elif _id_of(ann.get("category_id")) not in categories:
            skipped["unknown_category"] += 1
        elif ann.get("iscrowd", 0):
            filtered["crowd"] += 1
        elif (box := _clean_box(ann.get("bbox"), image["width"], image["height"])) is None:
            skipped["bad_box"] += 1
        elif box[2] * box[3] < filters.min_area * image["width"] * image["height"]:
            filtered["small_object"] += 1
        else:
            objects.setdefault(image["id"], []).append(LayoutObject(box, ann["category_id"]))
    return objects


def _captions(entries: list, images: dict, skipped: Counter) -> dict[int, list[str]]:
    captions: dict[int, list[str]] = {}
    seen: set[int] = set()
    for ann in entries:
        if not isinstance(ann, dict) or not _is_id(ann.get("id")):
            skipped["bad_caption_entry"] += 1
        elif ann["id"] in seen:
            skipped["duplicate_caption_id"] += 1
        elif _id_of(ann.get("image_id")) not in images:
            seen.add(ann["id"])
            skipped["caption_of_unknown_image"] += 1
        elif not isinstance(ann.get("caption"), str) or not ann["caption"].strip():
            seen.add(ann["id"])
            skipped["bad_caption_entry"] += 1
        else:
            seen.add(ann["id"])
            captions.setdefault(ann["image_id"], []).append(" ".join(ann["caption"].split()))
    return captions


def build_index(
    instances: dict, captions: dict, image_root: str | Path, filters: LayoutFilters | None = None
) -> CocoIndex:
    """Join a COCO instances and captions file into usable image records; skip and count what is broken.

    Bad data (counted in `skipped`): malformed entries, duplicate ids (the first one is kept), boxes that
    are empty or outside the image, unknown category or image ids, images without captions, image files
    that do not exist. Filters (counted in `filtered`): crowd annotations, small objects, too few or too many
    objects; beyond `max_boxes` only the largest objects are kept.
    """
    filters = filters or LayoutFilters()
    skipped: Counter = Counter()
    filtered: Counter = Counter()
    images = _images(instances["images"], str(image_root), skipped)
    categories = _categories(instances["categories"], skipped)
    objects = _objects(instances["annotations"], images, categories, filters, skipped, filtered)
    texts = _captions(captions["annotations"], images, skipped)
    records = []
    for image_id, image in images.items():
        found = sorted(objects.get(image_id, []), key=lambda o: -o.bbox[2] * o.bbox[3])
        if image_id not in texts:
            skipped["no_caption"] += 1
        elif len(found) < filters.min_objects:
            filtered["too_few_objects"] += 1
        elif filters.max_objects is not None and len(found) > filters.max_objects:
            filtered["too_many_objects"] += 1
        elif not os.path.exists(image["path"]):
            skipped["missing_image"] += 1
        else:
            if len(found) > filters.max_boxes:
                filtered["extra_boxes"] += len(found) - filters.max_boxes
            kept = tuple(found[: filters.max_boxes])
            records.append(
                ImageRecord(image_id, image["path"], image["width"], image["height"], kept, tuple(texts[image_id]))
            )
    ordered = [categories[k] for k in sorted(categories)]
    return CocoIndex(records, ordered, dict(sorted(skipped.items())), dict(sorted(filtered.items())))


def scorable_instances(instances: dict) -> tuple[dict, dict[str, int]]:
    """The part of a COCO instances dict that can be scored: well-formed images, categories and annotations
    (as `build_index` judges them; crowd annotations kept), and the counts of what was left out."""
    skipped: Counter = Counter()
    images = _images(instances["images"], "", skipped)
    categories = _categories(instances["categories"], skipped)
    annotations = []
    for ann in instances["annotations"]:
        image = images.get(_id_of(ann.get("image_id"))) if isinstance(ann, dict) else None
        if image is None:
            skipped["bad_annotation_entry" if not isinstance(ann, dict) else "unknown_image_id"] += 1
        elif _id_of(ann.get("category_id")) not in categories:
            skipped["unknown_category"] += 1
        elif _clean_box(ann.get("bbox"), image["width"], image["height"]) is None:
            skipped["bad_box"] += 1
        else:
            x, y, w, h = (float(v) for v in ann["bbox"])
            area = ann.get("area") if _number(ann.get("area")) else w * h
            annotations.append(
                {"image_id": image["id"], "category_id": ann["category_id"], "bbox": [x, y, w, h], "area": area,
                 "iscrowd": 1 if ann.get("iscrowd") else 0}
            )  # fmt: skip
    clean = {
        "images": [{k: v for k, v in image.items() if k != "path"} for image in images.values()],
        "annotations": annotations,
        "categories": list(categories.values()),
    }
    return clean, dict(sorted(skipped.items()))
