"""LayoutDataset on COCO 2017-shaped files: samples, filters, collate, and bad data skipped and counted."""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from spatiallock.data.coco import LayoutDataset, collate_layouts, split_files
from spatiallock.errors import SpatialLockError

FIXTURE = Path(__file__).parent / "fixtures" / "coco2017_mini" / "annotations"
Edit = Callable[[dict, dict], None]


def make_coco(tmp_path: Path, edit: Edit | None = None) -> Path:
    """The fixture in the COCO 2017 folder layout under tmp_path, with images drawn to the recorded sizes."""
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "val2017").mkdir()
    instances = json.loads((FIXTURE / "instances_val2017.json").read_text())
    captions = json.loads((FIXTURE / "captions_val2017.json").read_text())
    for n, image in enumerate(instances["images"]):
        mode = "L" if image["id"] == 252219 else "RGB"  # COCO has greyscale images too
        colour = 60 + 40 * n if mode == "L" else (60 + 40 * n, 90, 120)
        Image.new(mode, (image["width"], image["height"]), colour).save(root / "val2017" / image["file_name"])
    if edit is not None:
        edit(instances, captions)
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(instances))
    (root / "annotations" / "captions_val2017.json").write_text(json.dumps(captions))
    return root


def load(root: Path, **kwargs) -> tuple[LayoutDataset, list[warnings.WarningMessage]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = LayoutDataset.from_split(root, "val2017", **kwargs)
    return dataset, list(caught)


def full_epoch(dataset: LayoutDataset) -> list[dict]:
    loader = DataLoader(dataset, batch_size=2, collate_fn=collate_layouts)
    return list(loader)


def test_samples_from_coco_2017_files(tmp_path: Path) -> None:
    dataset, caught = load(make_coco(tmp_path), resolution=32)
    assert caught == [] and dataset.skipped == {}
    assert len(dataset) == 4 and dataset.filtered == {"crowd": 1}
    assert dataset.categories == ["person", "bicycle", "car", "dog", "chair"]
    assert dataset.category_index == {1: 0, 2: 1, 3: 2, 18: 3, 62: 4}
    for i in range(len(dataset)):
        sample = dataset[i]
        assert sample["pixel_values"].shape == (3, 32, 32) and sample["pixel_values"].dtype == torch.float32
        assert sample["pixel_values"].min() >= -1 and sample["pixel_values"].max() <= 1
        boxes = sample["boxes"]
        assert boxes.shape == (len(sample["labels"]), 4) and len(sample["labels"]) >= 1
        assert (boxes >= 0).all() and (boxes <= 1).all() and (boxes[:, 2:] > boxes[:, :2]).all()
        assert [dataset.categories[k] for k in sample["category_ids"].tolist()] == sample["labels"]
        record = dataset.records[i]
        assert sample["image_id"] == record.image_id and sample["caption"] == record.captions[0]
    assert dataset[-1]["image_id"] == dataset.records[-1].image_id
    with pytest.raises(IndexError):
        dataset[len(dataset)]
    grey = dataset[[r.image_id for r in dataset.records].index(252219)]
    assert torch.equal(grey["pixel_values"][0], grey["pixel_values"][2])  # greyscale read as RGB
    assert grey["labels"] == ["person", "bicycle"]  # crowd annotation left out, largest first


def test_synthetic_layout_is_found_too(tmp_path: Path) -> None:
    (tmp_path / "instances_val.json").write_text("{}")
    assert split_files(tmp_path, "val") == (
        tmp_path / "instances_val.json",
        tmp_path / "captions_val.json",
        tmp_path / "val",
    )
    with pytest.raises(SpatialLockError, match="instances_train.json"):
        split_files(tmp_path, "train")


def test_caption_choice_is_seeded(tmp_path: Path) -> None:
    root = make_coco(tmp_path)
    index = 1  # image 37777 has three captions
    first, _ = load(root, random_caption=True, seed=5)
    second, _ = load(root, random_caption=True, seed=5)
    picks = []
    for epoch in range(12):
        first.set_epoch(epoch)
        second.set_epoch(epoch)
        picks.append(first[index]["caption"])
        assert picks[-1] == second[index]["caption"]
    assert len(set(picks)) > 1 and set(picks) <= set(first.records[index].captions)


def test_filters(tmp_path: Path) -> None:
    root = make_coco(tmp_path)
    all_images, _ = load(root)
    by_id = {r.image_id: r for r in all_images.records}
    assert len(by_id[397133].objects) == 3

    small, _ = load(root, min_area=0.01)  # the 4x4 chair is 0.3% of its 90x60 image
    assert small.filtered["small_object"] == 1
    assert len({r.image_id: r for r in small.records}[397133].objects) == 2

    many, _ = load(root, min_objects=2)
    assert sorted(r.image_id for r in many.records) == [37777, 252219, 397133]
    assert many.filtered["too_few_objects"] == 1

    few, _ = load(root, max_objects=1)
    assert [r.image_id for r in few.records] == [87038] and few.filtered["too_many_objects"] == 3

    capped, _ = load(root, max_boxes=1)
    assert all(len(r.objects) == 1 for r in capped.records) and capped.filtered["extra_boxes"] == 4
    kept = {r.image_id: r.objects[0] for r in capped.records}
    for image_id, record in by_id.items():
        assert kept[image_id] == max(record.objects, key=lambda o: o.bbox[2] * o.bbox[3])


def test_crop_drops_objects_that_lose_most_of_their_area(tmp_path: Path) -> None:
    def add_edge_objects(instances: dict, captions: dict) -> None:
        extra = [([0.0, 30.0, 12.0, 10.0], 5001), ([5.0, 30.0, 14.0, 10.0], 5002), ([8.0, 30.0, 12.0, 10.0], 5003)]
        for bbox, ann_id in extra:
            instances["annotations"].append(
                {"id": ann_id, "image_id": 397133, "category_id": 2, "bbox": bbox, "area": 100.0, "iscrowd": 0}
            )

    dataset, _ = load(make_coco(tmp_path, add_edge_objects), resolution=60)
    i = [r.image_id for r in dataset.records].index(397133)
    assert len(dataset.records[i].objects) == 6
    sample = dataset[i]
    # centre crop of the 90x60 image starts at x=15: the box at 0..12 is gone, 5..19 keeps 29%, 8..20 keeps 42%
    assert sorted(sample["labels"]) == ["chair", "chair", "person"]
    assert dataset[i]["boxes"][:, 0].min() == 0.0  # the person (10..30) is clipped to the crop's left edge


def test_collate_pads_to_a_fixed_count(tmp_path: Path) -> None:
    dataset, _ = load(make_coco(tmp_path), resolution=32)
    batch = collate_layouts([dataset[i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    assert batch["boxes"].shape == (4, 30, 4) and batch["masks"].shape == (4, 30)
    assert batch["category_ids"].shape == (4, 30) and batch["category_ids"].dtype == torch.long
    for b in range(4):
        n = len(dataset[b]["labels"])
        assert batch["masks"][b].sum() == n and batch["masks"][b, :n].all()
        assert (batch["category_ids"][b, n:] == -1).all() and (batch["boxes"][b, n:] == 0).all()
        assert batch["phrases"][b][:n] == dataset[b]["labels"] and set(batch["phrases"][b][n:]) == {""}
        assert torch.equal(batch["boxes"][b, :n], dataset[b]["boxes"])
    assert batch["image_ids"] == [r.image_id for r in dataset.records]
    assert collate_layouts([dataset[0]], max_boxes=2)["boxes"].shape == (1, 2, 4)


def _zero_area_box(instances: dict, captions: dict) -> None:
    instances["annotations"][1]["bbox"][2] = 0.0


def _box_outside(instances: dict, captions: dict) -> None:
    instances["annotations"][4]["bbox"] = [70.0, 100.0, 10.0, 10.0]  # image 37777 is 64x96


def _unknown_category(instances: dict, captions: dict) -> None:
    instances["annotations"][8]["category_id"] = 999  # the only object of image 87038


def _duplicate_image_id(instances: dict, captions: dict) -> None:
    instances["images"].append({**instances["images"][0], "file_name": "000000999999.jpg"})


def _duplicate_annotation_id(instances: dict, captions: dict) -> None:
    instances["annotations"].append({**copy.deepcopy(instances["annotations"][3]), "bbox": [1.0, 1.0, 5.0, 5.0]})


def _no_caption(instances: dict, captions: dict) -> None:
    captions["annotations"] = [a for a in captions["annotations"] if a["image_id"] != 87038]


BAD_DATA = [
    (_zero_area_box, "bad_box", 4),
    (_box_outside, "bad_box", 4),
    (_unknown_category, "unknown_category", 3),
    (_duplicate_image_id, "duplicate_image_id", 4),
    (_duplicate_annotation_id, "duplicate_annotation_id", 4),
    (_no_caption, "no_caption", 3),
]


@pytest.mark.parametrize(("edit", "reason", "images"), BAD_DATA, ids=[case[1] for case in BAD_DATA])
def test_bad_data_is_skipped_counted_and_reported_once(tmp_path: Path, edit: Edit, reason: str, images: int) -> None:
    dataset, caught = load(make_coco(tmp_path, edit))
    assert dataset.skipped == {reason: 1}
    assert len(dataset) == images
    assert len(caught) == 1 and "instances_val2017.json" in str(caught[0].message)
    assert reason.replace("_", " ") in str(caught[0].message)
    assert sum(len(batch["captions"]) for batch in full_epoch(dataset)) == images


def test_missing_image_file_is_skipped_before_training(tmp_path: Path) -> None:
    root = make_coco(tmp_path)
    (root / "val2017" / "000000087038.jpg").unlink()
    dataset, caught = load(root)
    assert dataset.skipped == {"missing_image": 1} and len(caught) == 1
    assert 87038 not in [r.image_id for r in dataset.records]
    assert len(full_epoch(dataset)) == 2


def test_unreadable_image_is_replaced_by_the_next(tmp_path: Path) -> None:
    root = make_coco(tmp_path)
    (root / "val2017" / "000000037777.jpg").write_bytes(b"not a jpeg")
    dataset, _ = load(root)
    i = [r.image_id for r in dataset.records].index(37777)
    with pytest.warns(UserWarning, match="000000037777.jpg"):
        sample = dataset[i]
    assert sample["image_id"] == dataset.records[i + 1].image_id
    assert dataset.skipped == {"unreadable_image": 1}
