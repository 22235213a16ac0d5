"""Boxes through resize, crop and flip: a transformed box still frames the object drawn in it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from spatiallock.data.coco import LayoutDataset
from spatiallock.data.transforms import apply_to_boxes, plan_crop, swap_left_right

RED_DISC = (60.0, 22.0, 92.0, 70.0)  # x0, y0, x1, y1 in the 144x96 source image
BLUE_BAR = (2.0, 40.0, 30.0, 56.0)  # near the left edge: random crops cut it


def _draw(path: Path) -> None:
    """A red ellipse filling RED_DISC and a blue rectangle filling BLUE_BAR on a plain grey field."""
    ys, xs = np.mgrid[0:96, 0:144] + 0.5
    pixels = np.full((96, 144, 3), 128, dtype=np.uint8)
    x0, y0, x1, y1 = RED_DISC
    disc = ((xs - (x0 + x1) / 2) / ((x1 - x0) / 2)) ** 2 + ((ys - (y0 + y1) / 2) / ((y1 - y0) / 2)) ** 2 <= 1
    pixels[disc] = (230, 20, 20)
    x0, y0, x1, y1 = (int(v) for v in BLUE_BAR)
    pixels[y0:y1, x0:x1] = (20, 20, 230)
    Image.fromarray(pixels).save(path)


@pytest.fixture
def drawn(tmp_path: Path) -> Path:
    (tmp_path / "val").mkdir()
    _draw(tmp_path / "val" / "000000000001.png")
    image = {"id": 1, "file_name": "000000000001.png", "width": 144, "height": 96}
    boxes = [RED_DISC, BLUE_BAR]
    annotations = [
        {
            "id": k + 1,
            "image_id": 1,
            "category_id": k + 1,
            "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
            "iscrowd": 0,
        }
        for k, b in enumerate(boxes)
    ]
    categories = [{"id": 1, "name": "red disc", "supercategory": "shape"}, {"id": 2, "name": "blue bar"}]
    instances = {"info": {}, "licenses": [], "images": [image], "annotations": annotations, "categories": categories}
    captions = {
        "images": [image],
        "annotations": [{"id": 1, "image_id": 1, "caption": "a red disc right of a blue bar"}],
    }
    (tmp_path / "instances_val.json").write_text(json.dumps(instances))
    (tmp_path / "captions_val.json").write_text(json.dumps(captions))
    return tmp_path


def _extent(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


@pytest.mark.parametrize("flip_prob", [0.0, 1.0])
def test_boxes_frame_their_objects_after_resize_crop_and_flip(drawn: Path, flip_prob: float) -> None:
    res = 48  # the 144x96 image becomes 72x48, then a random 48x48 crop
    dataset = LayoutDataset.from_split(drawn, "val", resolution=res, random_crop=True, flip_prob=flip_prob, seed=1)
    kept_blue = dropped_blue = 0
    for epoch in range(16):
        dataset.set_epoch(epoch)
        sample = dataset[0]
        pixels = (sample["pixel_values"].permute(1, 2, 0).numpy() + 1.0) * 127.5
        red = (pixels[..., 0] - pixels[..., 2]) > 50
        blue = (pixels[..., 2] - pixels[..., 0]) > 50
        boxes = dict(zip(sample["labels"], (sample["boxes"].numpy() * res).tolist()))
        assert "right of" in sample["caption"] if flip_prob == 0 else "left of" in sample["caption"]
        for name, mask in (("red disc", red), ("blue bar", blue)):
            if name not in boxes:
                # dropped only if the crop left less than half of it
                assert name == "blue bar" and mask.sum() < 0.5 * (28 / 2) * (16 / 2)
                dropped_blue += 1
                continue
            kept_blue += name == "blue bar"
            x0, y0, x1, y1 = boxes[name]
            px0, py0, px1, py1 = _extent(mask)
            assert np.allclose([px0, py0, px1, py1], [x0, y0, x1, y1], atol=1.01), (name, epoch, boxes[name])
    assert kept_blue and dropped_blue  # random crops both keep and cut the bar


def test_flip_mirrors_image_boxes_and_caption(drawn: Path) -> None:
    plain = LayoutDataset.from_split(drawn, "val", resolution=48)[0]
    mirrored = LayoutDataset.from_split(drawn, "val", resolution=48, flip_prob=1.0)[0]
    assert torch.equal(mirrored["pixel_values"], plain["pixel_values"].flip(-1))
    x0, y0, x1, y1 = plain["boxes"].unbind(-1)
    assert torch.allclose(mirrored["boxes"], torch.stack([1 - x1, y0, 1 - x0, y1], dim=-1))
    assert (
        plain["caption"] == "a red disc right of a blue bar" and mirrored["caption"] == "a red disc left of a blue bar"
    )


def test_box_arithmetic_matches_a_hand_computation() -> None:
    plan = plan_crop(200, 100, 50, rng=None, flip=True)  # 200x100 -> 100x50, centre crop from x=25, mirrored
    assert (plan.width, plan.height, plan.left, plan.top) == (100, 50, 25, 0)
    boxes, keep = apply_to_boxes(np.array([[50.0, 10.0, 90.0, 30.0], [0.0, 0.0, 40.0, 20.0]]), (200, 100), plan)
    # first: scaled to 25..45, shifted to 0..20, mirrored to 30..50; second: 0..20 -> -25..-5, outside
    assert np.allclose(boxes[0], np.array([30.0, 5.0, 50.0, 15.0]) / 50)
    assert keep.tolist() == [True, False]


def test_random_crop_stays_inside_the_resized_image() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        w, h = (int(v) for v in rng.integers(20, 300, 2))
        plan = plan_crop(w, h, 32, rng)
        assert min(plan.width, plan.height) == 32
        assert 0 <= plan.left <= plan.width - 32 and 0 <= plan.top <= plan.height - 32


def test_swap_left_right_swaps_whole_words_only() -> None:
    assert swap_left_right("Left of a tree, a car to the right.") == "Right of a tree, a car to the left."
    assert swap_left_right("leftover rights") == "leftover rights"
    assert swap_left_right(swap_left_right("a cat left of a dog")) == "a cat left of a dog"
