"""The share of the sampling steps an adapter grounds by default (its config's `grounding_steps`, GLIGEN's
scheduled sampling): used when a call does not say, overridden when it does, saved and read back, recorded in
reports as the share actually used."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import NUM_CLASSES, PHRASE_DIM
from test_pipeline import make_adapter, sample
from test_train_adapter import train

from spatiallock.cli import main
from spatiallock.errors import SpatialLockError
from spatiallock.models.adapter import SpatialLockAdapter
from spatiallock.pipeline import SpatialLockPipeline, load_adapter
from spatiallock.sampling import SamplingOptions

STEPS = 4


def with_share(folder, share: float | None) -> SpatialLockAdapter:
    """The same (seeded, gates open) adapter, its config's grounding share set to `share` (None: not recorded)."""
    adapter = make_adapter(folder)
    if share is not None:
        adapter.register_to_config(grounding_steps=share)
    return adapter


def test_the_adapters_share_is_the_default_and_a_call_overrides_it(tiny_small_base):
    half = SpatialLockPipeline.from_pretrained(tiny_small_base, adapter=with_share(tiny_small_base, 0.5))
    every = SpatialLockPipeline.from_pretrained(tiny_small_base, adapter=with_share(tiny_small_base, None))
    assert half.default_grounding_steps == 0.5 and every.default_grounding_steps == 1.0
    by_default = sample(half, num_inference_steps=STEPS)
    np.testing.assert_array_equal(by_default, sample(every, num_inference_steps=STEPS, grounding_steps=0.5))
    assert np.abs(by_default - sample(every, num_inference_steps=STEPS)).max() > 1e-3
    # a call that names a share gets it, whatever the adapter's own
    np.testing.assert_array_equal(
        sample(half, num_inference_steps=STEPS, grounding_steps=1.0), sample(every, num_inference_steps=STEPS)
    )
    # the plain base has nothing to ground
    assert SpatialLockPipeline.from_pretrained(tiny_small_base).default_grounding_steps == 1.0


def test_the_share_is_saved_read_back_and_recorded_as_used(tiny_small_base, tmp_path):
    with_share(tiny_small_base, 0.3).save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "config.json").read_text())["grounding_steps"] == 0.3
    pipe = SpatialLockPipeline.from_pretrained(tiny_small_base, adapter=tmp_path / "adapter")
    assert pipe.default_grounding_steps == 0.3
    assert SamplingOptions().record(pipe)["grounding_steps"] == 0.3
    assert SamplingOptions(grounding_steps=0.8).record(pipe)["grounding_steps"] == 0.8
    assert SamplingOptions().pipeline_kwargs()["grounding_steps"] is None  # the pipeline decides


@pytest.mark.parametrize("share", [-0.1, 1.5, float("nan")])
def test_a_share_outside_0_to_1_is_refused(unet, share):
    with pytest.raises(SpatialLockError, match="grounding steps"):
        SpatialLockAdapter.from_unet(unet, "spatiallock", None, PHRASE_DIM, NUM_CLASSES, grounding_steps=share)


def test_train_adapter_saves_the_share_and_refuses_a_bad_one(tiny_sd, tiny_shapes, tmp_path, capsys):
    out = tmp_path / "grounded"
    assert train(tiny_sd, tiny_shapes, out, "--grounding-steps", "0.4", "--max-steps", "1") == 0
    assert load_adapter(out).config.grounding_steps == 0.4
    assert json.loads((out / "train" / "config.json").read_text())["grounding_steps"] == 0.4
    bad = [
        "--base",
        str(tiny_sd),
        "--data",
        str(tiny_shapes),
        "--out",
        str(tmp_path / "x"),
        "--grounding-steps",
        "1.5",
    ]
    assert main(["train", "adapter", *bad]) == 2
    assert "--grounding-steps" in capsys.readouterr().err and not (tmp_path / "x").exists()
