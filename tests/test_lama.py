"""The LAMA baseline (seed 003): mask adaption, the two players' losses, folders, and the commands that use it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from spatiallock.baselines.lama import (
    BatchGroupNorm,
    IslaNorm,
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


def test_adaption_starts_as_the_raw_mask_and_its_strength_is_used_clamped() -> None:
    torch.manual_seed(0)
    adaption = MaskAdaption(object_dim=18).eval()  # eval: the spectral norms' power iteration holds still
    raw = torch.rand(2, 4, 16, 16)
    raw[:, 0] += 0.01  # the background covers every pixel
    raw[1, 3] = 0  # a padded slot
    objects = torch.randn(2, 4, 18)
    assert float(adaption.alpha.detach()) == 0.0  # how it starts: tanh(0) + 1 = 1
    assert torch.equal(adaption(raw, objects), raw)
    outputs = {}
    for alpha in (0.5, 1.0, 3.0, -1.0, -3.0):
        with torch.no_grad():
            adaption.alpha.fill_(alpha)
        outputs[alpha] = adaption(raw, objects)
    assert not torch.allclose(outputs[0.5], raw, atol=1e-3)  # the strength changes it
    assert not torch.allclose(outputs[0.5], outputs[1.0], atol=1e-4)
    assert torch.equal(outputs[3.0], outputs[1.0]) and torch.equal(outputs[-3.0], outputs[-1.0])  # clamped
    adapted = normalise(outputs[1.0])
    torch.testing.assert_close(adapted.sum(dim=1), torch.ones(2, 16, 16))
    assert adapted.min() >= 0 and adapted[1, 3].abs().max() == 0  # nothing goes to an object that is not there


def test_local_query_is_the_pixel_query_at_first_and_a_5x5_neighbourhood_once_the_gates_open() -> None:
    torch.manual_seed(0)
    adaption = MaskAdaption(object_dim=18).eval()  # d' = 4 query channels
    side, c = 63, 31
    query = torch.randn(1, 4, side, side)
    assert torch.equal(adaption.local(query), query)  # gates at 0: matching on the pixel query alone
    with torch.no_grad():
        for block in adaption.local:
            block.gate.fill_(1.0)
        centre = adaption.local(query)[..., c, c]
    assert not torch.allclose(centre, query[..., c, c], atol=1e-3)  # open gates: no longer the pixel query

    @torch.no_grad()
    def change_at_centre(y: int, x: int) -> float:
        """How much the centre's local query moves when pixel (y, x) of the pixel query trades places with the
        corner's: the map's values stay the same, so GroupNorm's statistics over the whole map barely move."""
        swapped = query.clone()
        swapped[..., y, x], swapped[..., 0, 0] = query[..., 0, 0], query[..., y, x]
        return float((adaption.local(swapped)[..., c, c] - centre).abs().max())

    for dy, dx in ((2, 2), (-2, 0), (0, 2), (1, -2), (-2, -2)):  # inside the 5 x 5 neighbourhood
        assert change_at_centre(c + dy, c + dx) > 1e-2, (dy, dx)
    for dy, dx in ((3, 3), (-3, 0), (0, 3), (2, -3), (5, 0), (-9, 4)):  # outside: only through the statistics
        assert change_at_centre(c + dy, c + dx) < 1e-3, (dy, dx)


def test_the_pixel_query_ablation_matches_without_a_local_query() -> None:
    torch.manual_seed(0)
    adaption = MaskAdaption(object_dim=18, local_query=False).eval()
    assert not any(isinstance(m, torch.nn.Conv2d) for m in adaption.modules())
    raw, objects = torch.rand(1, 3, 8, 8), torch.randn(1, 3, 18)
    with torch.no_grad():
        adaption.alpha.fill_(1.0)
    match = torch.einsum("bok,bkhw->bohw", adaption.key(objects), adaption.pixel_query(raw, objects))
    torch.testing.assert_close(adaption(raw, objects), (torch.tanh(match) + 1) * raw)


def test_batch_group_norm_is_batch_norm_at_rho_0_and_group_norm_at_rho_1() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 16, 6, 6) * 3 + 1
    norm = BatchGroupNorm(16)
    assert float(norm.rho.detach()) == pytest.approx(0.1) and norm.group.num_groups == 4  # the authors' start
    batch = torch.nn.BatchNorm2d(16, affine=False)(x)
    group = torch.nn.GroupNorm(4, 16, affine=False)(x)
    for rho, expected in ((0.0, batch), (1.0, group), (-0.5, batch), (1.5, group)):  # rho used in [0, 1]
        with torch.no_grad():
            norm.rho.fill_(rho)
        torch.testing.assert_close(norm(x), expected)
    with torch.no_grad():
        norm.rho.fill_(0.25)
    torch.testing.assert_close(norm(x), 0.75 * batch + 0.25 * group)


def test_isla_norm_is_the_plain_normalisation_until_its_gate_opens() -> None:
    torch.manual_seed(0)
    isla = IslaNorm(8, style_dim=6).eval()  # eval: the spectral norms' power iteration holds still
    x, styles = torch.randn(2, 8, 8, 8), torch.randn(2, 3, 6)
    mask = torch.rand(2, 3, 16, 16)
    assert float(isla.gate.detach()) == 0.0
    assert torch.equal(isla(x, styles, mask), isla.norm(x))  # the modulation at gate 0 is the identity
    with torch.no_grad():
        isla.gate.fill_(0.5)
    assert not torch.allclose(isla(x, styles, mask), isla.norm(x), atol=1e-3)
    with torch.no_grad():
        isla.gate.fill_(4.0)
    high = isla(x, styles, mask)
    with torch.no_grad():
        isla.gate.fill_(1.0)
    torch.testing.assert_close(high, isla(x, styles, mask))  # the gate is used clamped to [-1, 1]


def test_spectral_norm_is_on_every_convolution_and_linear_layer_of_both_players() -> None:
    from torch.nn.utils import parametrize

    config = tiny_config()
    for model in (LamaGenerator(config), LamaDiscriminator(config)):
        layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
        assert len(layers) > 10
        for name, layer in layers:
            assert parametrize.is_parametrized(layer, "weight"), name
            assert type(layer.parametrizations.weight[0]).__name__ == "_SpectralNorm", name
    discriminator = LamaDiscriminator(config)
    assert parametrize.is_parametrized(discriminator.projection, "weight")  # the class projection too


def test_orthogonal_initialisation_and_the_authors_starting_values() -> None:
    generator = LamaGenerator(tiny_config())
    weight = generator.fc.parametrizations.weight.original  # (out, in), out > in: orthonormal columns
    torch.testing.assert_close(weight.T @ weight, torch.eye(weight.shape[1]), atol=1e-5, rtol=0)
    assert float(generator.fc.bias.detach().abs().max()) == 0.0
    # the noise weights are softplus(s); s is made zero, then (four dimensions: (1, C, 1, 1)) the orthogonal
    # initialisation makes it a random unit vector, as the authors' init_parameter does: weights near log 2
    noise = generator.blocks[0].noise1
    assert float(noise.seed.detach().norm()) == pytest.approx(1.0, abs=1e-5)
    x = torch.zeros(1, noise.seed.shape[1], 4, 4)
    weights = noise(x, torch.ones(1, 1, 4, 4))[0, :, 0, 0]
    assert torch.all((weights > math.log1p(math.exp(-1))) & (weights < math.log1p(math.e)))
    gates = [m.gate for m in generator.modules() if hasattr(m, "gate")]
    assert len(gates) > 5 and all(float(g.detach()) == 0.0 for g in gates)


def test_sampling_noise_is_truncated_as_the_authors_sample() -> None:
    generator = LamaGenerator(tiny_config(max_objects=8, z_dim=64, image_z_dim=64))
    plain = generator.noise(64, torch.Generator().manual_seed(0))
    cut = generator.noise(64, torch.Generator().manual_seed(0), truncation=0.5)
    for key in ("objects", "image"):
        beyond_plain = float((plain[key].abs() > 0.5).float().mean())
        beyond_cut = float((cut[key].abs() > 0.5).float().mean())
        assert beyond_plain == pytest.approx(0.617, abs=0.03)  # P(|z| > 0.5)
        assert beyond_cut == pytest.approx(0.617**2, abs=0.03)  # drawn again once: beyond twice
    maps = float((cut["block0"].abs() > 0.5).float().mean())
    assert maps == pytest.approx(0.617, abs=0.03)  # the noise injection maps are not truncated
    assert generator.config.truncation == 2.0


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
        for module in generator.modules():
            if hasattr(module, "gate"):
                module.gate.fill_(0.5)
    generator.eval().save_pretrained(tmp_path / "lama")
    layouts = [Layout("", ["red circle", "green triangle"], [(0.1, 0.1, 0.5, 0.6), (0.4, 0.3, 0.9, 0.9)])]
    seeds = lambda: [torch.Generator().manual_seed(5)]  # noqa: E731
    first = LamaPipeline(generator)(layouts, generator=seeds()).images[0]
    again = LamaPipeline.from_pretrained(tmp_path / "lama")(layouts, generator=seeds()).images[0]
    assert first.size == (32, 32) and first.tobytes() == again.tobytes()
    other = LamaPipeline(generator)(layouts, generator=[torch.Generator().manual_seed(6)]).images[0]
    assert other.tobytes() != first.tobytes()  # the noise matters: the test could fail


def test_a_folder_of_the_earlier_lama_build_is_refused_in_one_line(tmp_path: Path) -> None:
    generator = LamaGenerator(tiny_config())
    generator.save_pretrained(tmp_path / "lama")
    LamaGenerator.from_pretrained(tmp_path / "lama")  # this build's folder loads
    config = json.loads((tmp_path / "lama" / "config.json").read_text())
    del config["architecture"]  # as the build before the authors' modules wrote it
    (tmp_path / "lama" / "config.json").write_text(json.dumps(config))
    with pytest.raises(SpatialLockError, match="earlier build of LAMA .* train it again") as caught:
        LamaGenerator.from_pretrained(tmp_path / "lama")
    assert "\n" not in str(caught.value)


def test_pipeline_refuses_unknown_labels_and_too_many_objects() -> None:
    pipe = LamaPipeline(LamaGenerator(tiny_config()).eval())
    with pytest.raises(SpatialLockError, match=r"layouts\[0\]\.objects\[1\]\.label: 'purple star'"):
        pipe([Layout("", ["red circle", "purple star"], [(0, 0, 0.5, 0.5), (0.5, 0.5, 1, 1)])])
    with pytest.raises(SpatialLockError, match=r"layouts\[0\]\.objects: 4 objects"):
        pipe([Layout("", ["red circle"] * 4, [(0, 0, 0.5, 0.5)] * 4)])


def test_train_lama_then_generate_with_masks_and_evaluate(tiny_shapes: Path, tmp_path: Path, capsys, one_thread):
    out = tmp_path / "lama"
    small = ["--max-steps", "2", "--batch-size", "4", "--no-progress", "--resolution", "32", "--channels", "4",
             "--generator-delay", "1"]  # fmt: skip
    train = ["train", "lama", "--data", str(tiny_shapes)]
    # 16 images at batch 4: an epoch of 4 steps, which the authors' 31 held steps would leave the generator none of
    assert main([*train, "--out", str(tmp_path / "held"), *small[:-2]]) == 2
    assert "--generator-delay: holding the generator for 31 steps" in capsys.readouterr().err
    assert main([*train, "--out", str(out), "--checkpoint-every", "1", *small]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["_class_name"] == "LamaGenerator" and config["adaption"] is True and config["image_size"] == 32
    log = [json.loads(line) for line in (out / "train" / "log.jsonl").read_text().splitlines()]
    assert {"d_loss", "g_loss", "d_object", "g_object"} <= set(log[-1])  # step 2: the generator's turn
    assert config["d_channels"] == 2 and config["local_query"] is True and config["truncation"] == 2.0
    # resumed with more steps: continues from step 2
    assert main(["train", "lama", "--data", str(tiny_shapes), "--out", str(out), "--resume", *small[2:],
                 "--max-steps", "3"]) == 0  # fmt: skip
    steps = [json.loads(line)["step"] for line in (out / "train" / "log.jsonl").read_text().splitlines()]
    assert steps[-1] == 3

    control = tmp_path / "control"
    assert main(["train", "lama", "--data", str(tiny_shapes), "--out", str(control), "--no-adaption", *small]) == 0
    assert json.loads((control / "config.json").read_text())["adaption"] is False
    pixel = tmp_path / "pixel"
    assert main([*train, "--out", str(pixel), "--pixel-query", *small[2:], "--max-steps", "1"]) == 0
    assert json.loads((pixel / "config.json").read_text())["local_query"] is False

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
    evaluate = ["evaluate", "--model", str(out), "--detector", "default", "--layouts", str(val), "--out", str(report)]
    assert main([*evaluate, "--no-progress", "--score-threshold", "0.25"]) == 0
    scores = json.loads(report.read_text())
    assert 0.0 <= scores["mask_entropy"] <= math.log(9) and scores["steps"] is None
    assert scores["score_threshold"] == 0.25  # the authors' protocol, recorded
    parts = scores["mask_entropy_objects"] + scores["mask_entropy_background"]
    assert parts == pytest.approx(scores["mask_entropy"], abs=2e-4) and scores["adaption_strength"] == 0.0
    capsys.readouterr()
    assert main([*evaluate, "--no-progress", "--score-threshold", "1.5"]) == 2
    assert capsys.readouterr().err.strip().endswith("--score-threshold: must be 0 to 1, got 1.5")
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


def test_learning_rates_per_player_and_per_parameter_as_the_authors_set_them() -> None:
    from spatiallock.training.lama import LR_SCALES
    from spatiallock.training.loop import LoopConfig, param_groups

    generator, discriminator = LamaGenerator(tiny_config()), LamaDiscriminator(tiny_config())
    named = [(f"generator.{n}", p) for n, p in generator.named_parameters()]
    named += [(f"discriminator.{n}", p) for n, p in discriminator.named_parameters()]
    config = LoopConfig(
        max_steps=1,
        learning_rate=1e-4,
        lr_scales=(("generator.adaption.alpha", 100.0), *LR_SCALES),
        model_lr_scales=(("discriminator", 3.0),),
    )
    rates = {id(p): group["lr"] for group in param_groups(named, config) for p in group["params"]}
    assert rates[id(generator.adaption.alpha)] == pytest.approx(1e-2)
    assert rates[id(generator.fc.parametrizations.weight.original)] == pytest.approx(1e-4)
    assert rates[id(generator.blocks[0].norm1.norm.rho)] == pytest.approx(1e-5)  # rho at 0.1x
    assert all(rates[id(p)] == pytest.approx(1e-5) for p in generator.style_mapping.parameters())
    assert rates[id(generator.blocks[0].gate)] == pytest.approx(1e-4)
    gates = {id(m.gate) for m in discriminator.modules() if hasattr(m, "gate")}
    assert len(gates) == len(discriminator.trunk) + 1
    for p in discriminator.parameters():  # 3x the generator's; its gates at 0.2x of that
        assert rates[id(p)] == pytest.approx(6e-5 if id(p) in gates else 3e-4)


def test_gates_may_learn_faster_than_the_authors_let_them() -> None:
    from spatiallock.training.lama import LR_SCALES, gate_lr_scales
    from spatiallock.training.loop import LoopConfig, param_groups

    generator, discriminator = LamaGenerator(tiny_config()), LamaDiscriminator(tiny_config())
    named = [(f"generator.{n}", p) for n, p in generator.named_parameters()]
    named += [(f"discriminator.{n}", p) for n, p in discriminator.named_parameters()]
    config = LoopConfig(max_steps=1, learning_rate=1e-4, lr_scales=(*gate_lr_scales(10.0, alpha=2.0), *LR_SCALES),
                        model_lr_scales=(("discriminator", 3.0),))  # fmt: skip
    rates = {id(p): group["lr"] for group in param_groups(named, config) for p in group["params"]}
    gates = [m.gate for m in generator.modules() if hasattr(m, "gate")]
    assert len(gates) > 8 and all(rates[id(g)] == pytest.approx(1e-3) for g in gates)
    assert rates[id(generator.adaption.alpha)] == pytest.approx(2e-3)
    assert rates[id(generator.blocks[0].norm1.norm.rho)] == pytest.approx(1e-5)  # the rest as the authors'
    assert rates[id(discriminator.trunk[0].gate)] == pytest.approx(6e-4)  # 10 x 0.2 x 3 x 1e-4
    assert gate_lr_scales(1.0) == ()  # the authors' rates: nothing in front of theirs


def test_learning_rates_drop_tenfold_at_60_and_80_percent_and_the_generator_waits_each_epoch() -> None:
    from spatiallock.training.lama import generator_trains, lr_milestones
    from spatiallock.training.loop import constant_with_warmup

    assert lr_milestones(3000) == (1800, 2400)
    parameter = torch.nn.Parameter(torch.zeros(()))
    optimizer = torch.optim.Adam([parameter], lr=1.0)
    scheduler = constant_with_warmup(optimizer, 0, lr_milestones(10))
    rates = []
    for _ in range(10):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([1.0] * 6 + [0.1] * 2 + [0.01] * 2)
    trains = [generator_trains(step, steps_per_epoch=40, delay=31) for step in range(80)]
    assert trains == ([False] * 31 + [True] * 9) * 2  # held for the first 31 steps of every epoch


def test_a_training_step_updates_the_discriminator_then_the_generator_through_the_updated_one(one_thread) -> None:
    import copy

    from spatiallock.training.lama import lama_step

    torch.manual_seed(0)
    config = tiny_config()
    generator, discriminator = LamaGenerator(config), LamaDiscriminator(config)
    labels, boxes, valid = layout_batch()
    batch = {"category_ids": labels, "boxes": boxes, "masks": valid, "pixel_values": torch.rand(2, 3, 32, 32) * 2 - 1}
    copies = [(copy.deepcopy(generator), copy.deepcopy(discriminator)) for _ in range(2)]

    def adam(*modules):
        return torch.optim.Adam([p for m in modules for p in m.parameters()], lr=1e-2, betas=(0.0, 0.999))

    lama_step(generator, discriminator, batch, torch.Generator().manual_seed(3), adam(generator, discriminator))

    def manual(g, d, generator_first: bool):
        """Two steps by hand: the discriminator's on real and detached fakes, then the generator's on the same
        fakes; `generator_first` scores the fakes with the discriminator before its update instead."""
        fake, _, _ = g(labels, boxes, valid, g.noise(2, torch.Generator().manual_seed(3)))
        g_opt, d_opt = adam(g), adam(d)
        stale = generator_loss(d, fake, labels, boxes, valid)["loss"] if generator_first else None
        discriminator_loss(d, batch["pixel_values"], fake, labels, boxes, valid)["loss"].backward()
        d_opt.step()
        g_opt.zero_grad()
        (stale if generator_first else generator_loss(d, fake, labels, boxes, valid)["loss"]).backward()
        g_opt.step()

    manual(*copies[0], generator_first=False)
    manual(*copies[1], generator_first=True)
    for name, model, alternating in (
        ("discriminator", discriminator, copies[0][1]),
        ("generator", generator, copies[0][0]),
    ):
        for (n, p), q in zip(model.named_parameters(), alternating.parameters()):
            torch.testing.assert_close(p, q, msg=f"{name}.{n}")
    moved = [not torch.allclose(p, q) for p, q in zip(generator.parameters(), copies[1][0].parameters())]
    assert any(moved)  # through a stale discriminator the generator would have moved elsewhere
