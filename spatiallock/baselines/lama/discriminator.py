"""The LAMA discriminators (`LamaDiscriminator`): an image path of gated spectral-norm ResNet blocks and an object
path on RoIAlign crops of the image path's features with a class projection, and the hinge losses of both players.

Built as the authors' `ResnetDiscriminator64` (`model/rcnn_discriminator.py`, ZejianLi/LAMA): a first block and a
second block at full size, then blocks that halve the side down to 8 px, mean pooling and a linear layer for the
image score; the object crops are taken from the shared trunk after its third block (half size), so the object
loss shapes the image features too, and go through one more block, sum pooling and a projection. Every residual
branch enters through a gate starting at 0 (used clamped to [-1, 1]); spectral norm on every layer."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from spatiallock.baselines.lama.config import LamaConfig
from spatiallock.baselines.lama.masks import SLOPE, orthogonal_init, sn


class DownBlock(nn.Module):
    """The authors' ResBlockD (or, with `first`, their OptimizedBlock that reads the image): shortcut (a
    spectral-norm 1 x 1 where the width or side changes) + clamp(gate, -1, 1) * residual (two 3 x 3 convolutions
    after LeakyReLU), average-pooled to half the side when `down`."""

    def __init__(self, cin: int, cout: int, first: bool = False, down: bool = True):
        super().__init__()
        self.first, self.down = first, down
        self.conv1 = sn(nn.Conv2d(cin, cout, 3, padding=1))
        self.conv2 = sn(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = sn(nn.Conv2d(cin, cout, 1)) if first or down or cin != cout else None
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x if self.first else F.leaky_relu(x, SLOPE)
        h = self.conv2(F.leaky_relu(self.conv1(h), SLOPE))
        skip = x if self.skip is None else self.skip(x)
        if self.down:
            h, skip = F.avg_pool2d(h, 2), F.avg_pool2d(skip, 2)
        return self.gate.clamp(-1.0, 1.0) * h + skip


class LamaDiscriminator(nn.Module):
    """Image score (B,) and one score per object (N,) on RoIAlign crops of the shared trunk, with a class
    projection. Widths c, 2c at full size, then 4c, 8c, 16c, ... (capped at 16c) halving the side to 8 px."""

    def __init__(self, config: LamaConfig):
        super().__init__()
        self.config = config
        c = config.d_channels
        downs = int(math.log2(config.image_size // 8))
        widths = [c, 2 * c] + [c * min(4 * 2**k, 16) for k in range(downs)]
        blocks = [DownBlock(3, widths[0], first=True, down=False), DownBlock(widths[0], widths[1], down=False)]
        blocks += [DownBlock(widths[k + 1], widths[k + 2]) for k in range(downs)]
        self.trunk = nn.ModuleList(blocks)
        self.crop_after = 2  # crops are taken from the output of trunk[2], at half the image side
        self.image_out = sn(nn.Linear(widths[-1], 1, bias=False))
        crop = widths[self.crop_after]
        self.object = DownBlock(crop, 2 * crop)
        self.object_out = sn(nn.Linear(2 * crop, 1, bias=False))
        self.projection = sn(nn.Embedding(len(config.categories), 2 * crop))
        orthogonal_init(self)

    def forward(self, images, labels, boxes, valid) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, 3, S, S); labels (B, O), boxes (B, O, 4) normalised, valid (B, O) of the objects (no
        background). Returns (image scores (B,), scores of the valid objects (N,))."""
        x, features = images, None
        for k, block in enumerate(self.trunk):
            x = block(x)
            if k == self.crop_after:
                features = x
        image_scores = self.image_out(F.leaky_relu(x, SLOPE).mean(dim=(2, 3))).squeeze(1)
        keep = valid.bool()
        size = images.shape[-1]
        index = torch.arange(images.shape[0], device=images.device)[:, None].expand_as(labels)[keep]
        rois = torch.cat([index[:, None].to(images.dtype), boxes[keep].to(images.dtype) * size], dim=1)
        crops = roi_align(features, rois, output_size=8, spatial_scale=features.shape[-1] / size, aligned=False)
        h = F.leaky_relu(self.object(crops), SLOPE).sum(dim=(2, 3))
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
