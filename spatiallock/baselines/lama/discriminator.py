"""The LAMA discriminators: an image discriminator of spectral-norm ResNet blocks and an object discriminator on
RoIAlign crops with a class projection (`LamaDiscriminator`), and the hinge losses of both players."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm
from torchvision.ops import roi_align

from spatiallock.baselines.lama.config import LamaConfig


class DownBlock(nn.Module):
    """Spectral-norm ResNet block that halves the side (or keeps it)."""

    def __init__(self, cin: int, cout: int, first: bool = False, down: bool = True):
        super().__init__()
        self.first, self.down = first, down
        self.conv1 = spectral_norm(nn.Conv2d(cin, cout, 3, padding=1))
        self.conv2 = spectral_norm(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = spectral_norm(nn.Conv2d(cin, cout, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(F.relu(self.conv1(x if self.first else F.relu(x))))
        skip = self.skip(x)
        if self.down:
            h, skip = F.avg_pool2d(h, 2), F.avg_pool2d(skip, 2)
        return h + skip


class LamaDiscriminator(nn.Module):
    """Image score (B,) and one score per object (N,) on RoIAlign crops, with a class projection."""

    def __init__(self, config: LamaConfig):
        super().__init__()
        self.config = config
        c = config.d_channels
        downs = int(math.log2(config.image_size // 4))
        widths = [3] + [c * 2 ** min(k, 3) for k in range(downs)]
        self.image = nn.Sequential(
            *[DownBlock(widths[k], widths[k + 1], first=k == 0) for k in range(downs)],
            DownBlock(widths[-1], widths[-1], down=False),
        )
        self.image_out = spectral_norm(nn.Linear(widths[-1], 1))
        self.object_stem = DownBlock(3, c, first=True)  # S/2: crops are taken there
        self.object = nn.Sequential(DownBlock(c, 2 * c), DownBlock(2 * c, 4 * c, down=False))
        self.object_out = spectral_norm(nn.Linear(4 * c, 1))
        self.projection = spectral_norm(nn.Embedding(len(config.categories), 4 * c))

    def forward(self, images, labels, boxes, valid) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, 3, S, S); labels (B, O), boxes (B, O, 4) normalised, valid (B, O) of the objects (no
        background). Returns (image scores (B,), scores of the valid objects (N,))."""
        h = F.relu(self.image(images)).sum(dim=(2, 3))
        image_scores = self.image_out(h).squeeze(1)
        keep = valid.bool()
        size = images.shape[-1]
        index = torch.arange(images.shape[0], device=images.device)[:, None].expand_as(labels)[keep]
        rois = torch.cat([index[:, None].to(images.dtype), boxes[keep].to(images.dtype) * size], dim=1)
        features = self.object_stem(images)
        crops = roi_align(features, rois, output_size=8, spatial_scale=features.shape[-1] / size, aligned=True)
        h = F.relu(self.object(crops)).sum(dim=(2, 3))
        object_scores = self.object_out(h).squeeze(1) + (self.projection(labels[keep]) * h).sum(dim=1)
        return image_scores, object_scores


def discriminator_loss(discriminator: LamaDiscriminator, real, fake, labels, boxes, valid) -> dict[str, torch.Tensor]:
    """Hinge loss of the discriminator on real images and (detached) generated ones of the same layouts."""
    n = real.shape[0]
    pair = lambda t: torch.cat([t, t])  # noqa: E731
    image, objects = discriminator(torch.cat([real, fake.detach()]), pair(labels), pair(boxes), pair(valid))
    per_image = valid.bool().sum(1)
    real_objects = int(per_image.sum())
    image_loss = F.relu(1 - image[:n]).mean() + F.relu(1 + image[n:]).mean()
    object_loss = F.relu(1 - objects[:real_objects]).mean() + F.relu(1 + objects[real_objects:]).mean()
    config = getattr(discriminator, "module", discriminator).config
    loss = config.lambda_image * image_loss + config.lambda_object * object_loss
    return {"loss": loss, "d_image": image_loss.detach(), "d_object": object_loss.detach()}


def generator_loss(discriminator: LamaDiscriminator, fake, labels, boxes, valid) -> dict[str, torch.Tensor]:
    """Hinge loss of the generator: the discriminator's scores of its images; gradients reach the generator only
    (the discriminator's parameters take no part in this graph)."""
    params = [p for p in discriminator.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        image, objects = discriminator(fake, labels, boxes, valid)
    finally:
        for p in params:
            p.requires_grad_(True)
    config = getattr(discriminator, "module", discriminator).config
    loss = -(config.lambda_image * image.mean() + config.lambda_object * objects.mean())
    return {"loss": loss, "g_image": -image.mean().detach(), "g_object": -objects.mean().detach()}
