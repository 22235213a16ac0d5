"""Hostile input to the sampling commands (issue 15): every refusal is one line and exit code 2, before any model is
loaded or anything is written where it can be; likely mistakes are one warning line; what is written sorts and
resumes correctly. Each test names the defect of the issue it covers."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch
from helpers import error_line, generate
from PIL import Image

import spatiallock.sampling.run as sampling
from spatiallock.cli import main
from spatiallock.errors import SpatialLockError

GOOD = {"caption": "a red circle", "objects": [{"label": "red circle", "box": [0.1, 0.1, 0.5, 0.5]}]}


def write_json(path: Path, value) -> str:
    path.write_text(value if isinstance(value, str) else json.dumps(value))
    return str(path)


def refused(capsys, code: int, *parts: str) -> str:
    """Assert a refusal: exit code 2 and one error line holding every part."""
    stderr = capsys.readouterr().err
    assert code == 2, stderr
    line = error_line(stderr)
    for part in parts:
        assert part in line, line
    return line


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model is a failure: what a test checks must be refused before."""

    def load_pipeline(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was refused")

    monkeypatch.setattr(sampling, "load_pipeline", load_pipeline)


# ---- 1. a thin box is drawn, and generate finishes ---------------------------------------------------------


def test_1_a_box_thinner_than_a_pixel_is_drawn(tiny_small_base, tmp_path, capsys):
    from spatiallock.data.draw import draw_boxes

    image = Image.new("RGB", (32, 32))
    thin = [(0.3, 0.3, 0.302, 0.6), (0.1, 0.5, 0.9, 0.5001)]
    assert draw_boxes(image, ["red square", "blue circle"], thin).size == (256, 256)
    assert draw_boxes(image, ["red square", "blue circle"], thin, dashed=True).size == (256, 256)
    # the layout, 11 samples: every image, drawn copy and the grid written, names sorted as sampled
    layout = write_json(tmp_path / "thin.json", {**GOOD, "objects": [{"label": "red square", "box": thin[0]}]})
    out = tmp_path / "out"
    assert generate(layout, tiny_small_base, out, "--n", "11", "--batch-size", "11") == 0
    names = sorted(p.name for p in out.iterdir())
    assert names[:2] == ["thin_00.png", "thin_00_boxes.png"] and names[-3:-1] == ["thin_10.png", "thin_10_boxes.png"]
    assert len(names) == 23 and names[-1] == "thin_grid.png"


# ---- 6. generate-dataset resumes only the same job, and redoes broken images -----------------------------------


def coco_files(folder: Path, captions: list[str]) -> str:
    """A COCO instances file of len(captions) images, one object each, and its captions file beside it."""
    images = [{"id": 10 + i, "file_name": f"{i}.png", "width": 64, "height": 64} for i in range(len(captions))]
    annotations = [
        {"id": i + 1, "image_id": 10 + i, "category_id": 3, "bbox": [4 + 8 * i, 8, 24, 20], "iscrowd": 0}
        for i in range(len(captions))
    ]
    texts = [{"id": i + 1, "image_id": 10 + i, "caption": text} for i, text in enumerate(captions)]
    write_json(folder / "captions_val.json", {"images": images, "annotations": texts})
    instances = {"images": images, "annotations": annotations, "categories": [{"id": 3, "name": "red circle"}]}
    return write_json(folder / "instances_val.json", instances)


def generate_dataset(layouts, model, out, *options) -> int:
    args = ["generate-dataset", "--layouts", str(layouts), "--model", str(model), "--out", str(out)]
    return main([*args, "--steps", "2", "--batch-size", "1", "--no-progress", *options])


def test_6_generate_dataset_redoes_broken_images_and_refuses_another_limit_or_captions(
    tiny_small_base, tmp_path, capsys
):
    captions = ["a red circle on the left", "a red circle", "one red circle"]
    layouts = coco_files(tmp_path, captions)
    out = tmp_path / "set"
    assert generate_dataset(layouts, tiny_small_base, out) == 0
    images = sorted((out / "images").glob("*.png"))
    whole = {p.name: p.read_bytes() for p in images}
    assert json.loads((out / "generate.json").read_text())["limit"] is None

    # a kill left an empty file and a cut one: both are generated again, the result is one run's
    images[0].write_bytes(b"")
    images[2].write_bytes(whole[images[2].name][:100])
    (out / "instances.json").unlink()
    assert generate_dataset(layouts, tiny_small_base, out) == 0
    assert {p.name: p.read_bytes() for p in images} == whole
    finished = (out / "instances.json").read_bytes()
    capsys.readouterr()

    # another --limit is another data set: refused, nothing rewritten
    refused(capsys, generate_dataset(layouts, tiny_small_base, out, "--limit", "2"), "other settings", "limit")
    assert (out / "instances.json").read_bytes() == finished

    # captions edited between a kill and the rerun: the same instances file (same bytes), other images
    before = Path(layouts).read_bytes()
    coco_files(tmp_path, ["a red circle on the right", *captions[1:]])
    assert Path(layouts).read_bytes() == before
    refused(capsys, generate_dataset(layouts, tiny_small_base, out), "other settings", "layouts_sha256")
    assert (out / "instances.json").read_bytes() == finished


# ---- 7. inputs that ended in tracebacks ------------------------------------------------------------------------


def test_7_layout_json_beyond_pythons_limits_is_one_line(tmp_path, capsys, no_model):
    out = tmp_path / "out"
    box = "[" + "1" * 5000 + ", 0, 1, 1]"
    digits = write_json(tmp_path / "digits.json", '{"caption": "a", "objects": [{"label": "x", "box": ' + box + "}]}")
    refused(capsys, generate(digits, "default", out), "digits.json: malformed JSON", "digits")
    deep = write_json(tmp_path / "deep.json", "[" * 100_000 + "]" * 100_000)
    refused(capsys, generate(deep, "default", out), "deep.json: malformed JSON: nested too deeply")
    # 4,000 digits parse, but are no float
    box = "[" + "1" * 4000 + ", 0, 1, 1]"
    big = write_json(tmp_path / "big.json", '{"caption": "a", "objects": [{"label": "x", "box": ' + box + "}]}")
    refused(capsys, generate(big, "default", out), "layout.objects[0].box: 1111", "is not a finite number")
    assert not out.exists()


@pytest.mark.parametrize(
    ("seed", "message"), [("99999999999999", "--seed: must be from 0 to 4294967295"), ("-1", "--seed")]
)
def test_7_a_seed_beyond_torch_is_refused_and_any_seed_makes_a_generator(tmp_path, capsys, no_model, seed, message):
    layout = write_json(tmp_path / "one.json", GOOD)
    refused(capsys, generate(layout, "default", tmp_path / "out", "--seed", seed), message)
    assert not (tmp_path / "out").exists()
    # the library takes any integer: modulo 2**64, as torch takes a negative seed
    assert sampling.image_generator(10**30, 5, 1).initial_seed() < 2**64
    negative = torch.Generator().manual_seed(-1_000_003 * 1009).initial_seed()
    assert sampling.image_generator(-1, 0, 0).initial_seed() == negative


def test_7_an_out_that_cannot_be_written_is_refused_before_the_model_is_loaded(
    tmp_path, capsys, no_model, monkeypatch
):
    layout = write_json(tmp_path / "one.json", GOOD)
    afile = tmp_path / "afile"
    afile.write_text("x")
    refused(capsys, generate(layout, "default", afile / "sub"), "--out: ", "afile is a file, not a folder")
    refused(capsys, generate(layout, "default", afile), "--out: ", "exists and is not a folder")
    # a read-only folder (permissions do not stop root: the check asks os.access, as the kernel would answer)
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != readonly and real_access(path, mode))
    refused(capsys, generate(layout, "default", readonly / "out"), "--out: ", "is read-only")
    # generate-dataset and evaluate check theirs the same way
    args = ["generate-dataset", "--layouts", layout, "--model", "default", "--out", str(afile / "set")]
    refused(capsys, main(args), "--out: ", "afile is a file, not a folder")
    args = ["evaluate", "--layouts", layout, "--model", "default", "--detector", "default"]
    refused(capsys, main([*args, "--out", str(readonly / "report.json")]), "--out: ", "is read-only")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "one.json", "readonly"]


def broken_model(tiny_small_base, folder: Path, part: str, change) -> Path:
    """A copy of the tiny small base whose `part` (a JSON file) is rewritten by `change`."""
    shutil.copytree(tiny_small_base, folder)
    path = folder / part
    value = change(json.loads(path.read_text()))
    path.write_bytes(value if isinstance(value, bytes) else json.dumps(value).encode())
    return folder


BROKEN_MODELS = {
    "random bytes": ("model_index.json", lambda index: bytes(range(7, 256)), "model_index.json: malformed JSON"),
    "a list": ("model_index.json", lambda index: [1, 2], "model_index.json: expected a JSON object"),
    'caption_tokens "abc"': (
        "model_index.json", lambda index: {**index, "caption_tokens": "abc"}, 'caption_tokens: a whole number from 1'
    ),
    "caption_tokens -5": (
        "model_index.json", lambda index: {**index, "caption_tokens": -5}, "caption_tokens: a whole number from 1"
    ),
    "a list as the U-Net's config": ("unet/config.json", lambda config: [1, 2], "config.json: expected a JSON object"),
    "no scheduler": (
        "scheduler/scheduler_config.json", lambda config: {**config, "_class_name": "NoSuchScheduler"},
        '_class_name "NoSuchScheduler" names no diffusers scheduler',
    ),
    "a model as scheduler": (
        "scheduler/scheduler_config.json", lambda config: {**config, "_class_name": "UNet2DConditionModel"},
        "names no diffusers scheduler",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BROKEN_MODELS))
def test_7_13_a_broken_model_folder_is_one_line_and_leaves_no_out(tiny_small_base, tmp_path, capsys, case):
    part, change, message = BROKEN_MODELS[case]
    model = broken_model(tiny_small_base, tmp_path / "model", part, change)
    layout = write_json(tmp_path / "one.json", GOOD)
    refused(capsys, generate(layout, model, tmp_path / "out"), message)
    assert not (tmp_path / "out").exists()


def test_7_an_adapter_config_that_is_no_object_is_one_line(tiny_small_base, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    write_json(adapter / "config.json", [1, 2])
    layout = write_json(tmp_path / "one.json", GOOD)
    code = generate(layout, tiny_small_base, tmp_path / "out", "--adapter", str(adapter))
    refused(capsys, code, "adapter: ", "config.json: expected a JSON object, got a list")
    assert not (tmp_path / "out").exists()


def test_7_text_that_no_tokenizer_takes_is_refused(tmp_path, capsys, no_model):
    surrogate = write_json(tmp_path / "s.json", '{"caption": "a \\ud800 circle", "objects": []}')
    refused(capsys, generate(surrogate, "default", tmp_path / "out"), "layout.caption: not valid Unicode ('\\ud800')")
    detector = tmp_path / "detector.pth"
    detector.write_bytes(b"x")
    layout = write_json(tmp_path / "one.json", GOOD)
    args = ["evaluate", "--layouts", layout, "--model", "default", "--detector", str(detector)]
    refused(capsys, main([*args, "--out", str(tmp_path / "r.json")]), "detector: ", "is not a folder")
    assert not (tmp_path / "out").exists()


def png_declaring(width: int, height: int) -> bytes:
    """The start of a PNG whose header declares `width` x `height` pixels (no pixel data)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


def test_7_inputs_read_only_after_sampling_are_checked_before(tmp_path, capsys, no_model):
    layout = write_json(tmp_path / "one.json", GOOD)
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_declaring(30000, 30000))
    code = generate(layout, "default", tmp_path / "out", "--init-image", str(bomb))
    refused(capsys, code, "--init-image: ", "900000000 pixels")
    args = ["evaluate", "--layouts", layout, "--model", "default", "--detector", "default"]
    code = main([*args, "--out", str(tmp_path / "r.json"), "--fid-weights", str(tmp_path / "none.pth")])
    refused(capsys, code, "--fid-weights: ", "not found")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bomb.png", "one.json"]


def test_7_garbage_settings_and_coco_files_are_one_line(tmp_path, capsys, no_model):
    layout = write_json(tmp_path / "one.json", GOOD)
    for garbage in (b"\x00\xff garbage", b"[1, 2]"):
        out = tmp_path / f"set-{len(garbage)}"
        (out / "images").mkdir(parents=True)
        (out / "generate.json").write_bytes(garbage)
        code = main(["generate-dataset", "--layouts", layout, "--model", "default", "--out", str(out)])
        refused(capsys, code, "generate.json", "not the settings file of a generate-dataset run")
    image = {"id": 1, "file_name": "1.png", "width": 64, "height": 64}
    annotation = {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10]}
    category = {"id": 1, "name": "red circle"}
    huge = 10**400  # an integer beyond any float
    cases = [
        (({**image, "width": 0}, annotation, category), "images[0].width: expected a positive number, got 0"),
        (({**image, "height": "64"}, annotation, category), 'images[0].height: expected a positive number, got "64"'),
        (({**image, "id": [1]}, annotation, category), "images[0].id: expected an id, got [1]"),
        ((image, {**annotation, "image_id": [1]}, category), "annotations[0].image_id: expected an id, got [1]"),
        ((image, annotation, {**category, "id": [1]}), "categories[0]: needs 'id'"),
        ((image, {**annotation, "bbox": [0, 0, huge, 1]}, category), "annotations[0].bbox: 1000"),
    ]
    for (img, ann, cat), message in cases:
        coco = {"images": [img], "annotations": [ann], "categories": [cat]}
        path = write_json(tmp_path / "instances_x.json", coco)
        code = main(["generate-dataset", "--layouts", path, "--model", "default", "--out", str(tmp_path / "set")])
        refused(capsys, code, "instances_x.json: ", message)
    assert not (tmp_path / "set").exists()


# ---- 8. unbounded input ----------------------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_8_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path, capsys, no_model):
    fifo = tmp_path / "layout.json"
    os.mkfifo(fifo)
    codes = []
    runner = threading.Thread(target=lambda: codes.append(generate(fifo, "default", tmp_path / "out")), daemon=True)
    runner.start()
    runner.join(timeout=60)
    if runner.is_alive():  # blocked in open(): a writer releases it, and the test fails
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        runner.join(timeout=10)
        pytest.fail("reading the layout file waited for a writer")
    refused(capsys, codes[0], "layout.json: not a regular file")


def test_8_devices_large_files_and_large_sizes_are_refused(tmp_path, capsys, no_model, monkeypatch):
    import spatiallock.files as files_module

    if Path("/dev/zero").exists():
        refused(capsys, generate("/dev/zero", "default", tmp_path / "out"), "/dev/zero: not a regular file")
    monkeypatch.setattr(files_module, "MAX_FILE_BYTES", 1000)
    large = write_json(tmp_path / "large.json", [GOOD] * 50)
    refused(capsys, generate(large, "default", tmp_path / "out"), "large.json: larger than", "too large")
    monkeypatch.undo()
    layout = write_json(tmp_path / "one.json", GOOD)
    refused(capsys, generate(layout, "default", tmp_path / "out", "--size", "100000"), "--size: ", "4096")
    assert not (tmp_path / "out").exists()


# ---- 11. every float option finite and in range; sampling that diverges is refused -----------------------------


@pytest.mark.parametrize(
    "option",
    [
        ("--guidance", "inf"), ("--guidance", "nan"), ("--guidance", "-1"), ("--grounding-steps", "nan"),
        ("--grounding-steps", "1.5"), ("--layout-guidance-scale", "inf"), ("--layout-guidance-scale", "nan"),
        ("--init-strength", "nan"), ("--init-strength", "0"),
    ],
)  # fmt: skip
def test_11_float_options_must_be_finite_and_in_range(tmp_path, capsys, no_model, option):
    layout = write_json(tmp_path / "one.json", GOOD)
    refused(capsys, generate(layout, "default", tmp_path / "out", *option), f"{option[0]}: ")


def test_11_guidance_that_makes_the_latents_infinite_is_refused_not_a_black_image(tiny_small_base, tmp_path, capsys):
    from spatiallock.pipelines.diffusion import SpatialLockPipeline

    layout = write_json(tmp_path / "one.json", GOOD)
    out = tmp_path / "out"
    refused(capsys, generate(layout, tiny_small_base, out, "--guidance", "1e308"), "sampling diverged")
    assert not out.exists()  # 13: nothing written, not even the folder
    pipe = SpatialLockPipeline.from_pretrained(tiny_small_base)
    for name in ("guidance_scale", "layout_guidance_scale"):  # nan would turn guidance off unnoticed
        with pytest.raises(SpatialLockError, match=f"{name}: a finite number, got nan"):
            pipe("a red circle", num_inference_steps=1, **{name: float("nan")})


# ---- 12. likely mistakes are said ------------------------------------------------------------------------------


def test_12_unknown_keys_invisible_labels_and_long_captions(tiny_small_base, tmp_path, capsys):
    out = tmp_path / "out"
    invisible = write_json(
        tmp_path / "zw.json", {**GOOD, "objects": [{"label": "\u200b\u200b\ufeff", "box": [0, 0, 1, 1]}]}
    )
    refused(capsys, generate(invisible, tiny_small_base, out), "objects[0].label: empty label")

    long_caption = "a red circle " + "on a very large and very plain grey background " * 8
    misspelled = {"caption": "a red circle", "object": GOOD["objects"]}
    extra = {**GOOD, "objects": [{**GOOD["objects"][0], "colour": "red"}]}
    layouts = [{**GOOD, "caption": long_caption}, misspelled, {**GOOD, "caption": long_caption + "again"}, extra]
    layout = write_json(tmp_path / "mixed.json", layouts)
    assert generate(layout, tiny_small_base, out) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("spatiallock: warning:")]
    assert len(warnings) == 3, warnings
    assert "unknown key \"object\" ignored at layouts[1] (did you mean 'objects'?)" in warnings[0]
    assert 'unknown key "colour" ignored at layouts[3].objects[0]' in warnings[1]
    assert "2 captions longer than the 32 tokens the text encoder reads are cut" in warnings[2]
    assert len(list(out.glob("mixed_*_boxes.png"))) == 4


# ---- 13. no output on bad input, after the model is loaded too -------------------------------------------------


def test_13_a_size_the_model_cannot_take_leaves_no_out(tiny_small_base, tmp_path, capsys):
    layout = write_json(tmp_path / "one.json", GOOD)
    refused(capsys, generate(layout, tiny_small_base, tmp_path / "out", "--size", "63"), "--size: must be a multiple")
    refused(capsys, generate(layout, tiny_small_base, tmp_path / "out", "--steps", "5000"), "--steps: at most")
    assert not (tmp_path / "out").exists()


# ---- 15. a model name that is no folder never goes to the network ----------------------------------------------


def test_15_a_hub_id_is_taken_from_the_cache_or_refused_in_one_line(tiny_small_base, tmp_path, capsys, monkeypatch):
    import socket

    from huggingface_hub import constants

    def no_network(*args, **kwargs):
        raise AssertionError("a model name went to the network")

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    layout = write_json(tmp_path / "one.json", GOOD)
    out = tmp_path / "out"

    # online, but the hub cannot be reached (or has no such model): one line naming the failure
    def unreachable(*args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setattr(socket.socket, "connect", unreachable)
    refused(capsys, generate(layout, "someone/nothing", out), "someone/nothing: no such folder", "fetching it failed")
    # offline (HF_HUB_OFFLINE): never a network call
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    refused(capsys, generate(layout, "someone/nothing", out), "someone/nothing: no such folder", "offline")
    refused(capsys, generate(layout, "./no/such/folder", out), "model: ./no/such/folder: no such folder")
    # a hub model in the cache is used from there
    snapshot = tmp_path / "hub" / "models--someone--tiny" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_small_base, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    assert generate(layout, "someone/tiny", out) == 0
    assert (out / "one_0.png").is_file()


# ---- 16. one-line usage errors; names that sort ----------------------------------------------------------------


REQUIRED = ["--layout", "x.json", "--model", "default", "--out", "o"]


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["generate", *REQUIRED, "--steps", "x"], ["argument --steps: invalid int value: 'x'", "generate --help"]),
        (["generate", "--layout", "x.json"], ["required: ", "--out", "--model", "generate --help"]),
        (["generate", *REQUIRED, "--bogus"], ["unrecognized arguments: --bogus", "generate --help"]),
        (["genrate"], ["invalid choice: 'genrate'", "spatiallock --help"]),
        ([], ["required: <command>", "spatiallock --help"]),
    ],
)
def test_16_usage_errors_are_one_line_naming_the_option_and_the_help(capsys, argv, names):
    code = main(argv)
    stderr = capsys.readouterr().err
    assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert stderr.startswith("spatiallock: error: ")
    for name in names:
        assert name in stderr, stderr


def test_16_output_names_sort_as_the_layouts_beyond_a_thousand():
    from spatiallock.commands.generate import output_names

    names = output_names("layout", 1001)
    assert names[999] == "layout_0999" and names[1000] == "layout_1000" and sorted(names) == names
    assert output_names("layout", 12)[:2] == ["layout_000", "layout_001"]  # as before below a thousand
    assert output_names("two shapes", 1) == ["two_shapes"]
