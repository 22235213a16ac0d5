"""The `gligen` baseline is GLIGEN: the same weights give what diffusers' own GLIGEN gives.

diffusers' GLIGEN (`attention_type="gated"`: `position_net` = `GLIGENTextBoundingboxProjection`, a `fuser` =
`GatedSelfAttentionDense` in every transformer block, and `StableDiffusionGLIGENPipeline`) is written after the
official code and is the reference here. The adapter's weights are copied onto diffusers' names. Every one of
GLIGEN's 30 object slots is filled, so that the one deliberate difference plays no part: the project hides
empty slots from the attention, GLIGEN lets their null tokens take part (a test pins that down; where it
matters, in guidance's unconditional branch, the project's empty slots are made visible to compare).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionGLIGENPipeline, UNet2DConditionModel
from helpers import TEXT_DIM, sd_scheduler, tiny_clip_text_model, tiny_clip_tokenizer, tiny_unet, tiny_vae

from spatiallock.base.text import encode_phrases
from spatiallock.data.shapes import COLOURS, SHAPES
from spatiallock.layout import Layout
from spatiallock.models.adapter import SpatialLockAdapter
from spatiallock.pipelines.diffusion import SpatialLockPipeline

SLOTS = 30  # diffusers' GLIGEN pipeline always pads to 30 object slots


def gligen_state_dict(adapter: SpatialLockAdapter) -> dict[str, torch.Tensor]:
    """The adapter's weights under the names of diffusers' GLIGEN U-Net (`attention_type="gated"`)."""
    names = {"null_phrase": "null_positive_feature", "null_position": "null_position_feature"}
    state = {}
    for name, value in adapter.tokenizer.state_dict().items():
        name = names.get(name, name.replace("mlp.", "linears.", 1))
        state[f"position_net.{name}"] = value
    for block, fuser in zip(adapter.config.blocks, adapter.fusers):
        state.update({f"{block}.fuser.{name}": value for name, value in fuser.state_dict().items()})
    return state


def gligen_pair(seed: int = 0) -> tuple[UNet2DConditionModel, SpatialLockAdapter, UNet2DConditionModel]:
    """A tiny base with a `gligen` adapter attached (gates open, null embeddings random, so that every part
    counts), and diffusers' gated U-Net holding the same weights."""
    torch.manual_seed(seed)
    unet = tiny_unet().eval()
    adapter = SpatialLockAdapter.from_unet(unet, "gligen", phrase_dim=TEXT_DIM).eval()
    with torch.no_grad():
        for name, parameter in adapter.named_parameters():
            if name.rsplit(".", 1)[-1] in ("alpha_attn", "alpha_dense"):
                parameter.uniform_(0.3, 1.0)
            elif "null" in name:
                parameter.normal_()
    reference = UNet2DConditionModel.from_config(unet.config, attention_type="gated").eval()
    # every weight of diffusers' GLIGEN U-Net is set, none is left over
    missing, unexpected = reference.load_state_dict({**unet.state_dict(), **gligen_state_dict(adapter)}, strict=False)
    assert not missing and not unexpected
    adapter.attach(unet)
    return unet, adapter, reference


def unet_inputs(batch: int = 2, slots: int = SLOTS, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(batch, slots, 2, generator=g) * 0.6
    return {
        "sample": torch.randn(batch, 4, 16, 16, generator=g),
        "timestep": torch.tensor([500, 20][:batch]),
        "encoder_hidden_states": torch.randn(batch, 77, TEXT_DIM, generator=g),
        "phrase_embeds": torch.randn(batch, slots, TEXT_DIM, generator=g),
        "boxes": torch.cat([xy, xy + 0.05 + torch.rand(batch, slots, 2, generator=g) * 0.35], dim=-1),
    }


def reference_call(reference, inputs: dict, masks: torch.Tensor) -> torch.Tensor:
    gligen = {"boxes": inputs["boxes"], "positive_embeddings": inputs["phrase_embeds"], "masks": masks}
    args = (inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"])
    return reference(*args, cross_attention_kwargs={"gligen": gligen}).sample


def unhide_empty_slots(adapter: SpatialLockAdapter) -> None:
    """Let `adapter`'s empty slots take part in the attention, as GLIGEN's do: their tokens already are the null
    embeddings' (the tokenizer puts those in), only the slot mask hides them."""
    tokenize = adapter.tokenizer.forward

    def tokenize_with_every_slot_visible(phrase_embeds, boxes, masks):
        objs = tokenize(phrase_embeds, boxes, masks)
        return objs._replace(mask=torch.ones_like(objs.mask))

    adapter.tokenizer.forward = tokenize_with_every_slot_visible


@torch.no_grad()
def test_unet_prediction_matches_diffusers_gligen_with_every_slot_filled():
    unet, adapter, reference = gligen_pair()
    inputs = unet_inputs()
    masks = torch.ones(2, SLOTS)
    ours = adapter(unet, **inputs, masks=masks).sample
    expected = reference_call(reference, inputs, masks)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
    # the grounding does change the prediction: the comparison is not between two plain U-Nets
    plain = reference(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"]).sample
    assert (expected - plain).abs().max() > 1e-2


@pytest.mark.parametrize("objects", [0, 5])
@torch.no_grad()
def test_empty_slots_are_hidden_where_gligen_lets_null_tokens_attend(objects):
    """The deliberate difference, pinned down: `objects` real objects in 30 slots give GLIGEN fed those objects
    alone, not GLIGEN padded with null tokens to 30 slots. With no object (the unconditional branch of guidance)
    the attention sees the visual tokens only, where GLIGEN's sees 30 null tokens as well. Unhide the empty
    slots and the two agree."""
    unet, adapter, reference = gligen_pair()
    inputs = unet_inputs()
    masks = torch.zeros(2, SLOTS)
    masks[:, :objects] = 1.0
    ours = adapter(unet, **inputs, masks=masks).sample
    alone = {**inputs, "phrase_embeds": inputs["phrase_embeds"][:, :objects], "boxes": inputs["boxes"][:, :objects]}
    torch.testing.assert_close(ours, reference_call(reference, alone, masks[:, :objects]), rtol=0, atol=1e-5)
    padded = reference_call(reference, inputs, masks)
    assert (ours - padded).abs().max() > 1e-3
    # hiding the empty slots is the only difference
    unhide_empty_slots(adapter)
    torch.testing.assert_close(adapter(unet, **inputs, masks=masks).sample, padded, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = tiny_clip_tokenizer(Path(folder))
    return tiny_clip_text_model(tokenizer), tokenizer


def thirty_objects() -> tuple[list[str], list[tuple[float, float, float, float]]]:
    phrases = [f"{colour} {shape}{plural}" for plural in ("", "s") for shape in SHAPES for colour in COLOURS][:SLOTS]
    assert len(set(phrases)) == SLOTS
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(SLOTS, 2, generator=g) * 0.6
    boxes = torch.cat([xy, xy + 0.1 + torch.rand(SLOTS, 2, generator=g) * 0.3], dim=-1)
    return phrases, [tuple(round(v, 4) for v in box) for box in boxes.tolist()]


@torch.no_grad()
def test_phrase_embeddings_are_gligen_pipelines(clip):
    """GLIGEN's phrase embedding: CLIP's pooled output (before the projection) of each phrase, padded to the
    longest with an attention mask; the project pads to 32 tokens without one (CLIP is causal: the same)."""
    text_encoder, tokenizer = clip
    phrases, _ = thirty_objects()
    tokens = tokenizer(phrases, padding=True, return_tensors="pt")
    expected = text_encoder(**tokens).pooler_output
    torch.testing.assert_close(encode_phrases(text_encoder, tokenizer, phrases), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
@torch.no_grad()
def test_pipeline_images_match_diffusers_gligen_pipeline(clip, guidance_scale):
    """Same seed, scheduler, share of grounded steps and guidance. With guidance, GLIGEN's unconditional branch
    sees 30 null tokens, the project's none (see the test above): here the project's sees them too."""
    text_encoder, tokenizer = clip
    unet, adapter, reference = gligen_pair()
    vae = tiny_vae().eval()
    phrases, boxes = thirty_objects()
    caption = "shapes on a white background"
    options = {"num_inference_steps": 4, "guidance_scale": guidance_scale, "output_type": "np"}
    ours = SpatialLockPipeline(vae, text_encoder, tokenizer, unet, sd_scheduler(), adapter)
    ours.set_progress_bar_config(disable=True)
    if guidance_scale > 1.0:  # the unconditional rows: no object, GLIGEN's 30 null tokens
        unhide_empty_slots(adapter)
    gligen = StableDiffusionGLIGENPipeline(
        vae, text_encoder, tokenizer, reference, sd_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    gligen.set_progress_bar_config(disable=True)
    expected = gligen(
        caption, gligen_phrases=phrases, gligen_boxes=[list(box) for box in boxes], gligen_scheduled_sampling_beta=0.6,
        generator=torch.Generator().manual_seed(0), **options,
    ).images  # fmt: skip
    layout = Layout(caption, tuple(phrases), tuple(boxes))
    images = ours(layouts=[layout], grounding_steps=0.6, generator=torch.Generator().manual_seed(0), **options).images
    assert images.shape == expected.shape == (1, 32, 32, 3)
    np.testing.assert_allclose(images, expected, rtol=0, atol=1e-5)
    # grounding mattered: without it the images differ
    plain = ours(layouts=[layout], grounding_steps=0.0, generator=torch.Generator().manual_seed(0), **options).images
    assert np.abs(plain - expected).max() > 1e-3
