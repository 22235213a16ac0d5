"""Candidate selection by the PoG head (`candidates`, `select_at`): K candidates per layout in one batch, scored by
the adapter's perception head against the requested layout part-way, the best finished alone."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import LAYOUTS, NAMES, adapter_for, box_adapter, clean_estimate_at, error_line, pog_pipeline

from spatiallock.cli import main
from spatiallock.errors import SpatialLockError
from spatiallock.models.perception import DownBlockTap, rendered_features
from spatiallock.pipelines.diffusion import SpatialLockPipeline
from spatiallock.pipelines.extensions.perception import (
    CandidateSelection,
    candidate_features,
    down_features,
    perception_guidance,
    perception_targets,
    score_candidates,
)

STEPS, K = 4, 3


def poi_adapter(folder):
    """Grounding-Attention without a perception head (variant `poi`)."""
    return adapter_for(folder, "poi", "all", box_attention=True)


def run(pipe, layouts, seeds, **kwargs) -> torch.Tensor:
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    options = {"num_inference_steps": STEPS, "guidance_scale": 4.0, "output_type": "latent", **kwargs}
    return pipe(layouts=layouts, generator=generators, **options).images


def candidate_noise(pipe, seed: int, k: int) -> torch.Tensor:
    """The initial noise of candidate k of the image whose generator is seeded `seed`: its (k+1)-th draw."""
    generator = torch.Generator().manual_seed(seed)
    size = pipe.native_size // pipe.vae_scale_factor
    for _ in range(k + 1):
        noise = torch.randn((1, pipe.unet.config.in_channels, size, size), generator=generator)
    return noise


@pytest.mark.parametrize("scheduler", [None, "ddim"])
def test_selection_finishes_the_candidate_the_head_scores_best_as_if_it_ran_alone(
    tiny_small_base, scheduler, monkeypatch
):
    """With the scores set, the kept candidates are the lowest-scored, and each finishes exactly as that
    candidate sampled alone from its own noise (the multistep solver's history follows the kept rows)."""
    pipe = pog_pipeline(tiny_small_base)
    if scheduler:
        pipe = SpatialLockPipeline.from_pretrained(tiny_small_base, adapter=pipe.adapter, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
    designed = torch.tensor([[0.5, 0.9, 0.1], [0.7, 0.2, 0.8]])  # best: candidate 2 of layout 0, 1 of layout 1
    monkeypatch.setattr(CandidateSelection, "score", lambda self, pipe, features, layouts: designed.flatten())
    chosen = run(pipe, LAYOUTS, (10, 11), candidates=K, select_at=0.5)
    assert pipe.last_selection["kept"].tolist() == [2, 1]
    for b, (seed, k) in enumerate(((10, 2), (11, 1))):
        alone = run(pipe, [LAYOUTS[b]], (seed,), latents=candidate_noise(pipe, seed, k))
        torch.testing.assert_close(chosen[b : b + 1], alone, rtol=0, atol=2e-5)


def test_the_heads_scores_decide_and_candidate_0_is_the_image_without_selection(tiny_small_base):
    pipe = pog_pipeline(tiny_small_base)
    chosen = run(pipe, LAYOUTS, (3, 4), candidates=K, select_at=0.5)
    scores, kept = pipe.last_selection["scores"], pipe.last_selection["kept"]
    assert scores.shape == (2, K) and torch.isfinite(scores).all() and ((scores >= 0) & (scores <= 1)).all()
    assert kept.tolist() == scores.argmin(dim=1).tolist()
    # each image is scored against its own layout alone
    states, mask = pipe.encode_prompts([layout.caption for layout in LAYOUTS])
    with DownBlockTap(pipe.unet.down_blocks) as tap:
        pipe.unet(torch.randn(2, 4, 8, 8), 500, encoder_hidden_states=states, encoder_attention_mask=mask)
    features = tap.features
    both, one = (
        score_candidates(pipe, features, LAYOUTS),
        score_candidates(pipe, [f[1:] for f in features], LAYOUTS[1:]),
    )
    torch.testing.assert_close(both[1:], one)
    # candidate 0 of each layout is drawn first from its generator: what the same call without selection samples
    plain = run(pipe, LAYOUTS, (3, 4))
    for b in range(2):
        same = torch.allclose(chosen[b], plain[b], atol=2e-5)
        assert same == (kept[b].item() == 0)


def test_a_layouts_result_does_not_depend_on_the_rest_of_the_batch(tiny_small_base):
    pipe = pog_pipeline(tiny_small_base)
    together = run(pipe, LAYOUTS, (5, 6), candidates=2, select_at=0.5)
    kept_together = pipe.last_selection["kept"][1].item()
    alone = run(pipe, LAYOUTS[1:], (6,), candidates=2, select_at=0.5)
    assert pipe.last_selection["kept"][0].item() == kept_together
    torch.testing.assert_close(together[1:], alone, rtol=0, atol=2e-5)


def test_selection_composes_with_layout_guidance_and_either_unconditional_branch(tiny_small_base, monkeypatch):
    """With layout guidance, and with or without grounded unconditional rows, the kept candidates finish as they
    would without selection from their noise under the same guidance; the guidance did act on them."""
    pipe = pog_pipeline(tiny_small_base)
    designed = torch.tensor([[0.9, 0.1], [0.2, 0.8]])  # best: candidate 1 of layout 0, 0 of layout 1
    monkeypatch.setattr(CandidateSelection, "score", lambda self, pipe, features, layouts: designed.flatten())
    kept_noise = torch.cat([candidate_noise(pipe, 7, 1), candidate_noise(pipe, 8, 0)])
    guided = {"layout_guidance_steps": 2, "layout_guidance_scale": 50.0}
    chosen = {}
    for ground_unconditional in (True, False):
        options = {"ground_unconditional": ground_unconditional, **guided}
        chosen[ground_unconditional] = run(pipe, LAYOUTS, (7, 8), candidates=2, select_at=0.5, **options)
        assert pipe.last_selection["kept"].tolist() == [1, 0]
        without_selection = run(pipe, LAYOUTS, (7, 8), latents=kept_noise, **options)
        torch.testing.assert_close(chosen[ground_unconditional], without_selection, rtol=0, atol=2e-5)
    assert (chosen[True] - chosen[False]).abs().max() > 1e-2
    unguided = run(pipe, LAYOUTS, (7, 8), latents=kept_noise, ground_unconditional=False)
    assert (chosen[False] - unguided).abs().amax(dim=(1, 2, 3)).min() > 1e-3


def test_what_cannot_select_is_refused(tiny_small_base):
    poi = SpatialLockPipeline.from_pretrained(tiny_small_base, adapter=poi_adapter(tiny_small_base))
    with pytest.raises(SpatialLockError, match="PoG perception head"):
        run(poi, LAYOUTS, (0, 1), candidates=2)
    unnamed = SpatialLockPipeline.from_pretrained(tiny_small_base, adapter=box_adapter(tiny_small_base))
    with pytest.raises(SpatialLockError, match="class names"):
        run(unnamed, LAYOUTS, (0, 1), candidates=2)
    pipe = pog_pipeline(tiny_small_base)
    for bad, match in (({"candidates": 0}, "candidates"), ({"candidates": 2, "select_at": 1.0}, "select_at")):
        with pytest.raises(SpatialLockError, match=match):
            run(pipe, LAYOUTS, (0, 1), **bad)
    with pytest.raises(SpatialLockError, match="init"):
        run(pipe, LAYOUTS, (0, 1), candidates=2, init_from_layout=True)
    with pytest.raises(SpatialLockError, match="no label"):
        run(pipe, [LAYOUTS[0].__class__("a cat", ("cat",), ((0.1, 0.1, 0.5, 0.5),))], (0,), candidates=2)


def test_the_command_line_refuses_an_adapter_without_a_pog_head_in_one_line(tiny_small_base, tmp_path, capsys):
    poi_adapter(tiny_small_base).save_pretrained(tmp_path / "poi")
    layout = tmp_path / "layout.json"
    layout.write_text(
        json.dumps({"caption": "a red circle", "objects": [{"label": "red circle", "box": [0, 0, 1, 1]}]})
    )
    args = ["generate", "--model", str(tiny_small_base), "--adapter", str(tmp_path / "poi"), "--layout", str(layout)]
    assert main([*args, "--out", str(tmp_path / "out"), "--candidates", "2", "--steps", "2"]) == 2
    line = error_line(capsys.readouterr().err)
    assert "--candidates" in line and "PoG" in line and not (tmp_path / "out").exists()


def pog_loss(pipe, latents, t, layouts) -> torch.Tensor:
    """Per image, the PoG head's detection loss against its layout at `latents` (the conditional rows alone)."""
    states, mask = pipe.encode_prompts([layout.caption for layout in layouts])
    grounding = pipe.adapter.encode_grounding(*pipe.encode_layouts(layouts), tuple(latents.shape[-2:]))
    features = down_features(pipe, pipe.scheduler.scale_model_input(latents, t), t, states, mask, grounding)
    boxes, labels, masks = perception_targets(pipe, layouts)
    head, losses = pipe.adapter.perception, []
    for b in range(len(layouts)):
        parts = head.loss([f[b : b + 1] for f in features], boxes[b : b + 1], labels[b : b + 1], masks[b : b + 1])
        losses.append(sum(parts.values()))
    return torch.stack(losses)


def test_perception_guidance_lowers_the_pog_loss_against_the_requested_layout(tiny_small_base):
    pipe = pog_pipeline(tiny_small_base)
    pipe.scheduler.set_timesteps(STEPS)
    t = pipe.scheduler.timesteps[0]
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    states, mask = pipe.encode_prompts([layout.caption for layout in LAYOUTS])
    grounding = pipe.adapter.encode_grounding(*pipe.encode_layouts(LAYOUTS), (8, 8))
    before = pog_loss(pipe, latents, t, LAYOUTS)
    moved = perception_guidance(pipe, latents, t, states, mask, grounding, LAYOUTS, 0.05)
    after = pog_loss(pipe, moved, t, LAYOUTS)
    assert (after < before).all(), (before, after)
    rms = (moved - latents).pow(2).mean(dim=(1, 2, 3)).sqrt()
    torch.testing.assert_close(rms, torch.full((2,), 0.05), rtol=1e-3, atol=0)
    # one image's move does not depend on the rest of the batch
    grounding_1 = pipe.adapter.encode_grounding(*pipe.encode_layouts(LAYOUTS[1:]), (8, 8))
    alone = perception_guidance(pipe, latents[1:], t, states[1:], mask[1:], grounding_1, LAYOUTS[1:], 0.05)
    torch.testing.assert_close(moved[1:], alone, rtol=0, atol=1e-5)


def test_the_down_path_alone_gives_the_features_of_the_whole_call(tiny_small_base):
    pipe = pog_pipeline(tiny_small_base)
    states, mask = pipe.encode_prompts([layout.caption for layout in LAYOUTS])
    grounding = pipe.adapter.encode_grounding(*pipe.encode_layouts(LAYOUTS), (8, 8))
    sample, t = torch.randn(2, 4, 8, 8), torch.tensor(400)
    with DownBlockTap(pipe.unet.down_blocks) as tap:
        pipe.predict(sample, t, states, mask, grounding)
    early = down_features(pipe, sample, t, states, mask, grounding)
    assert len(early) == len(tap.features) == len(pipe.unet.down_blocks)
    for a, b in zip(early, tap.features):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_perception_guidance_in_a_sampling_call_and_what_is_refused(tiny_small_base, tmp_path, capsys):
    pipe = pog_pipeline(tiny_small_base)
    guided = run(pipe, LAYOUTS, (1, 2), perception_guidance_steps=2, perception_guidance_scale=0.2)
    assert torch.isfinite(guided).all() and (guided - run(pipe, LAYOUTS, (1, 2))).abs().max() > 1e-4
    both = run(pipe, LAYOUTS, (1, 2), perception_guidance_steps=2, candidates=2, select_at=0.5, output_type="np")
    assert np.isfinite(both).all()
    poi = SpatialLockPipeline.from_pretrained(tiny_small_base, adapter=poi_adapter(tiny_small_base))
    with pytest.raises(SpatialLockError, match="perception_guidance_steps: needs an adapter with a PoG"):
        run(poi, LAYOUTS, (0, 1), perception_guidance_steps=1)
    poi_adapter(tiny_small_base).save_pretrained(tmp_path / "poi")
    layout = tmp_path / "layout.json"
    layout.write_text(
        json.dumps({"caption": "a red circle", "objects": [{"label": "red circle", "box": [0, 0, 1, 1]}]})
    )
    args = ["evaluate", "--model", str(tiny_small_base), "--adapter", str(tmp_path / "poi"), "--layouts", str(layout)]
    args += ["--detector", "default", "--out", str(tmp_path / "r.json"), "--perception-guidance-steps", "2"]
    assert main(args) == 2
    line = error_line(capsys.readouterr().err)
    assert line.startswith("spatiallock: error: --perception-guidance-steps: needs an adapter with a PoG")
    assert not (tmp_path / "r.json").exists()


def test_a_candidate_whose_objects_the_head_finds_in_their_boxes_scores_better(tiny_small_base):
    pipe = pog_pipeline(tiny_small_base)
    layout = LAYOUTS[1]  # one green triangle at (0.2, 0.1, 0.8, 0.6)
    triangle = NAMES.index("green triangle")
    found = [
        {
            "boxes": torch.tensor([[0.2, 0.1, 0.8, 0.6]]),
            "scores": torch.tensor([0.9]),
            "labels": torch.tensor([triangle]),
        },
        {"boxes": torch.tensor([[0.2, 0.1, 0.8, 0.6]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([0])},
        {
            "boxes": torch.tensor([[0.0, 0.7, 0.3, 1.0]]),
            "scores": torch.tensor([0.9]),
            "labels": torch.tensor([triangle]),
        },
        {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)},
    ]
    pipe.adapter.perception.detect = lambda features, score_threshold: found
    scores = score_candidates(pipe, [torch.zeros(4, 1, 1, 1)], [layout] * 4)
    torch.testing.assert_close(scores, torch.tensor([0.1, 1.0, 1.0, 1.0]))  # right class, right box: 1 - 0.9


def test_a_rendered_head_guides_and_selects_by_the_clean_latents_the_prediction_implies(tiny_small_base):
    """`perception_input="rendered"`: guidance moves the latents by the normalised gradient of the head's loss
    at the predicted clean latents seen without the layout, and selection scores those same features."""
    pipe = pog_pipeline(tiny_small_base, perception_input="rendered")
    t, latents, states, mask, grounding, clean = clean_estimate_at(pipe, STEPS, 1)
    model_input = pipe.scheduler.scale_model_input(latents, t)
    x = clean.clone().requires_grad_(True)
    boxes, labels, masks = perception_targets(pipe, LAYOUTS)
    loss = sum(
        pipe.adapter.perception.loss(rendered_features(pipe.unet, x, states, mask), boxes, labels, masks).values()
    )
    (grad,) = torch.autograd.grad(loss * len(LAYOUTS), x)
    expected = latents - 0.05 * grad / grad.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt()
    moved = perception_guidance(pipe, latents, t, states, mask, grounding, LAYOUTS, 0.05)
    torch.testing.assert_close(moved, expected, rtol=1e-4, atol=1e-5)

    features = candidate_features(pipe, [], model_input, t, pipe.predict(model_input, t, states, mask, grounding),
                                       states, mask)  # fmt: skip
    for a, b in zip(features, rendered_features(pipe.unet, clean, states, mask)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    chosen = run(pipe, LAYOUTS, (10, 11), candidates=K, select_at=0.5, perception_guidance_steps=1)
    assert torch.isfinite(chosen).all() and pipe.last_selection["kept"].shape == (2,)
