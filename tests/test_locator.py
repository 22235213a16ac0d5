"""The location model: box tokens, its probabilities, the DPO loss, and `train locator` on a tiny shelves set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from spatiallock.cli import main
from spatiallock.data.synth import synthesize
from spatiallock.errors import SpatialLockError
from spatiallock.location.locator import BoxTokenizer, Locator, LocatorConfig, dpo_loss


def _tiny(bins: int = 16) -> Locator:
    torch.manual_seed(0)
    config = LocatorConfig(labels=["red circle", "blue square"], label_dim=8, bins=bins, image_size=32,
                           channels=(8, 16), dim=32, layers=1, heads=2, dropout=0.0)  # fmt: skip
    return Locator(config, torch.randn(2, 8)).eval()


def test_box_tokens_round_trip() -> None:
    tokenizer = BoxTokenizer(16)
    tokens = torch.randint(0, 16, (200, 4))
    tokens[:, 2:] = torch.maximum(tokens[:, 2:], tokens[:, :2])
    assert torch.equal(tokenizer.encode(tokenizer.decode(tokens)), tokens)
    corners = torch.rand(200, 2, 2)
    boxes = torch.cat([corners.min(dim=1).values, corners.max(dim=1).values], dim=1)
    back = tokenizer.decode(tokenizer.encode(boxes))
    assert (back[:, :2] <= boxes[:, :2] + 1e-6).all() and (back[:, 2:] >= boxes[:, 2:] - 1e-6).all()
    assert (back - boxes).abs().max() <= 1 / 16 + 1e-6  # the smallest bin-aligned box around it


def test_sampled_boxes_have_the_log_probability_the_model_gives_them() -> None:
    model = _tiny()
    images, labels = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 0, 1, 0, 1])
    boxes, scores = model.sample(images, labels, torch.Generator().manual_seed(1))
    assert ((boxes[:, 2:] > boxes[:, :2]).all()) and boxes.min() >= 0 and boxes.max() <= 1
    assert torch.allclose(model.log_prob(images, labels, boxes), scores, atol=1e-4)
    region = (0.5, 0.25, 1.0, 0.75)
    inside, _ = model.sample(images, labels, torch.Generator().manual_seed(2), region=region)
    assert (inside[:, 0] >= 0.5).all() and (inside[:, 1] >= 0.25).all()
    assert (inside[:, 2] <= 1.0).all() and (inside[:, 3] <= 0.75).all()
    with pytest.raises(SpatialLockError, match="label 'green circle': not a class"):
        model.label_index(["red circle", "green circle"])


def test_dpo_loss_is_zero_at_the_reference_and_falls_as_the_policy_prefers_the_positive() -> None:
    chosen, rejected = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0])
    assert dpo_loss(chosen, rejected, chosen, rejected).item() == pytest.approx(0.0, abs=1e-7)
    assert dpo_loss(chosen + 1, rejected - 1, chosen, rejected) < 0 < dpo_loss(chosen - 1, rejected, chosen, rejected)
    # a few optimiser steps on one pair: the loss falls below zero and the policy moves towards the positive
    policy, reference = _tiny(), _tiny()
    policy.train()
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    positive, negative = torch.tensor([[0.1, 0.5, 0.3, 0.9]] * 2), torch.tensor([[0.6, 0.0, 0.9, 0.2]] * 2)
    with torch.no_grad():
        ref = reference(images, labels, positive), reference(images, labels, negative)
    optimiser = torch.optim.Adam(policy.parameters(), lr=1e-3)
    losses = []
    for _ in range(5):
        loss = dpo_loss(policy(images, labels, positive), policy(images, labels, negative), *ref, beta=0.5)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(0.0, abs=1e-5) and losses[-1] < -0.01
    policy.eval()
    with torch.no_grad():
        gained = policy(images, labels, positive) - ref[0]
        lost = policy(images, labels, negative) - ref[1]
    assert (gained > lost).all()


def test_save_and_load_give_the_same_probabilities(tmp_path: Path) -> None:
    model = _tiny()
    model.save_pretrained(tmp_path / "loc")
    loaded = Locator.from_pretrained(tmp_path / "loc")
    images, labels, boxes = torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 1]), torch.rand(3, 2, 2)
    boxes = torch.cat([boxes.min(dim=1).values, boxes.max(dim=1).values], dim=1)
    assert torch.equal(model.log_prob(images, labels, boxes), loaded.log_prob(images, labels, boxes))
    assert loaded.config.labels == ["red circle", "blue square"]
    assert {p.name for p in (tmp_path / "loc").iterdir()} == {"config.json", "model.safetensors"}


def test_train_locator_both_stages(tmp_path: Path, capsys) -> None:
    synthesize(tmp_path / "shelves", train=12, val=4, seed=1, workers=1, progress=False, scene="shelves")
    data, first, second = tmp_path / "shelves", tmp_path / "loc", tmp_path / "loc-dpo"
    small = ["--max-steps", "2", "--batch-size", "4", "--no-progress", "--eval-samples", "2"]
    assert main(["train", "locator", "--data", str(data), "--out", str(second), "--dpo", *small]) == 2
    assert "--dpo: needs --init-from" in capsys.readouterr().err
    assert not second.exists()
    assert main(["train", "locator", "--data", str(data), "--out", str(first), *small]) == 0
    assert main(["train", "locator", "--data", str(data), "--out", str(second), "--dpo", "--init-from", str(first),
                 *small]) == 0  # fmt: skip
    for folder in (first, second):
        record = json.loads((folder / "eval.json").read_text())
        assert record["scenes"] == 4 and 0.0 <= record["top1_plausible"] <= 1.0
        assert Locator.from_pretrained(folder).config.labels[0] == "red circle"
    log = [json.loads(line) for line in (second / "train" / "log.jsonl").read_text().splitlines()]
    assert "margin" in log[-1] and "dpo" in log[-1]


def test_locate_prints_boxes_and_refuses_bad_input(tmp_path: Path, capsys) -> None:
    from PIL import Image

    _tiny().save_pretrained(tmp_path / "loc")
    Image.new("RGB", (32, 32), (120, 120, 120)).save(tmp_path / "scene.png")
    (tmp_path / "notes.txt").write_text("not an image")
    base = ["locate", "--model", str(tmp_path / "loc"), "--image", str(tmp_path / "scene.png")]
    out = tmp_path / "drawn.png"
    assert main([*base, "--label", "red circle", "--n", "4", "--region", "0.5,0,1,1", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert len(found["boxes"]) == 4 and all(b["box"][0] >= 0.5 for b in found["boxes"])
    scores = [b["log_prob"] for b in found["boxes"]]
    assert scores == sorted(scores, reverse=True)
    bad = {
        "--image": ["locate", "--model", str(tmp_path / "loc"), "--image", str(tmp_path / "missing.png"),
                    "--label", "red circle"],
        "--image ": ["locate", "--model", str(tmp_path / "loc"), "--image", str(tmp_path / "notes.txt"),
                     "--label", "red circle"],
        "--label": [*base, "--label", "green hexagon"],
        "--region": [*base, "--label", "red circle", "--region", "0.5,0.5,1.2,1"],
        "--region ": [*base, "--label", "red circle", "--region", "0.5,0.5,0.52,1"],
    }  # fmt: skip
    for field, argv in bad.items():
        assert main([*argv, "--out", str(out)]) == 2, field
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"spatiallock: error: {field.strip()}"), err
        assert not out.exists()
    assert main([*base, "--label", "blue square", "--n", "3", "--out", str(out)]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 3 and out.is_file()
