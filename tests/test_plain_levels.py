"""Grounding the plain levels: a U-Net that spares attention at its finest latent level gets Grounding-Attention
blocks on the outputs of that level's resnets (`--ground-plain-levels`), through forward hooks fed by the same
`position_net` call as the transformer blocks."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from helpers import NUM_CLASSES, PHRASE_DIM, adapter_for, error_line, grounded, make_inputs, plain, tiny_unet

from spatiallock.base.folders import small_unet_config
from spatiallock.errors import SpatialLockError
from spatiallock.models.adapter import SpatialLockAdapter

pytestmark = pytest.mark.usefixtures("one_thread")

FINEST = ["down_blocks.0.resnets.0", "up_blocks.2.resnets.0", "up_blocks.2.resnets.1"]


def plain_finest_unet(widths=(16, 32, 32), seed: int = 0) -> UNet2DConditionModel:
    """The small base's layout on make_inputs' 8x8 latents: the finest level without attention, then one with."""
    torch.manual_seed(seed)
    config = small_unet_config(latent_size=8, cross_attention_dim=32, widths=widths, plain_levels=1)
    return UNet2DConditionModel(**config).eval()


def finest_output(unet, adapter, x, phrase_embeds):
    """What the finest level's first resnet hands on (after the adapter's hook) for a layout with these phrases."""
    seen = []
    handle = unet.down_blocks[0].resnets[0].register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        adapter(unet, x["sample"], x["timestep"], x["encoder_hidden_states"], phrase_embeds, x["boxes"], x["masks"])
    finally:
        handle.remove()
    return seen[0]


@torch.no_grad()
def test_the_finest_plain_level_is_grounded_inside_each_box_only():
    unet = plain_finest_unet()
    adapter = adapter_for(unet, positions="all", box_attention=True, ground_plain_levels=True, gates=1.0, shape=0.1)
    assert list(adapter.config.plain_blocks) == FINEST and [d[0] for d in adapter.config.plain_block_dims] == [16] * 3
    adapter.attach(unet)
    x = make_inputs(batch=1, objects=1)
    x["boxes"][0, 0] = torch.tensor([0.0, 0.0, 0.5, 0.5])  # the top-left 4x4 cells of the 8x8 level
    other = x["phrase_embeds"].clone()
    other[0, 0] = torch.randn(PHRASE_DIM)
    moved = (finest_output(unet, adapter, x, x["phrase_embeds"]) - finest_output(unet, adapter, x, other)).abs()
    moved = moved.amax(dim=1)[0]  # (8, 8): how much each cell of the level changed with what the object is
    inside = torch.zeros(8, 8, dtype=torch.bool)
    inside[:4, :4] = True
    assert (moved[inside] > 1e-5).all() and torch.equal(moved[~inside], torch.zeros(int((~inside).sum())))
    # the same adapter without its plain-level blocks leaves that level as the base computes it
    for block in adapter.plain_fusers:
        block.enabled = False
    assert torch.equal(finest_output(unet, adapter, x, x["phrase_embeds"]), finest_output(unet, adapter, x, other))


@torch.no_grad()
def test_closed_gates_are_the_base_and_a_call_without_grounding_stays_the_base():
    unet = plain_finest_unet()
    x = make_inputs()
    before = plain(unet, x)
    adapter = adapter_for(unet, positions="all", box_attention=True, ground_plain_levels=True).attach(unet)
    assert torch.equal(grounded(adapter, unet, x), before)
    for name, parameter in adapter.plain_fusers.named_parameters():
        if name.rsplit(".", 1)[-1] in ("gate_attn", "gate_ff"):
            parameter.fill_(1.0)
    assert not torch.allclose(grounded(adapter, unet, x), before)
    # guidance whose unconditional rows are the plain base's: the hooks ground the conditional rows alone
    layout = (x["phrase_embeds"][1:], x["boxes"][1:], x["masks"][1:])  # the second row's, as a pipeline passes it
    grounding = adapter.encode_grounding(*layout, x["sample"].shape[-2:])
    rows = adapter(unet, x["sample"], x["timestep"], x["encoder_hidden_states"], grounding=grounding._replace(
        rows=slice(1, None))).sample  # fmt: skip
    assert torch.equal(rows[0], before[0]) and not torch.allclose(rows[1], before[1])
    # the grounded call's tokens do not linger: the next call without grounding is the plain base's
    assert torch.equal(plain(unet, x), before)
    SpatialLockAdapter.detach(unet)
    assert not unet.down_blocks[0].resnets[0]._forward_hooks and not unet._forward_pre_hooks
    assert torch.equal(plain(unet, x), before)


@torch.no_grad()
def test_a_saved_adapter_grounds_the_same_levels_and_like_carries_the_option(tmp_path):
    unet = plain_finest_unet()
    adapter = adapter_for(unet, positions="all", box_attention=True, ground_plain_levels=True, gates=0.5, shape=0.1)
    x = make_inputs()
    expected = grounded(adapter.attach(unet), unet, x)
    adapter.save_pretrained(tmp_path / "adapter")
    loaded = SpatialLockAdapter.from_pretrained(tmp_path / "adapter").eval()
    assert torch.equal(grounded(loaded.attach(unet), unet, x), expected)
    wider = plain_finest_unet(widths=(32, 32, 32), seed=1)
    carried = SpatialLockAdapter.like(dict(loaded.config), wider, PHRASE_DIM, NUM_CLASSES)
    assert list(carried.config.plain_blocks) == FINEST and [d[0] for d in carried.config.plain_block_dims] == [32] * 3
    with pytest.raises(SpatialLockError, match=r"plain-level resnet down_blocks.0.resnets.0 gives .*\[32, 1, 32\]"):
        loaded.attach(wider)


def test_a_unet_with_attention_at_its_finest_level_has_no_plain_level_to_ground():
    with pytest.raises(SpatialLockError, match="ground plain levels: this U-Net has no level without attention"):
        adapter_for(tiny_unet(), positions="all", ground_plain_levels=True)
    with pytest.raises(SpatialLockError, match="ground plain levels: only for Grounding-Attention"):
        adapter_for(plain_finest_unet(), "gligen", ground_plain_levels=True)


def test_train_adapter_refuses_the_option_on_a_base_without_plain_finest_level(tiny_sd, tiny_shapes, tmp_path, capsys):
    from helpers import run_train_adapter

    code = run_train_adapter(tiny_sd, tiny_shapes, tmp_path / "run", "--ground-plain-levels", "--max-steps", "1")
    assert code != 0
    assert "ground plain levels: this U-Net has no level without attention" in error_line(capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


def test_the_recipe_refuses_plain_levels_with_gradient_checkpointing():
    from spatiallock.training.recipe import AdapterRecipe

    AdapterRecipe(ground_plain_levels=True).check()
    with pytest.raises(SpatialLockError, match="--ground-plain-levels: not with --gradient-checkpointing"):
        AdapterRecipe(ground_plain_levels=True, gradient_checkpointing=True).check()
