"""LayoutDataset: images, captions and boxes from any COCO-format pair (the synthetic domain or COCO 2017).

    dataset = LayoutDataset.from_split("data/shapes", "train", resolution=64, flip_prob=0.5, random_caption=True)
    loader = DataLoader(dataset, batch_size=32, shuffle=True, collate_fn=collate_layouts)

A horizontal flip swaps the words "left" and "right" in the caption, so relations stay true.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from spatiallock.data.cocofile import CocoIndex, ImageRecord, LayoutFilters, build_index, read_coco_json
from spatiallock.data.transforms import apply_to_boxes, apply_to_image, plan_crop, swap_left_right
from spatiallock.errors import SpatialLockError
from spatiallock.files import read_rgb
from spatiallock.layout import MAX_OBJECTS

logger = logging.getLogger(__name__)


def split_files(root: str | Path, split: str) -> tuple[Path, Path, Path]:
    """Instances file, captions file and image folder of a split, in either layout this package reads.

    The synthetic layout: root/instances_<split>.json, root/captions_<split>.json, root/<split>/.
    The COCO 2017 layout: root/annotations/instances_<split>.json, ..., root/<split>/ (split e.g. "val2017").
    """
    root = Path(root)
    for folder in (root, root / "annotations"):
        instances, captions = folder / f"instances_{split}.json", folder / f"captions_{split}.json"
        if instances.exists():
            return instances, captions, root / split
    raise SpatialLockError(f"{root}: no instances_{split}.json in it or in its annotations/ folder")


def folder_files(root: str | Path, split: str) -> tuple[Path, Path, Path]:
    """`split_files`, or the files of a folder `generate-dataset` wrote (root/instances.json, root/captions.json,
    images named relative to root), which has no splits."""
    root = Path(root)
    if (root / "instances.json").is_file() and not (root / f"instances_{split}.json").exists():
        return root / "instances.json", root / "captions.json", root
    return split_files(root, split)


def _summary(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in counts.items())


class LayoutDataset(torch.utils.data.Dataset):
    """Samples of (image, caption, labelled boxes) from a COCO instances file, a captions file and an image folder.

    Each sample is a dict: "pixel_values" (3, R, R) float in [-1, 1], "caption" str, "boxes" (n, 4) float
    xyxy normalised to [0, 1], "labels" list of n category names, "category_ids" (n,) long in 0..K-1
    (`category_index` maps COCO ids to these), "image_id" int. Objects are ordered largest first.

    Broken entries are skipped and counted in `skipped`, objects and images removed by the filters in
    `filtered`; both are reported once, when the dataset is built.

    Args:
        instances_file, captions_file, image_root: the COCO-format pair and the folder of its `file_name`s.
        resolution: output side; the shorter side is resized to it, then a square is cropped.
        min_area: smallest box area kept, as a fraction of the image (and, after cropping, of the square).
        min_objects, max_objects: images with fewer or more objects are left out (None: no upper limit).
        max_boxes: at most this many objects per image, the largest ones.
        random_crop: crop at a random place instead of the centre.
        flip_prob: probability of a horizontal flip.
        random_caption: pick one of the image's captions at random instead of the first.
        min_kept: a box that keeps less than this share of its area after cropping is dropped.
        max_images: keep only the first this many images after filtering (None: all of them).
        seed: seed of the per-sample randomness, which depends only on (seed, epoch, index).
    """

    def __init__(
        self,
        instances_file: str | Path,
        captions_file: str | Path,
        image_root: str | Path,
        *,
        resolution: int = 64,
        min_area: float = 0.0,
        min_objects: int = 1,
        max_objects: int | None = None,
        max_boxes: int = MAX_OBJECTS,
        random_crop: bool = False,
        flip_prob: float = 0.0,
        random_caption: bool = False,
        min_kept: float = 0.5,
        max_images: int | None = None,
        seed: int = 0,
    ):
        if resolution < 1 or seed < 0:
            raise SpatialLockError(f"resolution must be positive and seed 0 or more, got {resolution} and {seed}")
        instances = read_coco_json(instances_file, "instances")
        captions = read_coco_json(captions_file, "captions")
        filters = LayoutFilters(min_area, min_objects, max_objects, max_boxes)
        index: CocoIndex = build_index(instances, captions, image_root, filters)
        self.records: list[ImageRecord] = index.records[:max_images]
        self.categories: list[str] = [c["name"] for c in index.categories]
        self.category_index: dict[int, int] = {c["id"]: i for i, c in enumerate(index.categories)}
        self.skipped: dict[str, int] = index.skipped
        self.filtered: dict[str, int] = index.filtered
        self.resolution, self.min_area, self.min_kept = resolution, min_area, min_kept
        self.random_crop, self.flip_prob, self.random_caption = random_crop, flip_prob, random_caption
        self.seed, self.epoch = seed, 0
        name = os.path.basename(str(instances_file))
        if self.skipped:
            warnings.warn(f"{name}: skipped bad data: {_summary(self.skipped)}", stacklevel=2)
        logger.info("%s: %d images; filtered out: %s", name, len(self.records), _summary(self.filtered) or "nothing")

    @classmethod
    def from_split(cls, root: str | Path, split: str, **kwargs) -> LayoutDataset:
        """The dataset of one split of a folder in the synthetic or the COCO 2017 layout (see `split_files`)."""
        return cls(*split_files(root, split), **kwargs)

    def set_epoch(self, epoch: int) -> None:
        """Draw different crops, flips and captions in every epoch, reproducibly."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def load_image(self, i: int) -> Image.Image:
        """The RGB image of record `i`, whatever mode the file has (`read_rgb`)."""
        return read_rgb(self.records[i].path)

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} images")
        i %= len(self)
        for attempt in range(len(self.records)):
            j = (i + attempt) % len(self.records)
            try:
                image = self.load_image(j)
            except (OSError, ValueError) as err:  # unreadable or truncated file: use the next image instead
                self.skipped["unreadable_image"] = self.skipped.get("unreadable_image", 0) + 1
                warnings.warn(f"{self.records[j].path}: cannot read image ({err}); using the next one", stacklevel=2)
                continue
            return self._sample(j, image)
        raise SpatialLockError("no image of the dataset can be read")

    def _sample(self, i: int, image: Image.Image) -> dict:
        record = self.records[i]
        rng = np.random.default_rng([self.seed, self.epoch, i])
        flip = bool(self.flip_prob > 0 and rng.random() < self.flip_prob)
        plan = plan_crop(*image.size, self.resolution, rng if self.random_crop else None, flip)
        # boxes are in the recorded size; a file of another size scales them along
        sx, sy = image.size[0] / record.width, image.size[1] / record.height
        xywh = np.array([o.bbox for o in record.objects], dtype=np.float64).reshape(-1, 4)
        xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1) * [sx, sy, sx, sy]
        boxes, keep = apply_to_boxes(xyxy, image.size, plan, self.min_area, self.min_kept)
        objects = [o for o, k in zip(record.objects, keep) if k]
        caption = record.captions[int(rng.integers(len(record.captions))) if self.random_caption else 0]
        pixels = np.asarray(apply_to_image(image, plan), dtype=np.float32) / 127.5 - 1.0
        return {
            "pixel_values": torch.from_numpy(pixels).permute(2, 0, 1).contiguous(),
            "caption": swap_left_right(caption) if flip else caption,
            "boxes": torch.from_numpy(boxes[keep]).float().reshape(-1, 4),
            "labels": [self.categories[self.category_index[o.category_id]] for o in objects],
            "category_ids": torch.tensor([self.category_index[o.category_id] for o in objects], dtype=torch.long),
            "image_id": record.image_id,
        }


class MixedLayouts(torch.utils.data.Dataset):
    """A `LayoutDataset` with extra ones drawn in: the samples of the extra data sets get the first one's
    category indices (matched by COCO id; `check_categories` first), and `extra_share` of the items come from
    them (None: in proportion to their sizes, i.e. plain concatenation).

    With a share, the length is the smallest that holds every image of both sides at that share; the smaller
    side repeats. Index i < `main_items` is main image i mod len(main), the rest extra images in turn.
    """

    def __init__(self, main: LayoutDataset, extras: list[LayoutDataset], extra_share: float | None = None):
        if not extras:
            raise SpatialLockError("extra data: none given")
        self.main, self.extras = main, extras
        self.extra_records = [(k, i) for k, extra in enumerate(extras) for i in range(len(extra))]
        n_main, n_extra = len(main), len(self.extra_records)
        if extra_share is None:
            self.main_items, self.extra_items = n_main, n_extra
        else:
            if not 0.0 < extra_share < 1.0:
                raise SpatialLockError(f"extra share: must lie in (0, 1), got {extra_share}")
            total = max(math.ceil(n_main / (1 - extra_share)), math.ceil(n_extra / extra_share))
            self.main_items = max(n_main, round(total * (1 - extra_share)))
            self.extra_items = max(n_extra, total - self.main_items)
        self.categories, self.category_index = main.categories, main.category_index
        # per extra data set: its contiguous index -> the main one's
        self.remap = [
            torch.tensor([main.category_index[cid] for cid, _ in sorted(e.category_index.items(), key=lambda c: c[1])])
            for e in extras
        ]

    def set_epoch(self, epoch: int) -> None:
        for dataset in (self.main, *self.extras):
            dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return self.main_items + self.extra_items

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} items")
        if i < self.main_items:
            return self.main[i % len(self.main)]
        k, j = self.extra_records[(i - self.main_items) % len(self.extra_records)]
        sample = dict(self.extras[k][j])
        sample["category_ids"] = self.remap[k][sample["category_ids"]]
        return sample


def check_categories(main: LayoutDataset, extra: LayoutDataset, main_name: str, extra_name: str) -> None:
    """Refuse an extra data set whose categories are not the main one's: every COCO id it uses must name the
    same category there."""
    names = {cid: main.categories[i] for cid, i in main.category_index.items()}
    for cid, i in extra.category_index.items():
        name = extra.categories[i]
        if cid not in names:
            raise SpatialLockError(f"{extra_name}: category id {cid} ({name!r}) is not a category of {main_name}")
        if names[cid] != name:
            raise SpatialLockError(
                f"{extra_name}: category id {cid} is {name!r} there but {names[cid]!r} in {main_name}"
            )


def collate_layouts(samples: list[dict], max_boxes: int = MAX_OBJECTS) -> dict:
    """Batch samples, padding objects to `max_boxes` slots: padded boxes are 0, category -1, mask 0, phrase ""."""
    batch = len(samples)
    boxes = torch.zeros(batch, max_boxes, 4)
    masks = torch.zeros(batch, max_boxes)
    category_ids = torch.full((batch, max_boxes), -1, dtype=torch.long)
    phrases = [[""] * max_boxes for _ in samples]
    for b, sample in enumerate(samples):
        n = min(len(sample["labels"]), max_boxes)
        boxes[b, :n] = sample["boxes"][:n]
        masks[b, :n] = 1.0
        category_ids[b, :n] = sample["category_ids"][:n]
        phrases[b][:n] = sample["labels"][:n]
    return {
        "pixel_values": torch.stack([s["pixel_values"] for s in samples]),
        "captions": [s["caption"] for s in samples],
        "boxes": boxes,
        "masks": masks,
        "category_ids": category_ids,
        "phrases": phrases,
        "image_ids": [s["image_id"] for s in samples],
    }
