"""Layout to masks: each object's mask from its class, size and noise (`MaskGenerator`), put into its box
(`place_masks`), and the Locality-Aware Mask Adaption (`MaskAdaption`) that sharpens them where they overlap.

Built as the authors' `model/mask_regression.py` (ZejianLi/LAMA): spectral norm on every convolution and linear
layer, residual branches that enter through gates starting at zero, the adaption strength used clamped to
[-1, 1]."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

EPS = 1e-8
SN_EPS = 1e-4  # the authors' spectral-norm epsilon
SLOPE = 0.01  # LeakyReLU slope of every LAMA block


def sn(layer: nn.Module) -> nn.Module:
    """`layer` with spectral normalisation on its weight, as every LAMA convolution and linear layer has."""
    return spectral_norm(layer, eps=SN_EPS)


def groups_of(channels: int, groups: int = 4) -> int:
    """The authors' 4 groups, or the largest divisor of `channels` below it (tiny test models)."""
    return math.gcd(channels, groups)


def orthogonal_init(module: nn.Module) -> None:
    """The authors' initialisation: every weight of two or more dimensions orthogonal, every bias zero."""
    for name, param in module.named_parameters():
        if param.dim() > 1:
            nn.init.orthogonal_(param)
        if name.endswith("bias"):
            nn.init.zeros_(param)
    refresh_spectral_norms(module)


def refresh_spectral_norms(module: nn.Module, iterations: int = 15) -> None:
    """Run the power iteration of every spectral norm in `module` on its current weight: after a weight is set
    again (the orthogonal initialisation), its singular vectors are those of the weight before."""
    for sub in module.modules():
        parametrizations = getattr(sub, "parametrizations", None)
        if parametrizations is None or "weight" not in parametrizations:
            continue
        for norm in parametrizations["weight"]:
            if hasattr(norm, "_power_method"):
                with torch.no_grad():
                    weight = parametrizations["weight"].original
                    norm._power_method(norm._reshape_weight_to_matrix(weight), iterations)


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


def entropy_terms(mask: torch.Tensor) -> torch.Tensor:
    """-p log p of each object at each pixel of normalised (B, O, H, W) masks: the terms of `mask_entropy`."""
    return -(mask * mask.clamp_min(EPS).log())


def mask_entropy(mask: torch.Tensor) -> torch.Tensor:
    """Mean per-pixel entropy over objects of normalised (B, O, H, W) masks, per image (B,): the paper's Eq. 5."""
    return entropy_terms(mask).sum(dim=1).mean(dim=(1, 2))


class GatedBlock(nn.Module):
    """x + gate * conv3x3(LeakyReLU(norm(x))): spectral-norm convolution without bias, the gate starting at 0, so
    the block starts as the identity (the authors' `MaskRegressBlock` with BN, `MaskAdjustBlock` with GN)."""

    def __init__(self, channels: int, norm: nn.Module):
        super().__init__()
        self.norm = norm
        self.conv = sn(nn.Conv2d(channels, channels, 3, padding=1, bias=False))
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gate * self.conv(F.leaky_relu(self.norm(x), SLOPE))


class MaskGenerator(nn.Module):
    """F_om: object features (N, d) -> masks (N, s, s) in (0, 1): a spectral-norm linear layer to 4 x 4, then a
    gated block and a bilinear doubling until s, then BN, LeakyReLU, a 1 x 1 convolution and a sigmoid."""

    def __init__(self, object_dim: int, size: int, width: int = 64):
        super().__init__()
        self.width = width
        self.fc = sn(nn.Linear(object_dim, width * 16))
        self.blocks = nn.ModuleList(GatedBlock(width, nn.BatchNorm2d(width)) for _ in range(int(math.log2(size // 4))))
        self.final = nn.Sequential(nn.BatchNorm2d(width), nn.LeakyReLU(SLOPE), sn(nn.Conv2d(width, 1, 1)))

    def forward(self, objects: torch.Tensor) -> torch.Tensor:
        x = self.fc(objects).reshape(-1, self.width, 4, 4)
        for block in self.blocks:
            x = F.interpolate(block(x), scale_factor=2, mode="bilinear", align_corners=False)
        return torch.sigmoid(self.final(x)).squeeze(1)


class MaskAdaption(nn.Module):
    """LAMA: scale each object's raw mask value at each pixel by tanh(clamp(alpha, -1, 1) E) + 1, E the match of
    the pixel's local query with the object's key (the paper's Eqs. 1-4).

    The pixel query is the objects' queries summed with the raw mask as weights; the local query is two gated
    blocks of GroupNorm, LeakyReLU and a 3 x 3 convolution on it. The gates start at zero, so the module starts
    as matching on the pixel query alone and reaches a 5 x 5 neighbourhood as they open. `local_query=False` is
    the paper's Table 5 ablation: matching on the pixel query only. Returns the adapted mask unnormalised, as
    the authors' generator takes it (`normalise` makes it a per-pixel distribution)."""

    def __init__(self, object_dim: int, local_query: bool = True):
        super().__init__()
        inner = max(object_dim // 4, 1)  # d' = floor(d / 4)
        self.key = sn(nn.Linear(object_dim, inner))
        self.query = sn(nn.Linear(object_dim, inner))
        self.local = (
            nn.Sequential(*(GatedBlock(inner, nn.GroupNorm(groups_of(inner), inner)) for _ in range(2)))
            if local_query
            else nn.Identity()
        )
        self.alpha = nn.Parameter(torch.zeros(()))  # adaption strength, 0 at the start

    def pixel_query(self, raw: torch.Tensor, objects: torch.Tensor) -> torch.Tensor:
        """(B, d', H, W): each pixel's objects' queries weighted by their raw mask values."""
        return torch.einsum("bok,bohw->bkhw", self.query(objects), raw)

    def forward(self, raw: torch.Tensor, objects: torch.Tensor) -> torch.Tensor:
        """raw (B, O, H, W), objects (B, O, d) -> the adapted mask (B, O, H, W), not normalised."""
        match = torch.einsum("bok,bkhw->bohw", self.key(objects), self.local(self.pixel_query(raw, objects)))
        return (torch.tanh(self.alpha.clamp(-1.0, 1.0) * match) + 1) * raw
