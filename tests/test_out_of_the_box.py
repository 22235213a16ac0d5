"""Hostile and careless input, round three: each case of the report is one line and exit 2, nothing half-written,
nothing read outside where it should be. (Case 1, the page's file leak, is tested over HTTP in tests/browser.)"""

from __future__ import annotations

import json
import struct
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
