"""An image-only detection reward: a frozen detector scores what a U-Net prediction implies was drawn.

The PoG head reads the grounded U-Net's features, which carry the requested boxes themselves, so it reports the
layout it is told whatever the image shows (the leak test, `evaluation.leak`). `ImageJudge` sees only pixels: the
clean latents a prediction implies, x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t), decoded by the base's autoencoder
to an image, are scored by a detector trained on real images (ControlNet++'s reward, with a detector as the
reward model). The detector is frozen: it never learns, and no layout token reaches it.

Three users:
- `train adapter --reward-detector DET`: `loss = diffusion + s * detection` on the images noised at most to
  `--reward-timesteps` (where the one-step estimate is sharp); the gradient reaches the adapter through the
  U-Net's prediction and the decoder.
- candidate selection and perception guidance at sampling time (`--judge DET`): the same detector on the decoded
  clean estimate of each candidate, beside the head-based scoring (see `pipelines.extensions.perception`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from spatiallock.base.latents import decode_latents
from spatiallock.errors import SpatialLockError
from spatiallock.evaluation.detector import Detector
from spatiallock.layout import Layout
from spatiallock.models.perception import predicted_clean
from spatiallock.pipelines.extensions.perception import layout_targets, placement_scores

REWARD_TIMESTEPS = 200  # ControlNet++: the reward only where the one-step clean estimate is sharp (t <= 200 of 1000)


def decode_images(vae, latents: torch.Tensor, patch: int = 1) -> torch.Tensor:
    """The U-Net's scaled latents (`patch`: `base.latents.latent_patch`) -> images (B, 3, H, W) in [0, 1],
    differentiable through the decoder."""
    pixels = decode_latents(vae, patch, latents)
    return ((pixels.float() + 1) / 2).clamp(0, 1)


class ImageJudge(nn.Module):
    """A frozen `Detector` that scores images against layouts; it sees pixels only.

    `loss` is the detector's own training loss (torchvision's, summed over its parts) against the requested boxes:
    differentiable in the images, never in the detector. `score` is, per image, 1 - the mean over the requested
    objects of the best IoU x score of a detection of its class (0 when none): lower is better, as the PoG head's
    candidate score.
    """

    def __init__(self, detector: Detector):
        super().__init__()
        self.detector = detector.requires_grad_(False)
        self.names = {name: k for k, name in enumerate(detector.names)}
        self.category_ids = torch.tensor([c["id"] for c in detector.config.categories])  # of each class index

    @classmethod
    def from_pretrained(cls, folder, device: str | torch.device = "cpu") -> ImageJudge:
        return cls(Detector.from_pretrained(folder, device))

    def class_map(self, names: Sequence[str], option: str) -> torch.Tensor:
        """(len(names),) long: each data class's index in the detector, -1 where the detector does not know it;
        refuses, in one line naming `option`, names of which the detector knows none."""
        index = torch.tensor([self.names.get(name, -1) for name in names], dtype=torch.long)
        if len(index) and (index < 0).all():
            raise SpatialLockError(
                f"{option}: the detector knows none of the classes {', '.join(list(names)[:4])}, ... "
                f"(it knows {', '.join(self.detector.names[:4])}, ...)"
            )
        return index

    def targets(self, layouts: Sequence[Layout]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Layouts as (boxes (B, N, 4) normalised xyxy, detector class indices (B, N), masks (B, N)); objects of a
        label the detector does not know are masked out."""
        return layout_targets(layouts, self.names)

    @staticmethod
    def _pixel_targets(images, boxes, labels, masks) -> list[dict]:
        height, width = images.shape[-2:]
        scale = torch.tensor([width, height, width, height], dtype=torch.float32, device=images.device)
        out = []
        for b in range(len(images)):
            keep = (masks[b] > 0.5) & (labels[b] >= 0)
            out.append({"boxes": boxes[b][keep].float().to(images.device) * scale, "labels": labels[b][keep]})
        return out

    def loss(self, images, boxes, labels, masks, per_image: bool = False) -> torch.Tensor:
        """The detection loss of `images` (B, 3, H, W) in [0, 1] against the requested objects: a scalar (the
        detector's batch loss), or (B,) with `per_image` (each image on its own, so that its gradient depends on
        that image alone). `labels` are detector class indices; masked or negative slots are not objects."""
        targets = self._pixel_targets(images, boxes, labels.to(images.device), masks)
        was_training = self.detector.training
        self.detector.train()  # torchvision's detection models return their losses in training mode only
        try:
            if per_image:
                return torch.stack(
                    [sum(self.detector([image], [target]).values()) for image, target in zip(images, targets)]
                )
            return sum(self.detector(list(images), targets).values())
        finally:
            self.detector.train(was_training)

    @torch.no_grad()
    def score(self, images, boxes, labels, masks) -> torch.Tensor:
        """(B,) lower is better: 1 - the mean over the requested objects of the best IoU x score of a detection of
        their class (1 for an image with no requested object found or asked): `placement_scores`."""
        found = self.detector.detect(list(images.float()), score_threshold=0.05)
        keep = (masks > 0.5) & (labels >= 0)
        return placement_scores(found, boxes, self.category_ids[labels.cpu().clamp(min=0)], keep)


class DetectionReward(nn.Module):
    """`train adapter`'s reward: `ImageJudge.loss` on the decoded clean estimate of the adapter's prediction, on
    the images noised at most to `max_timestep`; the rest contribute nothing.

    `class_map`: (K,) the detector's index of each of the training data's K classes (`ImageJudge.class_map`).
    """

    def __init__(self, judge: ImageJudge, class_map: torch.Tensor, max_timestep: int = REWARD_TIMESTEPS):
        super().__init__()
        self.judge, self.max_timestep = judge, max_timestep
        self.register_buffer("class_map", class_map, persistent=False)

    def forward(
        self, vae, scheduler, noisy, timesteps, prediction, boxes, labels, masks, patch: int = 1
    ) -> torch.Tensor:
        """The reward loss of one batch: a scalar, zero (without a graph) when no image is at or below the cut.

        noisy, prediction: (B, C, h, w) the U-Net's input and output; timesteps (B,); boxes (B, N, 4) normalised
        xyxy; labels (B, N) the data's class indices (-1 padding); masks (B, N) the objects in each image; patch:
        the base's latent patch (`base.latents.latent_patch`)."""
        rows = timesteps <= self.max_timestep
        if not rows.any():
            return torch.zeros((), device=noisy.device)
        clean = predicted_clean(
            scheduler.alphas_cumprod, noisy[rows], timesteps[rows], prediction[rows], scheduler.config.prediction_type
        )
        images = decode_images(vae, clean, patch)
        classes = labels[rows].to(self.class_map.device)
        mapped = torch.where(classes >= 0, self.class_map[classes.clamp(min=0)], torch.full_like(classes, -1))
        return self.judge.loss(images, boxes[rows], mapped, masks[rows])
