"""Hostile and careless input, round three: each case of the report is one line and exit 2, nothing half-written,
nothing read outside where it should be. (Case 1, the page's file leak, is tested over HTTP in tests/browser.)"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

from spatiallock.cli import main
from spatiallock.errors import SpatialLockError

LAYOUT = {"caption": "a red circle", "objects": [{"label": "red circle", "box": [0.1, 0.1, 0.6, 0.6]}]}


def refused(capsys, code: int, *parts: str) -> str:
    """Exit code 2 and one error line holding every part, no traceback."""
    stderr = capsys.readouterr().err
    assert code == 2, stderr
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("spatiallock: error:")]
    assert len(lines) == 1, stderr
    for part in parts:
        assert part in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def lama_folder(tmp_path_factory) -> Path:
    """A tiny LAMA model folder (untrained weights: what is tested is refused before any image is drawn)."""
    from spatiallock.baselines.lama import LamaConfig, LamaGenerator

    torch.manual_seed(0)
    config = LamaConfig(categories=["red circle", "blue square"], image_size=32, max_objects=3, embed_dim=8,
                        z_dim=8, image_z_dim=16, mask_size=8, channels=4, d_channels=4)  # fmt: skip
    folder = tmp_path_factory.mktemp("lama") / "lama"
    LamaGenerator(config).eval().save_pretrained(folder)
    return folder


def bomb_png(path: Path, side: int = 30000) -> Path:
    """A PNG whose header declares side x side pixels (its data is one pixel's): a decompression bomb's header."""
    Image.new("RGB", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = bytearray(data[12:29])  # b"IHDR" + 13 bytes
    ihdr[4:12] = struct.pack(">II", side, side)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    path.write_bytes(bytes(data))
    return path


# ---- case 3: a folder given as the layout file ------------------------------------------------------------------


@pytest.mark.parametrize("command", ["generate", "generate-dataset", "evaluate"])
def test_3_a_folder_as_the_layout_file_is_one_line(command, tmp_path, capsys):
    option = "--layout" if command == "generate" else "--layouts"
    out = tmp_path / ("out.json" if command == "evaluate" else "out")
    args = [command, option, str(tmp_path), "--model", "default", "--out", str(out)]
    args += ["--detector", "default"] if command == "evaluate" else []
    refused(capsys, main(args), "is a folder, expected")
    assert not out.exists()


def test_3_reading_a_folder_leaks_no_descriptor(tmp_path):
    import os

    from spatiallock.files import read_json

    before = len(os.listdir("/proc/self/fd")) if Path("/proc/self/fd").is_dir() else None
    for _ in range(20):
        with pytest.raises(SpatialLockError, match="is a folder"):
            read_json(tmp_path)
    if before is not None:
        assert len(os.listdir("/proc/self/fd")) == before


# ---- case 5: a LAMA folder where only a diffusion model can go ----------------------------------------------------


def test_5_insert_with_a_lama_folder_is_one_line(lama_folder, tmp_path, capsys):
    image = tmp_path / "scene.png"
    Image.new("RGB", (32, 32), (90, 90, 90)).save(image)
    out = tmp_path / "inserted.png"
    args = ["insert", "--image", str(image), "--label", "red circle", "--box", "0.1,0.1,0.5,0.5"]
    code = main([*args, "--model", str(lama_folder), "--out", str(out), "--steps", "2"])
    refused(capsys, code, "--model", "layout GAN", "cannot insert")
    assert not out.exists()


def test_5_the_page_refuses_a_lama_folder_in_one_line(lama_folder):
    from spatiallock.app import Studio

    with pytest.raises(SpatialLockError, match="^--model: .* layout GAN"):
        Studio(str(lama_folder), detector=None)


def test_5_diffusion_options_for_a_lama_folder_name_the_option(lama_folder, tmp_path, capsys):
    layout = tmp_path / "layout.json"
    layout.write_text(json.dumps(LAYOUT))
    out = tmp_path / "out"
    args = ["generate", "--layout", str(layout), "--model", str(lama_folder), "--out", str(out)]
    refused(capsys, main([*args, "--steps", "3"]), "--steps: a diffusion sampling option")
    refused(capsys, main([*args, "--candidates", "2"]), "--candidates: a diffusion sampling option")
    assert not out.exists()


# ---- case 8: evaluate's real images go through the pixel limit ----------------------------------------------------


def test_8_a_real_image_declaring_a_billion_pixels_is_one_line(tmp_path, capsys):
    real = tmp_path / "real"
    real.mkdir()
    bomb_png(real / "bomb.png")
    layout = tmp_path / "layout.json"
    layout.write_text(json.dumps(LAYOUT))
    out = tmp_path / "report.json"
    args = [
        "evaluate",
        "--layouts",
        str(layout),
        "--model",
        "default",
        "--steps",
        "1",
        "--real",
        str(real),
        "--detector",
        "default",
    ]
    refused(capsys, main([*args, "--out", str(out), "--no-progress"]), "bomb.png", "pixels")


# ---- case 9: generate-dataset never writes through a linked images folder -----------------------------------------


def test_9_a_linked_images_folder_is_refused_and_its_target_untouched(tmp_path, capsys):
    elsewhere, out = tmp_path / "elsewhere", tmp_path / "out"
    elsewhere.mkdir()
    out.mkdir()
    (elsewhere / ".notes.part").write_text("keep me")
    (out / "images").symlink_to("../elsewhere")
    layouts = tmp_path / "layouts.json"
    layouts.write_text(json.dumps([LAYOUT]))
    args = ["generate-dataset", "--layouts", str(layouts), "--model", "default", "--steps", "2", "--out", str(out)]
    refused(capsys, main(args), "--out", "is a link")
    assert sorted(p.name for p in elsewhere.iterdir()) == [".notes.part"]
    assert not (out / "generate.json").exists()


# ---- case 11: params ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--num-classes", "-1"], "--num-classes: from 1 to"),
        (["--phrase-dim", "0"], "--phrase-dim: from 1 to"),
    ],
)
def test_11_params_bounds_are_one_line(args, message, capsys):
    refused(capsys, main(["params", "--base", "sd-v1-4", *args]), message)


def test_11_params_on_a_binary_unet_config_is_one_line(tmp_path, capsys):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_bytes(bytes(range(256)) * 4)
    refused(capsys, main(["params", "--base", str(tmp_path)]), "config.json", "not valid JSON")


# ---- case 6: locate and insert check their options before any work ------------------------------------------------


@pytest.mark.parametrize(
    ("command", "extra", "message"),
    [
        ("locate", ["--seed", "99999999999999999999"], "--seed: must be from 0 to 4294967295"),
        ("insert", ["--seed", "99999999999999999999"], "--seed: must be from 0 to 4294967295"),
        ("insert", ["--guidance", "-50"], "--guidance: a finite number at least 0.0"),
        ("insert", ["--steps", "1001"], "--steps: at most the model's 1000 noise levels"),
        ("insert", ["--n", "100000"], "--n: must be 1 to 1000"),
        ("locate", ["--out", "README.md/x.png"], "--out"),
    ],
)
def test_6_7_locate_and_insert_options_are_checked_first(command, extra, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    args = [command, "--image", "examples/scene.png", "--label", "red circle", *extra]
    if command == "insert":
        args += ["--box", "0.1,0.1,0.4,0.4", "--out", str(tmp_path / "out.png")]
    refused(capsys, main(args), message)
    assert not (tmp_path / "out.png").exists()


def test_7_insert_refuses_an_image_too_large_to_sample(tmp_path, capsys):
    image = tmp_path / "large.png"
    Image.new("RGB", (2048, 2048), (90, 90, 90)).save(image)
    args = ["insert", "--image", str(image), "--label", "red circle", "--box", "0.1,0.1,0.4,0.4"]
    refused(capsys, main([*args, "--out", str(tmp_path / "out.png")]), "--image: 2048x2048", "resize")


def test_7_candidates_have_an_upper_bound(tmp_path, capsys):
    layout = tmp_path / "layout.json"
    layout.write_text(json.dumps(LAYOUT))
    args = ["generate", "--layout", str(layout), "--model", "default", "--out", str(tmp_path / "out")]
    refused(capsys, main([*args, "--candidates", "10000"]), "--candidates: must be from 1 to 64")


def test_7_texts_are_cut_before_they_are_tokenised():
    from spatiallock.base.text import CHARS_PER_TOKEN, _tokenize, warn_cut_texts

    seen = []

    class Recording:
        model_max_length = 32

        def __call__(self, texts, **options):
            seen.extend(len(text) for text in texts)
            ids = [[0] * min(len(text.split()), options["max_length"]) for text in texts]
            return type("Tokens", (), {"input_ids": ids, "attention_mask": ids})()

    huge = "word " * 2_000_000  # 10 MB
    with pytest.warns(UserWarning, match="cut"):
        warn_cut_texts(Recording(), [huge], 32)
    with pytest.raises(AttributeError):  # the recording tokenizer returns lists, not tensors: the call is what counts
        _tokenize(Recording(), [huge], 32, "cpu")
    assert seen and max(seen) <= 33 * CHARS_PER_TOKEN


def test_7_running_out_of_memory_is_one_line(monkeypatch, tmp_path, capsys):
    import spatiallock.commands.generate as generate_command

    def out_of_memory(args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(generate_command, "run_generate", out_of_memory)
    layout = tmp_path / "layout.json"
    layout.write_text(json.dumps(LAYOUT))
    args = ["generate", "--layout", str(layout), "--model", "default", "--out", str(tmp_path / "out")]
    refused(capsys, main(args), "out of memory", "--batch-size")


# ---- case 12: messages -------------------------------------------------------------------------------------------


def test_12_an_unknown_long_label_gives_a_short_line(tmp_path, capsys):
    layout = tmp_path / "layout.json"
    layout.write_text(json.dumps({**LAYOUT, "objects": [{"label": "x" * 5000, "box": [0.1, 0.1, 0.5, 0.5]}]}))
    args = ["evaluate", "--layouts", str(layout), "--model", "default", "--detector", "default", "--steps", "1"]
    line = refused(capsys, main([*args, "--out", str(tmp_path / "r.json")]), "is not a category of the detector")
    assert len(line) < 600


def test_12_a_folder_with_a_broken_config_is_not_called_an_adapter(tmp_path, capsys):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "config.json").write_text("{")
    layout = tmp_path / "layout.json"
    layout.write_text(json.dumps(LAYOUT))
    args = ["generate", "--layout", str(layout), "--model", str(folder), "--out", str(tmp_path / "out")]
    line = refused(capsys, main(args), "not a model folder")
    assert "adapter folder" not in line


def test_12_the_page_on_a_busy_port_is_refused_before_the_model_loads(capsys, monkeypatch):
    import socket

    import spatiallock.sampling.run as sampling_run

    monkeypatch.setattr(sampling_run, "load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        refused(capsys, main(["app", "--port", str(port), "--detector", "none"]), f"--port {port}", "cannot serve")
    assert "open http" not in capsys.readouterr().out


def test_12_a_bin_only_folder_is_refused_in_one_line_without_a_log_line(tmp_path):
    import shutil

    from spatiallock.shipped import default_model_path

    model = tmp_path / "model"
    shutil.copytree(default_model_path(), model)
    for weights in (model / "unet").glob("*.safetensors"):
        weights.unlink()
    (model / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"not read")
    layout = tmp_path / "layout.json"
    layout.write_text(json.dumps(LAYOUT))
    args = ["generate", "--layout", str(layout), "--model", str(model), "--out", str(tmp_path / "out")]
    # a process of its own: diffusers' log handler writes to the standard error it found at import
    done = subprocess.run([sys.executable, "-m", "spatiallock.cli", *args], capture_output=True, text=True)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith("spatiallock: error: base: cannot load") and "safetensors" in lines[0]
