"""`train adapter`: the shipped recipe through the CLI, the classifier-free guidance dropout of captions and
layouts, and the start every trainer shares."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import run_train_adapter

from spatiallock.base.folders import load_base
from spatiallock.base.text import TextConditioning
from spatiallock.errors import SpatialLockError
from spatiallock.models.adapter import SpatialLockAdapter
from spatiallock.models.injection import resolve_positions, transformer_blocks
from spatiallock.pipelines.diffusion import load_adapter
from spatiallock.training.adapter import AdapterTrainConfig, drop_conditions, train_adapter
from spatiallock.training.base import BaseTrainConfig
from spatiallock.training.common import drop, start_training
from spatiallock.training.loop import LoopConfig, step_generator

pytestmark = pytest.mark.usefixtures("one_thread")

DRAWS = 4000


def assert_rate(observed: float, probability: float, draws: int = DRAWS) -> None:
    """`observed` within 4 standard deviations of a binomial rate `probability` over `draws` (p ~ 6e-5 to fail)."""
    sigma = math.sqrt(probability * (1 - probability) / draws)
    assert abs(observed - probability) <= 4 * sigma, (observed, probability, sigma)


# ---- the shipped recipe -------------------------------------------------------------------------------------


def test_the_shipped_recipe_puts_box_attention_in_every_down_and_up_block(tiny_sd, tiny_shapes, tmp_path, capsys):
    out = tmp_path / "box-all"
    recipe = ("--box-attention", "--positions", "all", "--gate-lr-scale", "10", "--lr", "5e-4")
    assert run_train_adapter(tiny_sd, tiny_shapes, out, *recipe, "--max-steps", "2") == 0
    assert f"adapter written to {out} (2 steps" in capsys.readouterr().out

    config = json.loads((out / "config.json").read_text())
    assert config["box_attention"] is True
    unet = load_base(tiny_sd).unet
    positions = resolve_positions(unet, "all")
    # the tiny U-Net: attention at the finer level, one module down, two up; the mid block is not a down/up block
    assert positions == ["down_blocks.0.attentions.0", "up_blocks.1.attentions.0", "up_blocks.1.attentions.1"]
    assert config["blocks"] == [name for name, _ in transformer_blocks(unet, positions)]
    assert len(config["blocks"]) == 3 and not any(name.startswith("mid_block") for name in config["blocks"])
    assert all(any(block.startswith(p + ".") for block in config["blocks"]) for p in positions)
    recorded = json.loads((out / "train" / "config.json").read_text())
    assert recorded["box_attention"] is True and recorded["positions"] == "all" and recorded["gate_lr_scale"] == 10

    adapter = load_adapter(out)
    assert adapter.config.box_attention is True and list(adapter.config.blocks) == config["blocks"]
    adapter.attach(load_base(tiny_sd).unet)  # fits the base it was trained on
    assert any(value.item() != 0.0 for key, value in adapter.state_dict().items() if key.endswith("gate_attn"))


# ---- caption and layout dropout ------------------------------------------------------------------------------


@pytest.mark.parametrize("probability", [0.1, 0.3])
def test_drop_replaces_items_at_the_configured_rate(probability):
    items = [f"caption {i}" for i in range(DRAWS)]
    dropped, keep = drop(items, probability, torch.Generator().manual_seed(0), "")
    assert keep.shape == (DRAWS,) and keep.dtype == torch.bool
    assert all(d == ("" if not k else item) for item, d, k in zip(items, dropped, keep.tolist()))
    assert_rate(dropped.count("") / DRAWS, probability)


@pytest.mark.parametrize("probability, kept", [(0.0, DRAWS), (1.0, 0)])
def test_drop_at_rate_zero_keeps_everything_and_at_one_drops_everything(probability, kept):
    items = list(range(DRAWS))
    dropped, keep = drop(items, probability, torch.Generator().manual_seed(0), None)
    assert int(keep.sum()) == kept
    assert dropped == (items if kept else [None] * DRAWS)


def layout_batch(size: int) -> tuple[list[str], torch.Tensor]:
    """`size` captions and (size, 4) slot masks with 1 to 4 real objects each."""
    captions = [f"{i} red squares" for i in range(size)]
    masks = (torch.arange(4)[None, :] <= torch.arange(size)[:, None] % 4).float()
    return captions, masks


def test_caption_and_layout_dropout_rates_are_as_configured_and_independent():
    # as the trainer draws them: batches of 16, one generator per step
    caption_dropped, layout_dropped = [], []
    for step in range(DRAWS // 16):
        captions, masks = layout_batch(16)
        kept_captions, grounding = drop_conditions(captions, masks, 0.1, 0.3, step_generator(0, step, 0))
        for caption, kept_caption, mask, seen in zip(captions, kept_captions, masks, grounding):
            assert kept_caption in ("", caption)  # a dropped caption is the empty string, else untouched
            hidden = not seen.any()
            assert torch.equal(seen, torch.zeros_like(mask) if hidden else mask)  # a whole layout, or nothing
            caption_dropped.append(kept_caption == "")
            layout_dropped.append(hidden)
    caption_dropped, layout_dropped = torch.tensor(caption_dropped), torch.tensor(layout_dropped)
    assert_rate(caption_dropped.float().mean().item(), 0.1)
    assert_rate(layout_dropped.float().mean().item(), 0.3)
    # independent: both are dropped at the product of the rates, and each at its own rate given the other
    assert_rate((caption_dropped & layout_dropped).float().mean().item(), 0.1 * 0.3)
    caption_given_layout = caption_dropped[layout_dropped].float().mean().item()
    assert_rate(caption_given_layout, 0.1, draws=int(layout_dropped.sum()))


@pytest.mark.parametrize("caption_dropout, layout_dropout", [(1.0, 0.0), (0.0, 1.0)])
def test_the_trainer_sees_empty_captions_and_hidden_layouts_when_dropped(
    tiny_sd, tiny_shapes, tmp_path, monkeypatch, caption_dropout, layout_dropout
):
    encoded, grounded = [], []
    encode, forward = TextConditioning.encode, SpatialLockAdapter.forward

    def recording_encode(self, owner, captions, *args, **kwargs):
        encoded.append(list(captions))
        return encode(self, owner, captions, *args, **kwargs)

    def recording_forward(self, unet, sample, timestep, states, phrase_embeds, boxes, masks, **kwargs):
        grounded.append((masks.detach().clone(), kwargs["object_masks"].detach().clone()))
        return forward(self, unet, sample, timestep, states, phrase_embeds, boxes, masks, **kwargs)

    monkeypatch.setattr(TextConditioning, "encode", recording_encode)
    monkeypatch.setattr(SpatialLockAdapter, "forward", recording_forward)
    loop = LoopConfig(max_steps=2, batch_size=4, progress=False)
    config = AdapterTrainConfig(
        base=str(tiny_sd), data=str(tiny_shapes), out=str(tmp_path / "a"), caption_dropout=caption_dropout,
        layout_dropout=layout_dropout, loop=loop,
    )  # fmt: skip
    train_adapter(config)

    assert len(encoded) == len(grounded) == 2
    for captions, (masks, objects) in zip(encoded, grounded):
        assert len(captions) == 4 and objects.sum(dim=1).min() >= 1  # every image has objects
        if caption_dropout == 1.0:
            assert captions == [""] * 4
            assert torch.equal(masks, objects)
        else:
            assert all(captions)
            assert not masks.any()  # every slot of a hidden layout is off ...
        # ... while the perception loss still learns the real objects
        assert torch.equal(objects, (objects > 0).float()) and objects.any()


# ---- the start every trainer shares ---------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["vae", "unet"])
def test_start_training_refuses_checkpoints_of_any_stage_unless_resuming(tmp_path, stage):
    out = tmp_path / "base"
    (out / "train" / "checkpoints" / stage / "checkpoint-5").mkdir(parents=True)
    config = BaseTrainConfig(data=str(tmp_path / "data"), out=str(out))
    with pytest.raises(SpatialLockError, match=r"already holds checkpoints; pass --resume"):
        start_training(config, ("vae", "unet"), resume=False)
    assert not (out / "train" / "config.json").exists()
    run = start_training(config, ("vae", "unet"), resume=True)
    assert (run.out, run.folder) == (out, out / "train")
    run.record_config()
    assert json.loads((out / "train" / "config.json").read_text())["out"] == str(out)
