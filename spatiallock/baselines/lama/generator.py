"""Mask to image: the LAMA generator (`LamaGenerator`), ResNet up-blocks with ISLA-Norm on batch-group
normalisation, noise injection and gated residuals, drawing a layout through its adapted masks.

Built as the authors' `model/resnet_generator.py` and `model/components.py` (ZejianLi/LAMA): spectral norm on
every convolution and linear layer, orthogonal initialisation, a 3-layer style MLP of each object's noise, and
every gate where theirs is."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict

import torch
import torch.nn.functional as F
from torch import nn

from spatiallock.baselines.lama.config import LamaConfig
from spatiallock.baselines.lama.masks import (
    SLOPE,
    MaskAdaption,
    MaskGenerator,
    groups_of,
    normalise,
    orthogonal_init,
    place_masks,
    sn,
)
from spatiallock.checkpoint import read_model_folder, write_model_folder

ISLA_MARGIN = 1e-4  # the authors' floor of the per-pixel mask sum ISLA-Norm divides by


class BatchGroupNorm(nn.Module):
    """BN(x) + rho (GN(x) - BN(x)): one scalar GN share rho, starting at 0.1 and used clamped to [0, 1]; GroupNorm
    with 4 groups (batch-group normalisation)."""

    def __init__(self, channels: int):
        super().__init__()
        self.batch = nn.BatchNorm2d(channels, affine=False)
        self.group = nn.GroupNorm(groups_of(channels), channels, affine=False)
        self.rho = nn.Parameter(torch.tensor(0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = self.batch(x)
        return batch + self.rho.clamp(0.0, 1.0) * (self.group(x) - batch)


class IslaNorm(nn.Module):
    """Batch-group normalise to x_hat, then x_hat + clamp(gate, -1, 1) (gamma x_hat + beta): each object's gamma
    and beta (spectral-norm projections of its style [y, MLP(z)]) spread over the pixels by its mask, normalised
    at this resolution. The gate starts at 0: the block starts unmodulated."""

    def __init__(self, channels: int, style_dim: int):
        super().__init__()
        self.norm = BatchGroupNorm(channels)
        self.weight = sn(nn.Linear(style_dim, channels))
        self.bias = sn(nn.Linear(style_dim, channels))
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, styles: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x_hat = self.norm(x)
        mask = F.interpolate(mask, size=x.shape[-2:], mode="bilinear", align_corners=False)
        mask = mask / (mask.sum(dim=1, keepdim=True) + ISLA_MARGIN)
        gamma = torch.einsum("boc,bohw->bchw", self.weight(styles), mask)
        beta = torch.einsum("boc,bohw->bchw", self.bias(styles), mask)
        return x_hat + self.gate.clamp(-1.0, 1.0) * (gamma * x_hat + beta)


class NoiseInjection(nn.Module):
    """x + softplus(s) * noise, one s per channel starting at 0 (a weight of 0.69 from the start)."""

    def __init__(self, channels: int):
        super().__init__()
        self.seed = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return x + F.softplus(self.seed) * noise


class UpBlock(nn.Module):
    """The authors' ResBlockG: shortcut (nearest doubling, spectral-norm 1 x 1) + gate * residual (ISLA-Norm,
    LeakyReLU, nearest doubling, convolution without bias, noise; ISLA-Norm, LeakyReLU, convolution, noise); the
    gate starts at 0."""

    def __init__(self, cin: int, cout: int, style_dim: int):
        super().__init__()
        self.norm1, self.norm2 = IslaNorm(cin, style_dim), IslaNorm(cout, style_dim)
        self.conv1 = sn(nn.Conv2d(cin, cout, 3, padding=1, bias=False))
        self.conv2 = sn(nn.Conv2d(cout, cout, 3, padding=1, bias=False))
        self.noise1, self.noise2 = NoiseInjection(cout), NoiseInjection(cout)
        self.skip = sn(nn.Conv2d(cin, cout, 1))
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, x, styles, mask: torch.Tensor, noises: tuple[torch.Tensor, torch.Tensor]):
        h = F.interpolate(F.leaky_relu(self.norm1(x, styles, mask), SLOPE), scale_factor=2, mode="nearest")
        h = self.noise1(self.conv1(h), noises[0])
        h = self.noise2(self.conv2(F.leaky_relu(self.norm2(h, styles, mask), SLOPE)), noises[1])
        return self.skip(F.interpolate(x, scale_factor=2, mode="nearest")) + self.gate * h


def truncated(z: torch.Tensor, again: torch.Tensor, threshold: float | None) -> torch.Tensor:
    """The authors' truncation trick: values of `z` beyond `threshold` replaced by those of a second draw."""
    if threshold is None:
        return z
    return torch.where(z.abs() > threshold, again, z)


class LamaGenerator(nn.Module):
    """Layout (labels, boxes, valid) + noise -> (images in [-1, 1], adapted mask, raw mask)."""

    def __init__(self, config: LamaConfig):
        super().__init__()
        self.config = config
        c = config.channels
        self.embedding = nn.Embedding(len(config.categories) + 1, config.embed_dim)  # + the background
        self.mask_generator = MaskGenerator(config.object_dim, config.mask_size)
        self.adaption = MaskAdaption(config.object_dim, config.local_query) if config.adaption else None
        z = config.z_dim
        self.style_mapping = nn.Sequential(
            sn(nn.Linear(z, z)), nn.LeakyReLU(SLOPE), sn(nn.Linear(z, z)), nn.LeakyReLU(SLOPE), sn(nn.Linear(z, z))
        )  # each object's z -> its style, beside its class embedding
        ups = int(math.log2(config.image_size // 4))
        # 8c at 4 px, then halving down to c: 8c, 8c, 4c, 2c, c at 64 px
        widths = self.widths = [8 * c] + [max(8 * c // 2**k, c) for k in range(ups - 1)] + [c]
        self.fc = sn(nn.Linear(config.image_z_dim, widths[0] * 16))
        self.blocks = nn.ModuleList(UpBlock(widths[k], widths[k + 1], config.style_dim) for k in range(ups))
        self.out = nn.Sequential(nn.BatchNorm2d(c), nn.LeakyReLU(SLOPE), sn(nn.Conv2d(c, 3, 3, padding=1)), nn.Tanh())
        orthogonal_init(self)

    @property
    def device(self) -> torch.device:
        return self.embedding.weight.device

    # -- inputs -----------------------------------------------------------------------------------------------

    def noise_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per image: each object's z (the background's first), the image z, the maps of every noise injection."""
        shapes = {"objects": (self.config.max_objects + 1, self.config.z_dim), "image": (self.config.image_z_dim,)}
        side = 8
        for k in range(len(self.blocks)):
            shapes[f"block{k}"] = (2, side, side)
            side *= 2
        return shapes

    def noise(
        self,
        batch: int,
        generators: Sequence[torch.Generator] | torch.Generator | None = None,
        truncation: float | None = None,
    ) -> dict[str, torch.Tensor]:
        """Every random input of `batch` images. With a list of generators, image i draws all of its own from
        generators[i] (objects first, so its masks depend on that generator alone, whatever the batch).
        `truncation`: the object and image noise truncated at it (`truncated`), as the authors sample."""
        shapes = self.noise_shapes()

        def draw(key: str, shape, g, device) -> torch.Tensor:
            z = torch.randn(shape, generator=g, device=device)
            if truncation is None or key not in ("objects", "image"):
                return z
            return truncated(z, torch.randn(shape, generator=g, device=device), truncation)

        if isinstance(generators, (list, tuple)):
            if len(generators) != batch:
                raise ValueError(f"{len(generators)} generators for {batch} images")
            drawn = {k: [] for k in shapes}
            for g in generators:
                for key, shape in shapes.items():
                    drawn[key].append(draw(key, shape, g, g.device))
            return {k: torch.stack(v).to(self.device) for k, v in drawn.items()}
        g = generators
        device = g.device if g is not None else self.device
        return {k: draw(k, (batch, *s), g, device).to(self.device) for k, s in shapes.items()}

    def layout_tensors(self, labels: torch.Tensor, boxes: torch.Tensor, valid: torch.Tensor):
        """Category indices (B, O), boxes (B, O, 4) and validity (B, O) of the objects -> the same with the
        background object in front: (B, O + 1) indices, (B, O + 1, 4) boxes, (B, O + 1) validity."""
        b = labels.shape[0]
        background = torch.full((b, 1), len(self.config.categories), dtype=torch.long, device=labels.device)
        whole = torch.tensor([0.0, 0.0, 1.0, 1.0], device=boxes.device).expand(b, 1, 4)
        labels = torch.cat([background, labels.clamp_min(0)], dim=1)
        return labels, torch.cat([whole, boxes.float()], dim=1), torch.cat([torch.ones_like(valid[:, :1]), valid], 1)

    # -- masks and images -------------------------------------------------------------------------------------

    def object_features(self, labels, boxes, z) -> torch.Tensor:
        """o = [y, z, w, h] per object: (B, O, d)."""
        sizes = torch.stack([boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]], dim=-1)
        return torch.cat([self.embedding(labels), z[:, : labels.shape[1]], sizes], dim=-1)

    def masks(self, labels, boxes, valid, noise) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(adapted mask, raw mask, object features) of layouts whose background is already in front. The adapted
        mask is not normalised (`normalise` makes it a per-pixel distribution); without the adaption it is the
        raw mask."""
        objects = self.object_features(labels, boxes, noise["objects"])
        keep = valid.bool()
        side = self.config.mask_size
        small = torch.zeros(*labels.shape, side, side, device=labels.device, dtype=objects.dtype)
        small[keep] = self.mask_generator(objects[keep]).to(small.dtype)
        raw = place_masks(small, boxes, self.config.image_size) * valid[..., None, None]
        adapted = self.adaption(raw, objects) if self.adaption is not None else raw
        return adapted, raw, objects

    def styles(self, labels, z) -> torch.Tensor:
        """What ISLA-Norm reads of each object: [y, MLP(z)], (B, O, d_y + d_z)."""
        return torch.cat([self.embedding(labels), self.style_mapping(z[:, : labels.shape[1]])], dim=-1)

    def forward(self, labels, boxes, valid, noise: dict[str, torch.Tensor]):
        """labels (B, O) category indices (-1 or anything where not valid), boxes (B, O, 4) normalised xyxy,
        valid (B, O) 1 for objects; O at most `max_objects`. Returns (images (B, 3, S, S) in [-1, 1], adapted
        mask and raw mask (B, O + 1, S, S), the background first; the adapted one normalised)."""
        if labels.shape[1] > self.config.max_objects:
            raise ValueError(f"{labels.shape[1]} objects; this model draws at most {self.config.max_objects}")
        labels, boxes, valid = self.layout_tensors(labels, boxes, valid.float())
        mask, raw, _ = self.masks(labels, boxes, valid, noise)
        styles = self.styles(labels, noise["objects"])
        x = self.fc(noise["image"]).reshape(-1, self.widths[0], 4, 4)
        for k, block in enumerate(self.blocks):
            maps = noise[f"block{k}"]
            x = block(x, styles, mask, (maps[:, :1], maps[:, 1:]))
        return self.out(x), normalise(mask), raw

    # -- folders ----------------------------------------------------------------------------------------------

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write `config.json` and `model.safetensors` to `folder` (`atomic_save_pretrained` does it atomically)."""
        write_model_folder(folder, self.state_dict(), asdict(self.config))

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, device: str | torch.device = "cpu") -> LamaGenerator:
        """The generator saved in `folder`, in eval mode."""
        return read_model_folder(folder, "LAMA model", lambda values: cls(LamaConfig.from_dict(values))).to(device)
