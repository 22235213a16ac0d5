"""The synthetic layout domain: coloured shapes on textured backgrounds, written as a COCO 2017-style data set.

Every image is drawn from its own random generator seeded with (seed, split, index), so a data set is
the same bytes on every run and images can be drawn in any order by any number of worker processes.
Annotations list objects in paint order: a later object may cover an earlier one, never more than half.
"""

from __future__ import annotations

import io
import math
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

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
    synth_categories,
    unit_outline,
)
from spatiallock.files import atomic_output, write_json_atomic

SPLITS: tuple[str, ...] = ("train", "val")
SCENES: tuple[str, ...] = ("shapes", "shelves")
LICENSE = {"id": 1, "name": "CC0 1.0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}


@dataclass(frozen=True)
class SynthConfig:
    """How scenes are drawn. Sizes are the larger side of an object's box as a fraction of the image side.

    Objects of one colour do not touch unless `same_colour_overlap`, so every instance keeps a visible outline.
    """

    size: int = 64
    min_objects: int = 1
    max_objects: int = 6
    min_extent: float = 0.08
    max_extent: float = 0.6
    min_visible: float = 0.5
    same_colour_overlap: bool = False
    captions_per_image: int = 5
    placement_tries: int = 30
    scene: str = "shapes"  # or "shelves" (spatiallock.data.shelves: objects stand on boards, placement has rules)


@dataclass(frozen=True)
class SynthObject:
    """One drawn object: colour, shape and outline polygon (k, 2) in pixels."""

    colour: str
    shape: str
    polygon: np.ndarray

    @property
    def box(self) -> tuple[float, float, float, float]:
        """Full extent (x0, y0, x1, y1) in pixels, whatever covers it."""
        (x0, y0), (x1, y1) = self.polygon.min(axis=0), self.polygon.max(axis=0)
        return float(x0), float(y0), float(x1), float(y1)


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of one image, independent of every other image's."""
    return np.random.default_rng([seed, SPLITS.index(split), index])


def draw_scene(rng: np.random.Generator, config: SynthConfig) -> tuple[np.ndarray, list[SynthObject], str]:
    """Draw one scene. Returns the image (size, size, 3) uint8, its objects in paint order, the background kind.

    Each placement is kept only if every object already drawn keeps at least `min_visible` of its
    anti-aliased coverage; otherwise it is resampled, smaller with every failed try.
    """
    size = config.size
    kind = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    canvas = background(kind, size, rng)
    wanted = int(rng.integers(config.min_objects, config.max_objects + 1))
    objects: list[SynthObject] = []
    shown: list[np.ndarray] = []  # per object: its coverage times what is still uncovered, (size, size)
    visible: list[float] = []  # per object: sum of `shown`
    totals: list[float] = []  # per object: sum of its coverage
    for _ in range(wanted):
        colour, shape = list(COLOURS)[int(rng.integers(len(COLOURS)))], SHAPES[int(rng.integers(len(SHAPES)))]
        for attempt in range(config.placement_tries):
            high = max(config.min_extent, config.max_extent * 0.9**attempt)
            extent = math.exp(rng.uniform(math.log(config.min_extent), math.log(high))) * size
            outline = unit_outline(shape, rng) * extent
            span = outline.max(axis=0) - outline.min(axis=0)
            polygon = outline + rng.uniform(0.0, 1.0, 2) * (size - span) - outline.min(axis=0)
            coverage, region = rasterise(polygon, size)
            losses = [float((s[region] * coverage).sum()) for s in shown]
            if all(v - loss >= config.min_visible * t for v, loss, t in zip(visible, losses, totals)) and (
                config.same_colour_overlap
                or not any(loss > 0 for o, loss in zip(objects, losses) if o.colour == colour)
            ):
                break
        else:
            continue  # no room left for this object: the scene keeps fewer
        for i, s in enumerate(shown):
            s[region] *= 1.0 - coverage
            visible[i] -= losses[i]
        shown.append(np.zeros((size, size), dtype=np.float32))
        shown[-1][region] = coverage
        visible.append(float(coverage.sum()))
        totals.append(visible[-1])
        fill = shaded_fill(object_colour(colour, rng), region, rng)
        alpha = coverage[:, :, None]
        canvas[region] = canvas[region] * (1.0 - alpha) + fill * alpha
        objects.append(SynthObject(colour, shape, polygon))
    canvas += rng.normal(0.0, 2.0, canvas.shape).astype(np.float32)  # faint sensor noise over everything
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8), objects, kind


def _round(values: np.ndarray | list[float]) -> list[float]:
    return [round(float(v), 2) for v in values]


def render_record(seed: int, split: str, index: int, config: SynthConfig) -> tuple[bytes, dict]:
    """PNG bytes and COCO entries (image, annotations without ids, captions) of image `index` of a split."""
    rng = image_rng(seed, split, index)
    pixels, objects, kind = draw_scene(rng, config)
    size = config.size
    image_id = index + 1
    annotations = []
    for obj in objects:
        x0, y0, x1, y1 = (round(min(max(v, 0.0), size), 2) for v in obj.box)
        xs, ys = obj.polygon[:, 0], obj.polygon[:, 1]
        area = 0.5 * abs(float(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1))))
        annotations.append(
            {
                "image_id": image_id,
                "category_id": category_id(obj.colour, obj.shape),
                "bbox": [x0, y0, round(x1 - x0, 2), round(y1 - y0, 2)],
                "area": round(area, 2),
                "iscrowd": 0,
                "segmentation": [_round(obj.polygon.reshape(-1))],
            }
        )
    caption_objects = [CaptionObject(o.colour, o.shape, o.box) for o in objects]
    captions = make_captions(caption_objects, kind, size, rng, config.captions_per_image)
    image = {"id": image_id, "file_name": f"{image_id:012d}.png", "height": size, "width": size, "license": 1}
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue(), {"image": image, "annotations": annotations, "captions": captions}


def _render_and_save(task: tuple[int, str, int, SynthConfig, str]) -> dict:
    seed, split, index, config, out_dir = task
    if config.scene == "shelves":
        from spatiallock.data.shelves import render_shelf_record

        name = f"{index + 1:012d}.png"
        files, record = render_shelf_record(
            image_rng(seed, split, index), index + 1, config.size, config.min_objects, config.max_objects,
            config.captions_per_image, f"{split}-removed/{name}",
        )  # fmt: skip
        files = {(f"{split}/{k}" if k == name else k): v for k, v in files.items()}
    else:
        png, record = render_record(seed, split, index, config)
        files = {f"{split}/{record['image']['file_name']}": png}
    for relative, data in files.items():
        with atomic_output(os.path.join(out_dir, relative), "wb") as handle:
            handle.write(data)
    return record


def _info(split: str, seed: int, config: SynthConfig) -> dict:
    what = "shapes standing on shelves" if config.scene == "shelves" else "shapes"
    return {
        "description": f"SpatialLock synthetic {what}, {split} split: 16 categories, "
        f"{config.min_objects} to {config.max_objects} objects per image",
        "version": "1.0",
        "contributor": "spatiallock data synth",
        "url": "",
        "seed": seed,
        "image_size": config.size,
        "scene": {
            "kind": config.scene, "min_objects": config.min_objects, "max_objects": config.max_objects,
            "min_extent": config.min_extent, "max_extent": config.max_extent, "min_visible": config.min_visible,
        },
    }  # fmt: skip


def write_split(
    out_dir: str | Path,
    split: str,
    count: int,
    seed: int,
    config: SynthConfig,
    workers: int = 1,
    progress: bool = True,
) -> tuple[int, int]:
    """Draw `count` images into out_dir/split and write instances_<split>.json and captions_<split>.json (and for
    the shelves scene, the copies with one object removed into out_dir/<split>-removed and placements_<split>.json).

    Returns the number of images and of objects written.
    """
    out_dir = Path(out_dir)
    (out_dir / split).mkdir(parents=True, exist_ok=True)
    if config.scene == "shelves":
        (out_dir / f"{split}-removed").mkdir(parents=True, exist_ok=True)
    tasks = [(seed, split, i, config, str(out_dir)) for i in range(count)]
    bar = tqdm(total=count, desc=f"synth {split}", unit="img", disable=not progress)
    records: list[dict] = []
    if workers > 1 and count >= 64:
        with multiprocessing.Pool(workers) as pool:
            for record in pool.imap(_render_and_save, tasks, chunksize=max(1, min(64, count // (8 * workers)))):
                records.append(record)
                bar.update()
    else:
        for task in tasks:
            records.append(_render_and_save(task))
            bar.update()
    bar.close()
    annotations, captions = [], []
    for record in records:
        for ann in record["annotations"]:
            annotations.append({"id": len(annotations) + 1, **ann})
        for text in record["captions"]:
            captions.append({"id": len(captions) + 1, "image_id": record["image"]["id"], "caption": text})
    images = [record["image"] for record in records]
    head = {"info": _info(split, seed, config), "licenses": [LICENSE], "images": images}
    write_json_atomic(
        out_dir / f"instances_{split}.json", {**head, "annotations": annotations, "categories": synth_categories()}
    )
    write_json_atomic(out_dir / f"captions_{split}.json", {**head, "annotations": captions})
    if config.scene == "shelves":
        from spatiallock.data.shelves import rules_info

        placements = [record["placement"] for record in records if record.get("placement")]
        write_json_atomic(
            out_dir / f"placements_{split}.json",
            {"info": head["info"], "rules": rules_info(), "boxes": "normalised xyxy", "placements": placements},
        )
    return len(images), len(annotations)


def synthesize(
    out_dir: str | Path,
    train: int,
    val: int,
    seed: int,
    size: int = 64,
    workers: int | None = None,
    progress: bool = True,
    **scene,
) -> dict[str, tuple[int, int]]:
    """Write the synthetic data set (both splits) to `out_dir`; returns (images, objects) per split. `scene`: other
    `SynthConfig` fields (objects per image, object sizes, how much overlap may hide)."""
    config = SynthConfig(size=size, **scene)
    if config.scene not in SCENES:
        raise ValueError(f"scene: one of {', '.join(SCENES)}, got {config.scene!r}")
    workers = min(os.cpu_count() or 1, 8) if workers is None else workers
    return {
        split: write_split(out_dir, split, count, seed, config, workers, progress)
        for split, count in (("train", train), ("val", val))
    }
