"""The lean Grounding-Attention recipe: blocks without the feed-forward, narrower attention, the recipe carried
to another base (`SpatialLockAdapter.like`, `params --config-from`), and warm starts from a trained adapter."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import (
    NUM_CLASSES,
    PHRASE_DIM,
    adapter_for,
    error_line,
    grounded,
    make_inputs,
    open_gates,
    plain,
    run_train_adapter,
)

from spatiallock.base.configs import build_unet, unet_config
from spatiallock.cli import main
from spatiallock.errors import SpatialLockError
from spatiallock.models.adapter import SpatialLockAdapter, placement_of
from spatiallock.models.grounding import GroundingAttention, GroundingTokens
from spatiallock.pipelines.diffusion import load_adapter
from spatiallock.shipped import default_model_path

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_lean_block_has_no_feed_forward_and_computes_the_full_blocks_attention():
    torch.manual_seed(0)
    full = GroundingAttention(64, 32, 4, 16, box_attention=True)
    lean = GroundingAttention(64, 32, 4, 16, box_attention=True, feed_forward=False)
    assert full.ff is not None and lean.ff is None and lean.gate_ff is None
    assert not any("ff" in name or "norm2" in name for name, _ in lean.named_parameters())
    missing = set(dict(full.named_parameters())) - set(dict(lean.named_parameters()))
    assert missing and all(name.startswith(("ff.", "norm2.")) or name == "gate_ff" for name in missing)
    lean.load_state_dict(full.state_dict(), strict=False)
    with torch.no_grad():
        full.gate_attn.fill_(0.8), lean.gate_attn.fill_(0.8), full.shape_object.weight.normal_()
        lean.shape_object.weight.copy_(full.shape_object.weight)
    boxes = torch.tensor([[[0.1, 0.1, 0.6, 0.5], [0.5, 0.4, 1.0, 1.0]]])
    objs = GroundingTokens(torch.randn(1, 2, 32), torch.ones(1, 2), torch.randn(1, 1, 32), boxes, (8, 8), {})
    x = torch.randn(1, 64, 64)
    # with the feed-forward's gate shut the two blocks are the same function; open, the full one differs
    assert torch.allclose(full(x, objs), lean(x, objs), atol=1e-6)
    with torch.no_grad():
        full.gate_ff.fill_(0.8)
    assert not torch.allclose(full(x, objs._replace(cache={})), lean(x, objs._replace(cache={})), atol=1e-3)


def test_the_block_attention_is_diffusers_attention_with_the_bias():
    """The block computes its attention from cached key and value projections: the same numbers as diffusers'
    attention processor with the bias as its mask."""
    torch.manual_seed(0)
    block = GroundingAttention(64, 32, 4, 16, box_attention=True)
    with torch.no_grad():
        block.gate_attn.fill_(0.7), block.gate_ff.fill_(0.3), block.shape_object.weight.normal_()
    boxes = torch.tensor([[[0.1, 0.1, 0.5, 0.6], [0.4, 0.2, 0.9, 0.9], [0, 0, 0, 0]]] * 2)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    objs = GroundingTokens(torch.randn(2, 3, 32), mask, torch.randn(1, 1, 32), boxes, (16, 16), {})
    x = torch.randn(2, 256, 64)
    keys, bias = block.keys_and_bias(objs, 256, x.dtype)
    h = x + block.gate_attn.tanh() * block.attn(block.norm1(x), encoder_hidden_states=keys, attention_mask=bias)
    expected = h + block.gate_ff.tanh() * block.ff(block.norm2(h))
    assert torch.allclose(block(x, objs), expected, atol=1e-5)


def test_a_lean_adapter_starts_as_the_identity_is_smaller_and_loads_back(unet, tmp_path):
    x = make_inputs()
    before = plain(unet, x)
    full = adapter_for(unet, positions="all", box_attention=True)
    lean = adapter_for(unet, positions="all", box_attention=True, feed_forward=False, attention_width=0.5)
    lean.attach(unet)
    assert torch.equal(grounded(lean, unet, x), before)
    assert lean.parameter_counts()["attention_blocks"] < full.parameter_counts()["attention_blocks"] / 2
    # narrower: every head of each block half as wide, the heads kept
    for block, (width, heads, head) in zip(lean.fusers, lean.config.block_dims):
        assert block.heads == heads and block.attn.to_q.weight.shape == (heads * (head // 2), width)
    open_gates(lean, 0.5)
    grounded_out = grounded(lean, unet, x)
    assert not torch.allclose(grounded_out, before)
    lean.save_pretrained(tmp_path / "lean")
    loaded = load_adapter(tmp_path / "lean")
    assert loaded.config.feed_forward is False and loaded.config.attention_width == 0.5
    assert loaded.config.positions == "all"
    loaded.attach(unet)
    assert torch.allclose(grounded(loaded, unet, x), grounded_out, atol=1e-6)


@pytest.mark.parametrize("options", [{"feed_forward": False}, {"attention_width": 0.5}])
def test_lean_options_are_for_grounding_attention_only(unet, options):
    with pytest.raises(SpatialLockError, match="only for Grounding-Attention"):
        adapter_for(unet, "gligen", **options)


@pytest.mark.parametrize("width", [0.0, 1.5, float("nan")])
def test_an_attention_width_outside_0_to_1_is_refused(unet, width):
    with pytest.raises(SpatialLockError, match="attention width"):
        adapter_for(unet, attention_width=width)


def test_like_builds_the_same_recipe_on_another_base(unet):
    lean = adapter_for(unet, positions="up", box_attention=True, feed_forward=False, attention_width=0.5)
    with torch.device("meta"):
        sd = build_unet(unet_config("sd-v1-4"), device="meta")
        on_sd = SpatialLockAdapter.like(dict(lean.config), sd, 768, 80)
        up = SpatialLockAdapter.from_unet(sd, "spatiallock", "up", 768, 80, box_attention=True)
    assert on_sd.config.positions == "up" and on_sd.config.blocks == up.config.blocks
    assert on_sd.config.feed_forward is False and on_sd.config.attention_width == 0.5 and on_sd.config.box_attention
    assert on_sd.parameter_counts()["total"] < up.parameter_counts()["total"]
    # an adapter saved before placements were recorded: its placement read off the U-Net it was built for
    old = {k: v for k, v in lean.config.items() if k != "positions"}
    with pytest.raises(SpatialLockError, match="does not record its placement"):
        SpatialLockAdapter.like(old, sd, 768, 80)
    assert placement_of(old["blocks"], unet) == "up"
    with torch.device("meta"):
        assert SpatialLockAdapter.like(old, sd, 768, 80, built_for=unet).config.blocks == up.config.blocks


def test_params_config_from_counts_the_shipped_recipe_on_sd(capsys):
    assert main(["params", "--base", "sd-v1-4", "--config-from", "default", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    shipped = json.loads((default_model_path() / "adapter" / "config.json").read_text())
    recipe = result["recipe"]
    for key in ("variant", "box_attention", "feed_forward", "attention_width"):
        assert recipe[key] == shipped.get(key, recipe[key])
    assert len(result["spatiallock_blocks"]) == 15 if recipe["positions"] == "all" else result["spatiallock_blocks"]
    # the same counted by hand on the meta device
    with torch.device("meta"):
        sd = build_unet(unet_config("sd-v1-4"), device="meta")
        options = {k: shipped[k] for k in ("box_attention", "feed_forward", "attention_width") if k in shipped}
        expected = SpatialLockAdapter.from_unet(sd, shipped["variant"], recipe["positions"], 768, 80, **options)
    assert result["spatiallock_trainable"] == expected.parameter_counts()["total"]
    assert result["ratio"] == pytest.approx(result["spatiallock_trainable"] / result["gligen_trainable"])


def test_params_config_from_refuses_what_is_no_adapter_in_one_line(capsys, tmp_path):
    assert main(["params", "--config-from", str(tmp_path / "nowhere")]) == 2
    assert "config-from" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')
    assert main(["params", "--config-from", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert "not a SpatialLock adapter" in err and len(err.strip().splitlines()) == 1
    assert main(["params", "--config-from", "default", "--positions", "all"]) == 2
    assert "not both" in capsys.readouterr().err


def test_train_adapter_lean_flags_and_a_warm_start(tiny_sd, tiny_shapes, tmp_path, capsys):
    full = tmp_path / "full"
    everywhere = ("--box-attention", "--positions", "all")
    assert run_train_adapter(tiny_sd, tiny_shapes, full, *everywhere, "--max-steps", "2") == 0
    lean = tmp_path / "lean"
    flags = ("--box-attention", "--positions", "all", "--feed-forward", "none", "--attention-width", "1")
    warm = ("--init-from", str(full), "--max-steps", "1", "--lr", "1e-30")
    assert run_train_adapter(tiny_sd, tiny_shapes, lean, *flags, *warm) == 0
    out = capsys.readouterr().out
    assert f"init-from {full}:" in out and "0 of this adapter's start fresh" in out
    config = json.loads((lean / "config.json").read_text())
    assert config["feed_forward"] is False and config["positions"] == "all"
    assert json.loads((lean / "train" / "config.json").read_text())["init_from"] == str(full)
    # learning rate 1e-30: the lean adapter holds the full one's weights, less its feed-forward
    trained, started = load_adapter(full).state_dict(), load_adapter(lean).state_dict()
    assert set(started) < set(trained) and all(torch.allclose(started[k], trained[k], atol=1e-20) for k in started)
    assert any(".ff." in k for k in set(trained) - set(started))


def test_init_from_something_that_is_no_adapter_is_one_line(tiny_sd, tiny_shapes, tmp_path, capsys):
    code = run_train_adapter(tiny_sd, tiny_shapes, tmp_path / "x", "--init-from", str(tmp_path), "--max-steps", "1")
    assert code == 2
    assert "init-from" in error_line(capsys.readouterr().err)
    assert not (tmp_path / "x").exists()


def test_the_lean_recipe_is_the_same_per_base_unet_fixture(unet):
    """`like` on the base an adapter was built for rebuilds exactly its blocks and widths."""
    adapter = adapter_for(unet, positions="all", box_attention=True, feed_forward=False)
    again = SpatialLockAdapter.like(dict(adapter.config), unet, PHRASE_DIM, NUM_CLASSES)
    assert again.config.blocks == adapter.config.blocks and again.config.block_dims == adapter.config.block_dims
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in adapter.state_dict().items()}


def test_feed_forward_at_the_finest_level_only(unet):
    adapter = adapter_for(unet, positions="all", box_attention=True, feed_forward="finest")
    widths = [width for width, *_ in adapter.config.block_dims]
    assert len(set(widths)) > 1  # the tiny U-Net has blocks at two levels
    kept = [block.ff is not None for block in adapter.fusers]
    assert kept == [width == min(widths) for width in widths] and any(kept) and not all(kept)
    with pytest.raises(SpatialLockError, match="feed-forward"):
        adapter_for(unet, feed_forward="coarsest")
    with torch.device("meta"):
        sd = build_unet(unet_config("sd-v1-4"), device="meta")
        counts = [
            SpatialLockAdapter.like({**dict(adapter.config), "feed_forward": ff}, sd, 768, 80).parameter_counts()
            for ff in (False, "finest", True)
        ]
    assert counts[0]["total"] < counts[1]["total"] < counts[2]["total"]
