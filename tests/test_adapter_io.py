"""Saving and loading adapters, fitting them to a base, placements, and `spatiallock params`."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import NUM_CLASSES, PHRASE_DIM, adapter_for, grounded, make_inputs, open_gates

from spatiallock.base.configs import SD_V1_UNET, build_unet, tiny_unet_config
from spatiallock.cli import main
from spatiallock.errors import SpatialLockError
from spatiallock.models.adapter import SpatialLockAdapter
from spatiallock.models.injection import resolve_positions


@pytest.mark.parametrize(
    "variant, options", [("spatiallock", {}), ("gligen", {}), ("spatiallock", {"box_attention": True})]
)
def test_save_load_round_trip_reproduces_output_exactly(unet, tmp_path, variant, options):
    adapter = adapter_for(unet, variant, loss_weighting="fixed", loss_weights=(0.3, 0.7), **options).attach(unet)
    open_gates(adapter, 0.7)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.01 * torch.randn_like(p))
    x = make_inputs()
    expected = grounded(adapter, unet, x)
    adapter.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list((tmp_path / "adapter").glob("*.bin"))
    loaded = SpatialLockAdapter.from_pretrained(tmp_path / "adapter").attach(unet)
    assert loaded.config.variant == variant and loaded.config.loss_weights == [0.3, 0.7]
    assert loaded.config.box_attention == options.get("box_attention", False)
    assert torch.equal(grounded(loaded, unet, x), expected)


def test_adapter_for_another_base_fails_with_a_clear_message(unet, tmp_path):
    adapter_for(unet).save_pretrained(tmp_path / "adapter")
    wider = build_unet(tiny_unet_config(block_out_channels=[32, 96]))
    with pytest.raises(SpatialLockError, match=r"adapter does not fit the base: block down_blocks\.1\.attentions"):
        SpatialLockAdapter.from_pretrained(tmp_path / "adapter").attach(wider)
    other_text = build_unet(tiny_unet_config(cross_attention_dim=48))
    with pytest.raises(SpatialLockError, match="cross_attention_dim is 48, the adapter was built for 32"):
        SpatialLockAdapter.from_pretrained(tmp_path / "adapter").attach(other_text)


def test_default_placements_resolve_on_the_sd_v14_meta_model():
    unet = build_unet(SD_V1_UNET, device="meta")
    assert resolve_positions(unet) == ["down_blocks.2.attentions.1", "up_blocks.1.attentions.0"]
    assert len(resolve_positions(unet, "all")) == 6 + 9
    assert resolve_positions(unet, "inner") == [
        "down_blocks.1.attentions.0",
        "down_blocks.1.attentions.1",
        "down_blocks.2.attentions.0",
        "down_blocks.2.attentions.1",
        "up_blocks.1.attentions.0",
        "up_blocks.1.attentions.1",
        "up_blocks.1.attentions.2",
        "up_blocks.2.attentions.0",
        "up_blocks.2.attentions.1",
        "up_blocks.2.attentions.2",
    ]
    with torch.device("meta"):
        adapter = SpatialLockAdapter.from_unet(unet, positions="down_blocks.0.attentions.0,mid_block.attentions.0")
    assert adapter.config.block_dims == [[320, 8, 40], [1280, 8, 160]]


def test_a_placement_naming_no_block_lists_the_valid_names(unet):
    with pytest.raises(SpatialLockError) as err:
        resolve_positions(unet, "down_blocks.7.attentions.0")
    message = str(err.value)
    assert "down_blocks.7.attentions.0 names no attention block" in message
    assert "down_blocks.0.attentions.0" in message and "mid_block.attentions.0" in message
    assert "\n" not in message


def test_params_json_matches_gligen_and_the_paper_ratio(capsys):
    assert main(["params", "--base", "sd-v1-4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["gligen_trainable"] == 209_102_240
    assert result["base_params"] == 859_520_964
    assert result["spatiallock_trainable"] == 61_201_986  # the count the README gives
    assert result["ratio"] < 0.507  # the paper's bound
    # the same counted here, tensor by tensor, on SD v1.4 built on the meta device (CLIP's 768, COCO's 80 classes)
    unet = build_unet(SD_V1_UNET, device="meta")
    with torch.device("meta"):
        ours, gligen = (
            SpatialLockAdapter.from_unet(unet, variant, None, 768, 80) for variant in ("spatiallock", "gligen")
        )
    counted = {
        name: sum(p.numel() for p in module.parameters()) for name, module in (("ours", ours), ("gligen", gligen))
    }
    assert result["base_params"] == sum(p.numel() for p in unet.parameters())
    assert (result["spatiallock_trainable"], result["gligen_trainable"]) == (counted["ours"], counted["gligen"])
    assert result["ratio"] == pytest.approx(counted["ours"] / counted["gligen"], rel=1e-12)
    assert result["ratio"] == pytest.approx(0.29269, abs=1e-5)  # 61,201,986 / 209,102,240


def test_params_rejects_an_unknown_base_in_one_line(capsys, tmp_path):
    assert main(["params", "--base", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("spatiallock: error: base:") and "\n" not in err


def test_tokens_size_follows_the_phrase_encoder(unet):
    adapter = SpatialLockAdapter.from_unet(unet, "poi", phrase_dim=PHRASE_DIM, num_classes=NUM_CLASSES)
    assert adapter.perception is None
    assert adapter.tokenizer.mlp[0].in_features == PHRASE_DIM + 64
