"""The shelves scene: its objects keep the rules the checker states, its placement boxes are what they claim."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spatiallock.cli import main
from spatiallock.data.shelves import (
    ASPECT,
    HEIGHT_SHARE,
    Shelf,
    ShelfScene,
    plausible,
    scene_from_coco,
    violations,
)
from spatiallock.data.synth import synthesize


@pytest.fixture(scope="module")
def shelves_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shelves")
    synthesize(out, train=0, val=40, seed=5, workers=1, progress=False, scene="shelves", min_objects=2)
    return out


def _split(folder: Path) -> tuple[dict, dict[int, list[dict]], dict[int, str], list[dict]]:
    instances = json.loads((folder / "instances_val.json").read_text())
    per_image: dict[int, list[dict]] = {}
    for ann in instances["annotations"]:
        per_image.setdefault(ann["image_id"], []).append(ann)
    names = {c["id"]: c["name"] for c in instances["categories"]}
    placements = json.loads((folder / "placements_val.json").read_text())["placements"]
    return instances, per_image, names, placements


# one board across the image at 0.9 (its clearance 0.9: the image top), one over the left half at 0.5
SCENE = ShelfScene((Shelf(0.0, 1.0, 0.9, 0.04), Shelf(0.0, 0.5, 0.5, 0.04)), (("red square", (0.6, 0.6, 0.9, 0.9)),))


def test_each_rule_names_what_it_catches() -> None:
    assert violations(SCENE, (0.1, 0.6, 0.4, 0.9), "blue circle") == []  # on the floor, under the left board
    assert SCENE.clearance(SCENE.shelves[0]) == pytest.approx(0.9 - 0.54)
    assert violations(SCENE, (0.1, 0.5, 0.4, 0.8), "blue circle") == ["support"]  # lifted off the floor
    assert violations(SCENE, (0.6, 0.3, 0.8, 0.5), "blue circle") == ["support"]  # past the left board's end
    tall = 0.5 * HEIGHT_SHARE[1] + 0.02  # the left board's clearance is 0.5: up to the image top
    box = (0.05, 0.5 - tall, 0.05 + 0.7 * tall, 0.5)
    assert violations(SCENE, box, "blue diamond") == ["size"]  # too tall for its shelf
    small = 0.5 * HEIGHT_SHARE[0] - 0.02
    assert violations(SCENE, (0.05, 0.5 - small, 0.05 + small, 0.5), "blue square") == ["size"]  # too small
    assert violations(SCENE, (0.1, 0.7, 0.4, 0.9), "blue circle") == ["proportions"]  # 1.5 wide for a circle
    assert violations(SCENE, (0.1, 0.7, 0.4, 0.9), "blue triangle") == ["proportions"]
    low, high = ASPECT["diamond"]
    width = 0.3 * (low + high) / 2
    assert violations(SCENE, (0.1, 0.6, 0.1 + width, 0.9), "blue diamond") == []
    assert violations(SCENE, (0.55, 0.6, 0.85, 0.9), "blue circle") == ["overlap"]  # on the red square
    assert violations(SCENE, (0.8, 0.6, 1.1, 0.9), "blue circle") == ["inside"]
    assert not plausible(SCENE, (0.55, 0.6, 0.85, 0.9), "blue circle")
    with pytest.raises(ValueError, match="last word"):
        violations(SCENE, (0.1, 0.6, 0.4, 0.9), "blue hexagon")


def test_every_drawn_object_keeps_the_rules(shelves_dir: Path) -> None:
    instances, per_image, names, _ = _split(shelves_dir)
    checked = 0
    for image in instances["images"]:
        scene = scene_from_coco(image, per_image.get(image["id"], []), names)
        assert 2 <= len(scene.shelves) <= 3
        for index, (label, box) in enumerate(scene.objects):
            assert violations(scene.without(index), box, label) == [], (image["id"], label, box)
            checked += 1
    assert checked >= 2 * len(instances["images"])


def test_positives_are_plausible_and_negatives_are_not(shelves_dir: Path) -> None:
    instances, per_image, names, placements = _split(shelves_dir)
    images = {image["id"]: image for image in instances["images"]}
    assert len(placements) == len(images)
    broken: set[str] = set()
    for entry in placements:
        scene = scene_from_coco(images[entry["image_id"]], per_image[entry["image_id"]], names)
        removed = scene.without(entry["removed"])
        assert scene.objects[entry["removed"]][0] == entry["label"] == names[entry["category_id"]]
        assert entry["positives"][0] == entry["removed_box"]
        assert len(entry["positives"]) >= 2 and len(entry["negatives"]) >= 4
        assert all(plausible(removed, box, entry["label"]) for box in entry["positives"])
        for box in entry["negatives"]:
            rules = violations(removed, box, entry["label"])
            assert rules
            broken.update(rules)
    assert broken >= {"support", "size", "proportions", "overlap"}  # every kind of negative is there


def test_the_removed_copy_differs_only_where_the_object_was(shelves_dir: Path) -> None:
    _, per_image, _, placements = _split(shelves_dir)
    for entry in placements[:10]:
        full = np.asarray(Image.open(shelves_dir / "val" / f"{entry['image_id']:012d}.png"), dtype=np.int16)
        removed = np.asarray(Image.open(shelves_dir / entry["file_name"]), dtype=np.int16)
        x, y, w, h = per_image[entry["image_id"]][entry["removed"]]["bbox"]
        changed = np.abs(full - removed).max(axis=2) > 0
        assert changed.any()
        rows, columns = np.nonzero(changed)
        assert rows.min() >= int(y) - 1 and rows.max() <= y + h + 1
        assert columns.min() >= int(x) - 1 and columns.max() <= x + w + 1


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    synthesize(tmp_path / "a", train=0, val=6, seed=2, workers=1, progress=False, scene="shelves")
    synthesize(tmp_path / "b", train=0, val=6, seed=2, workers=1, progress=False, scene="shelves")
    files = {p.relative_to(tmp_path / "a"): p.read_bytes() for p in (tmp_path / "a").rglob("*") if p.is_file()}
    assert len(files) == 6 + 6 + 6  # instances, captions, placements of both splits; images; removed copies
    assert all((tmp_path / "b" / name).read_bytes() == data for name, data in files.items())


def test_cli_refuses_shapes_options_for_shelves(tmp_path: Path, capsys) -> None:
    argv = ["data", "synth", "--out", str(tmp_path / "s"), "--train", "0", "--val", "2", "--scene", "shelves"]
    assert main([*argv, "--max-extent", "0.3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["spatiallock: error: --max-extent: shapes scenes only (on shelves, the rules decide)"]
    assert not (tmp_path / "s").exists()
    assert main([*argv, "--no-progress"]) == 0
    assert (tmp_path / "s" / "placements_val.json").is_file()
