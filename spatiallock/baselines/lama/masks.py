"""Layout to masks: each object's mask from its class, size and noise (`MaskGenerator`), put into its box
(`place_masks`), and the Locality-Aware Mask Adaption (`MaskAdaption`) that sharpens them where they overlap."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-8


def place_masks(masks: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Object masks (B, O, s, s) resized into their boxes (B, O, 4; x0, y0, x1, y1 in [0, 1]) on a size x size
    canvas: (B, O, size, size), zero outside each box."""
    b, o, s, _ = masks.shape
    x0, y0, x1, y1 = boxes.float().unbind(-1)
    centres = (torch.arange(size, device=masks.device, dtype=torch.float32) + 0.5) / size
    gx = (centres - x0[..., None]) / (x1 - x0).clamp_min(1e-3)[..., None] * 2 - 1  # (B, O, size)
    gy = (centres - y0[..., None]) / (y1 - y0).clamp_min(1e-3)[..., None] * 2 - 1
    grid = torch.stack(
        [gx[:, :, None, :].expand(b, o, size, size), gy[:, :, :, None].expand(b, o, size, size)], dim=-1
    )
    placed = F.grid_sample(
        masks.reshape(b * o, 1, s, s), grid.reshape(b * o, size, size, 2).to(masks.dtype),
        mode="bilinear", padding_mode="zeros", align_corners=False,
    )  # fmt: skip
    return placed.reshape(b, o, size, size)


def normalise(mask: torch.Tensor) -> torch.Tensor:
    """A (B, O, H, W) mask as a per-pixel distribution over its O objects."""
    return mask / mask.sum(dim=1, keepdim=True).clamp_min(EPS)


def mask_entropy(mask: torch.Tensor) -> torch.Tensor:
    """Mean per-pixel entropy over objects of normalised (B, O, H, W) masks, per image (B,): the paper's Eq. 5."""
    return -(mask * mask.clamp_min(EPS).log()).sum(dim=1).mean(dim=(1, 2))


class MaskGenerator(nn.Module):
    """F_om: object features (N, d) -> masks (N, s, s) in (0, 1)."""

    def __init__(self, object_dim: int, size: int, width: int = 64):
        super().__init__()
        self.width = width
        self.fc = nn.Linear(object_dim, width * 16)
        layers = []
        for _ in range(int(math.log2(size // 4))):
            layers += [nn.Upsample(scale_factor=2), nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width)]
            layers.append(nn.ReLU())
        self.body = nn.Sequential(nn.BatchNorm2d(width), nn.ReLU(), *layers, nn.Conv2d(width, 1, 1))

    def forward(self, objects: torch.Tensor) -> torch.Tensor:
        hidden = self.fc(objects).reshape(-1, self.width, 4, 4)
        return torch.sigmoid(self.body(hidden)).squeeze(1)


class _ResBlock(nn.Module):
    """x + conv(relu(conv(relu(x)))), 3 x 3, same width."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class MaskAdaption(nn.Module):
    """LAMA: scale each object's raw mask value at each pixel by tanh(alpha E) + 1, E the match of the pixel's
    local query with the object's key (the paper's Eqs. 1-4), then normalise over objects."""

    def __init__(self, object_dim: int):
        super().__init__()
        inner = max(object_dim // 4, 1)  # d' = floor(d / 4)
        self.key = nn.Linear(object_dim, inner)
        self.query = nn.Linear(object_dim, inner)
        self.local = nn.Sequential(_ResBlock(inner), _ResBlock(inner))
        self.alpha = nn.Parameter(torch.zeros(()))  # adaption strength, 0 at the start

    def forward(self, raw: torch.Tensor, objects: torch.Tensor) -> torch.Tensor:
        """raw (B, O, H, W), objects (B, O, d) -> the adapted mask (B, O, H, W), a distribution at every pixel."""
        pixel_query = torch.einsum("bok,bohw->bkhw", self.query(objects), raw)
        local_query = self.local(pixel_query)
        match = torch.einsum("bok,bkhw->bohw", self.key(objects), local_query)
        return normalise((torch.tanh(self.alpha * match) + 1) * raw)
