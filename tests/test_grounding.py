"""PoI: grounding tokens and the injected attention blocks on a tiny U-Net."""

from __future__ import annotations

import pytest
import torch
from helpers import PHRASE_DIM, adapter_for, grounded, make_inputs, open_gates, plain

from spatiallock.errors import SpatialLockError
from spatiallock.models.adapter import VARIANTS, SpatialLockAdapter
from spatiallock.models.grounding import GroundingAttention, GroundingTokenizer


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fresh_adapter_leaves_output_unchanged(unet, variant):
    x = make_inputs()
    before = plain(unet, x)
    adapter = adapter_for(unet, variant).attach(unet)
    assert torch.equal(grounded(adapter, unet, x), before)
    # and it is not a no-op once the gates open
    open_gates(adapter, 1.0)
    assert not torch.allclose(grounded(adapter, unet, x), before, atol=1e-4)
    SpatialLockAdapter.detach(unet)
    assert torch.equal(plain(unet, x), before)


def test_default_variant_injects_two_blocks_gligen_every_block(unet):
    assert adapter_for(unet).config.blocks == [
        "down_blocks.1.attentions.0.transformer_blocks.0",
        "up_blocks.0.attentions.0.transformer_blocks.0",
    ]
    # GLIGEN: every transformer block of the U-Net, the mid block's included
    assert len(adapter_for(unet, "gligen").config.blocks) == 2 + 1 + 4


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_padded_slots_do_not_change_output(unet, variant):
    adapter = adapter_for(unet, variant).attach(unet)
    open_gates(adapter, 1.0)
    few = make_inputs(slots=3, objects=2)
    many = make_inputs(slots=9, objects=2, seed=5)  # different garbage in the padded slots
    for key in ("sample", "encoder_hidden_states"):
        many[key] = few[key]
    many["phrase_embeds"][:, :2] = few["phrase_embeds"][:, :2]
    many["boxes"][:, :2] = few["boxes"][:, :2]
    torch.testing.assert_close(grounded(adapter, unet, few), grounded(adapter, unet, many), atol=1e-6, rtol=1e-5)
    # the real objects do matter: moving one box changes the output
    moved = dict(few, boxes=few["boxes"].clone())
    moved["boxes"][:, 0] = torch.tensor([0.6, 0.6, 0.9, 0.9])
    assert not torch.allclose(grounded(adapter, unet, few), grounded(adapter, unet, moved), atol=1e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_layout_without_objects_equals_null_grounding_whatever_the_slot_count(unet, variant):
    adapter = adapter_for(unet, variant).attach(unet)
    open_gates(adapter, 1.0)
    empty_small = make_inputs(slots=1, objects=0)
    empty_large = make_inputs(slots=6, objects=0, seed=3)
    empty_large["sample"], empty_large["encoder_hidden_states"] = (
        empty_small["sample"],
        empty_small["encoder_hidden_states"],
    )
    out_small, out_large = grounded(adapter, unet, empty_small), grounded(adapter, unet, empty_large)
    assert torch.isfinite(out_small).all()
    torch.testing.assert_close(out_small, out_large, atol=1e-6, rtol=1e-5)


def test_optimiser_step_changes_only_the_adapter(unet):
    adapter = adapter_for(unet).attach(unet)
    base_before = {k: v.clone() for k, v in unet.state_dict().items()}
    adapter_before = {k: v.clone() for k, v in adapter.state_dict().items()}
    optimiser = torch.optim.AdamW(adapter.parameters(), lr=1e-3)
    x = make_inputs()
    for _ in range(2):  # the second step reaches the attention weights once the gates have moved
        out = adapter(unet, **x)
        loss = adapter.total_loss(out.sample.square().mean(), out.perception_losses)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert all(torch.equal(v, base_before[k]) for k, v in unet.state_dict().items())
    assert all(p.grad is None for p in unet.parameters())
    changed = {k for k, v in adapter.state_dict().items() if not torch.equal(v, adapter_before[k])}
    for part in ("tokenizer.mlp.0.weight", "fusers.0.gate_attn", "fusers.1.attn.to_k.weight", "perception.fpn"):
        assert any(k.startswith(part) for k in changed), part


def test_more_than_thirty_objects_is_a_clear_error():
    tokenizer = GroundingTokenizer(PHRASE_DIM, 32)
    with pytest.raises(SpatialLockError, match="31 object slots given, at most 30"):
        tokenizer(torch.zeros(1, 31, PHRASE_DIM), torch.zeros(1, 31, 4), torch.ones(1, 31))


def test_empty_slots_use_the_null_embeddings():
    tokenizer = GroundingTokenizer(PHRASE_DIM, 32)
    with torch.no_grad():
        tokenizer.null_phrase.normal_()
    boxes = torch.rand(1, 3, 4)
    phrases = torch.randn(1, 3, PHRASE_DIM)
    objs = tokenizer(phrases, boxes, torch.tensor([[1.0, 0.0, 0.0]]))
    # both empty slots are the same null token, whatever their phrase and box held
    torch.testing.assert_close(objs.tokens[0, 1], objs.tokens[0, 2])
    assert not torch.allclose(objs.tokens[0, 0], objs.tokens[0, 1])


def test_a_single_object_can_be_told_here_from_not_here():
    """With one object, a softmax over the objects alone would hand every visual token the same value: the
    null token in the keys lets tokens outside the box attend elsewhere, so the block's output varies."""
    torch.manual_seed(0)
    tokenizer = GroundingTokenizer(PHRASE_DIM, 32)
    block = GroundingAttention(query_dim=16, context_dim=32, heads=2, dim_head=8)
    with torch.no_grad():
        tokenizer.null_phrase.normal_()
        block.gate_attn.fill_(1.0)  # the feed-forward gate stays closed: the attention alone
        block.attn.to_k.weight.mul_(20.0)  # sharper attention than at initialisation
    objs = tokenizer(torch.randn(1, 1, PHRASE_DIM), torch.tensor([[[0.1, 0.1, 0.5, 0.5]]]), torch.ones(1, 1))
    visual = torch.randn(1, 16, 16)
    update = block(visual, objs) - visual
    assert update.std(dim=1).mean() > 1e-4  # not the same for every visual token
    # the same layout padded to more slots gives the same update
    padded = tokenizer(
        torch.randn(1, 3, PHRASE_DIM),
        torch.tensor([[[0.1, 0.1, 0.5, 0.5], [0, 0, 1, 1], [0, 0, 1, 1]]]),
        torch.tensor([[1.0, 0.0, 0.0]]),
    )
    padded = padded._replace(tokens=torch.cat([objs.tokens, padded.tokens[:, 1:]], dim=1))
    torch.testing.assert_close(block(visual, padded) - visual, update)


def test_query_positions_start_as_the_identity_and_make_cells_tell_apart(unet):
    x = make_inputs()
    before = plain(unet, x)
    adapter = adapter_for(unet, query_positions=True).attach(unet)
    assert torch.equal(grounded(adapter, unet, x), before)  # gates and the position projection start at zero
    open_gates(adapter, 1.0)
    without = grounded(adapter, unet, x)
    with torch.no_grad():
        for fuser in adapter.fusers:
            fuser.query_position.weight.normal_(std=1.0)
    assert not torch.allclose(grounded(adapter, unet, x), without, atol=1e-5)
    with pytest.raises(SpatialLockError, match="query positions: only for Grounding-Attention variants"):
        adapter_for(unet, "gligen", query_positions=True)


def test_cell_embedding_is_the_box_embedding_of_each_cell():
    from diffusers.models.embeddings import get_fourier_embeds_from_boundingbox

    from spatiallock.models.grounding import cell_embedding

    cells = cell_embedding(16, torch.zeros(1))  # a 4x4 grid, row by row
    third = torch.tensor([[[0.5, 0.0, 0.75, 0.25]]])  # row 0, column 2
    torch.testing.assert_close(cells[:, 2:3], get_fourier_embeds_from_boundingbox(8, third))
    with pytest.raises(SpatialLockError, match="square token grid"):
        cell_embedding(12, torch.zeros(1))


def test_box_coverage_is_the_share_of_each_cell_inside_the_box():
    from spatiallock.geometry import box_coverage

    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.25, 0.0, 0.75, 0.5]]])  # (1, 2, 4)
    coverage = box_coverage(boxes, rows=2, columns=2)  # cells row by row: (0,0) (0,1) (1,0) (1,1)
    torch.testing.assert_close(coverage[0, :, 0], torch.tensor([1.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(coverage[0, :, 1], torch.tensor([0.5, 0.5, 0.0, 0.0]))
    # a 1x2 grid (a wide latent): the second box covers half of each column's cell, in the top half
    torch.testing.assert_close(box_coverage(boxes, rows=1, columns=2)[0, :, 1], torch.tensor([0.25, 0.25]))


def test_level_grid_follows_the_down_sampling_of_a_non_square_latent():
    from spatiallock.geometry import level_grid

    assert level_grid(96 * 64, (64, 96)) == (64, 96)
    assert level_grid(12 * 8, (64, 96)) == (8, 12)
    assert level_grid(3 * 2, (9, 5)) == (3, 2)  # 9x5 -> 5x3 -> 3x2: halved, rounding up
    with pytest.raises(SpatialLockError, match="7 positions of a U-Net level do not tile"):
        level_grid(7, (8, 8))


def test_box_attention_writes_an_object_only_inside_its_box():
    """With box attention a visual token outside every box sees the null token only: what an object is (its
    phrase) changes the block's output inside its box and nowhere else."""
    from spatiallock.models.grounding import box_attention_bias, box_geometry

    torch.manual_seed(0)
    tokenizer = GroundingTokenizer(PHRASE_DIM, 32)
    block = GroundingAttention(query_dim=16, context_dim=32, heads=2, dim_head=8, box_attention=True)
    with torch.no_grad():
        block.gate_attn.fill_(1.0)
        block.gate_ff.fill_(1.0)
    box = torch.tensor([[[0.0, 0.0, 0.5, 0.5]]])  # the top-left quarter of a 4x4 grid: cells 0, 1, 4, 5
    visual = torch.randn(1, 16, 16)
    changed = []
    for _ in range(2):
        objs = tokenizer(torch.randn(1, 1, PHRASE_DIM), box, torch.ones(1, 1))._replace(grid=(4, 4))
        changed.append(block(visual, objs))
    moved = (changed[0] - changed[1]).abs().amax(dim=-1)[0]  # (16,) per visual token
    inside = torch.zeros(16, dtype=torch.bool)
    inside[[0, 1, 4, 5]] = True
    assert (moved[inside] > 1e-4).all() and torch.equal(moved[~inside], torch.zeros(int((~inside).sum())))
    # an empty slot is hidden even where its (padding) box would cover the cell
    padded = tokenizer(
        torch.randn(1, 2, PHRASE_DIM), torch.tensor([[[0, 0, 0.5, 0.5], [0, 0, 1, 1]]]), torch.ones(1, 2)
    )
    padded = padded._replace(mask=torch.tensor([[1.0, 0.0]]), grid=(4, 4))
    bias = box_attention_bias(box_geometry(padded, 16).coverage, torch.float32)
    assert bias.shape == (1, 16, 3) and (bias[0, :, 2] < -1e30).all() and (bias[0, :, 0] == 0).all()
    # without the latent size the block cannot place boxes: a clear error, not a wrong guess
    with pytest.raises(SpatialLockError, match="box attention: the grounding tokens carry no boxes or latent size"):
        block(visual, objs._replace(grid=None))


def test_box_attention_adapter_starts_as_the_identity_and_keeps_padding_invisible(unet):
    x = make_inputs()
    before = plain(unet, x)
    adapter = adapter_for(unet, box_attention=True).attach(unet)
    assert torch.equal(grounded(adapter, unet, x), before)
    open_gates(adapter, 1.0)
    with_boxes = grounded(adapter, unet, x)
    assert not torch.allclose(with_boxes, before, atol=1e-4)
    more = dict(x)  # the same layouts padded with two more empty slots
    more["phrase_embeds"] = torch.cat([x["phrase_embeds"], torch.randn(x["phrase_embeds"].shape[0], 2, PHRASE_DIM)], 1)
    more["boxes"] = torch.cat([x["boxes"], torch.rand(x["boxes"].shape[0], 2, 4).sort(-1).values], 1)
    more["masks"] = torch.cat([x["masks"], torch.zeros(x["masks"].shape[0], 2)], 1)
    torch.testing.assert_close(grounded(adapter, unet, more), with_boxes)
    with pytest.raises(SpatialLockError, match="box attention: only for Grounding-Attention variants"):
        adapter_for(unet, "gligen", box_attention=True)


def test_box_relative_positions_run_from_zero_to_one_across_each_box():
    from spatiallock.models.grounding import SHAPE_FREQS, box_relative_positions

    boxes = torch.tensor([[[0.0, 0.0, 1.0, 1.0], [0.0, 0.5, 0.5, 1.0]]])
    features = box_relative_positions(boxes, rows=2, columns=2)  # cell centres at 0.25 and 0.75
    assert features.shape == (1, 4, 2, 4 * SHAPE_FREQS)
    first = torch.pi * torch.tensor([0.25, 0.25])[:, None] * torch.arange(1, SHAPE_FREQS + 1)  # cell 0, box 0
    torch.testing.assert_close(features[0, 0, 0], torch.cat([first.sin(), first.cos()], dim=-1).reshape(-1))
    # cell 2 (bottom left, centre (0.25, 0.75)) lies in the middle of box 1 along x and y
    middle = torch.pi * torch.tensor([0.5, 0.5])[:, None] * torch.arange(1, SHAPE_FREQS + 1)
    torch.testing.assert_close(features[0, 2, 1], torch.cat([middle.sin(), middle.cos()], dim=-1).reshape(-1))


def test_the_learned_shape_term_moves_attention_inside_the_box_only():
    torch.manual_seed(0)
    tokenizer = GroundingTokenizer(PHRASE_DIM, 32)
    block = GroundingAttention(query_dim=16, context_dim=32, heads=2, dim_head=8, box_attention=True)
    with torch.no_grad():
        block.gate_attn.fill_(1.0)
    objs = tokenizer(torch.randn(1, 1, PHRASE_DIM), torch.tensor([[[0.0, 0.0, 0.5, 0.5]]]), torch.ones(1, 1))
    objs = objs._replace(grid=(4, 4))
    visual = torch.randn(1, 16, 16)
    fresh = block(visual, objs)
    with torch.no_grad():  # zero at first: a fresh block is plain box attention; trained, the term matters
        block.shape_object.weight.normal_(std=1.0)
    moved = (block(visual, objs) - fresh).abs().amax(dim=-1)[0]
    inside = torch.zeros(16, dtype=torch.bool)
    inside[[0, 1, 4, 5]] = True
    assert (moved[inside] > 1e-4).all() and torch.equal(moved[~inside], torch.zeros(12))
