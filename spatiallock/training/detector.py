"""`spatiallock train detector`: detectors of the synthetic domain, trained from scratch on its real images, with
generated data sets added when asked (`extra_data`).

The shipped FCOS's AP on the real validation images is the ceiling beside which the generated images' AP is
reported, and its pooled features give the Frechet distance of the synthetic domain (see `evaluation.detector`).
`benchmarks/augmentation.py` trains the other architectures with and without generated data.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from spatiallock.checkpoint import atomic_save_pretrained
from spatiallock.data.coco import (
    LayoutDataset,
    MixedLayouts,
    check_categories,
    collate_layouts,
    folder_files,
    split_files,
)
from spatiallock.errors import SpatialLockError
from spatiallock.evaluation.detector import ARCHS, Detector, DetectorConfig, evaluate_detector
from spatiallock.files import write_text_atomic
from spatiallock.training.common import start_training
from spatiallock.training.loop import LoopConfig, LoopResult, train_loop

STAGE = "detector"
EVAL_NAME = "eval.json"


@dataclass
class DetectorTrainConfig:
    """Everything `train detector` needs; written to `<out>/train/config.json`.

    `arch`, `channels`, `fpn_channels`, `head_convs`: the architecture (see `DetectorConfig`); `image_size`: the
    side images are trained and detected at (the data's native size is cheapest and loses nothing).
    `max_train_samples`: only the first N images of the split (None: all). `extra_data`: folders whose images are
    added to them (a `generate-dataset` folder, or another data folder's same split); `extra_share`: the share
    of training samples drawn from those (None: in proportion to the image counts).
    """

    data: str
    out: str
    split: str = "train"
    arch: str = "fcos"
    max_train_samples: int | None = None
    extra_data: tuple[str, ...] = ()
    extra_share: float | None = None
    image_size: int = 64
    flip_prob: float = 0.5
    channels: tuple[int, ...] = (16, 32, 64, 96, 128)
    fpn_channels: int = 64
    head_convs: int = 2
    loop: LoopConfig = field(
        default_factory=lambda: LoopConfig(
            max_steps=5000, batch_size=16, learning_rate=1.5e-3, warmup_steps=200, weight_decay=1e-4, ema_decay=0.998
        )
    )


def _targets(batch: dict, size: int, device: torch.device) -> list[dict]:
    """Per image: boxes in pixels of the `size` training images, contiguous labels; padded slots dropped."""
    targets = []
    for boxes, labels, mask in zip(batch["boxes"], batch["category_ids"], batch["masks"]):
        boxes, labels = boxes[mask > 0] * size, labels[mask > 0]
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        targets.append({"boxes": boxes[keep].to(device), "labels": labels[keep].to(device)})
    return targets


def training_data(config: DetectorTrainConfig, seed: int) -> LayoutDataset | MixedLayouts:
    """The split of `config.data` (its first `max_train_samples` images), with `extra_data` drawn in."""
    options = dict(resolution=config.image_size, flip_prob=config.flip_prob, seed=seed)
    main = LayoutDataset.from_split(config.data, config.split, max_images=config.max_train_samples, **options)
    if not len(main):
        raise SpatialLockError(f"data: {config.data} has no {config.split} images to train on")
    if not config.extra_data:
        return main
    extras = []
    for folder in config.extra_data:
        try:
            extra = LayoutDataset(*folder_files(folder, config.split), **options)
        except SpatialLockError as err:
            raise SpatialLockError(f"--extra-data: {err}") from None
        check_categories(main, extra, str(config.data), f"--extra-data: {folder}")
        if not len(extra):
            raise SpatialLockError(f"--extra-data: {folder} has no images")
        extras.append(extra)
    return MixedLayouts(main, extras, config.extra_share)


def train_detector(config: DetectorTrainConfig) -> LoopResult:
    """Train the detector as configured; writes the detector folder at `config.out` when done (not when stopped)."""
    if config.arch not in ARCHS:
        raise SpatialLockError(f"arch: must be one of {', '.join(ARCHS)}, got {config.arch!r}")
    if config.extra_share is not None and not config.extra_data:
        raise SpatialLockError("extra share: needs --extra-data")
    if config.image_size < 32:
        raise SpatialLockError(f"image size: must be at least 32, got {config.image_size}")
    if not 0.0 <= config.flip_prob <= 1.0:
        raise SpatialLockError(f"flip prob: must lie in [0, 1], got {config.flip_prob}")
    if not 0.0 <= config.loop.ema_decay < 1.0:
        raise SpatialLockError(f"EMA decay: must lie in [0, 1), got {config.loop.ema_decay}")
    run = start_training(config, (STAGE,), config.loop.resume)
    accelerator = run.accelerator
    device = accelerator.device
    dataset = training_data(config, config.loop.seed)
    categories = [{"id": cid, "name": dataset.categories[i]} for cid, i in dataset.category_index.items()]
    categories.sort(key=lambda c: dataset.category_index[c["id"]])
    torch.manual_seed(config.loop.seed)
    detector = Detector(
        DetectorConfig(
            categories=categories, arch=config.arch, image_size=config.image_size, channels=config.channels,
            fpn_channels=config.fpn_channels, head_convs=config.head_convs,
        )
    ).to(device)  # fmt: skip
    run.record_config()

    def losses(models: dict, batch: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
        images = list(((batch["pixel_values"] + 1.0) / 2.0).clamp(0.0, 1.0).to(device))
        parts = models[STAGE](images, _targets(batch, config.image_size, device))
        return {"loss": sum(parts.values()), **parts}

    result = train_loop(
        accelerator=accelerator, stage=STAGE, folder=run.folder, models={STAGE: detector}, dataset=dataset,
        collate_fn=collate_layouts, compute_losses=losses, config=config.loop,
    )  # fmt: skip
    if not result.interrupted and accelerator.is_main_process:
        atomic_save_pretrained(result.models[STAGE].eval(), run.out)
    accelerator.wait_for_everyone()
    return result


def evaluate_and_record(out: str | os.PathLike, data: str | os.PathLike, split: str = "val", **extra) -> dict | None:
    """AP of the detector folder `out` on a split's real images, written to `out/eval.json` with `extra`.

    Returns the metrics, or None when the data folder has no such split.
    """
    try:
        split_files(data, split)
    except SpatialLockError:
        return None
    metrics = evaluate_detector(Detector.from_pretrained(out), data, split)
    record = {**metrics, "data": str(data), "split": split, **extra}
    write_text_atomic(Path(out) / EVAL_NAME, json.dumps(record, indent=2) + "\n")
    return metrics
