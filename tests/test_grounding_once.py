"""The sampling path computes a layout's grounding once per call: the same images as recomputing it at every
U-Net call (the training path), with the per-step work gone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import box_adapter, sample

import spatiallock.models.grounding as grounding_module
from spatiallock.pipelines.diffusion import SpatialLockPipeline


def per_call_grounding(pipe: SpatialLockPipeline) -> None:
    """Make `pipe` ground as before the change: the adapter's training path (tokens, keys, box geometry and
    attention bias computed from the raw layout) at every U-Net call."""
    adapter = pipe.adapter
    raw = {}
    encode, encode_layouts = adapter.encode_grounding, pipe.encode_layouts

    def new_call(layouts):
        raw["new"] = True
        return encode_layouts(layouts)

    def remember(embeds, boxes, masks, latent_size):  # the pipeline's inputs, not the adapter's own calls
        if raw.pop("new", False):
            raw.update(embeds=embeds, boxes=boxes, masks=masks)
        return encode(embeds, boxes, masks, latent_size)

    def predict(latents, t, states, caption_mask, grounding, added=None):  # no extra inputs on this base
        if grounding is None:
            return pipe.unet(latents, t, encoder_hidden_states=states, encoder_attention_mask=caption_mask).sample
        rows = slice(raw["masks"].shape[0] - latents.shape[0], None)  # layout guidance: the conditional rows
        layout = (raw["embeds"][rows], raw["boxes"][rows], raw["masks"][rows])
        return adapter(pipe.unet, latents, t, states, *layout, encoder_attention_mask=caption_mask).sample

    adapter.encode_grounding = remember
    pipe.encode_layouts = new_call
    pipe.predict = predict


@pytest.mark.parametrize("options", [{}, {"query_positions": True}])
def test_grounding_once_per_call_gives_the_images_of_grounding_at_every_call(tiny_small_base, options):
    adapter = box_adapter(tiny_small_base, **options)
    once = SpatialLockPipeline.from_pretrained(tiny_small_base, adapter=adapter)
    expected = sample(once, num_inference_steps=4, grounding_steps=0.75)
    # and with layout guidance, which runs the U-Net on the conditional rows only
    guided = sample(once, num_inference_steps=4, layout_guidance_steps=2, layout_guidance_iterations=1)
    every_call = SpatialLockPipeline.from_pretrained(tiny_small_base, adapter=box_adapter(tiny_small_base, **options))
    per_call_grounding(every_call)
    np.testing.assert_allclose(sample(every_call, num_inference_steps=4, grounding_steps=0.75), expected, atol=1e-5)
    recomputed = sample(every_call, num_inference_steps=4, layout_guidance_steps=2, layout_guidance_iterations=1)
    np.testing.assert_allclose(recomputed, guided, atol=1e-5)
    # the adapter does change the images: the comparison is not between two plain bases
    plain = sample(SpatialLockPipeline.from_pretrained(tiny_small_base), num_inference_steps=4, grounding_steps=0.75)
    assert np.abs(expected - plain).max() > 1e-2


def test_the_layout_is_encoded_once_per_call_and_its_geometry_once_per_level(tiny_small_base, monkeypatch):
    pipe = SpatialLockPipeline.from_pretrained(tiny_small_base, adapter=box_adapter(tiny_small_base))
    counts = {"tokens": 0, "geometry": 0, "bias": 0}

    def counting(name, function):
        def wrapped(*args, **kwargs):
            counts[name] += 1
            return function(*args, **kwargs)

        return wrapped

    tokenizer_forward = pipe.adapter.tokenizer.forward
    monkeypatch.setattr(pipe.adapter.tokenizer, "forward", counting("tokens", tokenizer_forward))
    monkeypatch.setattr(grounding_module, "box_coverage", counting("geometry", grounding_module.box_coverage))
    monkeypatch.setattr(grounding_module, "box_attention_bias", counting("bias", grounding_module.box_attention_bias))
    steps = 5
    sample(pipe, num_inference_steps=steps)
    levels = {int(name.split(".")[1]) for name in pipe.adapter.config.blocks if name.startswith("down_blocks")}
    blocks = len(pipe.adapter.config.blocks)
    assert counts == {"tokens": 1, "geometry": len(levels), "bias": blocks}  # not `steps` times each
    # a new call encodes its own layouts again
    sample(pipe, num_inference_steps=steps)
    assert counts["tokens"] == 2


def test_fp16_sampling_with_a_box_attention_adapter(tiny_small_base):
    adapter = box_adapter(tiny_small_base)
    full = sample(SpatialLockPipeline.from_pretrained(tiny_small_base, adapter=adapter))
    half_adapter = box_adapter(tiny_small_base)
    half = SpatialLockPipeline.from_pretrained(tiny_small_base, adapter=half_adapter, torch_dtype=torch.float16)
    assert half.unet.dtype == torch.float16 and half.adapter.dtype == torch.float16
    images = sample(half)
    assert np.isfinite(images).all()
    # the same images as fp32, to fp16's precision
    assert np.abs(images - full).mean() < 0.01 and np.abs(images - full).max() < 0.1
    plain = sample(SpatialLockPipeline.from_pretrained(tiny_small_base, torch_dtype=torch.float16))
    assert np.abs(images - plain).max() > 1e-2
