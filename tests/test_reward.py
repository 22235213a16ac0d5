"""The image-only detection reward (`evaluation.reward`, `train adapter --reward-detector`): where it acts, where its
gradient goes, what it cannot see and what it leaves alone."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import adapter_for, clean_estimate_at, error_line, run_train_adapter
from safetensors.torch import load_file

from spatiallock.base.folders import load_base
from spatiallock.base.text import PhraseCache, encode_captions
from spatiallock.evaluation.detector import Detector, DetectorConfig
from spatiallock.evaluation.reward import DetectionReward, ImageJudge

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def categories(tiny_shapes):
    return json.loads((tiny_shapes / "instances_train.json").read_text())["categories"]


@pytest.fixture(scope="module")
def detector_folder(tmp_path_factory, categories):
    """An untrained tiny FCOS for the synthetic classes at 32 px: its loss is large, its gradient is not zero."""
    folder = tmp_path_factory.mktemp("reward-detector")
    torch.manual_seed(0)
    Detector(DetectorConfig(categories=categories, image_size=32)).save_pretrained(folder)
    return folder


def grounded_step(base, adapter, categories, timesteps):
    """One batch of two through the tiny base with `adapter` attached: what the reward is computed from."""
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    noise = torch.randn(latents.shape, generator=g)
    steps = torch.tensor(timesteps)
    noisy = base.scheduler.add_noise(latents, noise, steps)
    states, mask = encode_captions(base.text_encoder, base.tokenizer, ["a red circle", "two shapes"], 8)
    phrases, _ = PhraseCache(base.text_encoder, base.tokenizer)([["red circle"], ["blue square", "red circle"]], 2)
    boxes = torch.tensor([[[0.1, 0.1, 0.6, 0.6], [0, 0, 0, 0]], [[0.5, 0.2, 0.9, 0.7], [0.0, 0.3, 0.4, 0.9]]])
    masks = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    names = [c["name"] for c in categories]
    labels = torch.tensor([[names.index("red circle"), -1], [names.index("blue square"), names.index("red circle")]])
    prediction = adapter(base.unet, noisy, steps, states, phrases, boxes, masks, encoder_attention_mask=mask).sample
    return noisy, steps, prediction, boxes, labels, masks


@pytest.fixture
def setup(tiny_small_base, detector_folder, categories):
    base = load_base(tiny_small_base)
    adapter = adapter_for(tiny_small_base, "spatiallock", "all", gates=0.5)
    adapter.attach(base.unet)
    judge = ImageJudge.from_pretrained(detector_folder)
    reward = DetectionReward(judge, judge.class_map([c["name"] for c in categories], "--reward-detector"), 200)
    return base, adapter, reward


def adapter_grads(adapter) -> float:
    return sum(float(p.grad.abs().sum()) for p in adapter.parameters() if p.grad is not None)


def test_the_reward_is_zero_above_the_cut_and_reaches_the_adapter_below_it(setup, categories):
    base, adapter, reward = setup
    above = grounded_step(base, adapter, categories, [201, 900])
    loss = reward(base.vae, base.scheduler, *above)
    assert float(loss) == 0.0 and not loss.requires_grad  # no image at or below t = 200: nothing to backpropagate

    below = grounded_step(base, adapter, categories, [200, 900])  # one image at the cut, one far above
    loss = reward(base.vae, base.scheduler, *below)
    assert float(loss.detach()) > 0 and loss.requires_grad
    loss.backward()
    assert adapter_grads(adapter) > 0  # through the decoder and the U-Net's prediction into the adapter


def test_only_the_images_below_the_cut_are_scored(setup, categories):
    base, adapter, reward = setup
    noisy, steps, prediction, boxes, labels, masks = grounded_step(base, adapter, categories, [100, 900])
    both = reward(base.vae, base.scheduler, noisy, steps, prediction, boxes, labels, masks)
    first = reward(base.vae, base.scheduler, noisy[:1], steps[:1], prediction[:1], boxes[:1], labels[:1], masks[:1])
    assert torch.allclose(both, first)  # the image at t = 900 adds nothing
    other = prediction.clone()
    other[1] += 5.0  # whatever the U-Net predicts above the cut
    assert torch.equal(reward(base.vae, base.scheduler, noisy, steps, other, boxes, labels, masks), both)


def test_the_detector_cannot_see_the_layout_tokens(setup, categories):
    """The reward is a function of the decoded image and the boxes it is scored against only: the order of the
    layout's slots (and so of its tokens) changes nothing. (The judge has no input for a layout token at all.)"""
    base, adapter, reward = setup
    with torch.no_grad():
        noisy, steps, prediction, boxes, labels, masks = grounded_step(base, adapter, categories, [50, 150])
        loss = reward(base.vae, base.scheduler, noisy, steps, prediction, boxes, labels, masks)
        order = torch.tensor([1, 0])
        permuted = reward(
            base.vae, base.scheduler, noisy, steps, prediction, boxes[:, order], labels[:, order], masks[:, order]
        )
        assert torch.allclose(loss, permuted, atol=1e-6)


def test_the_detector_and_the_base_get_no_gradient(setup, categories):
    base, adapter, reward = setup
    before = {k: v.clone() for k, v in reward.judge.detector.state_dict().items()}
    loss = reward(base.vae, base.scheduler, *grounded_step(base, adapter, categories, [10, 20]))
    loss.backward()
    for module in (reward.judge.detector, base.vae, base.unet, base.text_encoder):
        assert all(p.grad is None and not p.requires_grad for p in module.parameters())
    assert all(torch.equal(before[k], v) for k, v in reward.judge.detector.state_dict().items())


def test_train_adapter_with_the_reward(tiny_small_base, tiny_shapes, detector_folder, tmp_path):
    """From the same start and seed, the reward changes what is learned (and is logged), while the base's and the
    detector's files are left as they were; the detector folder is recorded in the run's config."""
    common = ("--max-steps", "2", "--lr", "1e-2", "--variant", "spatiallock", "--positions", "all")
    detector_weights = load_file(detector_folder / "model.safetensors")
    assert run_train_adapter(tiny_small_base, tiny_shapes, tmp_path / "plain", *common) == 0
    assert run_train_adapter(
        tiny_small_base, tiny_shapes, tmp_path / "reward", *common, "--reward-detector", str(detector_folder),
        "--reward-timesteps", "999", "--reward-weight", "1",
    ) == 0  # fmt: skip
    log = [json.loads(line) for line in (tmp_path / "reward" / "train" / "log.jsonl").read_text().splitlines()]
    assert all(entry["reward"] > 0 for entry in log)
    config = json.loads((tmp_path / "reward" / "train" / "config.json").read_text())
    assert config["reward_detector"] == str(detector_folder) and config["reward_timesteps"] == 999
    plain = load_file(tmp_path / "plain" / "diffusion_pytorch_model.safetensors")
    rewarded = load_file(tmp_path / "reward" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(plain[k], rewarded[k]) for k in plain)
    after = load_file(detector_folder / "model.safetensors")
    assert all(torch.equal(detector_weights[k], after[k]) for k in after)


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda tmp, cats: tmp / "missing", "--reward-detector: not found:"),
        (
            lambda tmp, cats: (
                Detector(DetectorConfig(categories=[{"id": 1, "name": "zebra"}], image_size=32)).save_pretrained(
                    tmp / "zebra"
                )
                or tmp / "zebra"
            ),
            "--reward-detector: the detector knows none of the classes",
        ),
    ],
)
def test_a_reward_detector_that_cannot_serve_is_refused_in_one_line(
    tiny_small_base, tiny_shapes, categories, tmp_path, capsys, make, expected
):
    folder = make(tmp_path, categories)
    code = run_train_adapter(tiny_small_base, tiny_shapes, tmp_path / "out", "--reward-detector", str(folder))
    assert code != 0
    assert error_line(capsys.readouterr().err, alone=True).startswith(f"spatiallock: error: {expected}")
    assert not (tmp_path / "out").exists()


# ---- the same detector at sampling time: candidate selection and perception guidance --------------------------------


def judge_for(names) -> ImageJudge:
    torch.manual_seed(1)
    categories = [{"id": k + 1, "name": name} for k, name in enumerate(names)]
    return ImageJudge(Detector(DetectorConfig(categories=categories, image_size=32)))


def judged_pipeline(folder):
    """A pipeline whose adapter has no PoG head at all (variant poi): only the judge can score."""
    from helpers import NAMES

    from spatiallock.pipelines.diffusion import SpatialLockPipeline

    pipe = SpatialLockPipeline.from_pretrained(folder, adapter=adapter_for(folder, "poi", "all", gates=0.5))
    pipe.set_progress_bar_config(disable=True)
    pipe.set_judge(judge_for(NAMES))
    return pipe


def sample_latents(pipe, seeds, **kwargs):
    from helpers import LAYOUTS

    generators = [torch.Generator().manual_seed(s) for s in seeds]
    options = {"num_inference_steps": 4, "guidance_scale": 4.0, "output_type": "latent", **kwargs}
    return pipe(layouts=LAYOUTS, generator=generators, **options).images


def test_the_judge_picks_candidates_by_the_image_their_clean_estimate_decodes_to(tiny_small_base, monkeypatch):
    from helpers import LAYOUTS

    from spatiallock.pipelines.extensions import perception

    pipe = judged_pipeline(tiny_small_base)
    sample_latents(pipe, (3, 4), candidates=3, select_at=0.5)
    scores, kept = pipe.last_selection["scores"], pipe.last_selection["kept"]
    assert scores.shape == (2, 3) and ((scores >= 0) & (scores <= 1)).all()
    assert kept.tolist() == scores.argmin(dim=1).tolist()
    seen = []

    def designed(images, boxes, labels, masks):
        seen.append(images)
        return torch.tensor([0.5, 0.9, 0.1, 0.7, 0.2, 0.8])

    monkeypatch.setattr(pipe.judge, "score", designed)
    sample_latents(pipe, (3, 4), candidates=3, select_at=0.5)
    assert pipe.last_selection["kept"].tolist() == [2, 1]
    (images,) = seen  # images in [0, 1] at the pipeline's size: decoded, not features
    assert images.shape == (6, 3, 32, 32) and 0 <= images.min() and images.max() <= 1
    assert perception.check_perception(pipe, LAYOUTS, "candidates") is None


def test_judge_guidance_moves_each_image_down_the_judges_loss_at_its_clean_estimate(tiny_small_base):
    from helpers import LAYOUTS

    from spatiallock.pipelines.extensions.perception import decoded_clean, judge_guidance

    pipe = judged_pipeline(tiny_small_base)
    t, latents, states, mask, grounding, clean = clean_estimate_at(pipe, 4, 2)
    x = clean.clone().requires_grad_(True)
    loss = pipe.judge.loss(decoded_clean(pipe, x), *pipe.judge.targets(LAYOUTS), per_image=True)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    expected = latents - 0.05 * grad / grad.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt()
    moved = judge_guidance(pipe, latents, t, states, mask, grounding, LAYOUTS, 0.05)
    torch.testing.assert_close(moved, expected, rtol=1e-4, atol=1e-5)
    # one image's move is its own: the second image's gradient and move stay the same when the first image is
    # another one in a batch of the same size (compared at the same batch size: a convolution's result may differ
    # by 1e-7 between a batch of one and of two, which moves this non-smooth gradient by far more)
    swapped = torch.cat([torch.randn(latents[:1].shape, generator=torch.Generator().manual_seed(9)), latents[1:]])
    *_, clean_swapped = clean_estimate_at(pipe, 4, 2, latents=swapped)
    assert not torch.equal(clean_swapped[0], clean[0]) and torch.equal(clean_swapped[1:], clean[1:])
    y = clean_swapped.clone().requires_grad_(True)
    (own,) = torch.autograd.grad(
        pipe.judge.loss(decoded_clean(pipe, y), *pipe.judge.targets(LAYOUTS), per_image=True).sum(), y
    )
    torch.testing.assert_close(own[1:], grad[1:], rtol=0, atol=1e-6)
    assert (own[0] - grad[0]).abs().max() > 1e-4
    moved_swapped = judge_guidance(pipe, swapped, t, states, mask, grounding, LAYOUTS, 0.05)
    torch.testing.assert_close(moved_swapped[1:], moved[1:], rtol=0, atol=1e-6)
    # in a sampling call it changes the images; the judge's weights do not change
    before = {k: v.clone() for k, v in pipe.judge.state_dict().items()}
    guided = sample_latents(pipe, (1, 2), perception_guidance_steps=2, perception_guidance_scale=0.2)
    assert (guided - sample_latents(pipe, (1, 2))).abs().max() > 1e-4
    assert all(torch.equal(before[k], v) for k, v in pipe.judge.state_dict().items())


def test_judge_on_the_command_line(tiny_small_base, tmp_path, capsys):
    from helpers import NAMES

    from spatiallock.cli import main

    adapter_for(tiny_small_base, "poi", "all", gates=0.5, class_names=NAMES).save_pretrained(tmp_path / "poi")
    judge_for(NAMES).detector.save_pretrained(tmp_path / "judge")
    layout = tmp_path / "layout.json"
    layout.write_text(
        json.dumps({"caption": "a red circle", "objects": [{"label": "red circle", "box": [0, 0, 0.5, 0.5]}]})
    )
    common = ["generate", "--model", str(tiny_small_base), "--adapter", str(tmp_path / "poi"), "--layout", str(layout)]
    common += ["--steps", "2", "--candidates", "2", "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "a"), "--judge", str(tmp_path / "missing")]) == 2
    assert error_line(capsys.readouterr().err).startswith("spatiallock: error: --judge: not found:")
    assert not (tmp_path / "a").exists()
    assert main([*common, "--out", str(tmp_path / "b"), "--judge", str(tmp_path / "judge")]) == 0
    assert list((tmp_path / "b").glob("*.png"))


def test_the_judges_score_is_one_minus_iou_times_score_of_the_right_class(monkeypatch):
    from helpers import NAMES

    from spatiallock.layout import Layout

    judge = judge_for(NAMES)
    triangle = NAMES.index("green triangle") + 1  # the category id of the judge's class
    box = [[0.2, 0.1, 0.8, 0.6]]

    def found(boxes, label):
        n = len(boxes)
        return {"boxes": torch.tensor(boxes).reshape(n, 4), "scores": torch.full((n,), 0.9),
                "labels": torch.full((n,), label, dtype=torch.long)}  # fmt: skip

    detections = [found(box, triangle), found(box, 1), found([[0.0, 0.7, 0.3, 1.0]], triangle), found([], triangle)]
    monkeypatch.setattr(judge.detector, "detect", lambda images, score_threshold: detections)
    layouts = [Layout("a green triangle", ("green triangle",), ((0.2, 0.1, 0.8, 0.6),))] * 4
    scores = judge.score(torch.zeros(4, 3, 32, 32), *judge.targets(layouts))
    torch.testing.assert_close(scores, torch.tensor([0.1, 1.0, 1.0, 1.0]))  # right class, right box: 1 - 0.9
