"""The shapes detector: `train detector` end to end on a tiny data set, folder I/O, inputs, and the COCO scoring."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from spatiallock.checkpoint import atomic_save_pretrained
from spatiallock.cli import main
from spatiallock.data.shapes import synth_categories
from spatiallock.errors import SpatialLockError
from spatiallock.evaluation.detector import (
    Detector,
    DetectorConfig,
    coco_ap,
    evaluate_detector,
    to_coco_results,
    to_image_tensors,
)
from spatiallock.training.detector import evaluate_and_record

CATEGORY_IDS = {c["id"] for c in synth_categories()}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """16 train and 4 val images at 32 px, written by `spatiallock data synth`."""
    out = tmp_path_factory.mktemp("det-shapes")
    args = ["data", "synth", "--out", str(out), "--train", "16", "--val", "4", "--size", "32", "--workers", "1"]
    assert main([*args, "--no-progress"]) == 0
    return out


def train(data, out, *options: str) -> int:
    args = ["train", "detector", "--data", str(data), "--out", str(out), "--image-size", "32", "--batch-size", "4"]
    return main([*args, "--no-progress", *options])


@pytest.fixture(scope="module")
def trained(shapes, tmp_path_factory):
    """A detector folder after 2 steps of `train detector`, and what the command printed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("det") / "detector"
    try:
        assert train(shapes, out, "--max-steps", "2", "--checkpoint-every", "1") == 0
    finally:
        torch.set_num_threads(threads)
    return out


def val_images(shapes) -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in sorted((shapes / "val").glob("*.png"))]


def test_training_writes_a_detector_folder_and_its_val_ap(trained, shapes):
    assert (trained / "config.json").is_file() and (trained / "model.safetensors").is_file()
    config = json.loads((trained / "config.json").read_text())
    assert {c["id"] for c in config["categories"]} == CATEGORY_IDS
    assert {c["name"] for c in config["categories"]} == {c["name"] for c in synth_categories()}
    assert config["image_size"] == 32
    record = json.loads((trained / "eval.json").read_text())
    assert record["split"] == "val" and record["steps"] == 2
    for key in ("ap", "ap50", "ap75"):
        assert 0.0 <= record[key] <= 1.0
    log = [json.loads(line) for line in (trained / "train" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 2 and np.isfinite(log[-1]["loss"])
    assert {"classification", "bbox_regression", "bbox_ctrness"} <= set(log[-1])


def test_training_refuses_to_overwrite_checkpoints_and_resumes(trained, shapes, tmp_path, capsys):
    assert train(shapes, trained, "--max-steps", "2") == 2
    assert "--resume" in capsys.readouterr().err
    out = tmp_path / "copy"
    shutil.copytree(trained, out)
    assert train(shapes, out, "--max-steps", "3", "--resume") == 0
    assert "(3 steps" in capsys.readouterr().out
    assert json.loads((out / "eval.json").read_text())["steps"] == 3
    assert train(shapes, tmp_path / "bad", "--flip-prob", "2") == 2
    assert "flip prob" in capsys.readouterr().err


def test_folder_reloads_with_identical_outputs(trained, shapes, tmp_path):
    images = val_images(shapes)
    first = Detector.from_pretrained(trained)
    atomic_save_pretrained(first, tmp_path / "again")
    second = Detector.from_pretrained(tmp_path / "again")
    assert not first.training and not second.training
    for a, b in zip(first.detect(images, score_threshold=0.0), second.detect(images, score_threshold=0.0)):
        assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"])
        assert torch.equal(a["labels"], b["labels"]) and a["names"] == b["names"]
    assert torch.equal(first.features(images), second.features(images))


def test_detections_are_normalised_boxes_with_category_ids(trained, shapes):
    detector = Detector.from_pretrained(trained)
    images = val_images(shapes) + [Image.new("RGB", (48, 40), (90, 120, 30))]  # another size and aspect too
    found = detector.detect(images, score_threshold=0.0)
    assert len(found) == len(images)
    names = {c["id"]: c["name"] for c in synth_categories()}
    for result in found:
        boxes = result["boxes"]
        assert boxes.shape[1] == 4 and len(boxes) == len(result["scores"]) == len(result["labels"]) > 0
        assert boxes.min() >= 0 and boxes.max() <= 1
        assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
        assert set(result["labels"].tolist()) <= CATEGORY_IDS
        assert result["names"] == [names[i] for i in result["labels"].tolist()]
        assert (result["scores"][:-1] >= result["scores"][1:]).all()
    assert all((r["scores"] >= 0.3).all() for r in detector.detect(images, score_threshold=0.3))


def test_inputs_pil_uint8_and_float_agree(trained, shapes):
    detector = Detector.from_pretrained(trained)
    images = val_images(shapes)
    uint8 = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images])
    floats = uint8.float() / 255
    vectors = [detector.features(x) for x in (images, uint8, floats)]
    assert vectors[0].shape == (len(images), detector.feature_dim) and torch.isfinite(vectors[0]).all()
    assert torch.allclose(vectors[0], vectors[1]) and torch.allclose(vectors[0], vectors[2])
    a, b = detector.detect(images)[0], detector.detect(floats)[0]
    assert torch.allclose(a["boxes"], b["boxes"]) and torch.equal(a["labels"], b["labels"])
    with pytest.raises(SpatialLockError, match=r"\[0, 1\]"):
        detector.detect(floats * 2 - 1)
    with pytest.raises(SpatialLockError, match="channels"):
        to_image_tensors(torch.zeros(2, 1, 8, 8))


def test_evaluate_detector_on_real_images(trained, shapes):
    metrics = evaluate_detector(Detector.from_pretrained(trained), shapes, "val")
    assert set(metrics) == {"ap", "ap50", "ap75"}
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    with pytest.raises(SpatialLockError, match="instances_test"):
        evaluate_detector(Detector.from_pretrained(trained), shapes, "test")
    assert evaluate_and_record(trained, shapes, "test") is None  # `train detector` then says it did not score


def ground_truth_as_detections(instances: dict, shift: float = 0.0, relabel: bool = False) -> list[dict]:
    """The instances' own boxes in `detect`'s format (normalised xyxy), optionally shifted right by `shift`
    of the image width, or with every label replaced by another category."""
    per_image = {im["id"]: [] for im in instances["images"]}
    for ann in instances["annotations"]:
        per_image[ann["image_id"]].append(ann)
    detections = []
    for im in instances["images"]:
        w, h = im["width"], im["height"]
        boxes = [[(x + shift * w) / w, y / h, (x + bw + shift * w) / w, (y + bh) / h] for x, y, bw, bh in
                 (a["bbox"] for a in per_image[im["id"]])]  # fmt: skip
        labels = [a["category_id"] % 16 + 1 if relabel else a["category_id"] for a in per_image[im["id"]]]
        detections.append(
            {"boxes": torch.tensor(boxes).reshape(-1, 4), "scores": torch.ones(len(boxes)),
             "labels": torch.tensor(labels, dtype=torch.long)}
        )  # fmt: skip
    return detections


def score(instances: dict, detections: list[dict]) -> dict:
    sizes = [(im["width"], im["height"]) for im in instances["images"]]
    return coco_ap(instances, to_coco_results(detections, [im["id"] for im in instances["images"]], sizes))


def test_scoring_gives_one_for_ground_truth_and_less_for_wrong_boxes(shapes):
    instances = json.loads((shapes / "instances_val.json").read_text())
    perfect = score(instances, ground_truth_as_detections(instances))
    assert perfect == pytest.approx({"ap": 1.0, "ap50": 1.0, "ap75": 1.0})  # pycocotools' eps: 1 - 2e-16 at worst
    shifted = score(instances, ground_truth_as_detections(instances, shift=0.05))
    assert shifted["ap"] < 0.9 and shifted["ap75"] < 1.0
    assert score(instances, ground_truth_as_detections(instances, relabel=True)) == {
        "ap": 0.0,
        "ap50": 0.0,
        "ap75": 0.0,
    }
    empty = [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}]
    assert score(instances, empty * len(instances["images"])) == {"ap": 0.0, "ap50": 0.0, "ap75": 0.0}
    with pytest.raises(SpatialLockError, match="no object"):
        coco_ap({**instances, "annotations": []}, [])


def test_scoring_uses_the_recorded_size_not_the_normalised_one():
    """A 100x50 image: a normalised box found at its place scores 1 only when scaled by width and height."""
    instances = {
        "images": [{"id": 7, "width": 100, "height": 50}],
        "annotations": [{"image_id": 7, "category_id": 3, "bbox": [10.0, 5.0, 30.0, 20.0]}],
        "categories": [{"id": 3, "name": "red triangle"}],
    }
    found = [
        {"boxes": torch.tensor([[0.1, 0.1, 0.4, 0.5]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([3])}
    ]
    assert score(instances, found) == pytest.approx({"ap": 1.0, "ap50": 1.0, "ap75": 1.0})
    results = to_coco_results(found, [7], [(50, 100)])  # width and height swapped: a different box
    assert coco_ap(instances, results)["ap50"] == 0.0


def test_config_checks():
    with pytest.raises(SpatialLockError, match="categories"):
        DetectorConfig(categories=[])
    with pytest.raises(SpatialLockError, match="repeated"):
        DetectorConfig(categories=[{"id": 1, "name": "a"}, {"id": 1, "name": "b"}])
