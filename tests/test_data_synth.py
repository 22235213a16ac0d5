"""The synthetic layout data set: COCO tools read it, its layouts obey the domain's rules, seeds fix the bytes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torchvision.datasets import CocoDetection

from spatiallock.data.captions import CaptionObject, relation
from spatiallock.data.shapes import COLOURS, SHAPES
from spatiallock.data.synth import synthesize

NUMBER = re.compile(r"\d")


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    synthesize(out, train=8, val=64, seed=3, workers=1, progress=False)
    return out


def _all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_coco_tools_read_the_files(synth_dir: Path) -> None:
    coco = COCO(str(synth_dir / "instances_val.json"))
    captions = COCO(str(synth_dir / "captions_val.json"))
    assert len(coco.getImgIds()) == 64
    assert sorted(captions.getImgIds()) == sorted(coco.getImgIds())
    detection = CocoDetection(str(synth_dir / "val"), str(synth_dir / "instances_val.json"))
    image, targets = detection[5]
    assert image.size == (64, 64) and image.mode == "RGB"
    assert targets and all(t["image_id"] == detection.ids[5] for t in targets)
    for split in ("train", "val"):
        data = json.loads((synth_dir / f"instances_{split}.json").read_text())
        assert {"info", "licenses", "images", "annotations", "categories"} <= set(data)
        assert {p.name for p in (synth_dir / split).iterdir()} == {i["file_name"] for i in data["images"]}


def test_layouts_follow_the_domain_rules(synth_dir: Path) -> None:
    coco = COCO(str(synth_dir / "instances_val.json"))
    captions = COCO(str(synth_dir / "captions_val.json"))
    names = {f"{c} {s}" for c in COLOURS for s in SHAPES}
    assert {c["name"] for c in coco.loadCats(coco.getCatIds())} == names
    assert [c["id"] for c in coco.loadCats(coco.getCatIds())] == list(range(1, 17))
    seen = set()
    for image_id in coco.getImgIds():
        info = coco.loadImgs(image_id)[0]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        assert 1 <= len(anns) <= 6
        texts = [a["caption"] for a in captions.loadAnns(captions.getAnnIds(imgIds=image_id))]
        assert len(texts) == 5 and all(texts)
        for ann in anns:
            x, y, w, h = ann["bbox"]
            assert w > 0 and h > 0 and x >= 0 and y >= 0
            assert x + w <= info["width"] + 1e-6 and y + h <= info["height"] + 1e-6
            assert ann["iscrowd"] == 0
            name = coco.loadCats(ann["category_id"])[0]["name"]
            seen.add(name)
            assert all(name in t or name + "s" in t for t in texts), (name, texts)
        assert not any(NUMBER.search(t) for t in texts), texts
    assert seen == names


def test_sizes_span_small_to_large(synth_dir: Path) -> None:
    coco = COCO(str(synth_dir / "instances_val.json"))
    extents = [max(a["bbox"][2:]) / 64 for a in coco.loadAnns(coco.getAnnIds())]
    assert min(extents) < 0.12 and max(extents) > 0.4
    assert all(0.07 <= e <= 0.61 for e in extents)


def test_no_object_is_hidden_more_than_half(synth_dir: Path) -> None:
    """Annotations are in paint order; rasterise the outlines at 4x and look at what later objects cover."""
    coco = COCO(str(synth_dir / "instances_val.json"))
    worst = 1.0
    for image_id in coco.getImgIds():
        anns = sorted(coco.loadAnns(coco.getAnnIds(imgIds=image_id)), key=lambda a: a["id"])
        masks = []
        for ann in anns:
            polygon = [[4 * v for v in ann["segmentation"][0]]]
            masks.append(mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygon, 256, 256))).astype(bool))
        for i, mask in enumerate(masks):
            covered = np.zeros_like(mask)
            for later in masks[i + 1 :]:
                covered |= later
            worst = min(worst, (mask & ~covered).sum() / mask.sum())
            # the box is the full extent of the outline, covered or not
            ys, xs = np.nonzero(mask)
            x, y, w, h = anns[i]["bbox"]
            assert abs(xs.min() / 4 - x) <= 0.5 and abs((xs.max() + 1) / 4 - (x + w)) <= 0.5
            assert abs(ys.min() / 4 - y) <= 0.5 and abs((ys.max() + 1) / 4 - (y + h)) <= 0.5
    assert worst >= 0.48


def test_same_seed_same_bytes_in_serial_and_in_parallel(tmp_path: Path) -> None:
    synthesize(tmp_path / "a", train=4, val=64, seed=11, workers=1, progress=False)
    synthesize(tmp_path / "b", train=4, val=64, seed=11, workers=2, progress=False)
    synthesize(tmp_path / "c", train=4, val=64, seed=12, workers=1, progress=False)
    a, b, c = (_all_files(tmp_path / k) for k in "abc")
    assert len(a) == 4 + 64 + 4 and a == b
    assert a.keys() == c.keys()
    differing = [name for name in a if a[name] != c[name]]
    assert "instances_val.json" in differing and "captions_val.json" in differing
    assert sum(name.endswith(".png") for name in differing) == 68


def test_relations_follow_the_boxes() -> None:
    left, right = CaptionObject("red", "circle", (0, 20, 10, 30)), CaptionObject("blue", "square", (40, 22, 52, 34))
    top, bottom = CaptionObject("red", "circle", (20, 0, 30, 10)), CaptionObject("blue", "square", (18, 45, 34, 60))
    assert relation(left, right, 64) == "left" and relation(right, left, 64) == "right"
    assert relation(top, bottom, 64) == "above" and relation(bottom, top, 64) == "below"
    assert relation(left, CaptionObject("green", "diamond", (2, 21, 12, 31)), 64) is None


def test_relation_captions_agree_with_the_layout(synth_dir: Path) -> None:
    coco = COCO(str(synth_dir / "instances_val.json"))
    captions = COCO(str(synth_dir / "captions_val.json"))
    pattern = re.compile(
        r"^an? (\w+ \w+) (to the left of|left of|to the right of|right of|above|below) an? (\w+ \w+)\b"
    )
    checked = 0
    for image_id in coco.getImgIds():
        boxes = {}
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=image_id)):
            x, y, w, h = ann["bbox"]
            boxes.setdefault(coco.loadCats(ann["category_id"])[0]["name"], []).append((x + w / 2, y + h / 2))
        for ann in captions.loadAnns(captions.getAnnIds(imgIds=image_id)):
            found = pattern.match(ann["caption"])
            if not found:
                continue
            (ax, ay), (bx, by) = boxes[found.group(1)][0], boxes[found.group(3)][0]
            side = found.group(2).removeprefix("to the ").removesuffix(" of")
            assert {"left": ax < bx, "right": ax > bx, "above": ay < by, "below": ay > by}[side], ann["caption"]
            checked += 1
    assert checked >= 10
