"""Every script in benchmarks/ on a tiny configuration (2 layouts, 2 steps, tiny models built in code), writing into
a temporary folder: the results have the rows and keys expected, finite numbers in range, and charts of a sensible
size; and the scripts reach the package through its public names only."""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from spatiallock.cli import main as cli
from spatiallock.layout import read_layouts

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPTS = sorted(BENCHMARKS.glob("*.py"))

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", autouse=True)
def benchmarks_importable():
    """The scripts import each other by their file names (`from charts import ...`), as when run from benchmarks/;
    afterwards those names are forgotten again."""
    sys.path.insert(0, str(BENCHMARKS))
    yield
    sys.path.remove(str(BENCHMARKS))
    for path in SCRIPTS:
        module = sys.modules.get(path.stem)
        if module is not None and Path(getattr(module, "__file__", "") or "").resolve() == path.resolve():
            del sys.modules[path.stem]


def script(name: str):
    return importlib.import_module(name)


@pytest.fixture(scope="module")
def adapter(tiny_small_base, tiny_shapes, tmp_path_factory) -> Path:
    """An adapter of the tiny small base after 2 steps of `spatiallock train adapter`."""
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        args = ["train", "adapter", "--base", str(tiny_small_base), "--data", str(tiny_shapes), "--out", str(out)]
        assert cli([*args, "--batch-size", "2", "--max-steps", "2", "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def model(tiny_small_base, adapter, tmp_path_factory) -> Path:
    """A model folder: the tiny small base with that adapter (`save_pretrained`)."""
    from spatiallock.pipelines.diffusion import SpatialLockPipeline

    folder = tmp_path_factory.mktemp("model") / "model"
    SpatialLockPipeline.from_pretrained(str(tiny_small_base), adapter=str(adapter)).save_pretrained(folder)
    return folder


def make_detector(categories: list[dict], folder: Path) -> Path:
    """An untrained detector folder for `categories` at 32 px."""
    from spatiallock.evaluation.detector import Detector, DetectorConfig

    torch.manual_seed(0)
    Detector(DetectorConfig(categories=categories, image_size=32)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def detector(tiny_shapes, tmp_path_factory) -> Path:
    categories = json.loads((tiny_shapes / "instances_val.json").read_text())["categories"]
    return make_detector(categories, tmp_path_factory.mktemp("detector") / "detector")


def assert_chart(path: Path, min_side: int = 200, max_side: int = 4000) -> None:
    """A PNG chart exists at `path`, of a sensible size, and is not blank."""
    assert path.is_file(), path
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert min_side <= min(image.size) and max(image.size) <= max_side, image.size
        pixels = np.asarray(image.convert("L"))
    assert pixels.std() > 5, "blank chart"


def assert_share(value) -> None:
    assert isinstance(value, float) and math.isfinite(value) and 0.0 <= value <= 1.0, value


def test_every_script_has_a_test():
    """A new script in benchmarks/ gets a test here (charts.py is tested through the scripts that draw)."""
    tested = {"charts", "table", "params_plot", "synthetic", "augmentation", "location", "perception_head"}
    tested |= {"sample_speed", "train_speed", "ceiling", "sdxl_estimate"}
    assert {path.stem for path in SCRIPTS} == tested


# ---- results files alone -------------------------------------------------------------------------------------


ROWS = [
    {"variant": "real-images", "ap": 0.9, "ap50": 0.95, "ap75": 0.9, "miou": 0.92, "miou_any": 0.93, "fd": 1.5},
    {"variant": "autoencoder", "ap": 0.75, "ap50": 0.9, "ap75": 0.8, "miou": 0.84, "miou_any": 0.85, "fd": 4.0},
    {"variant": "spatiallock", "ap": 0.68, "ap50": 0.9, "ap75": 0.7, "miou": 0.81, "miou_any": 0.82, "fd": 9.0,
     "sd_v1_4_ratio": 0.27, "decoder": "abc"},
    {"variant": "gligen", "ap": 0.0, "ap50": 0.0, "ap75": 0.0, "miou": 0.07, "miou_any": 0.1, "fd": None,
     "sd_v1_4_ratio": 1.0, "decoder": "abc"},
]  # fmt: skip


def test_table_prints_the_rows_as_markdown(tmp_path, capsys):
    results = tmp_path / "synthetic.json"
    results.write_text(json.dumps({"device": "cpu", "train_steps": 2, "rows": ROWS}))
    table = script("table")
    table.main([str(results), "--label", "spatiallock=spatiallock (shipped)", "--rows", "spatiallock,gligen"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "| variant | AP | AP50 | AP75 | mIoU | mIoU any class | fd |"
    assert lines[2] == "| spatiallock (shipped) | 0.680 | 0.900 | 0.700 | 0.810 | 0.820 | 9.00 |"
    assert lines[3] == "| gligen | 0.000 | 0.000 | 0.000 | 0.070 | 0.100 | - |"
    assert len(lines) == 4
    with pytest.raises(SystemExit, match="no row nothing"):
        table.main([str(results), "--rows", "nothing"])
    # a second evaluator's AP gets its column where a row has one
    rows = [*ROWS[:2], {**ROWS[2], "ap_second": 0.66}, ROWS[3]]
    results.write_text(json.dumps({"device": "cpu", "train_steps": 2, "rows": rows}))
    table.main([str(results), "--rows", "spatiallock,gligen"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].endswith("| fd | AP, second evaluator |")
    assert lines[2].endswith("| 9.00 | 0.660 |") and lines[3].endswith("| - | - |")


def test_params_plot_draws_each_adapter_row_at_its_ratio(tmp_path, capsys):
    results = tmp_path / "synthetic.json"
    results.write_text(json.dumps({"rows": ROWS}))
    script("params_plot").main([str(results), "--out", str(tmp_path / "ap_vs_params.png")])
    printed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in printed[:-1]] == ["spatiallock", "gligen"]  # by ratio; no ratio, no point
    assert_chart(tmp_path / "ap_vs_params.png")


# ---- synthetic.py: the benchmark table of the synthetic domain ------------------------------------------------


@pytest.fixture(scope="module")
def lama(tiny_shapes, tmp_path_factory) -> Path:
    """A tiny LAMA model folder (as `train lama` writes) for the synthetic classes."""
    from spatiallock.baselines.lama import LamaConfig, LamaGenerator

    names = [c["name"] for c in json.loads((tiny_shapes / "instances_val.json").read_text())["categories"]]
    config = LamaConfig(categories=names, image_size=32, max_objects=8, embed_dim=8, z_dim=8, image_z_dim=16,
                        mask_size=8, channels=4, d_channels=4)  # fmt: skip
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("lama") / "lama"
    LamaGenerator(config).eval().save_pretrained(folder)
    return folder


def test_synthetic_scores_every_kind_of_row_and_draws_its_figures(
    tiny_small_base, tiny_shapes, detector, adapter, lama, tmp_path, capsys
):
    synthetic = script("synthetic")
    out = tmp_path / "results" / "synthetic.json"
    argv = ["--data", str(tiny_shapes), "--base", str(tiny_small_base), "--detector", str(detector),
            "--row", f"spatiallock={adapter}", "--row", f"lama={lama}", "--limit", "2", "--steps", "2",
            "--samples", "2", "--train-steps", "2", "--out", str(out), "--also-at", "0.25"]  # fmt: skip
    synthetic.main(argv)
    result = json.loads(out.read_text())
    assert result["train_steps"] == 2 and result["detector"] == str(detector)
    rows = {row["variant"]: row for row in result["rows"]}
    assert list(rows) == ["real-images", "autoencoder", "base", "spatiallock", "lama"]
    for name, row in rows.items():
        for metric in ("ap", "ap50", "ap75", "miou", "miou_any"):
            assert_share(row[metric])
        assert isinstance(row["fd"], float) and math.isfinite(row["fd"]) and row["fd"] >= -1e-6, (name, row["fd"])
        assert row["layouts"] == 2
    assert rows["real-images"]["sampling_steps"] == 2
    assert rows["autoencoder"]["decoder"] == rows["base"]["decoder"] == rows["spatiallock"]["decoder"]
    from spatiallock.base.folders import base_fingerprint  # every diffusion row names its base; LAMA has none

    fingerprint = base_fingerprint(tiny_small_base)
    assert [rows[n].get("base_fingerprint") for n in rows] == [None, fingerprint, fingerprint, fingerprint, None]
    trained = rows["spatiallock"]
    assert trained["train_steps"] == 2 and trained["adapter"] == str(adapter)
    assert trained["recipe"]["variant"] == "spatiallock" and 0.0 < trained["sd_v1_4_ratio"] < 2.0
    assert trained["seconds_per_image"] > 0
    assert rows["lama"]["recipe"]["model"] == "lama" and math.isfinite(rows["lama"]["mask_entropy"])
    lama_row = rows["lama"]
    assert lama_row["mask_entropy_objects"] + lama_row["mask_entropy_background"] == pytest.approx(
        lama_row["mask_entropy"], abs=2e-4
    )
    assert lama_row["adaption_strength"] == 0.0 and lama_row["recipe"]["local_query"] is True
    assert lama_row["recipe"]["gate_lr_scale"] == 1.0  # no training record: the authors' rates
    for name in rows:  # the authors' protocol beside this project's: counting only detections from 0.25
        assert_share(rows[name]["ap_t025"])
        assert_share(rows[name]["miou_t025"])
    assert_chart(out.with_suffix(".png"))
    samples = out.with_name("synthetic_samples")
    strips = {"real-images", "autoencoder", "base", "spatiallock", "lama", "lama_masks", "lama_raw_masks", "layouts"}
    assert {p.stem for p in samples.glob("*.png")} == strips
    with Image.open(out.with_name("synthetic_samples.png")) as sheet:
        assert sheet.size[1] >= 5 * 128  # one strip per row, two images at 128 px each
    assert out.with_name("lama.png").is_file()

    # --plot-only redraws the chart from the results file alone
    out.with_suffix(".png").unlink()
    synthetic.main(["--plot-only", "--out", str(out)])
    assert_chart(out.with_suffix(".png"))
    assert "wrote" in capsys.readouterr().out


def test_ceiling_scores_each_autoencoder_per_object_size(tiny_small_base, tiny_shapes, detector, tmp_path, capsys):
    ceiling = script("ceiling")
    out = tmp_path / "ceiling.json"
    argv = ["--data", str(tiny_shapes), "--detector", str(detector), "--limit", "3", "--out", str(out)]
    ceiling.main([*argv, "--vae", f"tiny={tiny_small_base}"])  # a base folder: its vae/
    ceiling.main([*argv, "--no-real", "--vae", f"again={tiny_small_base / 'vae'}"])  # the autoencoder itself
    result = json.loads(out.read_text())
    rows = {row["variant"]: row for row in result["rows"]}
    assert set(rows) == {"real-images", "tiny", "again"}  # the second run kept the first one's rows
    layouts = read_layouts(tiny_shapes / "instances_val.json")[:3]
    assert sum(result["objects_per_size"].values()) == sum(len(layout.boxes) for layout in layouts)
    for row in rows.values():
        assert_share(row["ap"])
        for size, count in result["objects_per_size"].items():
            assert (row[f"miou_{size}"] is None) == (count == 0), (size, row)
    tiny = rows["tiny"]
    assert tiny["latent"][0] == 4 and tiny["autoencoder"] == rows["again"]["autoencoder"] and tiny["params"] > 0
    assert math.isfinite(tiny["psnr"]) and tiny["ap"] == rows["again"]["ap"]
    assert "| tiny | 4x" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="holds no AutoencoderKL"):
        ceiling.main([*argv, "--vae", f"none={tmp_path}"])


def test_synthetic_second_evaluator_and_judged_rows(tiny_small_base, tiny_shapes, detector, adapter, tmp_path):
    """--second-detector: every row computed gets `ap_second` from that detector (on the same images: a copy of
    the first detector agrees exactly); a row's `judge=DET` selects its candidates with that detector."""
    import shutil

    synthetic = script("synthetic")
    out = tmp_path / "synthetic.json"
    second = shutil.copytree(detector, tmp_path / "second")
    argv = ["--data", str(tiny_shapes), "--base", str(tiny_small_base), "--detector", str(detector),
            "--second-detector", str(second), "--no-real", "--no-base", "--row", f"plain={adapter}",
            "--row", f"judged={adapter}:candidates=2:judge={second}", "--limit", "2", "--steps", "2",
            "--samples", "1", "--out", str(out)]  # fmt: skip
    synthetic.main(argv)
    rows = {row["variant"]: row for row in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["plain", "judged"]
    for row in rows.values():  # the same weights as the first detector: the same AP
        assert row["ap_second"] == row["ap"] and row["second_detector"] == str(second)
    assert rows["judged"]["options"] == {"candidates": 2, "judge": str(second)}
    synthetic.main([*argv[:6], "--no-real", "--no-base", "--row", f"plain={adapter}", "--limit", "2", "--steps", "2",
                    "--samples", "1", "--out", str(tmp_path / "without.json")])  # fmt: skip
    (row,) = json.loads((tmp_path / "without.json").read_text())["rows"]
    assert "ap_second" not in row

    # ap_second is the second detector's own verdict: one that finds every object scores 1, one that misses 0
    from spatiallock.evaluation.detector import DetectorConfig
    from spatiallock.layout import Layout

    categories = [{"id": 1, "name": "red circle"}, {"id": 2, "name": "blue square"}]
    layouts = [Layout("two", ("red circle", "blue square"), ((0.1, 0.1, 0.4, 0.4), (0.5, 0.5, 0.9, 0.9)))]

    class Fixed:
        config = DetectorConfig(categories=categories)

        def __init__(self, boxes):
            self.found = [{"boxes": torch.tensor(boxes), "labels": torch.tensor([1, 2]),
                           "scores": torch.tensor([0.9, 0.9]), "names": ["red circle", "blue square"]}]  # fmt: skip

        def detect(self, images, score_threshold=None):
            return self.found

    image = [Image.new("RGB", (64, 64))]
    assert synthetic.second_opinion(Fixed(layouts[0].boxes), image, layouts, "s") == {
        "ap_second": 1.0, "second_detector": "s"
    }  # fmt: skip
    missed = synthetic.second_opinion(Fixed(((0.6, 0.0, 0.9, 0.3), (0.0, 0.6, 0.3, 0.9))), image, layouts, "s")
    assert missed["ap_second"] == 0.0
    assert synthetic.second_opinion(None, image, layouts, None) == {}


def test_synthetic_report_rows_name_the_base_that_made_them(tiny_small_base, tiny_shapes, detector, adapter, tmp_path):
    """A `spatiallock evaluate` report becomes a row carrying the report's base_fingerprint (and the base's decoder);
    a report made on another base than the benchmark's is refused with one line, the table left as it was."""
    from spatiallock.base.folders import base_fingerprint
    from spatiallock.cli import main

    synthetic = script("synthetic")
    report = tmp_path / "r.json"
    evaluate = ["evaluate", "--model", str(tiny_small_base), "--adapter", str(adapter), "--detector", str(detector),
                "--layouts", str(tiny_shapes / "instances_val.json"), "--limit", "2", "--steps", "2",
                "--layout-guidance-steps", "1", "--no-progress", "--out", str(report)]  # fmt: skip
    assert main(evaluate) == 0
    out = tmp_path / "synthetic.json"
    argv = ["--data", str(tiny_shapes), "--base", str(tiny_small_base), "--detector", str(detector), "--no-real",
            "--no-base", "--limit", "2", "--samples", "1", "--out", str(out)]  # fmt: skip
    synthetic.main([*argv, "--report", f"guided={report}"])
    (row,) = json.loads(out.read_text())["rows"]
    assert row["variant"] == "guided" and row["base_fingerprint"] == base_fingerprint(tiny_small_base) is not None
    assert row["decoder"] is not None and row["options"]["layout_guidance_steps"] == 1
    written = out.read_bytes()
    made_elsewhere = json.loads(report.read_text()) | {"base_fingerprint": "0123456789ab"}
    report.write_text(json.dumps(made_elsewhere))
    with pytest.raises(SystemExit, match="made on base 0123456789ab"):
        synthetic.main([*argv, "--report", f"other={report}"])
    assert out.read_bytes() == written


# ---- augmentation.py: detectors trained on real and generated images ------------------------------------------


def test_augmentation_trains_detectors_on_real_and_generated_images(tiny_shapes, model, tmp_path, monkeypatch, capsys):
    """The script's commands run in this process (`spatiallock.cli.main`), not as new Python processes."""
    augmentation = script("augmentation")
    ran = []

    def run(command: list[str], dry_run: bool) -> None:
        assert command[:3] == augmentation.cli() and not dry_run
        ran.append(command[3])
        assert cli(command[3:]) == 0, command

    monkeypatch.setattr(augmentation, "run", run)
    out = tmp_path / "results" / "augmentation.json"
    argv = ["--data", str(tiny_shapes), "--model", str(model), "--real", "2", "--generated", "2", "--steps", "2",
            "--batch-size", "2", "--gen-batch", "2", "--checkpoint-every", "1", "--arch", "ssd",
            "--only", "real", "--only", "real+spatiallock", "--work", str(tmp_path / "work"), "--out", str(out),
            "--no-progress"]  # fmt: skip
    assert augmentation.main(argv) == 0
    assert ran == ["generate-dataset", "train", "train"]
    result = json.loads(out.read_text())
    assert result["real_images"] == 2 and result["generated_images"] == 2 and result["model"] == str(model)
    assert [(row["arch"], row["data"]) for row in result["rows"]] == [("ssd", "real"), ("ssd", "real+spatiallock")]
    for row in result["rows"]:
        for metric in ("ap", "ap50", "ap75"):
            assert_share(row[metric])
        assert row["steps"] == 2 and row["command"].startswith("spatiallock train detector")
    assert result["rows"][1]["generated_images"] == 2 and "--extra-data" in result["rows"][1]["command"]
    assert_chart(out.with_suffix(".png"))
    with Image.open(out.with_name("augmentation_samples.png")) as sheet:
        assert sheet.size[1] >= 128  # one strip of the generated images at 128 px

    # a second run reads the finished detectors back and trains nothing; --plot-only redraws the chart alone
    ran.clear()
    assert augmentation.main(argv) == 0 and ran == []
    assert json.loads(out.read_text())["rows"] == result["rows"]
    out.with_suffix(".png").unlink()
    assert augmentation.main(["--plot-only", "--out", str(out)]) == 0
    assert_chart(out.with_suffix(".png"))


# ---- location.py: where should it go, and object insertion ----------------------------------------------------


def test_location_scores_random_boxes_and_a_locator_and_inserts(model, tmp_path, capsys):
    from spatiallock.data.synth import synthesize
    from spatiallock.location.locator import Locator, LocatorConfig

    data = tmp_path / "shelves"
    synthesize(data, train=0, val=4, seed=1, size=32, workers=1, progress=False, scene="shelves")
    categories = json.loads((data / "instances_val.json").read_text())["categories"]
    labels = [c["name"] for c in categories]
    torch.manual_seed(0)
    config = LocatorConfig(labels=labels, label_dim=8, bins=16, image_size=32, channels=(8, 16), dim=32, layers=1,
                           heads=2, dropout=0.0)  # fmt: skip
    Locator(config, torch.randn(len(labels), 8)).eval().save_pretrained(tmp_path / "locator")
    detector = make_detector(categories, tmp_path / "detector")
    out = tmp_path / "results" / "location.json"
    argv = ["--data", str(data), "--limit", "2", "--samples", "4", "--top-of", "2", "--model",
            f"tiny={tmp_path / 'locator'}", "--insert-cases", "1", "--sampler", str(model), "--detector",
            str(detector), "--steps", "2", "--out", str(out)]  # fmt: skip
    location = script("location")
    assert location.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["scenes"] == 2 and result["samples"] == 4 and result["top_of"] == 2
    assert [row["name"] for row in result["models"]] == ["random", "tiny"]
    for row in result["models"]:
        assert_share(row["top1_plausible"])
        assert_share(row["plausible_rate"])
        assert [k for k, _, _ in row["tpr_fpr"]] == list(location.COUNTS)
        for _, tpr, fpr in row["tpr_fpr"]:
            assert_share(float(tpr))
            assert_share(float(fpr))
        tprs = [tpr for _, tpr, _ in row["tpr_fpr"]]
        assert tprs == sorted(tprs)  # more boxes hit at least as many
    insertion = result["insertion"]
    assert insertion["cases"] == 1 and insertion["steps"] == 2 and insertion["sampler"] == str(model)
    assert_share(insertion["found_rate"])
    assert_share(insertion["ssim_outside"])
    assert insertion["psnr_outside"] > 0 and math.isfinite(insertion["psnr_outside_raw"])
    assert_chart(out.with_suffix(".png"))

    # the same settings again for one more model: the rows of the others and the insertion are kept
    again = [a if a != "tiny=" + str(tmp_path / "locator") else f"other={tmp_path / 'locator'}" for a in argv]
    again[again.index("--insert-cases") + 1] = "0"
    assert location.main(again) == 0
    kept = json.loads(out.read_text())
    assert [row["name"] for row in kept["models"]] == ["random", "tiny", "other"]
    assert kept["insertion"] == insertion
    out.with_suffix(".png").unlink()
    assert location.main(["--plot-only", "--out", str(out)]) == 0
    assert_chart(out.with_suffix(".png"))


# ---- perception_head.py: the adapter's PoG head as a detector, noise level by noise level ---------------------


def test_perception_head_scores_the_head_at_each_timestep_and_grounding(model, tiny_shapes, detector, tmp_path):
    out = tmp_path / "results" / "perception_head.json"
    argv = ["--model", str(model), "--layouts", str(tiny_shapes / "instances_val.json"), "--limit", "2",
            "--timesteps", "0", "500", "--grounding", "own", "other", "--batch-size", "2", "--detector",
            str(detector), "--out", str(out)]  # fmt: skip
    assert script("perception_head").main(argv) == 0
    result = json.loads(out.read_text())
    assert result["images"] == 2 and result["detector"] == str(detector)
    assert_share(result["detector_on_real_images"]["ap"])
    expected = [("own", 0), ("own", 500), ("other", 0), ("other", 500)]
    assert [(row["grounding"], row["timestep"]) for row in result["rows"]] == expected
    for row in result["rows"]:
        for metric in ("ap", "ap50", "ap75"):
            assert_share(row[metric])
    assert all("ap_against_request" in row for row in result["rows"] if row["grounding"] == "other")
    assert result["command"].startswith("python benchmarks/perception_head.py --model")


def test_perception_head_leak_scores_every_part_and_keeps_the_rows(model, tiny_shapes, detector, tmp_path, capsys):
    out = tmp_path / "perception_head.json"
    out.write_text(json.dumps({"rows": [{"grounding": "own", "timestep": 0, "ap": 0.5}]}))
    argv = ["--model", str(model), "--layouts", str(tiny_shapes / "instances_val.json"), "--leak", "3",
            "--leak-timestep", "100", "--detector", str(detector), "--leak-detector", f"other={detector}",
            "--out", str(out)]  # fmt: skip
    assert script("perception_head").main(argv) == 0
    result = json.loads(out.read_text())
    assert result["rows"] == [{"grounding": "own", "timestep": 0, "ap": 0.5}]  # kept
    components = [entry["component"] for entry in result["leak"]]
    assert components == ["pog-head (rendered, t=100)", "evaluation detector", "other"]
    # `train adapter` trains the head on what was drawn (rendered) by default
    assert [entry["used_by_default"] for entry in result["leak"]] == [True, True, False]
    for entry in result["leak"]:
        assert_share(entry["ap_requested"])
        assert_share(entry["ap_shuffled"])
    assert result["leak_setting"]["images"] == 3 and result["leak_setting"]["timestep"] == 100
    assert "AP requested" in capsys.readouterr().out
    # the head on the other input; the entries not scored again are kept
    argv = [*argv[:10], "--leak-head-input", "grounded", "--out", str(out)]
    assert script("perception_head").main(argv) == 0
    leak = json.loads(out.read_text())["leak"]
    assert all(e["images_from"] == str(model) for e in leak)
    assert [(e["component"], e["used_by_default"]) for e in leak] == [
        ("pog-head (rendered, t=100)", True), ("other", False), ("pog-head (grounded; trained on rendered)", False),
        ("evaluation detector", True),
    ]  # fmt: skip


# ---- the speed benchmarks: the smallest runs their options allow -------------------------------------------------


def test_sample_speed_times_every_row(model, tmp_path, capsys):
    out = tmp_path / "results" / "sample_speed.json"
    images = tmp_path / "images.npz"
    argv = ["--cpu", "--steps", "2", "--images", "2", "--repeats", "1", "--shipped", str(model), "--recipe",
            f"tiny={model}", "--save-images", str(images), "--same-as", str(images), "--out", str(out)]  # fmt: skip
    script("sample_speed").main(argv)
    result = json.loads(out.read_text())
    assert result["device_type"] == "cpu" and result["steps"] == 2 and result["images_per_call"] == 2
    names = ["base", "spatiallock", "shipped", "gligen", "spatiallock-box-all", "tiny"]
    assert [row["model"] for row in result["rows"]] == names
    for row in result["rows"]:
        assert math.isfinite(row["s_per_image"]) and row["s_per_image"] > 0 and len(row["s_per_image_all"]) == 1
        assert row["max_abs_diff_vs_reference"] == 0.0  # compared with the images it kept itself
        assert row["vs_base"] > 0
    assert result["rows"][0]["adapter_params"] == 0 and result["rows"][0]["vs_base"] == 1.0
    assert all(row["adapter_params"] > 0 for row in result["rows"][1:])
    assert result["shipped_recipe"]["variant"] == "spatiallock"
    assert set(np.load(images).files) == set(names)


def test_sample_speed_sdxl_times_its_rows_into_a_section_of_its_own(model, tmp_path, capsys):
    out = tmp_path / "sample_speed.json"
    out.write_text(json.dumps({"rows": [{"model": "kept"}]}))
    argv = ["--cpu", "--sdxl", "--steps", "2", "--images", "1", "--repeats", "1", "--shipped", str(model)]
    script("sample_speed").main([*argv, "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["rows"] == [{"model": "kept"}]  # the file's other rows stay
    sdxl = result["sdxl"]
    assert [row["model"] for row in sdxl["rows"]] == ["base", "shipped", "shipped-first-blocks-1", "gligen"]
    params = {row["model"]: row["adapter_params"] for row in sdxl["rows"]}
    assert 0 < params["shipped-first-blocks-1"] < params["shipped"] < params["gligen"]
    assert sdxl["unet_config"]["addition_embed_type"] == "text_time"
    assert all(math.isfinite(row["s_per_image"]) and row["s_per_image"] > 0 for row in sdxl["rows"])


def test_sdxl_estimate_counts_a_training_step_on_the_meta_device(tmp_path, capsys):
    out = tmp_path / "estimate.json"
    script("sdxl_estimate").main(["--size", "256", "--objects", "4", "--tflops", "100", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["unet_params"] > 2.5e9 and result["size"] == 256
    rows = {row["adapter"]: row for row in result["rows"]}
    shipped, first, gligen = (
        rows[name] for name in ("shipped recipe", "shipped recipe, --first-blocks 1", "GLIGEN-style")
    )
    assert first["trainable_params"] < shipped["trainable_params"] < gligen["trainable_params"]
    # more blocks in the graph: more work and more saved activations; the frozen weights are the same
    assert first["step_tflops"] <= shipped["step_tflops"] < gligen["step_tflops"]
    assert 0 < first["activations_gb"] <= shipped["activations_gb"] < gligen["activations_gb"]
    assert shipped["frozen_weights_gb"] == gligen["frozen_weights_gb"] > 5
    assert shipped["memory_gb"] == pytest.approx(
        shipped["frozen_weights_gb"] + shipped["adapter_training_state_gb"] + shipped["activations_gb"], abs=0.2
    )
    assert list(shipped["seconds_per_step"]) == ["100 TFLOP/s"]


def test_sample_speed_busy_times_a_fresh_process_beside_a_busy_loop(model, tmp_path):
    """One measurement of --busy for real: a child process started as a command starts, a busy loop beside it."""
    import argparse

    speed = script("sample_speed")
    args = argparse.Namespace(steps=1, images=1, repeats=1, shipped=str(model))
    record = speed.time_children(args, tmp_path, "toolkit", "busy", "toolkit-busy-0")
    (seconds,) = record["times"]
    assert math.isfinite(seconds) and seconds > 0
    assert record["threads_at_start"]["torch_threads"] >= 1 and "SPATIALLOCK_THREADS" not in record["threads_at_end"]
    record = speed.time_children(args, tmp_path, "torch", "two", "torch-two-0")
    assert len(record["times"]) == 2 and record["threads_at_end"]["SPATIALLOCK_THREADS"] == "torch"


def test_sample_speed_busy_writes_ratios_beside_the_rows(tmp_path, monkeypatch, capsys):
    """--busy's results from its measurements (faked here): medians of the quiet rounds, the mean of the two
    processes, ratios to quiet; the file's other rows kept."""
    speed = script("sample_speed")
    seconds = {("toolkit", "quiet"): [0.5, 0.4, 0.45], ("torch", "quiet"): [0.4, 0.44, 0.38],
               ("toolkit", "busy"): [0.7], ("toolkit", "busy-session"): [0.8], ("toolkit", "two"): [0.7, 0.9],
               ("torch", "busy"): [3.6], ("torch", "busy-session"): [14.0], ("torch", "two"): [2.5, 2.7],
               ("one-thread", "quiet"): [0.7, 0.8, 0.75]}  # fmt: skip
    calls = []

    def fake(args, work, setting, condition, tag):
        calls.append((setting, condition))
        times = seconds[setting, condition]
        n = calls.count((setting, condition)) - 1
        picked = times if condition == "two" else [times[n]]
        return {"times": picked, "threads_at_start": {"torch_threads": 2}, "threads_at_end": {"torch_threads": 1}}

    monkeypatch.setattr(speed, "time_children", fake)
    out = tmp_path / "sample_speed_cpu.json"
    out.write_text(json.dumps({"benchmark": "sample_speed", "rows": [{"model": "base"}]}))
    speed.main(["--busy", "--out", str(out)])
    # quiet runs alternating, so that drift falls on all settings; one thread is timed quiet only
    assert calls[:9] == [("toolkit", "quiet"), ("torch", "quiet"), ("one-thread", "quiet")] * 3
    assert ("one-thread", "busy") not in calls and len(calls) == 15
    result = json.loads(out.read_text())
    assert result["rows"] == [{"model": "base"}]
    busy = result["busy"]
    rows = busy["rows"]
    assert rows["toolkit"]["quiet"]["s_per_image"] == 0.45 and rows["torch"]["quiet"]["s_per_image"] == 0.4
    assert rows["toolkit"]["two"]["s_per_image"] == 0.8 and rows["toolkit"]["two"]["vs_quiet"] == round(0.8 / 0.45, 3)
    assert rows["torch"]["busy-session"]["vs_quiet"] == 35.0 and rows["toolkit"]["busy"]["vs_torch_quiet"] == 1.75
    assert busy["toolkit_quiet_vs_torch_quiet"] == 1.125 and busy["steps"] == 25 and busy["repeats"] == 2
    assert rows["one-thread"] == {"quiet": {**rows["one-thread"]["quiet"], "s_per_image": 0.75, "vs_quiet": 1.0}}
    assert "toolkit quiet / torch quiet: 1.12" in capsys.readouterr().out


def test_train_speed_trains_a_variant_in_a_process_of_its_own(tmp_path):
    """One variant through the real worker process (a fresh Python: the slow part, so one only)."""
    out = tmp_path / "results" / "train_speed.json"
    assert script("train_speed").main([*TRAIN_SPEED, "--variants", "gligen", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    config = result["config"]
    assert result["device_type"] == "cpu" and config["architecture"] == "small" and config["latent_size"] == 8
    assert config["batch_size"] == 2 and config["timed_steps"] == 1 and config["warmup_steps"] == 0
    (row,) = result["rows"]
    assert row["variant"] == "gligen"
    assert_train_speed_row(row)
    assert row["process_peak_rss_mb"] > 0 and result["ratios"] == []  # nothing to set against gligen
    assert len(result["load_average"]["start"]) == 3


def test_train_speed_sets_each_variant_against_gligen(tmp_path, monkeypatch):
    """Every variant, each run in this process instead of a worker process of its own: the rows and ratios."""
    train_speed = script("train_speed")

    def in_this_process(args, variant: str) -> dict:
        return train_speed.run_variant(argparse.Namespace(**{**vars(args), "worker": variant}))

    monkeypatch.setattr(train_speed, "run_in_subprocess", in_this_process)
    out = tmp_path / "results" / "train_speed.json"
    assert train_speed.main([*TRAIN_SPEED, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [row["variant"] for row in result["rows"]] == list(train_speed.VARIANTS)
    for row in result["rows"]:
        assert_train_speed_row(row)
    by_name = {row["variant"]: row for row in result["rows"]}
    assert by_name["spatiallock-box-all"]["attention_blocks"] > by_name["spatiallock"]["attention_blocks"]
    ratios = {ratio["of"]: ratio for ratio in result["ratios"]}
    assert set(ratios) == {"spatiallock / gligen", "spatiallock-box-all / gligen"}
    for name, ratio in ratios.items():
        mine = by_name[name.split(" / ")[0]]
        expected = mine["trainable_params"] / by_name["gligen"]["trainable_params"]
        assert ratio["trainable_params"] == pytest.approx(expected, abs=1e-4)


TRAIN_SPEED = ["--device", "cpu", "--steps", "1", "--warmup", "0", "--batch-size", "2", "--resolution", "32",
               "--threads", "1"]  # fmt: skip


def assert_train_speed_row(row: dict) -> None:
    assert row["trainable_params"] > 0 and len(row["step_times"]) == 1
    for key in ("steps_per_s", "s_per_step", "s_per_step_median", "s_per_step_min", "cpu_s_per_step", "last_loss"):
        assert math.isfinite(row[key]) and row[key] > 0, key
    assert row["peak_memory_mb"] >= 0 and row["setup_memory_mb"] >= 0


# ---- the scripts use the package's public names only ----------------------------------------------------------

# names with a leading underscore that are a library's public interface: namedtuple's methods
PUBLIC_UNDERSCORE_NAMES = {"_replace", "_asdict", "_fields", "_make"}


def private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_uses(source: str, filename: str = "<source>") -> list[str]:
    """Each `x._name` attribute (not a dunder) and each import of a private spatiallock module or name, as
    'line: what'."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Attribute) and private(node.attr) and node.attr not in PUBLIC_UNDERSCORE_NAMES:
            found.append(f"{node.lineno}: .{node.attr}")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "spatiallock":
            parts = node.module.split(".") + [alias.name for alias in node.names]
            found += [f"{node.lineno}: {node.module}: {part}" for part in parts if private(part)]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "spatiallock":
                    found += [f"{node.lineno}: {alias.name}" for part in parts if private(part)]
    return sorted(found, key=lambda entry: int(entry.split(":")[0]))


def test_the_check_finds_private_attributes_and_imports():
    source = """
import spatiallock._hidden
from spatiallock.pipelines import _helper, public
from spatiallock._inner.mod import thing
from other_library import _theirs
pipe._conditioning(layouts)
pipe.condition(layouts).__class__
row._replace(a=1)
"""
    assert private_uses(source) == [
        "2: spatiallock._hidden", "3: spatiallock.pipelines: _helper", "4: spatiallock._inner.mod: _inner",
        "6: ._conditioning",
    ]  # fmt: skip


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda path: path.name)
def test_benchmarks_use_public_names_only(path):
    assert private_uses(path.read_text(), str(path)) == [], f"{path.name} reaches private names"
