"""Hostile input to the data, training and detector code (issue 15): one clear line and exit code 2, never a
traceback, nothing written outside --out, no pickle, and a resumed run that says what it resumes from."""

from __future__ import annotations

import json
import os
import shutil
import stat
import struct
import threading
import zlib
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from helpers import error_line, run_train_adapter
from safetensors.torch import load_file
from torch import nn

from spatiallock.checkpoint import atomic_save_pretrained, list_checkpoints, save_checkpoint
from spatiallock.cli import main
from spatiallock.data.cocofile import build_index, read_coco_json
from spatiallock.data.shapes import synth_categories
from spatiallock.errors import SpatialLockError
from spatiallock.evaluation.detector import Detector, DetectorConfig, evaluate_detector
from spatiallock.files import write_json_atomic
from spatiallock.training.loop import LoopConfig, make_accelerator, train_loop

pytestmark = pytest.mark.usefixtures("one_thread")


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def copy_of(folder: Path, tmp_path: Path, name: str) -> Path:
    return Path(shutil.copytree(folder, tmp_path / name))


def train_decoder(base, data, out, *options: str) -> int:
    args = ["train", "decoder", "--base", str(base), "--data", str(data), "--out", str(out), "--resolution", "32"]
    return main([*args, "--batch-size", "2", "--max-steps", "1", "--no-progress", *options])


# ---- 2: `train decoder` never follows links out of the base folder ------------------------------------------


@pytest.mark.parametrize("where", ["extra", "unet/extra.safetensors"])
@pytest.mark.parametrize("kind", ["folder", "file"])
def test_train_decoder_refuses_a_link_in_the_base_and_copies_nothing(
    tiny_small_base, tiny_shapes, tmp_path, capsys, where, kind
):
    secret = tmp_path / "secret"
    if kind == "folder":
        secret.mkdir()
        (secret / "id_rsa").write_text("private key")
    else:
        secret.write_text("private key")
    base = copy_of(tiny_small_base, tmp_path, "base")
    (base / where).symlink_to(secret)
    out = tmp_path / "sharper"
    assert train_decoder(base, tiny_shapes, out) == 2
    line = error_line(capsys.readouterr().err)
    assert f"base: {base / where} is a link" in line
    assert not out.exists()


# ---- 3: weights from safetensors or not at all ----------------------------------------------------------------


@pytest.fixture
def no_pickle(monkeypatch):
    """Any `torch.load` (the pickle fallback) fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load called: weights loaded through pickle")

    monkeypatch.setattr(torch, "load", refuse)


def pickled(folder: Path, part: str, cls) -> None:
    """Replace `folder/part`'s safetensors weights by the same weights as a pickled `.bin`."""
    model = cls.from_pretrained(folder, subfolder=part)
    for weights in (folder / part).glob("*.safetensors"):
        weights.unlink()
    model.save_pretrained(folder / part, safe_serialization=False)
    assert list((folder / part).glob("*.bin"))


def test_train_base_init_from_a_pickled_unet_is_refused(tiny_small_base, tiny_shapes, tmp_path, capsys, no_pickle):
    base = copy_of(tiny_small_base, tmp_path, "base")
    pickled(base, "unet", UNet2DConditionModel)
    args = ["train", "base", "--data", str(tiny_shapes), "--out", str(tmp_path / "o"), "--resolution", "32"]
    code = main([*args, "--init-from", str(base), "--max-steps", "1", "--batch-size", "2", "--no-progress"])
    assert code == 2
    line = error_line(capsys.readouterr().err)
    assert line.startswith(f"spatiallock: error: init from: cannot load {base}") and "safetensors" in line
    assert not (tmp_path / "o").exists()


def test_train_decoder_on_a_pickled_autoencoder_is_refused(tiny_small_base, tiny_shapes, tmp_path, capsys, no_pickle):
    base = copy_of(tiny_small_base, tmp_path, "base")
    pickled(base, "vae", AutoencoderKL)
    assert train_decoder(base, tiny_shapes, tmp_path / "o") == 2
    line = error_line(capsys.readouterr().err)
    assert line.startswith(f"spatiallock: error: base: cannot load {base}") and "safetensors" in line
    assert not (tmp_path / "o").exists()


def test_load_base_on_a_pickled_unet_is_refused(tiny_small_base, tmp_path, no_pickle):
    from spatiallock.base.folders import load_base

    base = copy_of(tiny_small_base, tmp_path, "base")
    pickled(base, "unet", UNet2DConditionModel)
    with pytest.raises(SpatialLockError, match=rf"^base: cannot load {base}: .*safetensors"):
        load_base(base)


def test_load_adapter_on_pickled_weights_is_refused(started, tmp_path, monkeypatch):
    from spatiallock.models.adapter import SpatialLockAdapter
    from spatiallock.pipelines.diffusion import load_adapter

    out = copy_of(started[0], tmp_path, "adapter")
    adapter = SpatialLockAdapter.from_pretrained(out)
    (out / "diffusion_pytorch_model.safetensors").unlink()
    adapter.save_pretrained(out, safe_serialization=False)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    with pytest.raises(SpatialLockError, match=rf"^adapter: cannot load {out}: .*safetensors"):
        load_adapter(out)


# ---- 4 and 14: unreadable checkpoints, and the temporary folders a kill leaves ----------------------------------


def tiny_run(folder: Path, max_steps: int, resume: bool = False, keep: int = 3):
    """`train_loop` on a linear model and 8 vectors: the loop of every trainer, in milliseconds."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    data = [torch.full((3,), float(i)) for i in range(8)]
    config = LoopConfig(
        max_steps=max_steps, batch_size=2, learning_rate=0.01, checkpoint_every=1, keep_checkpoints=keep,
        resume=resume, progress=False, ema_decay=0.5,
    )  # fmt: skip
    result = train_loop(
        accelerator=make_accelerator(), stage="s", folder=folder, models={"m": model}, dataset=data,
        collate_fn=torch.stack, compute_losses=lambda models, batch, g: {"loss": models["m"](batch).pow(2).mean()},
        config=config,
    )  # fmt: skip
    return result, model


def break_state(path: Path) -> None:
    path.write_text('{"step": 2, "optim')


CORRUPTIONS = {
    "truncated model": lambda c: truncate(c / "m.safetensors"),
    "truncated optimizer": lambda c: truncate(c / "optimizer.safetensors"),
    "truncated average": lambda c: truncate(c / "ema_m.safetensors"),
    "broken state.json": lambda c: break_state(c / "state.json"),
    "state.json a list": lambda c: (c / "state.json").write_text("[1, 2]"),
    "missing state.json": lambda c: (c / "state.json").unlink(),
    "missing model": lambda c: (c / "m.safetensors").unlink(),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_an_unreadable_newest_checkpoint_is_named_and_the_one_before_resumed(tmp_path, capsys, corruption):
    from spatiallock.checkpoint import read_checkpoint

    _, whole = tiny_run(tmp_path / "whole", 3)
    folder = tmp_path / "parts"
    tiny_run(folder, 2)
    checkpoints = folder / "checkpoints" / "s"
    CORRUPTIONS[corruption](checkpoints / "checkpoint-2")
    with pytest.raises(SpatialLockError, match="checkpoint-2: unreadable checkpoint"):
        read_checkpoint(checkpoints / "checkpoint-2", ["m"])
    capsys.readouterr()

    result, resumed = tiny_run(folder, 3, resume=True)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("spatiallock:")]
    assert len(warnings) == 1 and warnings[0].startswith(f"spatiallock: warning: {checkpoints / 'checkpoint-2'}: ")
    assert warnings[0].endswith("resuming from checkpoint-1 instead")
    assert result.step == 3
    assert torch.equal(resumed.weight, whole.weight) and torch.equal(resumed.bias, whole.bias)  # nothing lost
    assert [p.name for p in list_checkpoints(checkpoints)] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    read_checkpoint(checkpoints / "checkpoint-2", ["m"])  # written again by the resumed run


def test_resume_with_no_readable_checkpoint_is_one_line(started, tiny_sd, tiny_shapes, tmp_path, capsys):
    out = copy_of(started[0], tmp_path, "adapter")
    (checkpoint,) = list_checkpoints(out / "train" / "checkpoints" / "adapter")
    truncate(checkpoint / "adapter.safetensors")
    assert run_train_adapter(tiny_sd, tiny_shapes, out, "--lr", "1e-3", "--max-steps", "2", "--resume") == 2
    line = error_line(capsys.readouterr().err)
    assert line.startswith(f"spatiallock: error: --resume: {checkpoint}: unreadable checkpoint")
    assert line.endswith("no checkpoint to resume from")


def test_a_newer_checkpoint_that_resumed_before_is_replaced_not_kept(tmp_path, capsys):
    folder = tmp_path / "run"
    tiny_run(folder, 3, keep=5)
    checkpoints = folder / "checkpoints" / "s"
    break_state(checkpoints / "checkpoint-3" / "state.json")
    shutil.copytree(checkpoints / "checkpoint-3", checkpoints / "checkpoint-9")  # unreadable too
    tiny_run(folder, 3, resume=True, keep=5)
    assert "resuming from checkpoint-2" in capsys.readouterr().err
    # the run went on from step 2: the unreadable step-9 checkpoint would otherwise pass for the newest one
    assert [p.name for p in list_checkpoints(checkpoints)] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]


def test_stale_temporary_folders_of_a_killed_save_are_removed(tmp_path):
    folder = tmp_path / "run"
    tiny_run(folder, 1)
    checkpoints = folder / "checkpoints" / "s"
    stale = checkpoints / ".checkpoint-tmp-killed"
    stale.mkdir()
    (stale / "m.safetensors").write_bytes(b"x" * 1000)
    tiny_run(folder, 2, resume=True)
    assert not stale.exists()
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-1", "checkpoint-2"]

    # at every save too, and in a folder written by atomic_save_pretrained
    stale.mkdir()
    model = nn.Linear(2, 1)
    save_checkpoint(checkpoints, 5, {"m": model}, torch.optim.SGD(model.parameters(), lr=0.1))
    assert not stale.exists()
    detector = tiny_detector()
    target = tmp_path / "detector"
    (target / ".save-killed").mkdir(parents=True)
    atomic_save_pretrained(detector, target)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]


# ---- 5: a resumed run keeps the settings it was started with ---------------------------------------------------


@pytest.fixture(scope="module")
def started(tiny_sd, tiny_shapes, tmp_path_factory):
    """An adapter run after 1 step (checkpoint-1) and its recorded config.json."""
    out = tmp_path_factory.mktemp("started") / "adapter"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert run_train_adapter(tiny_sd, tiny_shapes, out, "--max-steps", "1", "--lr", "1e-3") == 0
    finally:
        torch.set_num_threads(threads)
    return out, (out / "train" / "config.json").read_bytes()


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (("--batch-size", "4"), "loop.batch_size: 2 -> 4"),
        (("--lr", "5e-4"), "loop.learning_rate: 0.001 -> 0.0005"),
        (("--variant", "poi"), "variant: 'spatiallock' -> 'poi'"),
        (("--seed", "1"), "loop.seed: 0 -> 1"),
        (("--data", "OTHER"), "data: "),
    ],
)
def test_resume_with_other_settings_is_refused_and_the_record_kept(
    started, tiny_sd, tiny_shapes, tmp_path, capsys, options, named
):
    out, recorded = started
    settings = {"--data": str(tiny_shapes), "--batch-size": "2", "--lr": "1e-3"}  # as the run was started
    settings[options[0]] = str(tmp_path) if options[1] == "OTHER" else options[1]
    args = ["train", "adapter", "--base", str(tiny_sd), "--out", str(out), "--max-steps", "2", "--resume"]
    assert main([*args, "--no-progress", *(item for pair in settings.items() for item in pair)]) == 2
    line = error_line(capsys.readouterr().err)
    assert line.startswith(f"spatiallock: error: --resume: the run in {out} was started with other settings (")
    assert named in line
    assert (out / "train" / "config.json").read_bytes() == recorded
    assert [p.name for p in list_checkpoints(out / "train" / "checkpoints" / "adapter")] == ["checkpoint-1"]


def test_resume_may_change_how_long_and_how_it_is_watched(started, tiny_sd, tiny_shapes, tmp_path):
    out = copy_of(started[0], tmp_path, "adapter")
    options = ("--lr", "1e-3", "--max-steps", "2", "--checkpoint-every", "7", "--keep", "2", "--num-workers", "0")
    # the same data folder, spelt apart
    assert run_train_adapter(tiny_sd, f"{tiny_shapes}/", out, *options, "--resume") == 0
    assert json.loads((out / "train" / "config.json").read_text())["loop"]["max_steps"] == 2


# ---- 7: bad COCO entries are skipped, bad files are one line -----------------------------------------------------


def split(tiny_shapes: Path) -> tuple[dict, dict]:
    return (json.loads((tiny_shapes / f"{kind}_val.json").read_text()) for kind in ("instances", "captions"))


@pytest.mark.parametrize(
    ("where", "key", "value"),
    [
        ("images", "width", 0),
        ("images", "width", "64"),
        ("images", "height", 10**400),
        ("images", "id", [1]),
        ("categories", "id", [1]),
        ("annotations", "image_id", [1]),
        ("annotations", "category_id", {"id": 1}),
        ("annotations", "bbox", [0, 0, 10**400, 1]),
        ("captions", "image_id", [1]),
    ],
)
def test_build_index_skips_and_counts_bad_entries(tiny_shapes, where, key, value):
    instances, captions = split(tiny_shapes)
    entries = captions["annotations"] if where == "captions" else instances[where]
    entries[0][key] = value
    index = build_index(instances, captions, tiny_shapes / "val")
    assert index.skipped and sum(index.skipped.values()) >= 1
    assert 3 <= len(index.records) <= 4


def test_data_show_and_the_detector_scoring_skip_bad_entries(tiny_shapes, tmp_path, capsys):
    data = copy_of(tiny_shapes, tmp_path, "shapes")
    instances, captions = split(data)
    instances["images"][0]["width"] = "64"
    instances["images"][1]["id"] = [2]
    instances["annotations"][0]["category_id"] = [1]
    captions["annotations"][0]["image_id"] = [1]
    write_json_atomic(data / "instances_val.json", instances)
    write_json_atomic(data / "captions_val.json", captions)
    assert main(["data", "show", str(data), "--out", str(tmp_path / "grid.png")]) == 0
    assert "(2 of 2 images)" in capsys.readouterr().out
    with pytest.warns(UserWarning, match="left out of the scoring: 2 bad image entry"):
        metrics = evaluate_detector(tiny_detector(), data, "val")
    assert set(metrics) == {"ap", "ap50", "ap75"}


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("[" * 100_000 + "]" * 100_000, "not a JSON file: nested too deeply"),
        ('{"images": [' + "9" * 5000 + "]}", "not a JSON file: Exceeds the limit"),
        (b"\xff\xfe{", "not a JSON file"),
    ],
)
def test_unreadable_coco_json_is_one_line(tmp_path, capsys, content, expected):
    bad = tmp_path / "instances.json"
    bad.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(SpatialLockError, match=f"^{bad}: {expected}"):
        read_coco_json(bad, "instances")


def test_a_fifo_as_coco_file_is_refused_without_waiting(tmp_path):
    fifo = tmp_path / "instances.json"
    os.mkfifo(fifo)
    outcome = []

    def read():
        try:
            read_coco_json(fifo, "instances")
        except SpatialLockError as err:
            outcome.append(str(err))

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    thread.join(10)
    if thread.is_alive():  # blocked in open(): let it go before failing
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert outcome == [f"{fifo}: not a regular file"]


def tiny_detector() -> Detector:
    torch.manual_seed(0)
    config = DetectorConfig(categories=synth_categories(), image_size=32, channels=(8, 8, 8, 8, 8), fpn_channels=32)
    return Detector(config)


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda d: truncate(d / "model.safetensors"), "model.safetensors is not readable"),
        (lambda d: (d / "model.safetensors").write_bytes(b""), "model.safetensors is not readable"),
        (lambda d: (d / "config.json").write_text("[1, 2]"), "config.json is not a detector config"),
        (lambda d: (d / "config.json").write_bytes(os.urandom(64)), "config.json is not a detector config"),
        (lambda d: edit_config(d, channels=[8, 8, 8, 8, -8]), "config.json is not a detector config"),
        (lambda d: edit_config(d, channels=[8, 8, 8, 8, 16]), "does not fit its config.json"),
    ],
)
def test_a_damaged_detector_folder_is_one_line(tmp_path, damage, expected):
    folder = tmp_path / "detector"
    atomic_save_pretrained(tiny_detector(), folder)
    damage(folder)
    with pytest.raises(SpatialLockError, match=expected) as caught:
        Detector.from_pretrained(folder)
    assert "\n" not in str(caught.value) and str(folder) in str(caught.value)


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


# ---- 9: temporary files are created exclusively, never through a link ---------------------------------------


def test_data_show_never_writes_through_a_planted_link(tiny_shapes, tmp_path, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    for name in (".grid.png.part", f".grid.png.{os.getpid()}.part"):
        (out / name).symlink_to(victim)
    assert main(["data", "show", str(tiny_shapes), "--out", str(out / "grid.png")]) == 0
    assert victim.read_text() == "precious"
    grid = out / "grid.png"
    assert not grid.is_symlink() and grid.read_bytes().startswith(b"\x89PNG")
    assert stat.S_IMODE(grid.stat().st_mode) == 0o666 & ~current_umask()  # as `open` would make it


def test_data_synth_never_writes_through_a_planted_link(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "shapes"
    (out / "val").mkdir(parents=True)
    (out / "val" / "000000000001.png.part").symlink_to(victim)
    (out / f".instances_val.json.{os.getpid()}.part").symlink_to(victim)
    args = ["data", "synth", "--out", str(out), "--train", "0", "--val", "1", "--size", "32", "--workers", "1"]
    assert main([*args, "--no-progress"]) == 0
    assert victim.read_text() == "precious"
    assert json.loads((out / "instances_val.json").read_text())["images"][0]["id"] == 1


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# ---- 10, 7 and 8: `data show` says what it could not read, and bounds what it makes -------------------------


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares `width` x `height` pixels and holds none of them."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.mark.parametrize("damage", ["truncated", "30000x30000"])
def test_data_show_with_no_readable_image_is_one_line(tiny_shapes, tmp_path, capsys, damage):
    data = copy_of(tiny_shapes, tmp_path, "shapes")
    for image in (data / "val").glob("*.png"):
        truncate(image) if damage == "truncated" else image.write_bytes(png_header(30000, 30000))
    out = tmp_path / "grid.png"
    assert main(["data", "show", str(data), "--out", str(out)]) == 2
    line = error_line(capsys.readouterr().err)
    assert "none of the 4 images can be read" in line
    if damage != "truncated":
        assert "too large" in line
    assert not out.exists()


def test_data_show_names_how_many_images_it_left_out(tiny_shapes, tmp_path, capsys):
    data = copy_of(tiny_shapes, tmp_path, "shapes")
    truncate(data / "val" / "000000000002.png")
    (data / "val" / "000000000003.png").write_bytes(png_header(30000, 30000))
    assert main(["data", "show", str(data), "--out", str(tmp_path / "grid.png")]) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("spatiallock:")]
    assert len(warnings) == 1 and warnings[0].startswith("spatiallock: warning: 2 of 4 images cannot be read")
    assert "(2 of 4 images)" in captured.out


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (("--cell", "2048"), "--cell"),
        (("--out", "FOLDER"), "is a folder"),
        (("--out", "UNDER_A_FILE"), "not a folder"),
        (("--seed", "-1"), "--seed"),
    ],
)
def test_data_show_refuses_bad_options_in_one_line(tiny_shapes, tmp_path, capsys, options, named):
    (tmp_path / "a-file").write_text("")
    places = {"FOLDER": str(tmp_path), "UNDER_A_FILE": str(tmp_path / "a-file" / "grid.png")}
    options = tuple(places.get(o, o) for o in options)
    out = () if "--out" in options else ("--out", str(tmp_path / "grid.png"))
    assert main(["data", "show", str(tiny_shapes), *out, *options]) == 2
    assert named in error_line(capsys.readouterr().err)
    assert not (tmp_path / "grid.png").exists()


@pytest.mark.parametrize(
    ("options", "named"),
    [(("--size", "2048"), "--size"), (("--out", "UNDER_A_FILE"), "is a file, not a folder")],
)
def test_data_synth_refuses_bad_options_in_one_line(tmp_path, capsys, options, named):
    (tmp_path / "a-file").write_text("")
    options = tuple(str(tmp_path / "a-file" / "s") if o == "UNDER_A_FILE" else o for o in options)
    out = () if "--out" in options else ("--out", str(tmp_path / "s"))
    assert main(["data", "synth", *out, "--train", "1", "--val", "0", *options]) == 2
    assert named in error_line(capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes in read-only folders")
def test_data_synth_into_a_read_only_folder_is_one_line(tmp_path, capsys):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        args = ["data", "synth", "--out", str(folder / "s"), "--train", "1", "--val", "0", "--no-progress"]
        assert main(args) == 2
    finally:
        folder.chmod(0o700)
    assert "no permission to write" in error_line(capsys.readouterr().err)


# ---- training options: finite and in range, or one line ------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "options", "named"),
    [
        ("adapter", ("--lr", "nan"), "--lr"),
        ("adapter", ("--lr", "inf"), "--lr"),
        ("adapter", ("--seed", "99999999999999"), "--seed"),
        ("adapter", ("--resolution", "-16"), "--resolution"),
        ("adapter", ("--num-workers", "-1"), "--num-workers"),
        ("base", ("--vae-lr", "-1"), "--vae-lr"),
        ("base", ("--ema-decay", "1.5"), "--ema-decay"),
        ("base", ("--resolution", "-16"), "--resolution"),
        ("detector", ("--weight-decay", "nan"), "--weight-decay"),
        ("detector", ("--ema-decay", "-1"), "--ema-decay"),
    ],
)
def test_training_options_out_of_range_are_one_line(tiny_sd, tiny_shapes, tmp_path, capsys, command, options, named):
    out = tmp_path / "out"
    small = {  # were the option taken, one short step
        "adapter": ("--base", str(tiny_sd)),
        "base": ("--resolution", "32", "--vae-steps", "1", "--vae-batch-size", "2"),
        "detector": ("--image-size", "32"),
    }[command]
    args = ["train", command, "--data", str(tiny_shapes), "--out", str(out), "--no-progress", "--max-steps", "1"]
    assert main([*args, "--batch-size", "2", *small, *options]) == 2
    assert error_line(capsys.readouterr().err).startswith(f"spatiallock: error: {named}")
    assert not out.exists()


def test_training_into_a_folder_under_a_file_is_one_line(tiny_shapes, tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    out = tmp_path / "a-file" / "detector"
    args = ["train", "detector", "--data", str(tiny_shapes), "--out", str(out), "--image-size", "32"]
    assert main([*args, "--max-steps", "1", "--batch-size", "2", "--no-progress"]) == 2
    assert "is a file, not a folder" in error_line(capsys.readouterr().err)


def test_checkpoint_state_is_read_whole_before_anything_is_restored(tmp_path):
    from spatiallock.checkpoint import read_checkpoint

    model = nn.Linear(2, 1)
    path = save_checkpoint(tmp_path, 1, {"m": model}, torch.optim.SGD(model.parameters(), lr=0.1))
    assert load_file(path / "m.safetensors").keys() == {"weight", "bias"}
    (path / "state.json").write_text(json.dumps({"step": 7, "optimizer": {}}))  # another step than its name
    with pytest.raises(SpatialLockError, match="does not record step 1"):
        read_checkpoint(path, ["m"])


def test_changed_settings_name_nested_ones_and_skip_what_only_one_version_knows(tmp_path):
    from dataclasses import asdict

    from spatiallock.training.base import BaseTrainConfig
    from spatiallock.training.common import changed_settings

    config = BaseTrainConfig(data=str(tmp_path / "data"), out=str(tmp_path / "out"))
    recorded = json.loads(json.dumps(asdict(config)))
    del recorded["snr_gamma"]  # a run recorded before the setting existed
    recorded["vae"]["max_steps"] = 10  # how long: may change
    recorded["unet"]["batch_size"] = 4
    recorded["data"] = f"{tmp_path}/./data"  # the same folder
    assert changed_settings(recorded, config) == ["unet.batch_size: 4 -> 32"]
    # a learning-rate drop added on resume: no change when it lies at or after the step resumed from
    config.vae.lr_milestones = (3000,)
    assert changed_settings(recorded, config, step=3000) == ["unet.batch_size: 4 -> 32"]
    assert changed_settings(recorded, config, step=3001) == [
        "unet.batch_size: 4 -> 32",
        "vae.lr_milestones: [] -> [3000]",
    ]
