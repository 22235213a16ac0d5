"""SpatialLockPipeline on tiny bases written to disk: determinism, equivalence with the plain base, save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import LAYOUTS, STEPS, TWO, adapter_for, sample

from spatiallock.errors import SpatialLockError
from spatiallock.pipelines.diffusion import SpatialLockPipeline


def test_output_is_deterministic_for_a_seed_and_changes_with_it(base_folder):
    pipe = SpatialLockPipeline.from_pretrained(base_folder, adapter=adapter_for(base_folder, gates=0.8))
    first, again, other = sample(pipe, 0), sample(pipe, 0), sample(pipe, 1)
    assert first.shape == (2, 32, 32, 3) and np.isfinite(first).all()
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).max() > 1e-3


@pytest.mark.parametrize("variant", ["spatiallock", "gligen"])
def test_closed_gates_give_exactly_the_plain_base_and_open_gates_do_not(base_folder, variant):
    plain = sample(SpatialLockPipeline.from_pretrained(base_folder))
    closed = sample(SpatialLockPipeline.from_pretrained(base_folder, adapter=adapter_for(base_folder, variant)))
    opened = SpatialLockPipeline.from_pretrained(base_folder, adapter=adapter_for(base_folder, variant, gates=0.8))
    np.testing.assert_array_equal(closed, plain)
    assert np.abs(sample(opened) - plain).max() > 1e-3
    # grounding for none of the steps is the plain base too, whatever the gates
    np.testing.assert_array_equal(sample(opened, grounding_steps=0.0), plain)


def test_plain_path_matches_diffusers_stable_diffusion_pipeline(tiny_sd):
    from diffusers import StableDiffusionPipeline

    reference = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    reference.set_progress_bar_config(disable=True)
    captions = [layout.caption for layout in LAYOUTS]
    expected = reference(
        captions, num_inference_steps=STEPS, guidance_scale=4.0, output_type="np", height=32, width=32,
        generator=torch.Generator().manual_seed(0),
    ).images  # fmt: skip
    ours = SpatialLockPipeline.from_pretrained(tiny_sd, adapter=adapter_for(tiny_sd))
    assert type(ours.scheduler).__name__ == "PNDMScheduler"  # the folder's own sampler
    np.testing.assert_allclose(sample(ours), expected, atol=1e-6)


def test_save_pretrained_then_from_pretrained_gives_the_same_images(base_folder, tmp_path):
    pipe = SpatialLockPipeline.from_pretrained(base_folder, adapter=adapter_for(base_folder, gates=0.8))
    expected = sample(pipe)
    pipe.save_pretrained(tmp_path / "model")
    assert (tmp_path / "model" / "adapter" / "config.json").is_file()
    # the small base names its text encoder's package instead of copying 90 MB
    has_encoder = (tmp_path / "model" / "text_encoder").is_dir()
    assert has_encoder == (base_folder.name.startswith("tiny-sd"))
    assert not list((tmp_path / "model").rglob("*.bin")) and not list((tmp_path / "model").rglob("*.pt"))
    loaded = SpatialLockPipeline.from_pretrained(tmp_path / "model")
    assert loaded.adapter is not None
    np.testing.assert_array_equal(sample(loaded), expected)
    # saving again over the folder replaces it whole
    loaded.save_pretrained(tmp_path / "model")
    np.testing.assert_array_equal(sample(SpatialLockPipeline.from_pretrained(tmp_path / "model")), expected)


def test_an_adapter_folder_attaches_to_a_separately_given_base(tiny_small_base, tmp_path):
    adapter = adapter_for(tiny_small_base, gates=0.8)
    adapter.save_pretrained(tmp_path / "adapter")
    direct = sample(SpatialLockPipeline.from_pretrained(tiny_small_base, adapter=adapter))
    from_folder = SpatialLockPipeline.from_pretrained(tiny_small_base, adapter=tmp_path / "adapter")
    np.testing.assert_array_equal(sample(from_folder), direct)
    with pytest.raises(SpatialLockError, match="is an adapter folder"):
        SpatialLockPipeline.from_pretrained(tmp_path / "adapter")


def test_an_adapter_for_another_base_is_refused(tiny_sd, tiny_small_base):
    with pytest.raises(SpatialLockError, match="adapter does not fit the base"):
        SpatialLockPipeline.from_pretrained(tiny_small_base, adapter=adapter_for(tiny_sd, gates=0.8))


def test_layouts_of_different_sizes_share_a_batch(tiny_small_base):
    pipe = SpatialLockPipeline.from_pretrained(tiny_small_base, adapter=adapter_for(tiny_small_base, gates=0.8))
    generators = [torch.Generator().manual_seed(s) for s in (5, 6)]
    pipe.set_progress_bar_config(disable=True)
    options = {"num_inference_steps": STEPS, "guidance_scale": 4.0, "output_type": "np"}
    batched = pipe(layouts=LAYOUTS, generator=generators, **options).images
    alone = pipe(layouts=LAYOUTS[1:], generator=[torch.Generator().manual_seed(6)], **options).images
    np.testing.assert_allclose(batched[1], alone[0], atol=1e-4)
    # the prompt/phrases/boxes form gives the same as layouts
    again = pipe(
        prompt=[layout.caption for layout in LAYOUTS], phrases=[list(layout.labels) for layout in LAYOUTS],
        boxes=[list(layout.boxes) for layout in LAYOUTS], generator=[torch.Generator().manual_seed(s) for s in (5, 6)],
        **options,
    ).images  # fmt: skip
    np.testing.assert_array_equal(again, batched)


@pytest.mark.parametrize(
    "scheduler, cls",
    [("ddim", "DDIMScheduler"), ("dpm", "DPMSolverMultistepScheduler"), ("euler", "EulerDiscreteScheduler")],
)
def test_diffusers_schedulers_swap_in(tiny_small_base, tiny_sd, scheduler, cls):
    import diffusers
    from diffusers import StableDiffusionPipeline

    pipe = SpatialLockPipeline.from_pretrained(
        tiny_small_base, adapter=adapter_for(tiny_small_base, gates=0.8), scheduler=scheduler
    )
    assert type(pipe.scheduler).__name__ == cls
    assert pipe.scheduler.config.prediction_type == "v_prediction"  # the base's own noise schedule carried over
    if scheduler == "dpm":
        assert pipe.scheduler.config.algorithm_type == "dpmsolver++"
    # sampling runs that sampler: the plain path gives what diffusers' Stable Diffusion pipeline gives with it
    reference = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    options = {"algorithm_type": "dpmsolver++"} if scheduler == "dpm" else {}
    reference.scheduler = getattr(diffusers, cls).from_config(reference.scheduler.config, **options)
    reference.set_progress_bar_config(disable=True)
    expected = reference(
        [layout.caption for layout in LAYOUTS], num_inference_steps=STEPS, guidance_scale=4.0, output_type="np",
        height=32, width=32, generator=torch.Generator().manual_seed(0),
    ).images  # fmt: skip
    ours = SpatialLockPipeline.from_pretrained(tiny_sd, adapter=adapter_for(tiny_sd), scheduler=scheduler)
    np.testing.assert_allclose(sample(ours), expected, atol=1e-6)


def test_bad_pipeline_arguments_raise_clear_errors(tiny_small_base):
    pipe = SpatialLockPipeline.from_pretrained(tiny_small_base, adapter=adapter_for(tiny_small_base, gates=0.8))
    with pytest.raises(SpatialLockError, match=r"layouts\[0\]\.objects\[0\]\.box: .* outside \[0, 1\]"):
        pipe("a red circle", phrases=["red circle"], boxes=[[0.1, 0.1, 1.2, 0.5]])
    with pytest.raises(SpatialLockError, match="1 phrases but 2 boxes"):
        pipe("a red circle", phrases=["red circle"], boxes=[[0.1, 0.1, 0.2, 0.5], [0.1, 0.1, 0.2, 0.5]])
    with pytest.raises(SpatialLockError, match="grounding_steps"):
        pipe("a red circle", phrases=["red circle"], boxes=[[0.1, 0.1, 0.2, 0.5]], grounding_steps=1.5)


def test_unconditional_branch_gets_empty_caption_and_null_grounding_for_the_grounded_share(tiny_small_base):
    pipe = SpatialLockPipeline.from_pretrained(tiny_small_base, adapter=adapter_for(tiny_small_base, gates=0.8))
    calls = []
    predict = pipe.predict

    def recording_predict(latents, t, states, caption_mask, grounding):
        layout = None if grounding is None else (grounding.boxes.clone(), grounding.mask.clone())
        calls.append((states.clone(), layout))
        return predict(latents, t, states, caption_mask, grounding)

    pipe.predict = recording_predict
    sample(pipe, num_inference_steps=4, grounding_steps=0.5)
    empty, _ = pipe.encode_prompts([""] * 2)
    captions, _ = pipe.encode_prompts([layout.caption for layout in LAYOUTS])
    assert len(calls) == 4
    for step, (states, grounding) in enumerate(calls):
        torch.testing.assert_close(states[:2], empty)  # unconditional rows first, as in Stable Diffusion
        torch.testing.assert_close(states[2:], captions)
        if step >= 2:  # grounding_steps=0.5: the layout guides the first half of the steps only
            assert grounding is None
            continue
        boxes, masks = grounding
        assert masks[:2].sum() == 0  # null grounding: no object slot is open in the unconditional rows
        assert masks[2].tolist()[:2] == [1.0, 1.0] and masks[3].tolist()[:1] == [1.0] and masks[3, 1:].sum() == 0
        torch.testing.assert_close(boxes[2, :2], torch.tensor(TWO, dtype=boxes.dtype))
