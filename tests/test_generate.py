"""`spatiallock generate` and `generate-dataset`: what they write, how they refuse bad input, how they resume."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
from helpers import accelerate_launch, adapter_for, error_line, generate
from PIL import Image
from pycocotools.coco import COCO

import spatiallock.sampling.run as sampling
from spatiallock.cli import main
from spatiallock.layout import read_layouts

GOOD = {
    "caption": "a red circle left of a blue square",
    "objects": [
        {"label": "red circle", "box": [0.05, 0.3, 0.45, 0.7]},
        {"label": "blue square", "box": [0.55, 0.3, 0.95, 0.7]},
    ],
}


@pytest.fixture(scope="module")
def adapter_folder(tiny_small_base, tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapter")
    adapter_for(tiny_small_base, gates=0.8).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def foreign_adapter(tiny_sd, tmp_path_factory):
    """An adapter built for the tiny SD base: it does not fit the small base."""
    folder = tmp_path_factory.mktemp("foreign-adapter")
    adapter_for(tiny_sd, gates=0.8).save_pretrained(folder)
    return folder


def write_json(path, value) -> str:
    path.write_text(json.dumps(value))
    return str(path)


def test_generate_writes_images_drawn_copies_and_a_grid(tiny_small_base, adapter_folder, tmp_path, capsys):
    layout = write_json(tmp_path / "two.json", GOOD)
    out = tmp_path / "out"
    assert generate(layout, tiny_small_base, out, "--adapter", str(adapter_folder), "--n", "2", "--seed", "3") == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["two_0.png", "two_0_boxes.png", "two_1.png", "two_1_boxes.png", "two_grid.png"]
    assert Image.open(out / "two_0.png").size == (32, 32)
    assert min(Image.open(out / "two_0_boxes.png").size) >= 256  # enlarged so that labels can be read
    assert "wrote 5 files" in capsys.readouterr().out
    # the same seed gives the same bytes
    again = tmp_path / "again"
    assert generate(layout, tiny_small_base, again, "--adapter", str(adapter_folder), "--n", "2", "--seed", "3") == 0
    assert (again / "two_1.png").read_bytes() == (out / "two_1.png").read_bytes()


def bad_object(**changes) -> dict:
    obj = {"label": "red circle", "box": [0.1, 0.1, 0.5, 0.5], **changes}
    return {"caption": "a red circle", "objects": [obj]}


BOX = "layout.json: layout.objects[0].box: "
BAD_LAYOUTS = {
    "box outside [0,1]": (bad_object(box=[0.1, 0.1, 1.5, 0.5]), BOX + "[0.1, 0.1, 1.5, 0.5] lies outside [0, 1]"),
    "inverted box": (bad_object(box=[0.6, 0.1, 0.2, 0.5]), BOX + "[0.6, 0.1, 0.2, 0.5] is inverted"),
    "zero area": (bad_object(box=[0.2, 0.3, 0.2, 0.5]), BOX + "[0.2, 0.3, 0.2, 0.5] has zero area"),
    "NaN": (json.dumps(bad_object(box=[0.1, float("nan"), 0.5, 0.5])), BOX + "nan is not a finite number"),
    "empty label": (bad_object(label="  "), "layout.json: layout.objects[0].label: empty label"),
    "non-string label": (bad_object(label=7), "layout.json: layout.objects[0].label: expected a string, got 7"),
    "31 objects": ({"caption": "x", "objects": bad_object()["objects"] * 31}, "objects: 31 objects, at most 30"),
    "missing caption": ({"objects": []}, "layout.caption: missing"),
    "list entry": ([GOOD, {"caption": 3}], "layouts[1].caption: expected a string, got 3"),
    "malformed JSON": ('{"caption": "a", "objects": [', "malformed JSON"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_LAYOUTS))
def test_bad_layouts_exit_2_naming_the_field_and_write_nothing(
    case, tiny_small_base, adapter_folder, tmp_path, capsys
):
    value, message = BAD_LAYOUTS[case]
    path = tmp_path / "layout.json"
    path.write_text(value if isinstance(value, str) else json.dumps(value))
    out = tmp_path / "out"
    assert generate(path, tiny_small_base, out, "--adapter", str(adapter_folder)) == 2
    assert message in error_line(capsys.readouterr().err)
    assert not out.exists()
    # generate-dataset refuses the same file the same way
    args = ["generate-dataset", "--layouts", str(path), "--model", str(tiny_small_base), "--out", str(out)]
    assert main([*args, "--adapter", str(adapter_folder), "--no-progress"]) == 2
    assert message in error_line(capsys.readouterr().err)
    assert not out.exists()


def test_missing_files_and_a_foreign_adapter_exit_2(tiny_small_base, foreign_adapter, tmp_path, capsys):
    layout = write_json(tmp_path / "two.json", GOOD)
    out = tmp_path / "out"
    assert generate(tmp_path / "nope.json", tiny_small_base, out) == 2
    assert "nope.json: file not found" in error_line(capsys.readouterr().err)
    assert generate(layout, tmp_path / "no-model", out) == 2
    assert "model: " in error_line(capsys.readouterr().err)
    assert generate(layout, tiny_small_base, out, "--adapter", str(tmp_path / "no-adapter")) == 2
    assert "adapter: " in error_line(capsys.readouterr().err)
    assert generate(layout, tiny_small_base, out, "--adapter", str(foreign_adapter)) == 2
    assert "adapter does not fit the base" in error_line(capsys.readouterr().err)
    assert not out.exists()


def coco_layouts(tmp_path) -> str:
    """A COCO instances file with 5 images (one without objects) and its captions file beside it."""
    categories = [{"id": 3, "name": "red circle"}, {"id": 9, "name": "blue square"}]
    images = [{"id": 10 + i, "file_name": f"{i}.png", "width": 64, "height": 48} for i in range(5)]
    annotations = [
        {"id": 1, "image_id": 10, "category_id": 3, "bbox": [4, 4, 20, 20], "area": 400, "iscrowd": 0},
        {"id": 2, "image_id": 11, "category_id": 9, "bbox": [30, 10, 30, 30], "area": 900, "iscrowd": 0},
        {"id": 3, "image_id": 11, "category_id": 3, "bbox": [0, 0, 16, 16], "area": 256, "iscrowd": 0},
        {"id": 4, "image_id": 12, "category_id": 9, "bbox": [10, 10, 40, 20], "area": 800, "iscrowd": 0},
        {"id": 5, "image_id": 14, "category_id": 3, "bbox": [20, 20, 20, 20], "area": 400, "iscrowd": 0},
    ]
    captions = [{"id": 1, "image_id": 11, "caption": "a blue square and a red circle"}]
    write_json(tmp_path / "captions_val.json", {"images": images, "annotations": captions})
    instances = {"images": images, "annotations": annotations, "categories": categories}
    return write_json(tmp_path / "instances_val.json", instances)


def generate_dataset(layouts, model, adapter, out) -> int:
    args = ["generate-dataset", "--layouts", str(layouts), "--model", str(model), "--adapter", str(adapter)]
    return main([*args, "--out", str(out), "--per-layout", "2", "--batch-size", "3", "--steps", "2", "--no-progress"])


def test_generate_dataset_killed_and_resumed_equals_one_run(tiny_small_base, adapter_folder, tmp_path, monkeypatch):
    layouts = coco_layouts(tmp_path)
    whole = tmp_path / "whole"
    assert generate_dataset(layouts, tiny_small_base, adapter_folder, whole) == 0

    # a kill after 4 of the 8 images: the batch in flight is lost, nothing half-written remains
    resumed = tmp_path / "resumed"
    real_save, calls = sampling.sample_batch, []

    def dying_sample_batch(*args, **kwargs):
        images = real_save(*args, **kwargs)
        calls.append(len(images))
        if len(calls) == 2:
            from spatiallock.files import save_image_atomic

            save_image_atomic(images[0], resumed / "images" / "000000000004.png")  # part of the batch got out
            raise KeyboardInterrupt
        return images

    monkeypatch.setattr(sampling, "sample_batch", dying_sample_batch)
    assert generate_dataset(layouts, tiny_small_base, adapter_folder, resumed) == 130
    assert sorted(p.name for p in (resumed / "images").iterdir()) == [f"{i:012d}.png" for i in range(1, 5)]
    assert not (resumed / "instances.json").exists()
    (resumed / "images" / ".000000000005.png.4242.part").write_bytes(b"\x89PNG cut off by a kill -9")
    monkeypatch.setattr(sampling, "sample_batch", real_save)
    assert generate_dataset(layouts, tiny_small_base, adapter_folder, resumed) == 0

    files = sorted(p.relative_to(whole) for p in whole.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(resumed) for p in resumed.rglob("*") if p.is_file())
    for name in files:
        assert (whole / name).read_bytes() == (resumed / name).read_bytes(), name

    coco = COCO(str(resumed / "instances.json"))
    assert len(coco.getImgIds()) == 8 and len(coco.getAnnIds()) == 10  # 4 layouts (5 objects) x 2 samples
    assert sorted(coco.getCatIds()) == [3, 9]
    first = coco.loadImgs(coco.getImgIds())[2]  # source image 11, first sample
    assert first["source_image_id"] == 11 and (resumed / first["file_name"]).is_file()
    boxes = sorted(a["bbox"] for a in coco.loadAnns(coco.getAnnIds(imgIds=[first["id"]])))
    assert boxes == [[0.0, 0.0, 8.0, 10.667], [15.0, 6.667, 15.0, 20.0]]  # 64x48 boxes rescaled to 32x32
    captions = json.loads((resumed / "captions.json").read_text())["annotations"]
    assert captions[2]["caption"] == "a blue square and a red circle" and captions[0]["caption"] == "a red circle"

    # other settings in the same folder are refused instead of mixing two data sets
    args = [
        "generate-dataset",
        "--layouts",
        layouts,
        "--model",
        str(tiny_small_base),
        "--adapter",
        str(adapter_folder),
    ]
    assert main([*args, "--out", str(resumed), "--seed", "5", "--no-progress"]) == 2


# Run under `accelerate launch`: the command line as `python -m spatiallock.cli` runs it, each process keeping
# a record of the images it sampled and of how many processes shared the work.
RANK_SCRIPT = textwrap.dedent(
    """
    import json
    import runpy
    import sys

    from accelerate import PartialState

    import spatiallock.sampling.run as sampling

    evidence, argv = sys.argv[1], sys.argv[2:]
    sample_batch, sampled = sampling.sample_batch, []

    def recording_sample_batch(pipe, layouts, batch, options):
        sampled.extend(batch)
        return sample_batch(pipe, layouts, batch, options)

    sampling.sample_batch = recording_sample_batch
    sys.argv = ["spatiallock", *argv]
    try:
        runpy.run_module("spatiallock.cli", run_name="__main__")
    finally:
        state = PartialState()
        with open(f"{evidence}/rank{state.process_index}.json", "w") as f:
            json.dump({"processes": state.num_processes, "sampled": sampled}, f)
    """
)


def test_generate_dataset_in_two_processes_writes_the_files_of_one(
    tiny_small_base, adapter_folder, tmp_path, one_thread
):
    """`accelerate launch` with two CPU processes: each samples its share of the images, and the folder holds
    the same bytes, images and annotation files, as one process writes."""
    layouts = coco_layouts(tmp_path)  # 4 layouts with objects
    options = ["--model", str(tiny_small_base), "--adapter", str(adapter_folder), "--steps", "2", "--batch-size", "1"]
    alone, shared, evidence = tmp_path / "alone", tmp_path / "shared", tmp_path / "ranks"
    assert main(["generate-dataset", "--layouts", layouts, "--out", str(alone), *options, "--no-progress"]) == 0
    script = tmp_path / "generate_ranks.py"
    script.write_text(RANK_SCRIPT)
    evidence.mkdir()
    args = ["generate-dataset", "--layouts", layouts, "--out", str(shared), *options, "--no-progress"]
    done = accelerate_launch([str(script), str(evidence), *args], tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    ranks = [json.loads(path.read_text()) for path in sorted(evidence.glob("rank*.json"))]
    assert [rank["processes"] for rank in ranks] == [2, 2], ranks  # the two processes joined
    sampled = [sorted(tuple(job) for job in rank["sampled"]) for rank in ranks]
    assert all(sampled) and not set(sampled[0]) & set(sampled[1])  # each did a part, no image twice
    assert sorted(sampled[0] + sampled[1]) == [(i, 0) for i in range(4)]
    files = sorted(p.relative_to(alone) for p in alone.rglob("*") if p.is_file())
    assert len([f for f in files if f.suffix == ".png"]) == 4 and Path("instances.json") in files
    assert files == sorted(p.relative_to(shared) for p in shared.rglob("*") if p.is_file())
    for name in files:
        assert (shared / name).read_bytes() == (alone / name).read_bytes(), name


@pytest.mark.parametrize("variant", ["spatiallock", "gligen"])
def test_images_do_not_depend_on_batching(tiny_small_base, tmp_path, variant):
    """A layout's image is the same alone and in a batch with longer layouts (other padding, other neighbours)."""
    adapter = tmp_path / "adapter"
    adapter_for(tiny_small_base, variant, gates=0.8).save_pretrained(adapter)
    layouts = coco_layouts(tmp_path)
    pixels = {}
    for batch in (1, 4):
        out = tmp_path / f"batch-{batch}"
        args = ["generate-dataset", "--layouts", layouts, "--model", str(tiny_small_base), "--adapter", str(adapter)]
        options = ["--out", str(out), "--batch-size", str(batch), "--steps", "2", "--no-progress"]
        assert main([*args, *options]) == 0
        pixels[batch] = [np.asarray(Image.open(p), dtype=np.int16) for p in sorted((out / "images").glob("*.png"))]
    assert len(pixels[1]) == len(pixels[4]) == 4
    for alone, batched in zip(pixels[1], pixels[4]):
        assert np.abs(alone - batched).max() <= 1  # float summation order may move a pixel by one level
    assert np.abs(pixels[1][0] - pixels[1][1]).max() > 10  # and the images do differ from one another


def test_coco_images_with_more_than_thirty_objects_keep_the_largest(tmp_path):
    categories = [{"id": 1, "name": "red circle"}]
    images = [{"id": 1, "file_name": "1.png", "width": 100, "height": 100}]
    # 32 boxes of growing size: the two smallest are dropped, with a warning
    annotations = [
        {"id": k, "image_id": 1, "category_id": 1, "bbox": [0, 0, 2 + k, 2 + k], "area": (2 + k) ** 2, "iscrowd": 0}
        for k in range(32)
    ]
    path = write_json(
        tmp_path / "instances.json", {"images": images, "annotations": annotations, "categories": categories}
    )
    with pytest.warns(UserWarning, match="1 images have more than 30 objects; their 30 largest are used"):
        (layout,) = read_layouts(path)
    assert len(layout.boxes) == 30
    assert min(b[2] for b in layout.boxes) == pytest.approx(0.04)  # the 3rd smallest box (4 px of 100) is kept


def test_skip_leaves_out_the_first_layouts(tiny_small_base, tmp_path, capsys):
    """`--skip N`: the data set is made from the layouts after the first N (e.g. those of images a detector
    does not train on); past the end is one error line."""
    layouts = coco_layouts(tmp_path)
    args = ["generate-dataset", "--layouts", layouts, "--model", str(tiny_small_base), "--adapter", "none"]
    out = tmp_path / "skipped"
    assert main([*args, "--out", str(out), "--skip", "2", "--steps", "2", "--no-progress"]) == 0
    images = json.loads((out / "instances.json").read_text())["images"]
    assert [im["source_image_id"] for im in images] == [12, 14]  # 10 and 11 left out (13 has no objects)
    assert json.loads((out / "generate.json").read_text())["skip"] == 2
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "none"), "--skip", "4", "--no-progress"]) == 2
    assert "--skip" in error_line(capsys.readouterr().err) and not (tmp_path / "none").exists()
