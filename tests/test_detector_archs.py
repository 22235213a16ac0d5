"""`train detector --arch` (FCOS, RetinaNet, Faster R-CNN, SSD) and `--extra-data` (generated folders beside the
real images): each architecture trains, saves and reloads; extra data keeps the real data's category indices."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import error_line
from torch import nn

from spatiallock.cli import main
from spatiallock.data.coco import LayoutDataset, MixedLayouts
from spatiallock.data.shapes import synth_categories
from spatiallock.errors import SpatialLockError
from spatiallock.evaluation.detector import ARCHS, Detector, DetectorConfig
from spatiallock.training.detector import DetectorTrainConfig, training_data

CATEGORY_IDS = {c["id"] for c in synth_categories()}


def train(data, out, *options: str) -> int:
    args = ["train", "detector", "--data", str(data), "--out", str(out), "--image-size", "32", "--batch-size", "4"]
    return main([*args, "--no-progress", *options])


@pytest.fixture(scope="module")
def generated(tiny_shapes, tiny_small_base, tmp_path_factory):
    """A `generate-dataset` folder from the tiny shapes' val layouts (tiny base, 2 steps) that lists only the
    categories its objects use, in reverse: the same ids name the same categories, at other contiguous indices
    than in the real data."""
    out = tmp_path_factory.mktemp("generated") / "gen"
    args = ["generate-dataset", "--layouts", str(tiny_shapes / "instances_val.json"), "--model", str(tiny_small_base)]
    assert main([*args, "--adapter", "none", "--out", str(out), "--steps", "2", "--no-progress"]) == 0
    instances = json.loads((out / "instances.json").read_text())
    used = {a["category_id"] for a in instances["annotations"]}
    instances["categories"] = [c for c in instances["categories"] if c["id"] in used][::-1]
    (out / "instances.json").write_text(json.dumps(instances))
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_each_arch_trains_two_steps_saves_and_reloads(arch, tiny_shapes, tmp_path, one_thread):
    out = tmp_path / arch
    assert train(tiny_shapes, out, "--arch", arch, "--max-steps", "2") == 0
    config = json.loads((out / "config.json").read_text())
    assert config["arch"] == arch and (out / "model.safetensors").is_file()
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))
    record = json.loads((out / "eval.json").read_text())
    assert record["arch"] == arch and record["steps"] == 2 and 0.0 <= record["ap"] <= 1.0
    log = [json.loads(line) for line in (out / "train" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 2 and torch.isfinite(torch.tensor(log[-1]["loss"]))

    first, second = Detector.from_pretrained(out), Detector.from_pretrained(out)
    assert type(first.model).__name__.lower() == arch
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    a, b = first.detect(images, score_threshold=0.0), second.detect(images, score_threshold=0.0)
    for x, y in zip(a, b):
        assert torch.equal(x["boxes"], y["boxes"]) and torch.equal(x["labels"], y["labels"])
        assert set(x["labels"].tolist()) <= CATEGORY_IDS
    assert first.features(images).shape == (3, first.feature_dim)


class _Recorder(nn.Module):
    """Stands in for the torchvision model: records the targets it gets, answers with model label 1."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.targets = None

    def forward(self, images, targets=None):
        if self.training:
            self.targets = targets
            return {"loss": self.weight.sum()}
        box = torch.tensor([[1.0, 2.0, 10.0, 12.0]])
        return [{"boxes": box, "scores": torch.ones(1), "labels": torch.tensor([1])} for _ in images]


@pytest.mark.parametrize("arch, shift", [("fcos", 0), ("retinanet", 0), ("fasterrcnn", 1), ("ssd", 1)])
def test_background_class_models_see_labels_shifted_by_one(arch, shift):
    """Faster R-CNN and SSD keep label 0 for the background: contiguous category k is their label k + 1, both
    for the training targets and for the detections read back."""
    categories = [{"id": 5, "name": "a"}, {"id": 7, "name": "b"}, {"id": 9, "name": "c"}]
    detector = Detector(DetectorConfig(categories=categories, arch=arch))
    detector.model = _Recorder()
    detector.train()
    targets = [{"boxes": torch.tensor([[0.0, 0.0, 4.0, 4.0]]), "labels": torch.tensor([0])}]
    detector([torch.zeros(3, 32, 32)], targets)
    assert detector.model.targets[0]["labels"].tolist() == [shift]
    assert targets[0]["labels"].tolist() == [0]  # the caller's targets are left alone
    found = detector.detect([torch.zeros(3, 32, 32)], score_threshold=0.0)[0]
    assert found["labels"].tolist() == [[7, 5][shift]] and found["names"] == [["b", "a"][shift]]


def test_unknown_arch_is_refused():
    with pytest.raises(SpatialLockError, match="arch must be one of"):
        DetectorConfig(categories=[{"id": 1, "name": "a"}], arch="yolo")


def test_extra_data_joins_a_generated_folder_and_a_real_one(tiny_shapes, generated):
    config = DetectorTrainConfig(
        data=str(tiny_shapes), out="unused", image_size=32, max_train_samples=10,
        extra_data=(str(generated), str(tiny_shapes)),
    )  # fmt: skip
    data = training_data(config, seed=0)
    assert isinstance(data, MixedLayouts)
    assert len(data.main) == 10 and len(data) == 10 + 4 + 16  # 4 generated, then all 16 real train images again
    assert data.categories == LayoutDataset.from_split(tiny_shapes, "train").categories
    generated_order = LayoutDataset(generated / "instances.json", generated / "captions.json", generated)
    assert generated_order.categories != data.categories  # the reversed listing: indices must be mapped
    for i in range(len(data)):
        sample = data[i]
        # every object's index names, in the real data's order, the label the sample was annotated with
        assert [data.categories[k] for k in sample["category_ids"].tolist()] == sample["labels"]
    assert sum(len(data[i]["labels"]) for i in range(10, 14)) > 0


def test_extra_share_sets_the_mix(tiny_shapes, generated):
    base = dict(data=str(tiny_shapes), out="unused", image_size=32, extra_data=(str(generated),))
    even = training_data(DetectorTrainConfig(**base, extra_share=0.5), seed=0)
    assert even.main_items == even.extra_items == 16  # 16 real, 4 generated images each drawn 4 times
    quarter = training_data(DetectorTrainConfig(**base, max_train_samples=12, extra_share=0.25), seed=0)
    assert (quarter.main_items, quarter.extra_items) == (12, 4)
    generated_ids = {data["image_id"] for data in (quarter[i] for i in range(12, 16))}
    assert len(generated_ids) == 4


def test_a_category_mismatch_is_one_error_line_and_exit_2(tiny_shapes, generated, tmp_path, capsys):
    renamed = tmp_path / "renamed"
    shutil.copytree(generated, renamed)
    instances = json.loads((renamed / "instances.json").read_text())
    used = {a["category_id"] for a in instances["annotations"]}
    victim = next(c for c in instances["categories"] if c["id"] in used)
    victim["name"] = "green hexagon"
    (renamed / "instances.json").write_text(json.dumps(instances))
    out = tmp_path / "det"
    assert train(tiny_shapes, out, "--extra-data", str(renamed), "--max-steps", "1") == 2
    line = error_line(capsys.readouterr().err, alone=True)
    assert "--extra-data" in line and f"category id {victim['id']}" in line and "green hexagon" in line
    assert not out.exists()

    assert train(tiny_shapes, out, "--extra-data", str(tmp_path / "nowhere"), "--max-steps", "1") == 2
    assert "--extra-data" in error_line(capsys.readouterr().err, alone=True) and not out.exists()
    assert train(tiny_shapes, out, "--extra-share", "0.5", "--max-steps", "1") == 2
    assert "--extra-share" in error_line(capsys.readouterr().err, alone=True)
    assert train(tiny_shapes, out, "--extra-data", str(generated), "--extra-share", "1", "--max-steps", "1") == 2
    assert "--extra-share" in error_line(capsys.readouterr().err, alone=True)


def test_training_with_extra_data_runs_and_records_it(tiny_shapes, generated, tmp_path, one_thread):
    out = tmp_path / "mixed"
    options = ["--extra-data", str(generated), "--max-train-samples", "8", "--extra-share", "0.5", "--max-steps", "2"]
    assert train(tiny_shapes, out, "--arch", "retinanet", *options) == 0
    record = json.loads((out / "eval.json").read_text())
    assert record["extra_data"] == [str(generated)] and record["max_train_samples"] == 8
    assert record["extra_share"] == 0.5
    recorded = json.loads((out / "train" / "config.json").read_text())
    assert recorded["extra_data"] == [str(generated)] and recorded["arch"] == "retinanet"
