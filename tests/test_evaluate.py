"""Scoring generated images against their layouts (AP, mIoU, Frechet distance) and `spatiallock evaluate`."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from helpers import adapter_for
from PIL import Image

from spatiallock.cli import main
from spatiallock.errors import SpatialLockError
from spatiallock.evaluation.detector import Detector, DetectorConfig
from spatiallock.evaluation.scoring import DetectorFeatures, frechet_distance, score_images
from spatiallock.layout import Layout, read_layouts

CATEGORIES = [{"id": 1, "name": "red circle"}, {"id": 2, "name": "blue square"}, {"id": 7, "name": "green triangle"}]
PAIR = ((0.1, 0.1, 0.4, 0.4), (0.5, 0.5, 0.9, 0.9))
LAYOUTS = [
    Layout("a red circle and a blue square", ("red circle", "blue square"), PAIR),
    Layout("a green triangle", ("green triangle",), ((0.2, 0.3, 0.7, 0.8),)),
]


class FixedDetector:
    """Stands in for `Detector`: returns the given detections, has its categories."""

    def __init__(self, detections):
        self.config = DetectorConfig(categories=CATEGORIES)
        self.detections = detections

    def detect(self, images, score_threshold=None):
        assert len(images) == len(self.detections)
        if score_threshold is None:
            return self.detections
        kept = []
        for found in self.detections:
            keep = found["scores"] >= score_threshold
            names = [name for name, k in zip(found["names"], keep.tolist()) if k]
            kept.append({"boxes": found["boxes"][keep], "labels": found["labels"][keep],
                         "scores": found["scores"][keep], "names": names})  # fmt: skip
        return kept


def found(boxes, labels, scores=None) -> dict:
    names = {c["id"]: c["name"] for c in CATEGORIES}
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.long),
        "scores": torch.tensor(scores or [0.9] * len(labels)),
        "names": [names[i] for i in labels],
    }


def images(n: int = 2) -> list[Image.Image]:
    return [Image.new("RGB", (64, 64), (128, 128, 128)) for _ in range(n)]


def test_detections_on_the_requested_boxes_score_one():
    perfect = [found(LAYOUTS[0].boxes, [1, 2]), found(LAYOUTS[1].boxes, [7])]
    scores, objects, _ = score_images(FixedDetector(perfect), images(), LAYOUTS)
    assert scores["ap"] == pytest.approx(1.0) and scores["ap50"] == pytest.approx(1.0)
    assert scores["miou"] == pytest.approx(1.0)
    assert [o["label"] for o in objects] == ["red circle", "blue square", "green triangle"]


def test_shifted_missing_and_wrong_class_detections_score_less():
    shifted = [[x0 + 0.1, y0, x1 + 0.1, y1] for x0, y0, x1, y1 in LAYOUTS[0].boxes]
    detections = [found(shifted, [1, 2]), found(LAYOUTS[1].boxes, [1])]  # the triangle is found as a circle
    scores, objects, _ = score_images(FixedDetector(detections), images(), LAYOUTS)
    # a 0.3-wide box moved by 0.1: IoU 0.2/0.4 = 0.5; a 0.4-wide box: 0.3/0.5 = 0.6; the triangle: 0
    assert [o["iou"] for o in objects] == pytest.approx([0.5, 0.6, 0.0], abs=1e-4)
    assert scores["miou"] == pytest.approx(1.1 / 3, abs=1e-4)
    # placed where asked but named wrongly: it counts for miou_any, not for miou
    assert [o["iou_any"] for o in objects] == pytest.approx([0.5, 0.6, 1.0], abs=1e-4)
    assert scores["miou_any"] == pytest.approx(2.1 / 3, abs=1e-4)
    assert 0.0 < scores["ap50"] < 1.0 and scores["ap75"] < scores["ap50"]


def test_low_scores_do_not_count_for_miou():
    weak = [found(LAYOUTS[0].boxes, [1, 2], [0.1, 0.9]), found(LAYOUTS[1].boxes, [7], [0.9])]
    scores, objects, _ = score_images(FixedDetector(weak), images(), LAYOUTS)
    assert [o["iou"] for o in objects] == pytest.approx([0.0, 1.0, 1.0])
    assert [o["iou_any"] for o in objects] == pytest.approx([0.0, 1.0, 1.0])
    assert scores["ap"] == pytest.approx(1.0)  # AP ranks by score and uses every detection


def test_a_score_threshold_counts_only_detections_from_it_for_ap_and_miou():
    weak = [found(LAYOUTS[0].boxes, [1, 2], [0.2, 0.9]), found(LAYOUTS[1].boxes, [7], [0.27])]
    default, _, _ = score_images(FixedDetector(weak), images(), LAYOUTS)
    authors, objects, counted = score_images(FixedDetector(weak), images(), LAYOUTS, score_threshold=0.25)
    assert default["ap"] == pytest.approx(1.0) and default["miou"] == pytest.approx(1 / 3)  # mIoU from 0.3
    assert authors["ap"] < 0.9  # the circle at 0.2 is no longer found
    assert [o["iou"] for o in objects] == pytest.approx([0.0, 1.0, 1.0])  # the triangle at 0.27 now counts
    assert [len(found["scores"]) for found in counted] == [1, 1] and counted[0]["names"] == ["blue square"]


def test_scores_by_object_size_use_the_domains_buckets():
    # sides 0.1, 0.2 and 0.5 of the image: small (< 1/8), medium, large (>= 1/4) at 64 px
    small, medium, large = (0.0, 0.0, 0.1, 0.1), (0.3, 0.3, 0.5, 0.5), (0.5, 0.0, 1.0, 0.5)
    layouts = [Layout("three", ("red circle", "blue square", "green triangle"), (small, medium, large))]
    missed_small = [found([medium, large, (0.8, 0.8, 0.9, 0.9)], [2, 7, 1])]  # the circle drawn elsewhere
    scores, objects, _ = score_images(FixedDetector(missed_small), images(1), layouts, by_size=True)
    assert [o["size"] for o in objects] == ["small", "medium", "large"]
    assert scores["ap_small"] == 0.0 and scores["miou_small"] == 0.0
    assert scores["ap_medium"] == pytest.approx(1.0) and scores["ap_large"] == pytest.approx(1.0)
    assert scores["miou_large"] == pytest.approx(1.0) and scores["objects_small"] == 1
    assert 0.0 < scores["ap"] < 1.0  # all sizes together
    # no small object asked for: nothing to score there, which is not 0
    big = [Layout("one", ("green triangle",), (large,))]
    scores, _, _ = score_images(FixedDetector([found([large], [7])]), images(1), big, by_size=True)
    assert scores["ap_small"] is None and scores["miou_small"] is None and scores["objects_small"] == 0
    assert scores["ap_large"] == pytest.approx(1.0)
    plain, _, _ = score_images(FixedDetector([found([large], [7])]), images(1), big)
    assert "ap_small" not in plain


def test_a_label_the_detector_does_not_know_is_named():
    layouts = [Layout("a purple star", ("purple star",), ((0.1, 0.1, 0.5, 0.5),))]
    with pytest.raises(SpatialLockError, match=r"layouts\[0\]\.objects\[0\]\.label: 'purple star' is not a category"):
        score_images(FixedDetector([found([], [])]), images(1), layouts)


def test_frechet_distance_in_detector_space_is_zero_for_equal_sets_and_grows():
    torch.manual_seed(0)
    detector = Detector(DetectorConfig(categories=CATEGORIES))
    g = torch.Generator().manual_seed(0)
    noise = [Image.fromarray((torch.rand(64, 64, 3, generator=g) * 255).byte().numpy()) for _ in range(24)]
    flat = [Image.new("RGB", (64, 64), (30 * (i % 8), 90, 200)) for i in range(24)]
    features = DetectorFeatures(detector)
    same = frechet_distance(noise, noise, features)
    apart = frechet_distance(flat, noise, features)
    assert abs(same) < 1e-3 and apart > 10 * max(abs(same), 1e-3)


def adapter_and_detector(base, shapes, tmp_path):
    """An adapter folder for `base` and an (untrained) detector folder for the categories of `shapes`."""
    adapter = tmp_path / "adapter"
    adapter_for(base, gates=0.8).save_pretrained(adapter)
    detector_folder = tmp_path / "detector"
    categories = json.loads((shapes / "instances_val.json").read_text())["categories"]
    torch.manual_seed(0)
    Detector(DetectorConfig(categories=categories, image_size=32)).save_pretrained(detector_folder)
    return adapter, detector_folder


def test_evaluate_command_writes_a_report_and_a_picture(tiny_small_base, tiny_shapes, tmp_path, capsys, monkeypatch):
    """The report scores the images the command generated: with a detector that finds every requested object in
    its box but names the first one wrongly, mIoU is (n - 1) / n, mIoU of any class 1 and AP below 1; fd is the
    Frechet distance of those images to the real ones beside the layouts."""
    adapter, detector_folder = adapter_and_detector(tiny_small_base, tiny_shapes, tmp_path)
    instances = json.loads((tiny_shapes / "instances_val.json").read_text())
    ids = {c["name"]: c["id"] for c in instances["categories"]}
    names = {i: name for name, i in ids.items()}
    requested = read_layouts(tiny_shapes / "instances_val.json")
    seen = []

    def finds_the_requested_objects(self, images, score_threshold=None, batch_size=64):
        seen.append((self, list(images)))
        assert len(images) == len(requested)
        found = []
        for n, layout in enumerate(requested):
            labels = [ids[label] for label in layout.labels]
            if n == 0:
                labels[0] = next(i for i in ids.values() if i != labels[0])
            boxes = torch.tensor(layout.boxes, dtype=torch.float32).reshape(-1, 4)
            scores = torch.full((len(labels),), 0.9)
            found.append(
                {"boxes": boxes, "scores": scores, "labels": torch.tensor(labels), "names": [names[i] for i in labels]}
            )
        return found

    monkeypatch.setattr(Detector, "detect", finds_the_requested_objects)
    out = tmp_path / "reports" / "r.json"
    layouts = str(tiny_shapes / "instances_val.json")
    common = ["evaluate", "--model", str(tiny_small_base), "--adapter", str(adapter), "--layouts", layouts]
    common += ["--steps", "2", "--no-progress"]
    assert main([*common, "--detector", str(detector_folder), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["num_layouts"] == 4 and report["real_images"] == 4  # val/ beside the instances file
    n = sum(len(layout.labels) for layout in requested)
    assert [o["iou"] for o in report["objects"]] == [0.0] + [1.0] * (n - 1)
    assert [o["iou_any"] for o in report["objects"]] == [1.0] * n
    assert report["miou"] == pytest.approx((n - 1) / n, abs=1e-4) and report["miou_any"] == 1.0
    assert 0.0 < report["ap"] < 1.0 and 0.0 < report["ap50"] < 1.0
    (detector, generated), *_ = seen
    real = [Image.open(tiny_shapes / "val" / image["file_name"]).convert("RGB") for image in instances["images"]]
    assert report["fd"] == pytest.approx(frechet_distance(generated, real, DetectorFeatures(detector)), abs=1e-3)
    assert report["fd"] > 0 and report["seconds_per_image"] > 0
    annotations = json.loads((tiny_shapes / "instances_val.json").read_text())["annotations"]
    assert len(report["objects"]) == len(annotations)
    assert Image.open(out.with_suffix(".png")).size[0] > 64
    assert "miou" in capsys.readouterr().out
    # which base made the images: the SHA-256 of its U-Net's and then its autoencoder's weight files
    digest = hashlib.sha256()
    for part in ("unet", "vae"):
        for path in sorted((tiny_small_base / part).glob("*.safetensors")):
            digest.update(path.read_bytes())
    assert report["base_fingerprint"] == digest.hexdigest()[:12]
    # a report path that is not JSON, and a detector folder that is not there: exit 2, nothing written
    assert main([*common, "--detector", str(detector_folder), "--out", str(tmp_path / "r.txt")]) == 2
    assert main([*common, "--detector", str(tmp_path / "none"), "--out", str(tmp_path / "r2.json")]) == 2
    assert not (tmp_path / "r.txt").exists() and not (tmp_path / "r2.json").exists()


def test_evaluate_passes_every_sampling_option_to_the_pipeline_and_records_it(
    tiny_small_base, tiny_shapes, tmp_path, monkeypatch
):
    import spatiallock.evaluation.scoring as evaluate_module

    adapter, detector_folder = adapter_and_detector(tiny_small_base, tiny_shapes, tmp_path)
    scored = []
    score = evaluate_module.score_images

    def keep_images(detector, images, layouts, *args):
        scored.append(np.stack([np.asarray(image, dtype=np.float32) for image in images]))
        return score(detector, images, layouts, *args)

    monkeypatch.setattr(evaluate_module, "score_images", keep_images)
    layouts = str(tiny_shapes / "instances_val.json")
    common = ["evaluate", "--model", str(tiny_small_base), "--adapter", str(adapter), "--layouts", layouts]
    common += ["--detector", str(detector_folder), "--steps", "3", "--limit", "2", "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "plain.json")]) == 0
    guided = ["--layout-guidance-steps", "2", "--layout-guidance-scale", "3000", "--layout-guidance-iterations", "1"]
    assert main([*common, *guided, "--out", str(tmp_path / "guided.json")]) == 0
    assert main([*common, "--init-from-layout", "--scheduler", "ddim", "--out", str(tmp_path / "init.json")]) == 0
    plain, with_guidance, with_init = scored
    assert np.abs(plain - with_guidance).max() > 8  # pixel levels: layout guidance changed the images
    assert np.abs(plain - with_init).max() > 1.0
    report = json.loads((tmp_path / "guided.json").read_text())
    expected = {
        "scheduler": "DPMSolverMultistepScheduler", "steps": 3, "guidance": 5.0, "grounding_steps": 1.0,
        "size": 32, "dtype": "fp32", "seed": 0, "batch_size": 8, "layout_guidance_steps": 2,
        "layout_guidance_scale": 3000.0, "layout_guidance_iterations": 1, "layout_guidance_layers": None,
        "missing_labels": "add", "init_image": None, "init_from_layout": False, "init_strength": 1.0,
        "init_steps": None,
    }  # fmt: skip
    assert {key: report[key] for key in expected} == expected
    init = json.loads((tmp_path / "init.json").read_text())
    assert init["scheduler"] == "ddim" and init["init_from_layout"] is True and init["layout_guidance_steps"] == 0
    # --adapter none: the base alone (the folder's own adapter is not attached), recorded as such
    assert main([*common[:4], "none", *common[5:], "--out", str(tmp_path / "base.json")]) == 0
    assert json.loads((tmp_path / "base.json").read_text())["adapter"] == "none"
    assert np.abs(scored[-1] - plain).max() > 1.0
