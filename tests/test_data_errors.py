"""A file that is not COCO-format fails at once, with one line naming the file and what is missing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from spatiallock.cli import main
from spatiallock.data.coco import LayoutDataset
from spatiallock.errors import SpatialLockError


def _write(path: Path, data: object) -> Path:
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


@pytest.fixture
def good(tmp_path: Path) -> tuple[Path, Path, Path]:
    (tmp_path / "images").mkdir()
    image = {"id": 1, "file_name": "000000000001.png", "width": 8, "height": 8}
    instances = {"images": [image], "annotations": [], "categories": [{"id": 1, "name": "thing"}]}
    captions = {"images": [image], "annotations": [{"id": 1, "image_id": 1, "caption": "a thing"}]}
    return (
        _write(tmp_path / "good_instances.json", instances),
        _write(tmp_path / "good_captions.json", captions),
        tmp_path / "images",
    )


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ({"images": [], "categories": []}, "not a COCO instances file: missing key 'annotations'"),
        ({"annotations": [], "categories": []}, "not a COCO instances file: missing key 'images'"),
        ({"images": [], "annotations": {}, "categories": []}, "not a COCO instances file: 'annotations' is a dict"),
        ([{"caption": "x", "objects": []}], "not a COCO instances file: top level is a JSON list"),
        ('{"images": [', "not a JSON file"),
        (
            {"images": [], "annotations": [{"id": 1, "image_id": 1, "caption": "a cat"}], "categories": []},
            "not a COCO instances file: no annotation has the key 'bbox'",
        ),
    ],
)
def test_not_coco_instances(tmp_path: Path, good: tuple[Path, Path, Path], content: object, expected: str) -> None:
    bad = _write(tmp_path / "instances.json", content)
    with pytest.raises(SpatialLockError) as caught:
        LayoutDataset(bad, good[1], good[2])
    message = str(caught.value)
    assert message.startswith(f"{bad}: ") and expected in message and "\n" not in message


def test_captions_file_given_as_instances_names_the_file(good: tuple[Path, Path, Path]) -> None:
    instances, captions, images = good
    with pytest.raises(
        SpatialLockError, match=f"^{re.escape(str(captions))}: not a COCO instances file: missing key 'categories'$"
    ):
        LayoutDataset(captions, instances, images)


def test_instances_file_given_as_captions_names_the_file(tmp_path: Path, good: tuple[Path, Path, Path]) -> None:
    instances, _, images = good
    boxes = _write(
        tmp_path / "boxes.json", {"images": [], "annotations": [{"id": 1, "bbox": [0, 0, 1, 1]}], "categories": []}
    )
    with pytest.raises(
        SpatialLockError,
        match=f"^{re.escape(str(boxes))}: not a COCO captions file: no annotation has the key 'caption'$",
    ):
        LayoutDataset(instances, boxes, images)


def test_missing_file_names_the_file(tmp_path: Path, good: tuple[Path, Path, Path]) -> None:
    with pytest.raises(SpatialLockError, match="nowhere.json: file not found"):
        LayoutDataset(tmp_path / "nowhere.json", good[1], good[2])


def test_cli_reports_one_line_and_exit_code_2(tmp_path: Path, good: tuple[Path, Path, Path], capsys) -> None:
    bad = _write(tmp_path / "instances.json", {"images": [], "categories": []})
    argv = ["data", "show", "--instances", str(bad), "--captions", str(good[1]), "--images", str(good[2])]
    code = main([*argv, "--out", str(tmp_path / "grid.png")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines() == [
        f"spatiallock: error: {bad}: not a COCO instances file: missing key 'annotations'"
    ]
    assert not (tmp_path / "grid.png").exists()
