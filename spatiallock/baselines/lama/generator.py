"""Mask to image: the LAMA generator (`LamaGenerator`), ResNet up-blocks with ISLA-Norm on batch-group
normalisation, noise injection and ReZero residuals, drawing a layout through its adapted masks."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict

import torch
import torch.nn.functional as F
from torch import nn

from spatiallock.baselines.lama.config import LamaConfig
from spatiallock.baselines.lama.masks import MaskAdaption, MaskGenerator, normalise, place_masks
from spatiallock.checkpoint import read_model_folder, write_model_folder


class BatchGroupNorm(nn.Module):
    """rho BN(x) + (1 - rho) GN(x), rho in [0, 1] learnt per channel (batch-group normalisation)."""

    def __init__(self, channels: int):
        super().__init__()
        self.batch = nn.BatchNorm2d(channels, affine=False)
        self.group = nn.GroupNorm(min(8, channels), channels, affine=False)
        self.rho = nn.Parameter(torch.full((1, channels, 1, 1), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rho = self.rho.clamp(0.0, 1.0)
        return rho * self.batch(x) + (1 - rho) * self.group(x)


class IslaNorm(nn.Module):
    """Normalise, then each object's own scale and shift (from its [y, z]) spread over the pixels by its mask."""

    def __init__(self, channels: int, style_dim: int):
        super().__init__()
        self.norm = BatchGroupNorm(channels)
        self.affine = nn.Linear(style_dim, 2 * channels)

    def forward(self, x: torch.Tensor, styles: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.affine(styles).chunk(2, dim=-1)  # (B, O, C) each
        scale = torch.einsum("boc,bohw->bchw", gamma, mask)
        shift = torch.einsum("boc,bohw->bchw", beta, mask)
        return self.norm(x) * (1 + scale) + shift


class NoiseInjection(nn.Module):
    """x + w * noise, one learnt weight per channel starting at zero."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return x + self.weight * noise


class UpBlock(nn.Module):
    """ISLA-Norm ResNet block that doubles the side; the residual branch enters through ReZero (starts at 0)."""

    def __init__(self, cin: int, cout: int, style_dim: int):
        super().__init__()
        self.norm1, self.norm2 = IslaNorm(cin, style_dim), IslaNorm(cout, style_dim)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.noise1, self.noise2 = NoiseInjection(cout), NoiseInjection(cout)
        self.skip = nn.Conv2d(cin, cout, 1)
        self.rezero = nn.Parameter(torch.zeros(()))

    def forward(self, x, styles, masks: dict[int, torch.Tensor], noises: tuple[torch.Tensor, torch.Tensor]):
        side = x.shape[-1]
        h = F.relu(self.norm1(x, styles, masks[side]))
        h = self.noise1(self.conv1(F.interpolate(h, scale_factor=2)), noises[0])
        h = self.noise2(self.conv2(F.relu(self.norm2(h, styles, masks[2 * side]))), noises[1])
        return self.skip(F.interpolate(x, scale_factor=2)) + self.rezero * h


class LamaGenerator(nn.Module):
    """Layout (labels, boxes, valid) + noise -> (images in [-1, 1], adapted mask, raw mask)."""

    def __init__(self, config: LamaConfig):
        super().__init__()
        self.config = config
        c = config.channels
        self.embedding = nn.Embedding(len(config.categories) + 1, config.embed_dim)  # + the background
        self.mask_generator = MaskGenerator(config.object_dim, config.mask_size)
        self.adaption = MaskAdaption(config.object_dim) if config.adaption else None
        ups = int(math.log2(config.image_size // 4))
        # 8c at 4 px, then halving down to c: 8c, 8c, 4c, 2c, c at 64 px
        widths = self.widths = [8 * c] + [max(8 * c // 2**k, c) for k in range(ups - 1)] + [c]
        self.fc = nn.Linear(config.image_z_dim, widths[0] * 16)
        self.blocks = nn.ModuleList(UpBlock(widths[k], widths[k + 1], config.style_dim) for k in range(ups))
        self.out = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, 3, 3, padding=1), nn.Tanh())

    @property
    def device(self) -> torch.device:
        return self.fc.weight.device

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
        self, batch: int, generators: Sequence[torch.Generator] | torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Every random input of `batch` images. With a list of generators, image i draws all of its own from
        generators[i] (objects first, so its masks depend on that generator alone, whatever the batch)."""
        shapes = self.noise_shapes()
        if isinstance(generators, (list, tuple)):
            if len(generators) != batch:
                raise ValueError(f"{len(generators)} generators for {batch} images")
            drawn = {k: [] for k in shapes}
            for g in generators:
                for key, shape in shapes.items():
                    drawn[key].append(torch.randn(shape, generator=g, device=g.device))
            return {k: torch.stack(v).to(self.device) for k, v in drawn.items()}
        g = generators
        device = g.device if g is not None else self.device
        return {k: torch.randn((batch, *s), generator=g, device=device).to(self.device) for k, s in shapes.items()}

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
        """(adapted mask, raw mask, object features) of layouts whose background is already in front."""
        objects = self.object_features(labels, boxes, noise["objects"])
        keep = valid.bool()
        side = self.config.mask_size
        small = torch.zeros(*labels.shape, side, side, device=labels.device, dtype=objects.dtype)
        small[keep] = self.mask_generator(objects[keep]).to(small.dtype)
        raw = place_masks(small, boxes, self.config.image_size) * valid[..., None, None]
        adapted = self.adaption(raw, objects) if self.adaption is not None else normalise(raw)
        return adapted, raw, objects

    def forward(self, labels, boxes, valid, noise: dict[str, torch.Tensor]):
        """labels (B, O) category indices (-1 or anything where not valid), boxes (B, O, 4) normalised xyxy,
        valid (B, O) 1 for objects; O at most `max_objects`. Returns (images (B, 3, S, S) in [-1, 1], adapted
        mask and raw mask (B, O + 1, S, S), the background first)."""
        if labels.shape[1] > self.config.max_objects:
            raise ValueError(f"{labels.shape[1]} objects; this model draws at most {self.config.max_objects}")
        labels, boxes, valid = self.layout_tensors(labels, boxes, valid.float())
        mask, raw, objects = self.masks(labels, boxes, valid, noise)
        styles = objects[..., : self.config.style_dim]
        pyramid = {self.config.image_size: mask}
        side = self.config.image_size
        while side > 4:
            pyramid[side // 2] = F.avg_pool2d(pyramid[side], 2)
            side //= 2
        x = self.fc(noise["image"]).reshape(-1, self.widths[0], 4, 4)
        for k, block in enumerate(self.blocks):
            maps = noise[f"block{k}"]
            x = block(x, styles, pyramid, (maps[:, :1], maps[:, 1:]))
        return self.out(x), mask, raw

    # -- folders ----------------------------------------------------------------------------------------------

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write `config.json` and `model.safetensors` to `folder` (`atomic_save_pretrained` does it atomically)."""
        write_model_folder(folder, self.state_dict(), asdict(self.config))

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, device: str | torch.device = "cpu") -> LamaGenerator:
        """The generator saved in `folder`, in eval mode."""
        return read_model_folder(folder, "LAMA model", lambda values: cls(LamaConfig.from_dict(values))).to(device)
