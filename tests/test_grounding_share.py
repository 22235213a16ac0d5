"""Sampling defaults an adapter carries in its config: the share of the steps it grounds (`grounding_steps`,
GLIGEN's scheduled sampling) and whether classifier-free guidance's unconditional rows go through it
(`ground_unconditional`). Used when a call does not say, overridden when it does, saved and read back, recorded
in reports as actually used."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import LAYOUTS, NUM_CLASSES, PHRASE_DIM, adapter_for, box_adapter, run_train_adapter, sample

from spatiallock.cli import main
from spatiallock.errors import SpatialLockError
from spatiallock.models.adapter import SpatialLockAdapter
from spatiallock.pipelines.diffusion import SpatialLockPipeline, load_adapter
from spatiallock.sampling import SamplingOptions

STEPS = 4


def with_share(folder, share: float | None) -> SpatialLockAdapter:
    """The same (seeded, gates open) adapter, its config's grounding share set to `share` (None: not recorded)."""
    adapter = adapter_for(folder, gates=0.8)
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
    assert run_train_adapter(tiny_sd, tiny_shapes, out, "--grounding-steps", "0.4", "--max-steps", "1") == 0
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


def test_without_unconditional_grounding_those_rows_are_the_plain_bases_and_the_others_unchanged(tiny_small_base):
    """One U-Net call on a guided batch: the unconditional rows are exactly the plain U-Net's, the conditional
    rows exactly what the adapter gives them in a batch of their own."""
    adapter = box_adapter(tiny_small_base)
    pipe = SpatialLockPipeline.from_pretrained(tiny_small_base, adapter=adapter)
    embeds, boxes, masks = pipe.encode_layouts(LAYOUTS)
    states, mask = pipe.encode_prompts(["", ""] + [layout.caption for layout in LAYOUTS])
    torch.manual_seed(0)
    latents, t = torch.randn(4, 4, 8, 8), torch.tensor(500)
    cond = adapter.encode_grounding(embeds, boxes, masks, (8, 8))
    both = adapter(
        pipe.unet, latents, t, states, encoder_attention_mask=mask, grounding=cond._replace(rows=slice(2, None))
    )
    plain = pipe.unet(latents[:2], t, encoder_hidden_states=states[:2], encoder_attention_mask=mask[:2]).sample
    alone = adapter(pipe.unet, latents[2:], t, states[2:], encoder_attention_mask=mask[2:], grounding=cond).sample
    torch.testing.assert_close(both.sample[:2], plain, rtol=0, atol=1e-5)
    torch.testing.assert_close(both.sample[2:], alone, rtol=0, atol=1e-5)


def test_the_adapters_unconditional_choice_is_the_default_and_a_call_overrides_it(tiny_small_base):
    own = box_adapter(tiny_small_base)
    own.register_to_config(ground_unconditional=False)
    lean = SpatialLockPipeline.from_pretrained(tiny_small_base, adapter=own)
    usual = SpatialLockPipeline.from_pretrained(tiny_small_base, adapter=box_adapter(tiny_small_base))
    assert lean.default_ground_unconditional is False and usual.default_ground_unconditional is True
    by_default = sample(lean, num_inference_steps=STEPS)
    np.testing.assert_array_equal(by_default, sample(usual, num_inference_steps=STEPS, ground_unconditional=False))
    assert np.abs(by_default - sample(usual, num_inference_steps=STEPS)).max() > 1e-3
    np.testing.assert_array_equal(
        sample(lean, num_inference_steps=STEPS, ground_unconditional=True), sample(usual, num_inference_steps=STEPS)
    )
    assert SamplingOptions().record(lean)["ground_unconditional"] is False
    # without guidance there are no unconditional rows: the choice changes nothing
    np.testing.assert_array_equal(
        sample(lean, num_inference_steps=STEPS, guidance_scale=1.0),
        sample(usual, num_inference_steps=STEPS, guidance_scale=1.0),
    )


def test_ground_unconditional_takes_yes_or_no_on_the_command_line(tmp_path, capsys):
    layout = tmp_path / "layout.json"
    layout.write_text(
        json.dumps({"caption": "a red circle", "objects": [{"label": "red circle", "box": [0, 0, 1, 1]}]})
    )
    code = main(["generate", "--model", "default", "--layout", str(layout), "--out", str(tmp_path / "o"),
                 "--ground-unconditional", "maybe"])  # fmt: skip
    assert code == 2 and "--ground-unconditional" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_layout_guidance_and_layout_initialisation_compose_with_ungrounded_unconditional_rows(tiny_small_base):
    pipe = SpatialLockPipeline.from_pretrained(tiny_small_base, adapter=box_adapter(tiny_small_base))
    guidance = {"layout_guidance_steps": 2, "layout_guidance_scale": 5.0}
    ungrounded = {"num_inference_steps": STEPS, "ground_unconditional": False, "init_from_layout": True}
    images = sample(pipe, **ungrounded, **guidance)
    # the layout's inverted rendering replaced the seed's noise (the sampler is deterministic): any seed, one image
    np.testing.assert_array_equal(images, sample(pipe, seed=1, **ungrounded, **guidance))
    # layout guidance acted on top of it, and the unconditional rows were not grounded
    assert np.abs(images - sample(pipe, **ungrounded)).max() > 1e-3
    grounded = {**ungrounded, "ground_unconditional": True}
    assert np.abs(images - sample(pipe, **grounded, **guidance)).max() > 1e-4


def test_train_adapter_perception_timesteps_is_recorded_and_checked(tiny_sd, tiny_shapes, tmp_path, capsys):
    out = tmp_path / "early"
    assert run_train_adapter(tiny_sd, tiny_shapes, out, "--perception-timesteps", "600", "--max-steps", "1") == 0
    assert json.loads((out / "train" / "config.json").read_text())["perception_timesteps"] == 600
    bad = ["--base", str(tiny_sd), "--data", str(tiny_shapes), "--out", str(tmp_path / "x")]
    assert main(["train", "adapter", *bad, "--perception-timesteps", "0"]) == 2
    assert "--perception-timesteps" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_train_adapter_perception_input_rendered_trains_and_is_saved(tiny_sd, tiny_shapes, tmp_path, capsys):
    out = tmp_path / "rendered"
    options = ["--perception-input", "rendered", "--perception-timesteps", "600", "--max-steps", "2"]
    assert run_train_adapter(tiny_sd, tiny_shapes, out, *options) == 0
    assert json.loads((out / "config.json").read_text())["perception_input"] == "rendered"
    log = [json.loads(line) for line in (out / "train" / "log.jsonl").read_text().splitlines()]
    assert np.isfinite(log[-1]["perception"])
    assert load_adapter(out).config.perception_input == "rendered"
    bad = ["--base", str(tiny_sd), "--data", str(tiny_shapes), "--out", str(tmp_path / "x"), "--variant", "poi"]
    assert main(["train", "adapter", *bad, "--perception-input", "rendered"]) == 2
    assert "perception-input" in capsys.readouterr().err and not (tmp_path / "x").exists()
