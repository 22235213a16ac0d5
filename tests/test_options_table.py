"""The sampling options table: every option that changes an image is recorded by `generate-dataset` and a rerun
that changes any one of them is refused (parametrised over the table, so a new option is covered the day it is
added); the command line, the checks and the pipeline arguments all come from it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from PIL import Image

from spatiallock.cli import main
from spatiallock.sampling.options import OPTIONS, SamplingOptions, add_arguments, setting_differences, yes_no

OUTPUT_OPTIONS = [option for option in OPTIONS if option.output]
LAYOUT = {"caption": "a red circle", "objects": [{"label": "red circle", "box": [0.1, 0.1, 0.6, 0.6]}]}


def another_value(option, tmp_path: Path) -> list[str]:
    """Command-line arguments that set `option` to a valid value other than its default."""
    if option.flag:
        return [option.flag_name]
    if option.type is yes_no:
        return [option.flag_name, "yes"]
    if option.choices is not None:
        return [option.flag_name, next(c for c in option.choices if c != option.default)]
    if option.metavar == "PATH":  # an image file
        path = tmp_path / "reference.png"
        Image.new("RGB", (32, 32), (200, 30, 30)).save(path)
        return [option.flag_name, str(path)]
    if option.type is str:
        return [option.flag_name, "mid_block"]
    low = option.low if option.low is not None else 0
    high = option.high if option.high is not None else low + 100
    if option.default is None:
        value = low + (high - low) / 2 if option.type is float else max(int(low), 1) * 16
    elif option.type is float:
        value = (option.default + low) / 2 if option.default > low else option.default + 1
    else:
        value = option.default + 1
    return [option.flag_name, str(value)]


def generate_dataset(layouts: Path, model, out: Path, *options: str) -> int:
    args = ["generate-dataset", "--layouts", str(layouts), "--model", str(model), "--out", str(out)]
    return main([*args, "--steps", "2", "--batch-size", "1", "--no-progress", *options])


@pytest.fixture(scope="module")
def finished(tiny_small_base, tmp_path_factory):
    """A data set of two images generated with every option at its default."""
    folder = tmp_path_factory.mktemp("dataset")
    layouts = folder / "layouts.json"
    layouts.write_text(json.dumps([LAYOUT, {**LAYOUT, "caption": "one red circle"}]))
    out = folder / "out"
    assert generate_dataset(layouts, tiny_small_base, out) == 0
    return layouts, out


def snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_the_table_covers_the_options_of_the_bug_reports():
    names = {option.name for option in OUTPUT_OPTIONS}
    assert {
        "ground_unconditional", "perception_guidance_steps", "perception_guidance_scale", "candidates", "select_at",
        "guidance", "seed", "scheduler", "grounding_steps", "layout_guidance_steps", "init_from_layout", "steps",
    } <= names  # fmt: skip
    assert "batch_size" not in names  # batching never changes an image


@pytest.mark.parametrize("option", OUTPUT_OPTIONS, ids=lambda option: option.flag_name)
def test_a_rerun_with_one_output_option_changed_is_refused(option, finished, tiny_small_base, tmp_path, capsys):
    layouts, out = finished
    before = snapshot(out)
    capsys.readouterr()
    code = generate_dataset(layouts, tiny_small_base, out, *another_value(option, tmp_path))
    stderr = capsys.readouterr().err
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2, stderr
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert "other settings" in lines[0] and option.name in lines[0], lines[0]
    assert snapshot(out) == before  # nothing rewritten


def test_a_killed_plain_run_resumed_with_perception_guidance_is_refused(tiny_small_base, tmp_path, capsys):
    """Case 2 of the hostile-input report: images 1-3 plain and 4-6 guided, with nothing recorded."""
    layouts = tmp_path / "layouts.json"
    layouts.write_text(json.dumps([{**LAYOUT, "caption": f"a red circle, picture {n}"} for n in range(3)]))
    out = tmp_path / "out"
    assert generate_dataset(layouts, tiny_small_base, out) == 0
    killed = sorted((out / "images").glob("*.png"))[1:]
    for path in killed:  # a kill after the first image
        path.unlink()
    (out / "instances.json").unlink()
    capsys.readouterr()
    guided = ["--perception-guidance-steps", "2", "--perception-guidance-scale", "0.5"]
    assert generate_dataset(layouts, tiny_small_base, out, *guided) == 2
    assert "perception_guidance_s" in capsys.readouterr().err
    assert not any(path.exists() for path in killed)
    assert generate_dataset(layouts, tiny_small_base, out) == 0  # the same command resumes
    assert all(path.exists() for path in killed)


def test_a_data_set_recorded_before_an_option_existed_still_resumes(finished, tiny_small_base, tmp_path):
    layouts, out = finished
    copy = tmp_path / "out"
    copy.mkdir()
    for name, data in snapshot(out).items():
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        (copy / name).write_bytes(data)
    settings = json.loads((copy / "generate.json").read_text())
    for name in ("candidates", "select_at", "ground_unconditional", "perception_guidance_steps"):
        del settings[name]  # what an older version wrote
    (copy / "generate.json").write_text(json.dumps(settings))
    assert generate_dataset(layouts, tiny_small_base, copy) == 0
    assert setting_differences(settings, {**settings, "candidates": 1}) == []
    assert setting_differences(settings, {**settings, "candidates": 2}) == ["candidates"]


def test_argparse_options_checks_and_pipeline_arguments_come_from_the_table(tmp_path):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    defaults = vars(parser.parse_args([]))
    assert defaults == {option.name: option.default for option in OPTIONS}
    for option in OPTIONS:  # every option parses to another value, which the checks accept
        args = parser.parse_args(another_value(option, tmp_path))
        options = SamplingOptions.from_args(args)
        assert getattr(options, option.name) != option.default, option.name
        options.check()
    # a feature's own options reach the pipeline only when the feature is on
    assert "layout_guidance_scale" not in SamplingOptions(layout_guidance_scale=5.0).pipeline_kwargs()
    on = SamplingOptions(layout_guidance_steps=3, layout_guidance_scale=5.0).pipeline_kwargs()
    assert on["layout_guidance_steps"] == 3 and on["layout_guidance_scale"] == 5.0
    assert SamplingOptions(size=64).pipeline_kwargs()["width"] == 64
    assert SamplingOptions(size=64).pipeline_kwargs("layout-gan") == {"height": 64, "width": 64}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"steps": 0}, "--steps: must be at least 1, got 0"),
        ({"seed": 2**32}, "--seed: must be from 0 to 4294967295"),
        ({"select_at": 1.0}, "--select-at: a share of the steps in (0, 1), got 1.0"),
        ({"init_strength": 0.0}, "--init-strength: a share in (0, 1], got 0.0"),
        ({"guidance": float("nan")}, "--guidance: a finite number at least 0.0, got nan"),
        ({"dtype": "fp8"}, "--dtype: one of fp32, fp16, bf16, got 'fp8'"),
        ({"steps": 2.5}, "--steps: a whole number, got 2.5"),
        ({"candidates": 2, "init_from_layout": True}, "--candidates: not with --init-image or --init-from-layout"),
    ],
)
def test_checks_name_the_option(values, message):
    from spatiallock.errors import SpatialLockError

    with pytest.raises(SpatialLockError) as caught:
        SamplingOptions(**values).check()
    assert message in str(caught.value)


def test_a_layout_gan_refuses_every_diffusion_option_not_at_its_default():
    from spatiallock.errors import SpatialLockError

    for option in OPTIONS:
        if "layout-gan" in option.kinds:
            continue
        options = SamplingOptions(**{option.name: object()})  # any value but the default
        with pytest.raises(SpatialLockError, match=f"^{option.flag_name}: a diffusion sampling option"):
            options.refuse_for("layout-gan", "a LAMA model")
    SamplingOptions(seed=3, size=64).refuse_for("layout-gan", "a LAMA model")
