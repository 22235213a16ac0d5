"""scripts/ship_default.py on tiny models: what it writes into an assets folder (fp16 weights, provenance, the
detector's scores), that `--model default` and `--detector default` load it back, and that it refuses to write
assets over the size limit."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import spatiallock.shipped as shipped
from spatiallock.base.folders import base_fingerprint
from spatiallock.cli import main as cli
from spatiallock.evaluation.detector import Detector
from spatiallock.pipelines.diffusion import SpatialLockPipeline
from spatiallock.sampling import load_pipeline

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "ship_default.py"

pytestmark = pytest.mark.usefixtures("one_thread")


def ship_default():
    """The script as a module (a fresh one per call: its limit can be changed without touching other runs)."""
    spec = importlib.util.spec_from_file_location("ship_default", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(module, monkeypatch, *argv: str) -> None:
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *argv])
    module.main()


@pytest.fixture(scope="module")
def trained(tiny_small_base, tiny_shapes, tmp_path_factory) -> tuple[Path, Path]:
    """An adapter of the tiny small base and a 32 px detector, each after 2 steps of its `spatiallock train`."""
    folder = tmp_path_factory.mktemp("trained")
    adapter, detector = folder / "adapter", folder / "detector"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        common = ["--data", str(tiny_shapes), "--batch-size", "2", "--max-steps", "2", "--no-progress"]
        assert cli(["train", "adapter", "--base", str(tiny_small_base), "--out", str(adapter), *common]) == 0
        assert cli(["train", "detector", "--image-size", "32", "--out", str(detector), *common]) == 0
    finally:
        torch.set_num_threads(threads)
    return adapter, detector


def dtypes(path: Path) -> set[str]:
    with safe_open(str(path), "pt") as weights:
        return {weights.get_slice(key).get_dtype() for key in weights.keys()}


def test_ships_the_model_and_detector_in_fp16_and_default_loads_them(
    tiny_small_base, trained, tmp_path, monkeypatch, capsys
):
    adapter, detector = trained
    out = tmp_path / "assets"
    base = tmp_path / "base"  # a base with the record `train base` keeps: its config and its command lines
    shutil.copytree(tiny_small_base, base)
    (base / "train").mkdir()
    (base / "train" / "config.json").write_text(json.dumps({"latent_size": 8}))
    (base / "train" / "commands.txt").write_text("t0  spatiallock train base --vae-only\nt1  spatiallock train base\n")
    argv = ["--base", str(base), "--adapter", str(adapter), "--detector", str(detector), "--out", str(out)]
    run(ship_default(), monkeypatch, *argv)
    printed = capsys.readouterr().out
    assert "default: " in printed and "detector: " in printed and "; total " in printed
    assert f"wrote {out / 'default'} and {out / 'detector'}" in printed
    assert sorted(p.name for p in out.iterdir()) == ["default", "detector"]  # no staging folder left behind

    model, shipped_detector = out / "default", out / "detector"
    for part in ("unet", "vae", "adapter"):
        assert dtypes(model / part / "diffusion_pytorch_model.safetensors") == {"F16"}, part
    assert dtypes(shipped_detector / "model.safetensors") == {"F16"}
    provenance = json.loads((model / "provenance.json").read_text())
    assert provenance["base"] == str(base) and provenance["adapter"] == str(adapter)
    assert provenance["base_training"] == {"latent_size": 8}
    assert provenance["base_commands"] == ["t0  spatiallock train base --vae-only", "t1  spatiallock train base"]
    assert "base_stages" not in provenance
    # the digest of the weights as shipped (fp16), which every row made with `--base` on them records
    assert provenance["base_fingerprint"] == base_fingerprint(model) != base_fingerprint(base)
    assert provenance["detector"] == str(detector)
    assert provenance["adapter_training"] == json.loads((adapter / "train" / "config.json").read_text())
    assert provenance["detector_training"] == json.loads((detector / "train" / "config.json").read_text())
    assert (shipped_detector / "eval.json").read_bytes() == (detector / "eval.json").read_bytes()

    # `--model default` and `--detector default` load what was shipped, in fp32, the weights those trained rounded
    monkeypatch.setattr(shipped, "ASSETS", out)
    pipe = load_pipeline("default", device="cpu")
    source = SpatialLockPipeline.from_pretrained(str(tiny_small_base), adapter=str(adapter))
    for name in ("unet", "vae", "adapter"):
        loaded, original = getattr(pipe, name).state_dict(), getattr(source, name).state_dict()
        assert loaded.keys() == original.keys(), name
        for key, value in loaded.items():
            assert value.dtype == torch.float32, (name, key)
            assert torch.equal(value, original[key].half().float()), (name, key)
    image = pipe(prompt="a red circle", phrases=["red circle"], boxes=[[0.1, 0.1, 0.6, 0.6]], num_inference_steps=2,
                 generator=torch.Generator().manual_seed(0)).images[0]  # fmt: skip
    assert image.size == (pipe.native_size, pipe.native_size)
    loaded = Detector.from_pretrained(shipped.resolve_detector("default"))
    original = Detector.from_pretrained(detector)
    assert loaded.config == original.config
    for key, value in loaded.state_dict().items():
        assert torch.equal(value.float(), original.state_dict()[key].half().float()), key
    (found,) = loaded.detect([image])
    assert set(found) >= {"boxes", "scores", "labels"}


def test_refuses_assets_over_the_limit_and_leaves_the_folder_as_it_was(
    tiny_small_base, trained, tmp_path, monkeypatch
):
    adapter, detector = trained
    out = tmp_path / "assets"
    (out / "default").mkdir(parents=True)
    (out / "default" / "model_index.json").write_text("{}")
    module = ship_default()
    monkeypatch.setattr(module, "LIMIT_MB", 0.01)
    argv = ["--base", str(tiny_small_base), "--adapter", str(adapter), "--detector", str(detector), "--out", str(out)]
    with pytest.raises(SystemExit, match=r"more than 0\.01 MB: not written"):
        run(module, monkeypatch, *argv)
    assert [p.name for p in out.iterdir()] == ["default"]
    assert [p.name for p in (out / "default").iterdir()] == ["model_index.json"]
    assert (out / "default" / "model_index.json").read_text() == "{}"


def test_ships_the_locator_alone_with_both_training_stages_and_locate_loads_it(tmp_path, monkeypatch, capsys):
    from PIL import Image

    from spatiallock.location.locator import Locator, LocatorConfig

    torch.manual_seed(0)
    config = LocatorConfig(labels=["red circle", "blue square"], label_dim=8, bins=16, image_size=32,
                           channels=(8, 16), dim=32, layers=1, heads=2, dropout=0.0)  # fmt: skip
    first, second = tmp_path / "loc", tmp_path / "loc-dpo"
    Locator(config, torch.randn(2, 8)).save_pretrained(first)
    Locator(config, torch.randn(2, 8)).save_pretrained(second)
    stages = ((first, {"dpo": False, "init_from": None}), (second, {"dpo": True, "init_from": str(first)}))
    for folder, stage in stages:
        (folder / "train").mkdir()
        (folder / "train" / "config.json").write_text(json.dumps({"out": str(folder), **stage}))
    (second / "eval.json").write_text(json.dumps({"top1_plausible": 0.5}))
    out = tmp_path / "assets"
    (out / "detector").mkdir(parents=True)
    (out / "detector" / "config.json").write_text("{}")
    run(ship_default(), monkeypatch, "--locator", str(second), "--benchmark", "location.json", "--out", str(out))
    printed = capsys.readouterr().out
    assert "detector: 0.0 MB, locator: " in printed and f"wrote {out / 'locator'}\n" in printed
    assert sorted(p.name for p in out.iterdir()) == ["detector", "locator"]  # the other part untouched
    assert (out / "detector" / "config.json").read_text() == "{}"
    assert dtypes(out / "locator" / "model.safetensors") == {"F16"}
    provenance = json.loads((out / "locator" / "provenance.json").read_text())
    assert provenance["locator"] == str(second) and provenance["benchmark"] == "location.json"
    assert [stage["out"] for stage in provenance["training"]] == [str(first), str(second)]  # first stage first
    assert provenance["eval"] == {"top1_plausible": 0.5}

    # locate and insert's default locator is the shipped one, in fp32 with the weights rounded to fp16
    monkeypatch.setattr(shipped, "ASSETS", out)
    loaded, original = Locator.from_pretrained(shipped.default_locator_path()), Locator.from_pretrained(second)
    for key, value in loaded.state_dict().items():
        if value.is_floating_point():
            assert value.dtype == torch.float32 and torch.equal(value, original.state_dict()[key].half().float()), key
    Image.new("RGB", (32, 32), (120, 120, 120)).save(tmp_path / "scene.png")
    argv = ["locate", "--image", str(tmp_path / "scene.png"), "--label", "blue square", "--n", "3", "--json"]
    assert cli(argv) == 0
    assert len(json.loads(capsys.readouterr().out)["boxes"]) == 3


def test_nothing_to_ship_is_a_usage_error(tmp_path, monkeypatch):
    with pytest.raises(SystemExit):
        run(ship_default(), monkeypatch, "--out", str(tmp_path / "assets"))
    assert not (tmp_path / "assets").exists()


def test_ships_the_judge_apart_and_judge_default_loads_it_not_the_evaluator(trained, tmp_path, monkeypatch, capsys):
    from spatiallock.evaluation.reward import ImageJudge

    _, detector = trained
    out = tmp_path / "assets"
    run(ship_default(), monkeypatch, "--judge", str(detector), "--out", str(out))
    assert sorted(p.name for p in out.iterdir()) == ["judge"]
    assert dtypes(out / "judge" / "model.safetensors") == {"F16"}
    assert json.loads((out / "judge" / "provenance.json").read_text())["detector"] == str(detector)
    monkeypatch.setattr(shipped, "ASSETS", out)
    assert shipped.resolve_judge("default") == out / "judge"
    judge = ImageJudge.from_pretrained(shipped.resolve_judge("default"))
    original = Detector.from_pretrained(detector).state_dict()
    for key, value in judge.detector.state_dict().items():
        if value.is_floating_point():
            assert torch.equal(value, original[key].half().float()), key
    (out / "judge").rename(out / "gone")  # without it, `default` names what is missing, not the evaluator
    with pytest.raises(shipped.SpatialLockError, match="the shipped default judge is missing from"):
        shipped.resolve_judge("default")


def test_a_base_put_together_from_several_runs_records_each_run(tiny_small_base, trained, tmp_path, monkeypatch):
    """--base-runs: the autoencoder's, the U-Net's and the decoder's runs, each with its config and command lines,
    in the order given; a folder with no training record is refused before anything is written."""
    adapter, _ = trained
    runs = []
    for name, config in (("ae", {"vae_only": True}), ("unet", {"vae_from": "ae/vae"}), ("dec", {"lr": 1e-4})):
        run_folder = tmp_path / name / "train"
        run_folder.mkdir(parents=True)
        (run_folder / "config.json").write_text(json.dumps(config))
        (run_folder / "commands.txt").write_text(f"t  spatiallock train {name}\n")
        runs.append(str(tmp_path / name))
    out = tmp_path / "assets"
    argv = ["--base", str(tiny_small_base), "--adapter", str(adapter), "--out", str(out)]
    run(ship_default(), monkeypatch, *argv, "--base-runs", *runs)
    stages = json.loads((out / "default" / "provenance.json").read_text())["base_stages"]
    assert [stage["run"] for stage in stages] == runs
    assert [stage["training"] for stage in stages] == [{"vae_only": True}, {"vae_from": "ae/vae"}, {"lr": 1e-4}]
    assert stages[2]["commands"] == ["t  spatiallock train dec"]
    shutil.rmtree(out)
    with pytest.raises(SystemExit) as exit_info:
        run(ship_default(), monkeypatch, *argv, "--base-runs", runs[0], str(tmp_path / "nothing"))
    assert exit_info.value.code == 2 and not out.exists()


def test_a_new_adapter_on_the_shipped_base_keeps_the_base_record_and_moves_the_old_adapters(
    tiny_small_base, trained, tmp_path, monkeypatch, capsys
):
    adapter, _ = trained
    out = tmp_path / "assets"
    run(ship_default(), monkeypatch, "--base", str(tiny_small_base), "--adapter", str(adapter), "--out", str(out))
    record = out / "default" / "provenance.json"
    first = json.loads(record.read_text())
    first.update(base="the base as trained", decoder_training={"steps": 8000},
                 adapter_config_added={"ground_unconditional": False, "why": "measured"})  # fmt: skip
    record.write_text(json.dumps(first))
    argv = ["--base", str(out / "default"), "--adapter", str(adapter), "--benchmark", "synthetic.json"]
    run(ship_default(), monkeypatch, *argv, "--out", str(out))
    second = json.loads(record.read_text())
    assert second["base"] == "the base as trained" and second["decoder_training"] == {"steps": 8000}
    assert second["adapter"] == str(adapter) and second["benchmark"] == "synthetic.json"
    assert second["detector"] == first["detector"]
    assert second["previous_adapter_training"] == first["adapter_training"]
    assert second["earlier_adapter_training"] == []
    # the sampling default the shipped adapter was given is given to the new one
    assert json.loads((out / "default" / "adapter" / "config.json").read_text())["ground_unconditional"] is False
    assert json.loads((adapter / "config.json").read_text())["ground_unconditional"] is True  # its folder untouched
    run(ship_default(), monkeypatch, *argv, "--out", str(out))
    third = json.loads(record.read_text())
    assert third["earlier_adapter_training"] == [first["adapter_training"]]
