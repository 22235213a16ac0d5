"""`train locator` on broken shelves data: one line naming the file and the field, exit code 2, nothing written.

Every case breaks one thing in a copy of a tiny shelves data set (8 train and 2 val images at 32 px, written
once): the train placements, the train instances, an image a placement names, or the val files the result is
scored on after training. All of it is checked before training starts, so `--out` is never created.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from spatiallock.cli import main
from spatiallock.data.synth import synthesize

SMALL = ["--max-steps", "1", "--batch-size", "2", "--no-progress", "--eval-samples", "1"]


@pytest.fixture(scope="module")
def shelves(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shelves") / "data"
    synthesize(folder, train=8, val=2, seed=0, size=32, workers=1, progress=False, scene="shelves", min_objects=2)
    return folder


@pytest.fixture
def data(tmp_path: Path, shelves: Path) -> Path:
    """A copy of the data set two folders below `tmp_path` (so `../../x.png` names `tmp_path/x.png`)."""
    return Path(shutil.copytree(shelves, tmp_path / "sets" / "data"))


def _edit(path: Path, change: Callable[[dict], object]) -> None:
    values = json.loads(path.read_text())
    change(values)
    path.write_text(json.dumps(values))


def _refused(data: Path, capsys, *expected: str) -> str:
    """Run `train locator` on `data`; check the run is refused in one line holding `expected`, and return it."""
    out = data.parent.parent / "loc"
    code = main(["train", "locator", "--data", str(data), "--out", str(out), *SMALL])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured.err
    assert len(lines) == 1 and lines[0].startswith("spatiallock: error: "), lines
    assert "Traceback" not in captured.err + captured.out
    for part in expected:
        assert part in lines[0], (part, lines[0])
    assert not out.exists()
    return lines[0]


def _index(data: Path, file_name: str) -> int:
    entries = json.loads((data / "placements_train.json").read_text())["placements"]
    return next(i for i, entry in enumerate(entries) if entry["file_name"] == file_name)


@pytest.mark.parametrize(
    ("placements", "field"),
    [([1, 2, 3], "placements[0]: the number 1, expected an object"), ({"a": 1}, "placements: an object")],
    ids=["list-of-numbers", "object"],
)
def test_placements_that_are_not_a_list_of_entries(data: Path, capsys, placements, field: str) -> None:
    _edit(data / "placements_train.json", lambda values: values.update(placements=placements))
    _refused(data, capsys, f"{data / 'placements_train.json'}: {field}")


def test_an_instances_file_that_is_not_json(data: Path, capsys) -> None:
    (data / "instances_train.json").write_text('{"images": [')
    _refused(data, capsys, f"{data / 'instances_train.json'}: not a JSON file")


@pytest.mark.parametrize("key", ["width", "height"])
def test_an_image_entry_without_its_size(data: Path, capsys, key: str) -> None:
    _edit(data / "instances_train.json", lambda values: values["images"][1].pop(key))
    _refused(data, capsys, f"{data / 'instances_train.json'}: images[1].{key}: missing")


def test_a_missing_removed_object_image(data: Path, capsys) -> None:
    name = "train-removed/000000000003.png"
    (data / name).unlink()
    index = _index(data, name)
    _refused(data, capsys, f"{data / 'placements_train.json'}: placements[{index}].file_name: ", "not found")


def test_an_unreadable_removed_object_image(data: Path, capsys) -> None:
    name = "train-removed/000000000005.png"
    (data / name).write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    index = _index(data, name)
    _refused(data, capsys, f"placements[{index}].file_name: ", "not a readable image")


@pytest.mark.parametrize(
    ("key", "box", "problem"),
    [
        ("positives", [0.1, 0.2], "positives[0]: a list of 2 items, expected 4 numbers"),
        ("negatives", [0.1, 0.2, "0.5", 0.6], 'negatives[0][2]: the string "0.5", expected a finite number'),
        ("positives", [0.5, 0.2, 0.1, 0.6], "positives[0]: [0.5, 0.2, 0.1, 0.6]: expected 0 <= x0 <= x1 <= 1"),
        ("negatives", [0.1, 0.2, 0.5, 1.5], "negatives[0]: [0.1, 0.2, 0.5, 1.5]: expected 0 <= x0"),
    ],
    ids=["two-numbers", "a-string", "x1-left-of-x0", "beyond-1"],
)
def test_boxes_that_are_not_four_normalised_numbers(data: Path, capsys, key: str, box: list, problem: str) -> None:
    _edit(data / "placements_train.json", lambda values: values["placements"][1][key].__setitem__(0, box))
    _refused(data, capsys, f"{data / 'placements_train.json'}: placements[1].{problem}")


@pytest.mark.parametrize("how", ["parent", "absolute", "link"])
def test_a_file_name_that_leaves_the_data_folder(data: Path, capsys, how: str) -> None:
    outside = data.parent.parent / "x.png"
    Image.new("RGB", (32, 32)).save(outside)
    name = {"parent": "../../x.png", "absolute": str(outside), "link": "train-removed/link.png"}[how]
    if how == "link":
        os.symlink(outside, data / name)
    _edit(data / "placements_train.json", lambda values: values["placements"][0].update(file_name=name))
    _refused(data, capsys, f"{data / 'placements_train.json'}: placements[0].file_name: ", "leaves the data folder")


@pytest.mark.parametrize(
    ("file", "change", "field"),
    [
        ("instances_val.json", "not json", "not a JSON file"),
        ("instances_val.json", lambda v: v.pop("categories"), "not a COCO instances file"),
        ("instances_val.json", lambda v: v["images"][0].pop("shelves"), "images[0].shelves: missing"),
        ("instances_val.json", lambda v: v["annotations"][0].update(bbox=[1, 2]), "annotations[0].bbox: a list of 2"),
        ("placements_val.json", lambda v: v["placements"][0].update(removed=99), "placements[0].removed: 99"),
        ("placements_val.json", lambda v: v["placements"][1].update(image_id=7), "placements[1].image_id: 7"),
    ],
    ids=["instances-not-json", "no-categories", "no-shelves", "short-bbox", "removed-out-of-range", "unknown-image"],
)
def test_broken_val_files_are_refused_before_training(data: Path, capsys, file: str, change, field: str) -> None:
    if change == "not json":
        (data / file).write_text("not json")
    else:
        _edit(data / file, change)
    _refused(data, capsys, f"{data / file}: {field}")


def test_a_label_that_is_not_a_category(data: Path, capsys) -> None:
    _edit(data / "placements_train.json", lambda values: values["placements"][2].update(label="green hexagon"))
    _refused(data, capsys, f"{data / 'placements_train.json'}: placements[2].label: 'green hexagon' is not ")
