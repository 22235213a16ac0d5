"""Sampling from layouts: `LamaPipeline`, a LAMA generator behind the interface sampling calls, the test of a
LAMA model folder (`is_lama_folder`) and the picture of a mask (`mask_picture`)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from spatiallock.baselines.lama.config import CLASS_NAME
from spatiallock.baselines.lama.generator import LamaGenerator
from spatiallock.baselines.lama.masks import entropy_terms, normalise
from spatiallock.errors import SpatialLockError
from spatiallock.layout import quoted
from spatiallock.pipelines.protocol import LAYOUT_GAN


def is_lama_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder written by `LamaGenerator.save_pretrained` (`train lama`)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("_class_name") == CLASS_NAME
    except (OSError, ValueError, AttributeError):
        return False


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
    kind: str = field(default=LAYOUT_GAN, init=False)

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
                        f"layouts[{i}].objects[{j}].label: {quoted(label)} is not a category of this LAMA model "
                        f"(known: {names})"
                    )

    def _noise(self, count: int, generator) -> dict[str, torch.Tensor]:
        """The noise of `count` images, truncated as the model's config says (the authors' sampling)."""
        if generator is None:
            generator = [torch.Generator().manual_seed(i) for i in range(count)]
        generators = generator if isinstance(generator, (list, tuple)) else [generator] * count
        return self.generator.noise(count, generators, truncation=self.generator.config.truncation)

    @torch.no_grad()
    def masks(self, layouts: Sequence, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(adapted, raw) masks of `layouts`, the same ones `__call__` with the same generators draws with."""
        labels, boxes, valid = self.layout_tensors(layouts)
        noise = self._noise(len(layouts), generator)
        labels, boxes, valid = self.generator.layout_tensors(labels, boxes, valid)
        mask, raw, _ = self.generator.masks(labels, boxes, valid, noise)
        return normalise(mask), raw

    @torch.no_grad()
    def __call__(self, layouts: Sequence, generator=None, **ignored) -> LamaOutput:
        from torchvision.transforms.functional import to_pil_image

        labels, boxes, valid = self.layout_tensors(layouts)
        images, mask, raw = self.generator(labels, boxes, valid, self._noise(len(layouts), generator))
        pictures = [to_pil_image(((image.float().clamp(-1, 1) + 1) / 2).cpu()) for image in images]
        return LamaOutput(pictures, mask, raw)

    def mask_entropy(self, layouts: Sequence, seed: int, per_layout: int = 1, batch: int = 64) -> dict[str, float]:
        """Mean per-pixel mask entropy (the paper's Eq. 5) of the images `sampling.sample` draws for `layouts`
        with `seed`: of the final (adapted, or only normalised) masks and of the raw masks normalised, each with
        the background object's part (its -p log p terms) apart: `mask_entropy` = `mask_entropy_objects` +
        `mask_entropy_background` (the authors' COCO layouts have no whole-image object)."""
        from spatiallock.pipelines.seeding import image_generator, jobs_of

        jobs = jobs_of(layouts, per_layout)
        sums = {"": [], "_background": [], "_raw": [], "_raw_background": []}
        for start in range(0, len(jobs), batch):
            part = jobs[start : start + batch]
            mask, raw_mask = self.masks([layouts[i] for i, _ in part], [image_generator(seed, i, k) for i, k in part])
            for suffix, m in (("", mask), ("_raw", normalise(raw_mask))):
                terms = entropy_terms(m).mean(dim=(2, 3))  # (B, O + 1): each object's part, the background first
                sums[suffix].append(terms.sum(dim=1))
                sums[f"{suffix}_background"].append(terms[:, 0])
        means = {key: float(torch.cat(values).mean()) for key, values in sums.items()}
        report = {}
        for suffix in ("", "_raw"):
            report[f"mask_entropy{suffix}"] = round(means[suffix], 4)
            report[f"mask_entropy{suffix}_background"] = round(means[f"{suffix}_background"], 4)
            report[f"mask_entropy{suffix}_objects"] = round(means[suffix] - means[f"{suffix}_background"], 4)
        if self.generator.adaption is not None:  # alpha as learnt, and as used (clamped to [-1, 1])
            alpha = self.generator.adaption.alpha.detach()
            report["alpha"] = round(float(alpha), 4)
            report["adaption_strength"] = round(float(alpha.clamp(-1, 1)), 4)
        return report

    def check_options(self, options, layouts: Sequence) -> None:
        """Refuse, in one line, the options only a diffusion model takes (`SamplingOptions.refuse_for`), another
        image size, and labels or layouts this model cannot draw."""
        options.refuse_for(self.kind, "a LAMA model")
        if options.size is not None and options.size != self.native_size:
            size = self.native_size
            raise SpatialLockError(f"--size: this LAMA model draws {size} px images only, got {options.size}")
        self.check_layouts(layouts)

    def resolved_options(self, options) -> dict:
        """No scheduler, steps or guidance: one forward pass at the model's own size."""
        return {"scheduler": None, "size": options.size or self.native_size, "steps": None, "guidance": None}

    def extra_scores(self, layouts: Sequence, seed: int, per_layout: int) -> dict[str, float]:
        """How clear its semantic masks are (seed 003's Eq. 5): `mask_entropy`."""
        return self.mask_entropy(layouts, seed, per_layout)


def mask_picture(mask: torch.Tensor, categories: Sequence[str], labels: Sequence[str]):
    """One (O + 1, S, S) normalised mask as a picture: each pixel the mix of its objects' colours (the background
    dark grey, each category its own colour), so unclear pixels show as blends."""
    from torchvision.transforms.functional import to_pil_image

    index = {name: i for i, name in enumerate(categories)}
    colours = [BACKGROUND_COLOUR] + [PALETTE[index[label] % len(PALETTE)] for label in labels]
    table = torch.tensor(colours, dtype=torch.float32) / 255  # (O + 1, 3)
    picture = torch.einsum("ohw,oc->chw", mask[: len(colours)].float().cpu(), table)
    return to_pil_image(picture.clamp(0, 1))
