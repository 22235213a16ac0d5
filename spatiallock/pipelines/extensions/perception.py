"""Perception at sampling time: the adapter's PoG head (seed 000's detector on the U-Net's features), or an
image-only judge, used to guide the latents (`PerceptionGuidance`) or to pick the best of several candidates
(`CandidateSelection`).

Both score the requested layout against what is found. With the PoG head: in the features of the step's U-Net
call (`perception_input` "grounded"), or in those of the clean latents the step's prediction implies, seen without
the layout ("rendered": one down pass more). With a judge (`SpatialLockPipeline.set_judge`: a frozen detector
that sees pixels only, `evaluation.reward.ImageJudge`): in the image the step's clean estimate decodes to, so that
the score says what was drawn, never what was asked (the PoG head on grounded features leaks the layout: see
`evaluation.leak`). The functions here take the pipeline as their first argument.

A judge is any module with `targets(layouts) -> (boxes, labels, masks)`, `score(images, boxes, labels, masks)
-> (B,)` (lower is better) and `loss(images, boxes, labels, masks, per_image=True) -> (B,)` differentiable in the
images, (B, 3, H, W) in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from spatiallock.errors import SpatialLockError
from spatiallock.layout import Layout
from spatiallock.models.perception import DownBlocksDone, DownBlockTap, down_path_only, rendered_features
from spatiallock.models.perception import predicted_clean as clean_from_prediction
from spatiallock.pipelines.extensions.base import Extension, SamplingCall


def layout_targets(layouts: Sequence[Layout], classes: dict[str, int]) -> tuple[torch.Tensor, ...]:
    """Layouts as detection targets: boxes (B, N, 4) normalised xyxy, class indices (B, N) by `classes` (label ->
    index) and masks (B, N) of the objects whose label is one of `classes` (the others are not scored)."""
    slots = max(1, max((len(layout) for layout in layouts), default=1))
    boxes = torch.zeros(len(layouts), slots, 4)
    labels = torch.zeros(len(layouts), slots, dtype=torch.long)
    masks = torch.zeros(len(layouts), slots)
    for b, layout in enumerate(layouts):
        for n, (label, box) in enumerate(zip(layout.labels, layout.boxes)):
            if label in classes:
                boxes[b, n], labels[b, n], masks[b, n] = torch.tensor(box), classes[label], 1.0
    return boxes, labels, masks


def perception_targets(pipe, layouts: Sequence[Layout]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The requested layouts as the PoG head's targets (`layout_targets` by the head's class names)."""
    return layout_targets(layouts, {name: k for k, name in enumerate(pipe.adapter.config.class_names)})


def placement_scores(detections: Sequence[dict], boxes, classes, keep) -> torch.Tensor:
    """(B,) lower is better: per image, 1 - the mean over its requested objects (`keep` (B, N) bool) of the best
    IoU x score of a detection of their class (`classes` (B, N), in the label space of the detections' "labels");
    1 for an image with no requested object or no detection."""
    from torchvision.ops import box_iou

    scores = []
    for b, found in enumerate(detections):
        chosen = keep[b].cpu()
        asked, wanted = boxes[b].cpu().float()[chosen], classes[b].cpu()[chosen]
        if not len(asked) or not len(found["boxes"]):
            scores.append(1.0)
            continue
        quality = box_iou(asked, found["boxes"].cpu().float()) * found["scores"].cpu().float()[None]
        quality = quality * (wanted[:, None] == found["labels"].cpu()[None])
        scores.append(1.0 - quality.max(dim=1).values.mean().item())
    return torch.tensor(scores)


@torch.no_grad()
def score_candidates(pipe, features: list[torch.Tensor], layouts: Sequence[Layout]) -> torch.Tensor:
    """Per image, how badly the PoG head finds its requested objects, from the U-Net's down-block `features` of
    those images (`placement_scores` of the head's detections). Lower is better."""
    boxes, labels, masks = perception_targets(pipe, layouts)
    head = pipe.adapter.perception
    detections = head.detect([f.to(next(head.parameters()).dtype) for f in features], score_threshold=0.05)
    return placement_scores(detections, boxes, labels, masks > 0.5)


def predicted_clean(pipe, model_input: torch.Tensor, t, prediction: torch.Tensor) -> torch.Tensor:
    """The clean latents a U-Net `prediction` at timestep `t` implies for a (scaled) `model_input`."""
    steps = torch.full((len(model_input),), int(t), dtype=torch.long, device=model_input.device)
    alphas = pipe.scheduler.alphas_cumprod
    return clean_from_prediction(alphas, model_input, steps, prediction, pipe.scheduler.config.prediction_type)


def normalised_step(grad: torch.Tensor, scale: float) -> torch.Tensor:
    """`scale` times `grad` normalised per image to a root mean square of 1 (float)."""
    rms = grad.float().pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt().clamp(min=1e-12)
    return scale * grad.float() / rms


def decoded_clean(pipe, clean: torch.Tensor) -> torch.Tensor:
    """Clean latents decoded to images (B, 3, H, W) in [0, 1], float: what a judge sees. Differentiable."""
    pixels = pipe.decode_latents(clean.to(pipe.vae.dtype))
    return ((pixels.float() + 1) / 2).clamp(0, 1)


@torch.no_grad()
def judge_candidates(pipe, model_input, t, noise, layouts: Sequence[Layout]) -> torch.Tensor:
    """Each row's score by the pipeline's judge (lower is better) on the image its step's prediction implies."""
    images = decoded_clean(pipe, predicted_clean(pipe, model_input, t, noise))
    return pipe.judge.score(images, *pipe.judge.targets(layouts))


def judge_guidance(pipe, latents, t, states, caption_mask, grounding, layouts, scale: float, added=None):
    """`latents` moved by `scale` (root mean square per image) down the gradient of the judge's detection loss on
    the image their clean estimate decodes to, the U-Net's prediction held fixed (x_t moves with x0 by a positive
    factor); each image's move depends on that image alone."""
    model_input = pipe.scheduler.scale_model_input(latents, t)
    with torch.no_grad():
        prediction = pipe.predict(model_input, t, states, caption_mask, grounding, added)
        clean = predicted_clean(pipe, model_input, t, prediction)
    targets = [x.to(latents.device) for x in pipe.judge.targets(layouts)]
    with torch.enable_grad():
        x = clean.detach().requires_grad_(True)
        loss = pipe.judge.loss(decoded_clean(pipe, x), *targets, per_image=True).sum()
        (grad,) = torch.autograd.grad(loss, x)
    return (latents - normalised_step(grad, scale).to(latents.dtype)).detach()


def candidate_features(pipe, tapped, model_input, t, noise, states, caption_mask, added=None) -> list[torch.Tensor]:
    """What the PoG head scores candidates from: the features tapped from this step's call (`grounded`), or the
    features of the clean latents the step's guided prediction implies, seen without the layout (`rendered`)."""
    if pipe.adapter.config.perception_input != "rendered":
        return tapped
    with torch.no_grad():
        clean = predicted_clean(pipe, model_input, t, noise)
        return rendered_features(pipe.unet, clean, states, caption_mask, added)


def down_features(pipe, sample, t, states, caption_mask, grounding, added=None) -> list[torch.Tensor]:
    """The U-Net's down-block features (what the PoG head reads) for a scaled model input, the up path never run:
    the call stops after the last down block."""
    with DownBlockTap(pipe.unet.down_blocks) as tap, down_path_only(pipe.unet.down_blocks):
        try:
            pipe.predict(sample, t, states, caption_mask, grounding, added)
        except DownBlocksDone:
            pass
    return tap.features


def perception_guidance(pipe, latents, t, states, caption_mask, grounding, layouts, scale: float, added=None):
    """`latents` moved by `scale` (root mean square per image) down the gradient of the PoG head's detection loss
    against `layouts`; each image's move depends on that image alone."""
    boxes, labels, masks = (x.to(latents.device) for x in perception_targets(pipe, layouts))
    original = latents
    rendered = pipe.adapter.config.perception_input == "rendered"
    if rendered:  # the gradient at the clean latents the prediction implies, the prediction held fixed
        model_input = pipe.scheduler.scale_model_input(latents, t)
        with torch.no_grad():
            prediction = pipe.predict(model_input, t, states, caption_mask, grounding, added)
        latents = predicted_clean(pipe, model_input, t, prediction)
    with torch.enable_grad():
        x = latents.detach().requires_grad_(True)
        if rendered:
            features = rendered_features(pipe.unet, x, states, caption_mask, added)
        else:
            model_input = pipe.scheduler.scale_model_input(x, t)
            features = down_features(pipe, model_input, t, states, caption_mask, grounding, added)
        head = pipe.adapter.perception
        features = [f.to(next(head.parameters()).dtype) for f in features]
        # the head's loss is a mean over the batch's images: times their number, each image's own term
        loss = sum(head.loss(features, boxes, labels, masks).values()) * len(layouts)
        (grad,) = torch.autograd.grad(loss, x)
    step = normalised_step(grad, scale).to(x.dtype)
    # rendered: x_t moves with x0 by a positive factor (the prediction held fixed), and the step is normalised
    return (original - step if rendered else x - step).detach()


def check_perception(pipe, layouts: Sequence[Layout], option: str) -> None:
    """Refuse, in one line naming `option`, perception this pipeline cannot do for these layouts."""
    if getattr(pipe, "judge", None) is not None:
        known = pipe.judge.names
        if not any(label in known for layout in layouts for label in layout.labels):
            raise SpatialLockError(
                f"{option}: no label of the layouts is one of the judge's classes ({', '.join(list(known)[:8])}, "
                "...): nothing to score them by"
            )
        return
    if pipe.adapter is None or pipe.adapter.perception is None:
        raise SpatialLockError(
            f"{option}: needs an adapter with a PoG perception head (variant spatiallock or poi-pog)"
        )
    if not pipe.adapter.config.class_names:
        raise SpatialLockError(
            f"{option}: the adapter does not record its perception head's class names (class_names in its "
            "config); retrain it, or add them in the order of its training data's categories"
        )
    known = set(pipe.adapter.config.class_names)
    if not any(label in known for layout in layouts for label in layout.labels):
        raise SpatialLockError(
            f"{option}: no label of the layouts is one of the perception head's classes "
            f"({', '.join(pipe.adapter.config.class_names[:8])}, ...): nothing to score them by"
        )


def as_option_error(check, *args) -> None:
    """Run a check of the pipeline's arguments and word its refusal with the command line's option name."""
    try:
        check(*args)
    except SpatialLockError as err:
        option, _, rest = str(err).partition(":")
        raise SpatialLockError(f"--{option.replace('_', '-')}:{rest}") from None


def select_scheduler_rows(scheduler, keep: torch.Tensor, rows: int) -> None:
    """Keep the rows `keep` of every per-image tensor a scheduler carries from one step to the next (the previous
    model outputs of a multistep solver, a last sample): those of the shape of a batch of `rows` latents. The
    schedule itself (timesteps, sigmas: one dimension) is the same for every image and stays."""

    def pick(value):
        if torch.is_tensor(value) and value.ndim >= 2 and value.shape[0] == rows:
            return value[keep]
        return value

    for name, value in list(vars(scheduler).items()):
        if isinstance(value, list | tuple) and any(torch.is_tensor(v) for v in value):
            setattr(scheduler, name, type(value)(pick(v) for v in value))
        elif torch.is_tensor(value):
            setattr(scheduler, name, pick(value))


class PerceptionGuidance(Extension):
    """For the first `perception_guidance_steps` steps, move the latents down the gradient of the PoG head's
    detection loss against the requested layout (`perception_guidance`) before the U-Net call; the head reads the
    down blocks only, so the backward pass stops there. With the pipeline's judge set, the judge's detection loss
    on the decoded clean estimate instead (`judge_guidance`: the backward pass through the decoder only).
    `perception_guidance_scale`: the size of each move in latent units (the gradient normalised per image to a
    root mean square of 1)."""

    arguments = {"perception_guidance_steps": 0, "perception_guidance_scale": 0.1}

    def __init__(self, steps: int, scale: float):
        self.steps, self.scale = steps, scale

    @staticmethod
    def check(pipe, steps, scale, layouts) -> None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise SpatialLockError(f"perception_guidance_steps: a whole number, 0 or more, got {steps!r}")
        if not (math.isfinite(scale) and scale >= 0):
            raise SpatialLockError(f"perception_guidance_scale: a step size, 0 or more, got {scale!r}")
        if steps:
            check_perception(pipe, layouts, "perception_guidance_steps")

    @classmethod
    def from_call(cls, pipe, values, layouts):
        steps, scale = values["perception_guidance_steps"], values["perception_guidance_scale"]
        cls.check(pipe, steps, scale, layouts)
        return cls(steps, scale) if steps else None

    @classmethod
    def check_options(cls, pipe, options, layouts) -> None:
        as_option_error(cls.check, pipe, options.perception_guidance_steps, options.perception_guidance_scale, layouts)

    def before_step(self, pipe, call: SamplingCall, i: int, t) -> None:
        if i < self.steps:
            c = call.conditioning
            grounding = call.grounding_at(i)
            guide = perception_guidance if getattr(pipe, "judge", None) is None else judge_guidance
            call.latents = guide(
                pipe, call.latents, t, c.cond_states, c.cond_mask, grounding, call.rows, self.scale, c.cond_added
            )


class CandidateSelection(Extension):
    """Sample `candidates` candidates per image in one batch (each image's generator draws its candidates' noise
    one after another, so candidate 0 is the image without selection), score each with the adapter's PoG head
    against the requested layout after `select_at` of the steps (`score_candidates`, from that step's U-Net call,
    no extra call), or with the pipeline's judge on the image each candidate's clean estimate decodes to
    (`judge_candidates`: one decoder call), and finish only the best; the rest of the steps cost what one image
    costs. The pipeline's `last_selection` keeps the scores and the choice."""

    arguments = {"candidates": 1, "select_at": 0.3}

    def __init__(self, candidates: int, select_at: float):
        self.candidates, self.select_at = candidates, select_at
        self.final = None
        self.select = None

    @staticmethod
    def check(pipe, candidates, select_at, layouts, init: bool) -> None:
        if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1:
            raise SpatialLockError(f"candidates: a whole number, 1 or more, got {candidates!r}")
        if not 0.0 < select_at < 1.0:  # nan fails too
            raise SpatialLockError(f"select_at: a share of the steps in (0, 1), got {select_at}")
        if candidates == 1:
            return
        if init:
            raise SpatialLockError(
                "candidates: not with init_image or init_from_layout (every candidate would start from the same "
                "latents)"
            )
        check_perception(pipe, layouts, "candidates")

    @classmethod
    def from_call(cls, pipe, values, layouts):
        init = values["init_image"] is not None or values["init_from_layout"]
        cls.check(pipe, values["candidates"], values["select_at"], layouts, init)
        return cls(values["candidates"], values["select_at"]) if values["candidates"] > 1 else None

    @classmethod
    def check_options(cls, pipe, options, layouts) -> None:
        as_option_error(cls.check, pipe, options.candidates, options.select_at, layouts, options.uses_init)

    def prepare(self, pipe, call: SamplingCall) -> None:
        self.final = pipe.condition(
            call.layouts, call.guided, call.ground_unconditional, call.latent_size, call.device
        )
        call.rows = [layout for layout in call.layouts for _ in range(self.candidates)]
        if isinstance(call.generator, list):  # a layout's K candidates drawn in turn from its own generator
            call.generators = [g for g in call.generator for _ in range(self.candidates)]

    def start(self, pipe, call: SamplingCall) -> None:
        steps = len(call.timesteps)
        self.select = min(max(1, round(self.select_at * steps)), steps - 1)

    def taps(self, pipe, call: SamplingCall, i: int) -> bool:
        judged = getattr(pipe, "judge", None) is not None
        return i == self.select and not judged and pipe.adapter.config.perception_input != "rendered"

    def score(self, pipe, features: list[torch.Tensor], layouts: Sequence[Layout]) -> torch.Tensor:
        """Each row's score (lower is better): `score_candidates`."""
        return score_candidates(pipe, features, layouts)

    def after_prediction(self, pipe, call: SamplingCall, i: int, t, model_input, noise, features) -> torch.Tensor:
        if i != self.select:
            return noise
        c, batch, k = call.conditioning, len(call.layouts), self.candidates
        if getattr(pipe, "judge", None) is not None:
            scores = judge_candidates(pipe, model_input[c.cond_rows], t, noise, call.rows).view(batch, k)
        else:
            tapped = [f[c.cond_rows] for f in features]
            found = candidate_features(
                pipe, tapped, model_input[c.cond_rows], t, noise, c.cond_states, c.cond_mask, c.cond_added
            )
            scores = self.score(pipe, found, call.rows).view(batch, k)
        keep = (torch.arange(batch) * k + scores.argmin(dim=1).cpu()).to(call.latents.device)
        pipe.last_selection = {"scores": scores.cpu(), "kept": (keep % k).cpu()}
        call.latents, noise = call.latents[keep], noise[keep]
        select_scheduler_rows(pipe.scheduler, keep, batch * k)
        call.conditioning, call.rows, call.generators = self.final, call.layouts, call.generator
        call.extra = pipe.prepare_extra_step_kwargs(call.generator, call.eta)
        return noise
