"""Object insertion: the object is drawn in its box and the image far from the box is left as it was."""

from __future__ import annotations

import numpy as np
import torch
from helpers import NAMES, pog_pipeline
from PIL import Image

from spatiallock.cli import main
from spatiallock.location.insert import box_mask, feathered, insert_object


def _scene(size: int = 32, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_masks_cover_the_box_and_the_band_around_it() -> None:
    mask = box_mask((0.25, 0.5, 0.75, 1.0), 8, 8)
    assert mask[4:, 2:6].all() and mask.sum() == 16
    assert box_mask((0.25, 0.5, 0.75, 1.0), 8, 8, grow=1.0).sum() == 6 * 5
    weight = feathered((0.25, 0.25, 0.75, 0.75), 16, 16, feather=2)[:, :, 0]
    assert (weight[4:12, 4:12] == 1).all() and weight[0, 0] == 0 and 0 < weight[3, 8] < 1 and weight[1, 8] == 0


def test_insertion_leaves_the_pixels_far_from_the_box_unchanged(tiny_small_base) -> None:
    pipe = pog_pipeline(tiny_small_base)
    scene = _scene()
    box = (0.5, 0.5, 0.875, 0.875)
    out = insert_object(pipe, scene, box, "red circle", generator=torch.Generator().manual_seed(0),
                        num_inference_steps=3, feather=2)  # fmt: skip
    before, after = np.asarray(scene), np.asarray(out)
    assert after.shape == before.shape
    far = feathered(box, 32, 32, feather=3)[:, :, 0] == 0  # more than 2 pixels from the box
    assert far.sum() > 500 and np.array_equal(after[far], before[far])
    assert (after[16:28, 16:28] != before[16:28, 16:28]).mean() > 0.5  # the box itself is drawn anew
    # the same seed draws the same object; another draws another
    again = insert_object(pipe, scene, box, "red circle", generator=torch.Generator().manual_seed(0),
                          num_inference_steps=3, feather=2)  # fmt: skip
    other = insert_object(pipe, scene, box, "red circle", generator=torch.Generator().manual_seed(1),
                          num_inference_steps=3, feather=2)  # fmt: skip
    assert np.array_equal(np.asarray(again), after) and not np.array_equal(np.asarray(other), after)


def test_insert_command_writes_the_image_or_refuses_in_one_line(tiny_small_base, tmp_path, capsys) -> None:
    pog_pipeline(tiny_small_base).adapter.save_pretrained(tmp_path / "adapter")
    _scene().save(tmp_path / "scene.png")
    (tmp_path / "notes.txt").write_text("not an image")
    out = tmp_path / "out.png"
    model = ["--model", str(tiny_small_base), "--adapter", str(tmp_path / "adapter"), "--steps", "2"]
    good = ["insert", "--image", str(tmp_path / "scene.png"), "--out", str(out), *model]
    bad = {
        "--image": ["insert", "--image", str(tmp_path / "missing.png"), "--label", NAMES[0], "--box", "0,0,1,1"],
        "--image ": ["insert", "--image", str(tmp_path / "notes.txt"), "--label", NAMES[0], "--box", "0,0,1,1"],
        "--box": [*good[:3], "--label", NAMES[0], "--box", "0.5,0.5,1.5,1"],
        "--label": [*good[:3], "--label", "purple hexagon", "--box", "0,0,0.5,0.5"],
        "--locator": [*good[:3], "--label", NAMES[0], "--locator", str(tmp_path / "no-locator")],
    }
    for field, argv in bad.items():
        argv = [*argv, "--out", str(out), *model] if argv[0] == "insert" and "--out" not in argv else argv
        assert main(argv) == 2, field
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"spatiallock: error: {field.strip()}"), err
        assert not out.exists()
    assert main([*good, "--label", NAMES[1], "--box", "0.1,0.1,0.6,0.6"]) == 0
    assert "inserted 'blue square' at 0.1000 0.1000 0.6000 0.6000" in capsys.readouterr().out
    assert Image.open(out).size == (32, 32)
