"""`coco_ap` against the COCO API's reference results (tests/fixtures/cocoapi, see its README): 100 val2014 images,
734 detections and the numbers pycocotools gives on them. Each known way of getting another number from the same
detections is shown to move the score, so that the project's code slipping into one would fail the reference test."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from spatiallock.data.cocofile import scorable_instances
from spatiallock.evaluation.detector import coco_ap, to_coco_results

FIXTURES = Path(__file__).parent / "fixtures" / "cocoapi"

# pycocotools' COCOeval(iouType="bbox"), default parameters, on the two fixture files
REFERENCE = {"ap": 0.5045806987249628, "ap50": 0.6969727247299577, "ap75": 0.5729816669904824}
ZERO = {"ap": 0.0, "ap50": 0.0, "ap75": 0.0}
TOLERANCE = 1e-9


@pytest.fixture(scope="module")
def fixture_files() -> tuple[dict, list[dict]]:
    instances = json.loads((FIXTURES / "instances_val2014_100.json").read_text())
    results = json.loads((FIXTURES / "instances_val2014_fakebbox100_results.json").read_text())
    return instances, results


@pytest.fixture
def coco(fixture_files) -> tuple[dict, list[dict]]:
    """A fresh copy of the ground truth and the detections, free to be changed by a test."""
    return copy.deepcopy(fixture_files)


def assert_reference(scores: dict) -> None:
    assert scores.keys() == REFERENCE.keys(), "coco_ap reports other stats: pin them to the fixture README's table"
    assert scores == pytest.approx(REFERENCE, rel=0, abs=TOLERANCE)


def test_fixture_is_the_reference_one(coco):
    instances, results = coco
    assert len(instances["images"]) == 100 and len(instances["categories"]) == 80
    assert len(instances["annotations"]) == 839
    assert sum(1 for ann in instances["annotations"] if ann["iscrowd"]) == 9
    assert len(results) == 734


def test_coco_ap_reproduces_the_reference_without_changing_its_inputs(coco, fixture_files):
    instances, results = coco
    assert_reference(coco_ap(instances, results))
    assert (instances, results) == fixture_files, "coco_ap changed the dicts it was given"


def test_scorable_instances_keeps_every_annotation_so_evaluate_detector_gets_the_reference(coco):
    """`evaluate_detector` runs `scorable_instances` on an instances file before `coco_ap`."""
    instances, results = coco
    clean, skipped = scorable_instances(instances)
    assert skipped == {}
    assert len(clean["annotations"]) == 839 and sum(ann["iscrowd"] for ann in clean["annotations"]) == 9
    assert_reference(coco_ap(clean, results))


def as_detections(instances: dict, results: list[dict]) -> tuple[list[dict], list[int], list[tuple[int, int]]]:
    """COCO results in `detect`'s format: per image (in the instances' order), "boxes" (n, 4) corners normalised by
    the image's width and height, "scores", "labels"; with the image ids and (width, height) sizes.

    float64, as `to_coco_results` computes: float32 boxes (what `detect` returns) move corners by up to 4e-5 px,
    which tips one IoU at a threshold here (AP 0.50442)."""
    per_image = {im["id"]: [] for im in instances["images"]}
    for r in results:
        per_image[r["image_id"]].append(r)
    detections, ids, sizes = [], [], []
    for im in instances["images"]:
        width, height = im["width"], im["height"]
        found = per_image[im["id"]]
        boxes = [
            [x / width, y / height, (x + w) / width, (y + h) / height] for x, y, w, h in (r["bbox"] for r in found)
        ]
        detections.append(
            {
                "boxes": torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4),
                "scores": torch.tensor([r["score"] for r in found], dtype=torch.float64),
                "labels": torch.tensor([r["category_id"] for r in found], dtype=torch.long),
            }
        )
        ids.append(im["id"])
        sizes.append((width, height))
    return detections, ids, sizes


def test_xyxy_detections_through_to_coco_results_give_the_reference(coco):
    """Pitfall: corners where COCO wants [x, y, w, h]. `detect` gives corners; `to_coco_results` converts them."""
    instances, results = coco
    detections, ids, sizes = as_detections(instances, results)
    assert sum(1 for d in detections if len(d["scores"]) == 0) == 1  # an image without detections is passed too
    converted = to_coco_results(detections, ids, sizes)
    assert len(converted) == len(results)
    order = {image_id: n for n, image_id in enumerate(ids)}
    expected = sorted(results, key=lambda r: order[r["image_id"]])  # stable: each image's detections in file order
    for got, want in zip(converted, expected):
        keys = ("image_id", "category_id", "score")
        assert [got[k] for k in keys] == [want[k] for k in keys]
        assert got["bbox"] == pytest.approx(want["bbox"], rel=0, abs=1e-9)
    assert_reference(coco_ap(instances, converted))


def test_corners_passed_as_width_and_height_give_another_ap(coco):
    """What the test above would see if the conversion were skipped: AP 0.032, not 0.505."""
    instances, results = coco
    corners = [{**r, "bbox": [x, y, x + w, y + h]} for r in results for x, y, w, h in [r["bbox"]]]
    scores = coco_ap(instances, corners)
    assert scores["ap"] == pytest.approx(0.032078353707020585, abs=TOLERANCE)
    assert scores["ap"] < REFERENCE["ap"] - 0.4


@pytest.mark.parametrize(
    "cut, expected",
    [(0.05, 0.48935161323745174), (0.25, 0.3973165662101642)],  # 0.05: `detect`'s default threshold
)
def test_every_detection_counts_a_score_cut_gives_another_ap(coco, cut, expected):
    """Pitfall: a score cut. The reference needs all 734 detections, 28 of them scored under 0.05; `coco_ap` gives
    the reference on all of them (test above) and the cut numbers on the cut lists, so it cuts nothing itself."""
    instances, results = coco
    kept = [r for r in results if r["score"] >= cut]
    assert 0 < len(kept) < len(results)
    scores = coco_ap(instances, kept)
    assert scores["ap"] == pytest.approx(expected, abs=TOLERANCE)
    assert abs(scores["ap"] - REFERENCE["ap"]) > 0.01


def test_crowd_regions_are_kept(coco):
    """Pitfall: `iscrowd` dropped (AP 0.502). The reference tests score with it; this shows the drop is seen."""
    instances, results = coco
    for ann in instances["annotations"]:
        del ann["iscrowd"]
    scores = coco_ap(instances, results)
    assert scores["ap"] == pytest.approx(0.5023456313181366, abs=TOLERANCE)
    assert abs(scores["ap"] - REFERENCE["ap"]) > 1e-3


def test_ground_truth_without_area_is_scored_and_gives_the_reference(coco):
    """Pitfall: no `area` (pycocotools raises). `coco_ap` fills it from the box; it only sorts objects into size
    buckets, which AP over all sizes does not use."""
    instances, results = coco
    for ann in instances["annotations"]:
        del ann["area"]
    assert_reference(coco_ap(instances, results))


def test_ground_truth_as_score_images_builds_it(coco):
    """`score_images` gives images with id, width, height only and annotations with image_id, category_id, bbox
    only (no area, iscrowd, id): scored as if no object were a crowd, i.e. the number of `iscrowd` dropped."""
    instances, results = coco
    bare = {
        "images": [{k: im[k] for k in ("id", "width", "height")} for im in instances["images"]],
        "annotations": [{k: ann[k] for k in ("image_id", "category_id", "bbox")} for ann in instances["annotations"]],
        "categories": instances["categories"],
    }
    assert coco_ap(bare, results) == pytest.approx(
        {"ap": 0.5023456313181366, "ap50": 0.6951353768160619, "ap75": 0.5703907080002736}, rel=0, abs=TOLERANCE
    )


def test_annotation_ids_zero_or_repeated_do_not_change_the_result(coco):
    """pycocotools counts a match with a ground-truth id of 0 as a miss, and keeps one annotation per id; with every
    id 0 it finds nothing (-1). `coco_ap` numbers the annotations itself."""
    instances, results = coco
    for ann in instances["annotations"]:
        ann["id"] = 0
    assert_reference(coco_ap(instances, results))


def test_empty_detection_list_scores_zero(coco):
    """Pitfall: no detection at all (pycocotools raises on an empty result list). `coco_ap` documents 0."""
    instances, _ = coco
    assert coco_ap(instances, []) == ZERO
