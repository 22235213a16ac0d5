"""`spatiallock data synth` and `spatiallock data show` through the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from spatiallock.cli import main


def test_synth_writes_both_splits(tmp_path: Path, capsys) -> None:
    out = tmp_path / "shapes"
    assert (
        main(["data", "synth", "--out", str(out), "--train", "5", "--val", "3", "--seed", "2", "--no-progress"]) == 0
    )
    assert "images/s" in capsys.readouterr().out
    for split, count in (("train", 5), ("val", 3)):
        assert len(list((out / split).glob("*.png"))) == count
        instances = json.loads((out / f"instances_{split}.json").read_text())
        captions = json.loads((out / f"captions_{split}.json").read_text())
        assert [i["id"] for i in instances["images"]] == [i["id"] for i in captions["images"]]
        assert {a["image_id"] for a in captions["annotations"]} == {i["id"] for i in instances["images"]}
    assert not list(out.glob("*.part")) and not list(out.glob(".*"))
    assert Image.open(out / "val" / "000000000003.png").size == (64, 64)


def test_synth_size_option(tmp_path: Path) -> None:
    assert (
        main(["data", "synth", "--out", str(tmp_path), "--train", "0", "--val", "2", "--size", "96", "--no-progress"])
        == 0
    )
    assert Image.open(tmp_path / "val" / "000000000002.png").size == (96, 96)
    assert json.loads((tmp_path / "instances_train.json").read_text())["images"] == []


def test_synth_scene_options_draw_a_harder_set(tmp_path: Path) -> None:
    """More, smaller objects than the training domain: what `evaluate` is checked on beyond it."""
    hard = ["--min-objects", "5", "--max-objects", "6", "--max-extent", "0.3", "--min-visible", "0.3"]
    for name, options in (("easy", []), ("hard", hard)):
        args = ["data", "synth", "--out", str(tmp_path / name), "--train", "0", "--val", "24", "--seed", "3"]
        assert main([*args, *options, "--no-progress", "--workers", "1"]) == 0
    easy, hard = (json.loads((tmp_path / n / "instances_val.json").read_text()) for n in ("easy", "hard"))
    count = lambda d: [sum(a["image_id"] == i["id"] for a in d["annotations"]) for i in d["images"]]  # noqa: E731
    assert min(count(easy)) < 5 and set(count(hard)) <= {5, 6}
    assert max(max(a["bbox"][2:]) for a in hard["annotations"]) <= 0.3 * 64 + 1
    assert max(max(a["bbox"][2:]) for a in easy["annotations"]) > 0.3 * 64 + 1
    assert hard["info"]["scene"]["min_visible"] == 0.3 and easy["info"]["scene"]["max_objects"] == 6


@pytest.mark.parametrize(
    ("options", "field"),
    [
        (["--train", "-1", "--val", "2"], "--train"),
        (["--train", "2", "--val", "-3"], "--val"),
        (["--train", "2", "--val", "2", "--size", "16"], "--size"),
        (["--train", "2", "--val", "2", "--seed", "-1"], "--seed"),
        (["--train", "2", "--val", "2", "--min-objects", "4", "--max-objects", "3"], "--min-objects"),
        (["--train", "2", "--val", "2", "--max-objects", "31"], "--max-objects"),
        (["--train", "2", "--val", "2", "--max-extent", "nan"], "--max-extent"),
        (["--train", "2", "--val", "2", "--min-visible", "0"], "--min-visible"),
        (["--train", "0", "--val", "0"], "nothing to write"),
        (["--train", "2", "--val", "2", "--workers", "0"], "--workers"),
    ],
)
def test_synth_rejects_bad_arguments(tmp_path: Path, capsys, options: list[str], field: str) -> None:
    out = tmp_path / "shapes"
    assert main(["data", "synth", "--out", str(out), *options]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("spatiallock: error:") and field in lines[0]
    assert not out.exists()


def test_help_shows_an_example(capsys) -> None:
    with pytest.raises(SystemExit) as done:
        main(["data", "synth", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "spatiallock data synth --out" in text and "--seed" in text


def test_show_draws_a_grid(tmp_path: Path, capsys) -> None:
    data = tmp_path / "shapes"
    main(["data", "synth", "--out", str(data), "--train", "0", "--val", "6", "--no-progress"])
    grid = tmp_path / "grid.png"
    plain = tmp_path / "plain.png"
    assert main(["data", "show", str(data), "--split", "val", "--num", "4", "--cell", "64", "--out", str(grid)]) == 0
    image = Image.open(grid).convert("RGB")
    assert image.width == 2 * (64 + 4) + 4 and image.height > image.width
    # the same cells without boxes and text differ: something was drawn on them
    Image.open(data / "val" / "000000000001.png").resize((64, 64), Image.Resampling.NEAREST).save(plain)
    cell = image.crop((4, 4, 68, 68))
    assert cell.tobytes() != Image.open(plain).convert("RGB").tobytes()
    assert "4 of 6 images" in capsys.readouterr().out
