"""The LAMA baseline (seed 003): mask adaption, the two players' losses, folders, and the commands that use it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from spatiallock.baselines.lama import (
    LamaConfig,
    LamaDiscriminator,
    LamaGenerator,
    LamaPipeline,
    MaskAdaption,
    discriminator_loss,
    generator_loss,
    mask_entropy,
    normalise,
    place_masks,
)
from spatiallock.cli import main
from spatiallock.errors import SpatialLockError
from spatiallock.layout import Layout

CATEGORIES = ["red circle", "blue square", "green triangle"]


def tiny_config(**changes) -> LamaConfig:
    values = dict(categories=CATEGORIES, image_size=32, max_objects=3, embed_dim=8, z_dim=8, image_z_dim=16,
                  mask_size=8, channels=4, d_channels=4)  # fmt: skip
    return LamaConfig(**{**values, **changes})


def layout_batch(seed: int = 0):
    torch.manual_seed(seed)
    labels = torch.tensor([[0, 1, 2], [2, 0, -1]])
    boxes = torch.tensor([
        [[0.1, 0.1, 0.6, 0.6], [0.4, 0.3, 0.9, 0.8], [0.0, 0.5, 0.5, 1.0]],
        [[0.2, 0.2, 0.7, 0.9], [0.5, 0.0, 1.0, 0.4], [0.0, 0.0, 0.0, 0.0]],
    ])  # fmt: skip
    valid = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    return labels, boxes, valid


def test_masks_land_in_their_boxes_only() -> None:
    masks = torch.ones(1, 2, 8, 8)
    boxes = torch.tensor([[[0.25, 0.0, 0.75, 0.5], [0.0, 0.5, 0.5, 1.0]]])
    placed = place_masks(masks, boxes, 16)
    assert placed[0, 0, :8, 4:12].min() > 0.2 and placed[0, 0, 8:].abs().max() == 0 and placed[0, 0, :, :3].max() == 0
    assert placed[0, 1, 8:, :8].min() > 0.2 and placed[0, 1, :8].abs().max() == 0


def test_adaption_at_strength_zero_is_the_raw_mask_normalised_and_always_a_distribution() -> None:
    torch.manual_seed(0)
    adaption = MaskAdaption(object_dim=12)
    raw = torch.rand(2, 4, 16, 16)
    raw[:, 0] += 0.01  # the background covers every pixel
    raw[1, 3] = 0  # a padded slot
    objects = torch.randn(2, 4, 12)
    assert float(adaption.alpha.detach()) == 0.0  # how it starts
    assert torch.equal(adaption(raw, objects), normalise(raw))
    with torch.no_grad():
        adaption.alpha.fill_(3.0)
    adapted = adaption(raw, objects)
    assert not torch.allclose(adapted, normalise(raw), atol=1e-3)  # the strength changes it
    torch.testing.assert_close(adapted.sum(dim=1), torch.ones(2, 16, 16))
    assert adapted.min() >= 0 and adapted[1, 3].abs().max() == 0  # nothing goes to an object that is not there


def test_mask_entropy_is_zero_for_a_clear_mask_and_log_m_for_a_uniform_one() -> None:
    clear = torch.zeros(1, 3, 4, 4)
    clear[0, 0, :2], clear[0, 1, 2:] = 1, 1
    assert float(mask_entropy(clear)[0]) == pytest.approx(0.0, abs=1e-6)
    assert float(mask_entropy(torch.full((1, 3, 4, 4), 1 / 3))[0]) == pytest.approx(math.log(3), rel=1e-5)


def test_generator_gives_images_and_per_pixel_distributions(one_thread) -> None:
    generator = LamaGenerator(tiny_config()).eval()
    labels, boxes, valid = layout_batch()
    images, mask, raw = generator(labels, boxes, valid, generator.noise(2, torch.Generator().manual_seed(0)))
    assert images.shape == (2, 3, 32, 32) and images.abs().max() <= 1
    assert mask.shape == raw.shape == (2, 4, 32, 32)  # the background first, then 3 slots
    torch.testing.assert_close(mask.sum(dim=1), torch.ones(2, 32, 32))
    assert raw[1, 3].abs().max() == 0  # the padded slot has no mask


def _snapshot(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def _changed(before: list[torch.Tensor], module: torch.nn.Module) -> list[bool]:
    return [not torch.equal(b, p.detach()) for b, p in zip(before, module.parameters())]


def test_each_player_step_changes_only_its_own_parameters(one_thread) -> None:
    torch.manual_seed(0)
    config = tiny_config()
    generator, discriminator = LamaGenerator(config), LamaDiscriminator(config)
    # the trainer's optimiser holds both players; a loss must move only its own
    optimizer = torch.optim.Adam([*generator.parameters(), *discriminator.parameters()], lr=1e-2, betas=(0.0, 0.999))
    labels, boxes, valid = layout_batch()
    real = torch.rand(2, 3, 32, 32) * 2 - 1
    rng = torch.Generator().manual_seed(1)

    g_before, d_before = _snapshot(generator), _snapshot(discriminator)
    fake, _, _ = generator(labels, boxes, valid, generator.noise(2, rng))
    generator_loss(discriminator, fake, labels, boxes, valid)["loss"].backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    assert any(_changed(g_before, generator)) and not any(_changed(d_before, discriminator))
    assert all(p.requires_grad for p in discriminator.parameters())  # left trainable for its own step

    g_before, d_before = _snapshot(generator), _snapshot(discriminator)
    fake, _, _ = generator(labels, boxes, valid, generator.noise(2, rng))
    discriminator_loss(discriminator, real, fake, labels, boxes, valid)["loss"].backward()
    optimizer.step()
    assert any(_changed(d_before, discriminator)) and not any(_changed(g_before, generator))


def test_save_and_load_reproduce_an_image_exactly(tmp_path: Path, one_thread) -> None:
    torch.manual_seed(0)
    generator = LamaGenerator(tiny_config())
    with torch.no_grad():  # trained-looking weights: strength and residuals away from their zero start
        generator.adaption.alpha.fill_(0.7)
        for block in generator.blocks:
            block.rezero.fill_(0.5)
    generator.eval().save_pretrained(tmp_path / "lama")
    layouts = [Layout("", ["red circle", "green triangle"], [(0.1, 0.1, 0.5, 0.6), (0.4, 0.3, 0.9, 0.9)])]
    seeds = lambda: [torch.Generator().manual_seed(5)]  # noqa: E731
    first = LamaPipeline(generator)(layouts, generator=seeds()).images[0]
    again = LamaPipeline.from_pretrained(tmp_path / "lama")(layouts, generator=seeds()).images[0]
    assert first.size == (32, 32) and first.tobytes() == again.tobytes()
    other = LamaPipeline(generator)(layouts, generator=[torch.Generator().manual_seed(6)]).images[0]
    assert other.tobytes() != first.tobytes()  # the noise matters: the test could fail


def test_pipeline_refuses_unknown_labels_and_too_many_objects() -> None:
    pipe = LamaPipeline(LamaGenerator(tiny_config()).eval())
    with pytest.raises(SpatialLockError, match=r"layouts\[0\]\.objects\[1\]\.label: 'purple star'"):
        pipe([Layout("", ["red circle", "purple star"], [(0, 0, 0.5, 0.5), (0.5, 0.5, 1, 1)])])
    with pytest.raises(SpatialLockError, match=r"layouts\[0\]\.objects: 4 objects"):
        pipe([Layout("", ["red circle"] * 4, [(0, 0, 0.5, 0.5)] * 4)])


def test_train_lama_then_generate_with_masks_and_evaluate(tiny_shapes: Path, tmp_path: Path, capsys, one_thread):
    out = tmp_path / "lama"
    small = ["--max-steps", "2", "--batch-size", "4", "--no-progress", "--resolution", "32", "--channels", "4"]
    train = ["train", "lama", "--data", str(tiny_shapes)]
    assert main([*train, "--out", str(out), "--checkpoint-every", "1", *small]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["_class_name"] == "LamaGenerator" and config["adaption"] is True and config["image_size"] == 32
    log = [json.loads(line) for line in (out / "train" / "log.jsonl").read_text().splitlines()]
    assert {"d_loss", "g_loss", "d_object", "g_object"} <= set(log[-1])
    # resumed with more steps: continues from step 2
    assert main(["train", "lama", "--data", str(tiny_shapes), "--out", str(out), "--resume", *small[2:],
                 "--max-steps", "3"]) == 0  # fmt: skip
    steps = [json.loads(line)["step"] for line in (out / "train" / "log.jsonl").read_text().splitlines()]
    assert steps[-1] == 3

    control = tmp_path / "control"
    assert main(["train", "lama", "--data", str(tiny_shapes), "--out", str(control), "--no-adaption", *small]) == 0
    assert json.loads((control / "config.json").read_text())["adaption"] is False

    val = tiny_shapes / "instances_val.json"
    images = tmp_path / "images"
    layout = tmp_path / "layout.json"
    layout.write_text(json.dumps({"caption": "x", "objects": [{"label": "red circle", "box": [0.1, 0.1, 0.6, 0.6]}]}))
    assert main(["generate", "--model", str(out), "--layout", str(layout), "--out", str(images), "--n", "2",
                 "--save-masks", "--no-progress"]) == 0  # fmt: skip
    assert {"layout_0.png", "layout_1.png", "layout_0_mask.png", "layout_1_mask.png"} <= {
        p.name for p in images.iterdir()
    }
    report = tmp_path / "report.json"
    assert main(["evaluate", "--model", str(out), "--detector", "default", "--layouts", str(val), "--out", str(report),
                 "--no-progress"]) == 0  # fmt: skip
    scores = json.loads(report.read_text())
    assert 0.0 <= scores["mask_entropy"] <= math.log(9) and scores["steps"] is None
    dataset = tmp_path / "dataset"
    assert main(["generate-dataset", "--model", str(out), "--layouts", str(val), "--out", str(dataset),
                 "--no-progress"]) == 0  # fmt: skip
    assert len(json.loads((dataset / "instances.json").read_text())["images"]) == 4
    capsys.readouterr()
    refused = tmp_path / "refused"
    assert main(["generate", "--model", str(out), "--layout", str(layout), "--out", str(refused),
                 "--init-from-layout"]) == 2  # fmt: skip
    assert "--init-from-layout: a diffusion sampling option" in capsys.readouterr().err
    assert not refused.exists()


def test_learning_rates_per_player_and_for_the_adaption_strength() -> None:
    from spatiallock.training.loop import LoopConfig, param_groups

    generator, discriminator = LamaGenerator(tiny_config()), LamaDiscriminator(tiny_config())
    named = [(f"generator.{n}", p) for n, p in generator.named_parameters()]
    named += [(f"discriminator.{n}", p) for n, p in discriminator.named_parameters()]
    config = LoopConfig(
        max_steps=1,
        learning_rate=1e-4,
        lr_scales=(("adaption.alpha", 100.0),),
        model_lr_scales=(("discriminator", 3.0),),
    )
    rates = {id(p): group["lr"] for group in param_groups(named, config) for p in group["params"]}
    assert rates[id(generator.adaption.alpha)] == pytest.approx(1e-2)
    assert rates[id(generator.fc.weight)] == pytest.approx(1e-4)
    assert all(rates[id(p)] == pytest.approx(3e-4) for p in discriminator.parameters())
