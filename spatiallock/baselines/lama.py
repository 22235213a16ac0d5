"""LAMA (seed 003): layout -> object masks -> Locality-Aware Mask Adaption -> image, a GAN baseline.

    generator = LamaGenerator(LamaConfig(categories=["red circle", "blue square"]))
    noise = generator.noise(batch=2, generators=[torch.Generator().manual_seed(s) for s in (0, 1)])
    images, mask, raw = generator(labels, boxes, valid, noise)

The parts, each as the paper builds it, sized for 64 px on a CPU:

- layout-to-mask (`MaskGenerator`): every object's feature o = [class embedding y, noise z, box w, h] becomes a
  16 x 16 mask (a sigmoid), resized into its box (`place_masks`); the masks of all objects are the raw semantic
  mask. A whole-image background object (`BACKGROUND`) comes first in every layout, as in LostGAN.
- `MaskAdaption` (LAMA): object queries summed per pixel with the raw mask as weights (pixel query), summarised
  by two 3 x 3 ResNet blocks (local query), matched against object keys (E); the raw mask is scaled by
  tanh(alpha E) + 1 with alpha starting at zero, then normalised over objects (`normalise`). Without adaption
  (`LamaConfig.adaption` False, the paper's control) the raw mask is only normalised.
- mask-to-image (`LamaGenerator`): ResNet up-blocks with ISLA-Norm (each object's own scale and shift, spread
  over the image by its mask) on batch-group normalisation, noise injection after each convolution and ReZero
  residuals.
- `LamaDiscriminator`: an image discriminator of spectral-norm ResNet blocks and an object discriminator on
  RoIAlign crops (torchvision) with a class projection; hinge losses (`discriminator_loss`, `generator_loss`).

`mask_entropy` is the paper's mask clarity measure (its Eq. 5): the mean per-pixel entropy over objects.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm
from torchvision.ops import roi_align

from spatiallock.checkpoint import read_model_folder, write_model_folder
from spatiallock.errors import SpatialLockError

BACKGROUND = "__image__"  # the whole-image object every layout starts with
CLASS_NAME = "LamaGenerator"
EPS = 1e-8


@dataclass
class LamaConfig:
    """What builds a LAMA generator (and its discriminator), written to the model folder's config.json."""

    categories: list[str]
    image_size: int = 64
    max_objects: int = 8  # objects of a layout, the background not counted
    embed_dim: int = 64  # d_y, the class embedding
    z_dim: int = 64  # d_z, each object's noise
    image_z_dim: int = 128  # the image noise the generator starts from
    mask_size: int = 16  # side of each object's mask before it is put into its box
    channels: int = 16  # generator width: 8c at 4 px, then 8c, 4c, 2c, c
    d_channels: int = 16  # discriminator width
    adaption: bool = True  # False: the control without LAMA (the raw mask, normalised)
    lambda_image: float = 0.1
    lambda_object: float = 1.0
    _class_name: str = CLASS_NAME

    def __post_init__(self):
        if not self.categories or not all(isinstance(c, str) and c for c in self.categories):
            raise ValueError("categories: a non-empty list of names")
        if BACKGROUND in self.categories:
            raise ValueError(f"categories: {BACKGROUND!r} is reserved for the background")
        if self.image_size < 16 or self.image_size & (self.image_size - 1):
            raise ValueError(f"image_size: a power of two of at least 16, got {self.image_size}")
        if self.mask_size < 4 or self.mask_size & (self.mask_size - 1):
            raise ValueError(f"mask_size: a power of two of at least 4, got {self.mask_size}")
        for name in ("max_objects", "embed_dim", "z_dim", "image_z_dim", "channels", "d_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1, got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, values: dict) -> LamaConfig:
        if values.get("_class_name") != CLASS_NAME:
            raise ValueError(f"_class_name is {values.get('_class_name')!r}, not {CLASS_NAME!r}")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    @property
    def object_dim(self) -> int:
        """d = d_y + d_z + 2 (box width and height)."""
        return self.embed_dim + self.z_dim + 2

    @property
    def style_dim(self) -> int:
        """What ISLA-Norm reads of an object: [y, z]."""
        return self.embed_dim + self.z_dim


def is_lama_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder written by `LamaGenerator.save_pretrained` (`train lama`)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("_class_name") == CLASS_NAME
    except (OSError, ValueError, AttributeError):
        return False


# ---- masks ----------------------------------------------------------------------------------------------------


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


# ---- mask-to-image --------------------------------------------------------------------------------------------


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


# ---- discriminators -------------------------------------------------------------------------------------------


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


# ---- sampling from layouts ------------------------------------------------------------------------------------

PALETTE = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
    (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255), (170, 110, 40),
]  # fmt: skip
BACKGROUND_COLOUR = (40, 40, 40)


@dataclass
class LamaOutput:
    images: list  # PIL images
    masks: torch.Tensor  # adapted (B, O + 1, S, S), the background first
    raw_masks: torch.Tensor


@dataclass
class LamaPipeline:
    """A LAMA generator behind the interface `spatiallock.sampling.run` calls: `pipe(layouts=..., generator=[...])`.

    A GAN has no sampling steps, guidance or scheduler: those options do not apply (`check_options` refuses the
    diffusion-only ones that would change an image)."""

    generator: LamaGenerator
    is_layout_gan: bool = field(default=True, init=False)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> LamaPipeline:
        return cls(LamaGenerator.from_pretrained(folder).eval())

    @property
    def device(self) -> torch.device:
        return self.generator.device

    @property
    def native_size(self) -> int:
        return self.generator.config.image_size

    def to(self, device) -> LamaPipeline:
        self.generator.to(device)
        return self

    def set_progress_bar_config(self, **options) -> None:
        """Nothing to show: one forward pass per batch."""

    def layout_tensors(self, layouts: Sequence) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(labels, boxes, valid) of `layouts`, padded to the most objects among them."""
        self.check_layouts(layouts)
        index = {name: i for i, name in enumerate(self.generator.config.categories)}
        count = max(1, max(len(layout.labels) for layout in layouts))
        labels = torch.full((len(layouts), count), -1, dtype=torch.long)
        boxes, valid = torch.zeros(len(layouts), count, 4), torch.zeros(len(layouts), count)
        for b, layout in enumerate(layouts):
            for j, (label, box) in enumerate(zip(layout.labels, layout.boxes)):
                labels[b, j], boxes[b, j], valid[b, j] = index[label], torch.tensor(box, dtype=torch.float32), 1
        device = self.device
        return labels.to(device), boxes.to(device), valid.to(device)

    def check_layouts(self, layouts: Sequence) -> None:
        """`SpatialLockError` naming the first label the model does not know or layout with too many objects."""
        known = set(self.generator.config.categories)
        limit = self.generator.config.max_objects
        for i, layout in enumerate(layouts):
            if len(layout.labels) > limit:
                raise SpatialLockError(
                    f"layouts[{i}].objects: {len(layout.labels)} objects; this LAMA model draws at most {limit}"
                )
            for j, label in enumerate(layout.labels):
                if label not in known:
                    names = ", ".join(sorted(known))
                    raise SpatialLockError(
                        f"layouts[{i}].objects[{j}].label: {label!r} is not a category of this LAMA model "
                        f"(known: {names})"
                    )

    def _noise(self, count: int, generator) -> dict[str, torch.Tensor]:
        if generator is None:
            generator = [torch.Generator().manual_seed(i) for i in range(count)]
        return self.generator.noise(count, generator if isinstance(generator, (list, tuple)) else [generator] * count)

    @torch.no_grad()
    def masks(self, layouts: Sequence, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(adapted, raw) masks of `layouts`, the same ones `__call__` with the same generators draws with."""
        labels, boxes, valid = self.layout_tensors(layouts)
        noise = self._noise(len(layouts), generator)
        labels, boxes, valid = self.generator.layout_tensors(labels, boxes, valid)
        mask, raw, _ = self.generator.masks(labels, boxes, valid, noise)
        return mask, raw

    @torch.no_grad()
    def __call__(self, layouts: Sequence, generator=None, **ignored) -> LamaOutput:
        from torchvision.transforms.functional import to_pil_image

        labels, boxes, valid = self.layout_tensors(layouts)
        images, mask, raw = self.generator(labels, boxes, valid, self._noise(len(layouts), generator))
        pictures = [to_pil_image(((image.float().clamp(-1, 1) + 1) / 2).cpu()) for image in images]
        return LamaOutput(pictures, mask, raw)

    def mask_entropy(self, layouts: Sequence, seed: int, per_layout: int = 1, batch: int = 64) -> dict[str, float]:
        """Mean per-pixel mask entropy of the images `sampling.sample` draws for `layouts` with `seed`: of the
        final (adapted, or only normalised) masks and of the raw masks normalised."""
        from spatiallock.pipelines.seeding import image_generator, jobs_of

        jobs = jobs_of(layouts, per_layout)
        adapted, raw = [], []
        for start in range(0, len(jobs), batch):
            part = jobs[start : start + batch]
            mask, raw_mask = self.masks([layouts[i] for i, _ in part], [image_generator(seed, i, k) for i, k in part])
            adapted.append(mask_entropy(mask))
            raw.append(mask_entropy(normalise(raw_mask)))
        return {
            "mask_entropy": round(float(torch.cat(adapted).mean()), 4),
            "mask_entropy_raw": round(float(torch.cat(raw).mean()), 4),
        }

    def check_options(self, options, layouts: Sequence) -> None:
        """Refuse options that only a diffusion model has and that would change what it draws."""
        refused = {
            "layout_guidance_steps": 0, "init_image": None, "init_from_layout": False, "candidates": 1,
            "perception_guidance_steps": 0, "grounding_steps": None, "ground_unconditional": None,
        }  # fmt: skip
        for name, neutral in refused.items():
            if getattr(options, name) != neutral:
                option = f"--{name.replace('_', '-')}"
                raise SpatialLockError(f"{option}: a diffusion sampling option; a LAMA model has no use for it")
        if options.size is not None and options.size != self.native_size:
            size = self.native_size
            raise SpatialLockError(f"--size: this LAMA model draws {size} px images only, got {options.size}")
        self.check_layouts(layouts)


def mask_picture(mask: torch.Tensor, categories: Sequence[str], labels: Sequence[str]):
    """One (O + 1, S, S) normalised mask as a picture: each pixel the mix of its objects' colours (the background
    dark grey, each category its own colour), so unclear pixels show as blends."""
    from torchvision.transforms.functional import to_pil_image

    index = {name: i for i, name in enumerate(categories)}
    colours = [BACKGROUND_COLOUR] + [PALETTE[index[label] % len(PALETTE)] for label in labels]
    table = torch.tensor(colours, dtype=torch.float32) / 255  # (O + 1, 3)
    picture = torch.einsum("ohw,oc->chw", mask[: len(colours)].float().cpu(), table)
    return to_pil_image(picture.clamp(0, 1))
