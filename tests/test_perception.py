"""PoG: feature taps, FPN + Enh-Fusion + RetinaNet heads, and the loss weighting."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler
from helpers import NUM_CLASSES, PHRASE_DIM, adapter_for, make_inputs, open_gates
from torchvision.ops import box_iou

from spatiallock.errors import SpatialLockError
from spatiallock.models.adapter import SpatialLockAdapter
from spatiallock.models.perception import (
    DownBlockTap,
    LossWeighting,
    PerceptionHead,
    predicted_clean,
    rendered_features,
)


def test_tap_collects_one_full_resolution_feature_per_down_block(unet):
    x = make_inputs()
    with DownBlockTap(unet.down_blocks) as tap:
        unet(x["sample"], x["timestep"], x["encoder_hidden_states"])
    assert [tuple(f.shape[1:]) for f in tap.features] == [(32, 8, 8), (64, 4, 4)]
    # hooks are gone afterwards
    unet(x["sample"], x["timestep"], x["encoder_hidden_states"])
    assert len(tap.features) == 2


@pytest.mark.parametrize("enh_fusion", [True, False])
def test_perception_loss_is_finite_and_falls_when_overfitting_one_batch(enh_fusion):
    torch.manual_seed(0)
    head = PerceptionHead([16, 32], NUM_CLASSES, channels=32, enh_fusion=enh_fusion, enh_grid=4, enh_heads=4)
    features = [torch.randn(2, 16, 16, 16), torch.randn(2, 32, 8, 8)]
    boxes = torch.tensor([[[0.1, 0.1, 0.4, 0.5], [0.5, 0.5, 0.9, 0.8]], [[0.2, 0.3, 0.7, 0.9], [0, 0, 0, 0]]])
    labels = torch.tensor([[1, 3], [4, 0]])
    masks = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    optimiser = torch.optim.Adam(head.parameters(), lr=1e-3)
    history = []
    for _ in range(60):  # over-fitted by then whatever the seed (tried 0 to 2)
        losses = head.loss(features, boxes, labels, masks)
        total = sum(losses.values())
        assert torch.isfinite(total) and set(losses) == {"classification", "bbox_regression"}
        optimiser.zero_grad()
        total.backward()
        optimiser.step()
        history.append(total.item())
    assert history[-1] < 0.5 * history[0]
    # after over-fitting, each object of the first image is detected in its box with its class
    found = head.detect(features, score_threshold=0.2)[0]
    for box, label in zip(boxes[0], labels[0]):
        same_class = found["boxes"][found["labels"] == label]
        assert same_class.numel() and box_iou(box[None], same_class).max() > 0.5


def test_enh_fusion_starts_as_identity_and_is_switchable():
    torch.manual_seed(0)
    with_enh = PerceptionHead([16, 32], NUM_CLASSES, channels=32, enh_grid=4, enh_heads=4)
    without = PerceptionHead([16, 32], NUM_CLASSES, channels=32, enh_fusion=False)
    without.fpn.load_state_dict(with_enh.fpn.state_dict())
    features = [torch.randn(1, 16, 16, 16), torch.randn(1, 32, 8, 8)]
    for a, b in zip(with_enh.pyramid(features), without.pyramid(features)):
        assert torch.equal(a, b)
    assert without.enh_fusion is None
    with torch.no_grad():
        with_enh.enh_fusion.proj.bias.fill_(0.5)
    assert not torch.equal(with_enh.pyramid(features)[0], without.pyramid(features)[0])


def test_image_without_objects_gives_finite_loss():
    head = PerceptionHead([16, 32], NUM_CLASSES, channels=32, enh_grid=4, enh_heads=4)
    features = [torch.randn(1, 16, 16, 16), torch.randn(1, 32, 8, 8)]
    losses = head.loss(features, torch.zeros(1, 2, 4), torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2))
    assert torch.isfinite(losses["classification"]) and losses["bbox_regression"].item() == 0.0


def test_learned_weights_follow_uncertainty_weighting_and_fixed_weights_are_fixed():
    learned = LossWeighting(["diffusion", "perception"])
    with torch.no_grad():
        learned.log_vars.copy_(torch.tensor([0.5, -1.0]))
    losses = {"diffusion": torch.tensor(2.0), "perception": torch.tensor(3.0)}
    expected = torch.exp(torch.tensor(-0.5)) * 2 + 0.5 + torch.exp(torch.tensor(1.0)) * 3 - 1.0
    torch.testing.assert_close(learned(losses), expected)
    fixed = LossWeighting(["diffusion", "perception"], "fixed", [0.5, 0.5])
    assert list(fixed.parameters()) == [] and fixed(losses).item() == pytest.approx(2.5)
    with pytest.raises(ValueError, match="2 losses"):
        LossWeighting(["diffusion", "perception"], "fixed", [1.0])


def test_adapter_trains_with_learned_weights_that_move(unet):
    """Uncertainty weighting, sum_i exp(-s_i) L_i + s_i, trained with the adapter: the gradient of s_i is
    1 - exp(-s_i) L_i, so Adam's first step (of size lr, against the gradient's sign) raises the s_i of a loss
    above 1 and lowers that of a loss below 1; the weights reported are exp(-s_i)."""
    adapter = adapter_for(unet, fpn_channels=32)
    adapter.attach(unet)
    optimiser = torch.optim.AdamW(adapter.parameters(), lr=1e-2)
    x = make_inputs()
    for step in range(3):
        out = adapter(unet, **x)
        loss = adapter.total_loss(out.sample.square().mean(), out.perception_losses)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if step == 0:
            first = [out.sample.square().mean().item(), sum(out.perception_losses.values()).item()]
            moved = adapter.weighting.log_vars.detach().clone()
    assert adapter.weighting.names == ["diffusion", "perception"]
    assert all(abs(value - 1.0) > 0.05 for value in first), first  # the step's direction is clear
    expected = torch.tensor([1e-2 if value > 1.0 else -1e-2 for value in first])
    torch.testing.assert_close(moved, expected, rtol=1e-4, atol=0)
    log_vars = adapter.weighting.log_vars.detach().tolist()
    assert log_vars != moved.tolist()  # and the later steps moved them on
    weights = adapter.weighting.weights()
    assert weights == pytest.approx({"diffusion": math.exp(-log_vars[0]), "perception": math.exp(-log_vars[1])})


def test_the_perception_loss_on_chosen_images_only(unet):
    """`perception_rows`: the loss of the chosen images is the loss of a batch of those alone; with none chosen it
    is zero, and a backward pass still reaches every head parameter."""
    adapter = adapter_for(unet, fpn_channels=32)
    adapter.attach(unet)
    x = make_inputs(batch=3)
    chosen = adapter(unet, **x, perception_rows=torch.tensor([False, True, True])).perception_losses
    alone = adapter(unet, **{k: v[1:] for k, v in x.items()}).perception_losses
    for name in alone:
        torch.testing.assert_close(chosen[name], alone[name], rtol=1e-5, atol=1e-6)
    everything = adapter(unet, **x).perception_losses
    assert any(not torch.allclose(everything[n], chosen[n]) for n in alone)
    none = adapter(unet, **x, perception_rows=torch.zeros(3, dtype=torch.bool)).perception_losses
    assert all(v.item() == 0.0 for v in none.values())
    sum(none.values()).backward()
    assert all(p.grad is not None for p in adapter.perception.parameters())


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_predicted_clean_inverts_the_noising(prediction_type):
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    g = torch.Generator().manual_seed(0)
    clean, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    steps = torch.tensor([0, 400, 999])
    noisy = scheduler.add_noise(clean, noise, steps)
    target = noise if prediction_type == "epsilon" else scheduler.get_velocity(clean, noise, steps)
    found = predicted_clean(scheduler.alphas_cumprod, noisy, steps, target, prediction_type)
    torch.testing.assert_close(found, clean, rtol=1e-4, atol=2e-3)


def test_rendered_features_see_the_latents_only_never_the_layout(unet):
    """The head's `rendered` input is the plain U-Net's down path at timestep 0: the same with the adapter
    attached as without it, whatever layout the adapter was told."""
    adapter = adapter_for(unet, fpn_channels=32)
    open_gates(adapter, 0.7)  # so that grounding would change the features if it reached them
    x = make_inputs()
    states = x["encoder_hidden_states"]
    with DownBlockTap(unet.down_blocks) as tap:
        unet(x["sample"], torch.zeros(2, dtype=torch.long), states)
    adapter.attach(unet)
    seen = rendered_features(unet, x["sample"], states)
    assert len(seen) == len(tap.features)
    for a, b in zip(seen, tap.features):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    grounded = adapter(unet, **x).sample  # the attached adapter does act on a grounded call
    assert not torch.allclose(grounded, unet(x["sample"], x["timestep"], states).sample)


def test_a_rendered_head_trains_the_adapter_through_its_prediction(unet):
    """With `perception_input="rendered"`, the perception loss reaches the attention blocks through the clean
    latents their prediction implies (and the head through the plain down path); it needs the scheduler."""
    adapter = adapter_for(unet, fpn_channels=32, perception_input="rendered")
    open_gates(adapter, 0.7)
    adapter.attach(unet)
    x = make_inputs()
    with pytest.raises(ValueError, match="scheduler"):
        adapter(unet, **x)
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    out = adapter(unet, **x, scheduler=scheduler)
    loss = sum(out.perception_losses.values())
    loss.backward()
    fuser_grads = [p.grad for p in adapter.fusers.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in fuser_grads)
    assert all(p.grad is not None for p in adapter.perception.parameters())
    with pytest.raises(SpatialLockError, match="perception input"):
        SpatialLockAdapter.from_unet(unet, phrase_dim=PHRASE_DIM, num_classes=NUM_CLASSES, perception_input="x")
