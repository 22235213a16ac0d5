"""The adapter's training recipe (`AdapterRecipe`) as `train adapter` reads it: one option per field with the
field's default, one set of allowed values behind both the parser and `check`, and the adapter it builds."""

from __future__ import annotations

import re
from dataclasses import fields

import pytest

from spatiallock.cli import build_parser, main
from spatiallock.errors import SpatialLockError
from spatiallock.models.adapter import FEED_FORWARD, RECIPE, SpatialLockAdapter
from spatiallock.training.adapter import AdapterTrainConfig
from spatiallock.training.recipe import (
    FEED_FORWARD_CHOICES,
    AdapterRecipe,
    Interval,
    LossWeights,
    flag_of,
    recipe_options,
)

FOLDERS = ["--base", "b", "--data", "d", "--out", "o"]
# a value out of range for each option with allowed values: (as typed, as a field's value)
BAD = {
    "loss_weights": ("0.5,-1", (0.5, -1.0)),
    "resolution": ("20", 20),
    "attention_width": ("0", 0.0),
    "grounding_steps": ("1.5", 1.5),
    "perception_timesteps": ("0", 0),
    "gate_lr_scale": ("nan", float("nan")),
    "max_train_samples": ("-3", -3),
}


def adapter_args(*options: str):
    return build_parser().parse_args(["train", "adapter", *FOLDERS, *options])


def test_every_option_is_a_recipe_field_with_its_default():
    args = vars(adapter_args())
    options = recipe_options()
    assert options and all(args[spec.name] == spec.default for spec in options)
    run_only = {"base", "data", "out", "max_steps", "batch_size", "lr", "seed", "checkpoint_every", "keep"}
    run_only |= {"num_workers", "resume", "no_progress", "command", "train_command", "func"}
    assert set(args) == {spec.name for spec in options} | run_only
    # the fields without an option keep their defaults in every run
    hidden = {spec.name for spec in fields(AdapterRecipe)} - {spec.name for spec in options}
    assert hidden == {"caption_dropout", "layout_dropout", "flip_prob", "max_objects"}


def test_the_recorded_config_holds_each_setting_under_its_field_name():
    config = AdapterTrainConfig(base="b", data="d", out="o", feed_forward="none", attention_width=0.5)
    config.check()
    assert isinstance(config, AdapterRecipe)
    assert {spec.name for spec in fields(AdapterRecipe)} < {spec.name for spec in fields(config)}
    assert config.feed_forward == "none" and config.attention_width == 0.5 and config.base == "b"


@pytest.mark.parametrize("name", sorted(BAD))
def test_the_parser_and_check_refuse_the_same_values_in_the_same_words(name, capsys):
    typed, value = BAD[name]
    meta = next(spec.metadata for spec in recipe_options() if spec.name == name)
    words = meta["allowed"].words
    assert main(["train", "adapter", *FOLDERS, flag_of(name), typed]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    if meta["cast"] is None:  # refused by the parser
        assert f"error: argument {flag_of(name)}: expected {words}, got {typed!r}" in err
    else:  # cast by the parser, refused by the recipe's check before any work
        assert f"error: {flag_of(name)}: expected {words}, got {value!r}" in err
    with pytest.raises(SpatialLockError, match="^" + re.escape(f"{flag_of(name)}: expected {words}")):
        AdapterRecipe(**{name: value}).check()


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"variant": "dalle"}, "--variant: one of spatiallock, poi, poi-pog, gligen, got 'dalle'"),
        ({"feed_forward": "coarsest"}, "--feed-forward: one of all, finest, none, got 'coarsest'"),
        ({"timestep_sampling": "log-normal"}, "--timestep-sampling: one of uniform, cubic, got 'log-normal'"),
        ({"mixed_precision": "fp8"}, "--mixed-precision: one of no, fp16, bf16"),
        ({"caption_dropout": 1.5}, "--caption-dropout: expected a number in [0, 1], got 1.5"),
        ({"variant": "poi", "perception_input": "rendered"}, "--perception-input: variant poi has no PoG"),
    ],
)
def test_check_names_the_option_of_the_first_bad_setting(changes, message):
    with pytest.raises(SpatialLockError) as caught:
        AdapterRecipe(**changes).check()
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_a_refused_recipe_leaves_no_folder(tmp_path, capsys):
    out = tmp_path / "x"
    options = ["--variant", "gligen", "--perception-input", "rendered"]
    assert main(["train", "adapter", "--base", "b", "--data", "d", "--out", str(out), *options]) == 2
    assert "--perception-input: variant gligen has no PoG" in capsys.readouterr().err and not out.exists()


def test_the_allowed_values_in_words():
    assert Interval(0.0, open_low=True).words == "a positive number"
    assert Interval(0, open_low=True, whole=True).words == "a positive whole number"
    assert Interval(0.0, 1.0, open_low=True).words == "a number in (0, 1]"
    assert Interval(16, 2048, whole=True, step=8).words == "a multiple of 8 from 16 to 2048"
    assert 24 in Interval(16, 2048, whole=True, step=8) and 20 not in Interval(16, 2048, whole=True, step=8)
    assert True not in Interval(0, open_low=True, whole=True) and float("inf") not in Interval(0.0)
    assert LossWeights().parse("0.5,0.25") == (0.5, 0.25)
    for text in ("0.5", "0.5,x", "0.5,inf"):
        with pytest.raises(ValueError, match="such as 0.5,0.5"):
            LossWeights().parse(text)


def test_the_recipe_builds_what_the_adapter_records_and_like_carries(unet):
    options = AdapterRecipe().adapter_options(["a", "b"])
    assert set(options) - {"class_names"} <= set(RECIPE)  # `like` and `params --config-from` carry every one
    assert set(FEED_FORWARD_CHOICES.values()) == set(FEED_FORWARD)
    # the default recipe is the adapter's own defaults, the same config.json byte for byte, but for what the PoG
    # head reads: `train adapter` trains it on what was drawn; the adapter's default stays the paper's grounded
    # input, which adapters saved before the setting existed were trained on
    assert options["perception_input"] == "rendered"
    plain = SpatialLockAdapter.from_unet(unet, "spatiallock", None, 24, 2, class_names=["a", "b"])
    assert plain.config.perception_input == "grounded"
    built = SpatialLockAdapter.from_unet(unet, "spatiallock", None, 24, 2, **options)
    plain = SpatialLockAdapter.from_unet(unet, "spatiallock", None, 24, 2, class_names=["a", "b"],
                                         perception_input="rendered")  # fmt: skip
    assert built.to_json_string() == plain.to_json_string()
    lean = AdapterRecipe(box_attention=True, feed_forward="none", attention_width=0.5, loss_weights=(0.5, 0.5))
    config = SpatialLockAdapter.from_unet(unet, "spatiallock", "all", 24, 2, **lean.adapter_options("ab")).config
    assert config.feed_forward is False and config.attention_width == 0.5 and config.box_attention is True
    assert config.loss_weighting == "fixed" and list(config.loss_weights) == [0.5, 0.5]
    assert list(config.class_names) == ["a", "b"]


def test_a_variant_without_a_pog_head_takes_the_default_head_input_and_refuses_another():
    AdapterRecipe(variant="poi").check()  # the default (a head reads what was drawn) says nothing to it
    assert AdapterRecipe(variant="poi").adapter_options(["a"])["perception_input"] == "grounded"
    assert AdapterRecipe(variant="poi-pog").adapter_options(["a"])["perception_input"] == "rendered"
    with pytest.raises(SpatialLockError, match="--perception-input: variant gligen has no PoG"):
        AdapterRecipe(variant="gligen", perception_input="rendered").check()
