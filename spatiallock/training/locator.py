"""`spatiallock train locator`: the location model (`spatiallock.location.locator`) on a shelves data set.

Two stages, one command each. Without `dpo`: maximum likelihood of the positive boxes (one drawn per example
and step), the removed-object images as the background. With `dpo` and `init_from` a locator of the first
stage: Direct Preference Optimization on pairs of a positive and a negative box of the same example, against a
frozen copy of `init_from` as the reference; `sft_weight` adds the positive's likelihood to keep the policy
near the data. Everything a run reads (the split's placements and their images, the instances file, and the
split it is scored on) is checked before anything is written; `plausibility` is that score.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from spatiallock.checkpoint import atomic_save_pretrained
from spatiallock.errors import SpatialLockError
from spatiallock.files import read_rgb
from spatiallock.location.locator import (
    SHELVES_HINT,
    Locator,
    LocatorConfig,
    Placements,
    dpo_loss,
    held_out,
    load_background,
    read_instances,
)
from spatiallock.training.common import start_training
from spatiallock.training.loop import LoopConfig, LoopResult, train_loop

STAGE = "locator"
MAX_IMAGE_SIZE = 1024  # the largest image side a new locator reads at (`data synth --size` goes up to it)


@dataclass
class LocatorTrainConfig:
    """Everything `train locator` needs; written to `<out>/train/config.json`."""

    data: str
    out: str
    split: str = "train"
    dpo: bool = False
    init_from: str | None = None
    beta: float = 0.1
    sft_weight: float = 0.0
    bins: int = 64
    dim: int = 128
    layers: int = 3
    loop: LoopConfig = field(
        default_factory=lambda: LoopConfig(
            max_steps=3000, batch_size=32, learning_rate=3e-4, warmup_steps=100, weight_decay=0.01
        )
    )


def label_table(labels: list[str]) -> torch.Tensor:
    """The project's text encoder's embeddings of `labels` (n, 384)."""
    from spatiallock.base.text import encode_phrases, load_minilm

    encoder, tokenizer = load_minilm()
    return encode_phrases(encoder, tokenizer, labels).float()


def data_labels(data: str) -> tuple[list[str], int]:
    """The category names of a shelves data set's instances file (its category order) and its image size."""
    path = Path(data) / "instances_train.json"
    if not path.is_file():
        raise SpatialLockError(f"data: {path} not found ({SHELVES_HINT})")
    instances = read_instances(data, "train")
    size = instances["images"][0]["width"] if instances["images"] else 64
    if size > MAX_IMAGE_SIZE:
        raise SpatialLockError(
            f"{path}: images[0].width: {size} px; a locator reads images of at most {MAX_IMAGE_SIZE}"
        )
    return [c["name"] for c in instances["categories"]], size


def train_locator(config: LocatorTrainConfig, eval_split: str | None = None) -> LoopResult:
    """Train as configured; writes the locator folder at `config.out` when done (not when stopped). The data, and
    `eval_split` when the data set has its placements (the result is scored on it after training), are checked
    first: a fault is a `SpatialLockError` before anything is written."""
    if config.dpo and not config.init_from:
        raise SpatialLockError("--dpo: needs --init-from, the positive-only locator it refines (and its reference)")
    if config.beta <= 0:
        raise SpatialLockError(f"--beta: must be above 0, got {config.beta}")
    if config.init_from:
        model = Locator.from_pretrained(config.init_from).train()
        labels, known = model.config.labels, f"a class of the locator {config.init_from}"
    else:
        labels, size = data_labels(config.data)
        known = f"a category of {Path(config.data) / 'instances_train.json'}"
    placements = Placements.read(config.data, config.split, labels, known)
    if not placements.entries:
        raise SpatialLockError(f"data: {config.data} has no {config.split} placements to train on")
    if eval_split and (Path(config.data) / f"placements_{eval_split}.json").is_file():
        held_out(config.data, eval_split, labels=labels, known=known)
    if not config.init_from:
        torch.manual_seed(config.loop.seed)
        table = label_table(labels)
        model = Locator(
            LocatorConfig(labels=labels, label_dim=table.shape[1], bins=config.bins, image_size=size, dim=config.dim,
                          layers=config.layers),
            table,
        )  # fmt: skip
    run = start_training(config, (STAGE,), config.loop.resume)
    device = run.accelerator.device
    model = model.to(device)
    reference = None
    if config.dpo:
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    dataset = PlacementDataset(placements, model.config.labels, model.config.image_size)
    run.record_config()

    def losses(models: dict, batch: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
        policy = models[STAGE]  # called, not its methods: forward is `log_prob`, and DDP wraps forward
        images, labels = batch["pixel_values"].to(device), batch["label"].to(device)
        positive = pick(batch["positives"], batch["n_positives"], generator).to(device)
        if reference is None:
            nll = -policy(images, labels, positive)
            return {"loss": nll.mean() / 4, "nll": nll.mean().detach()}
        negative = pick(batch["negatives"], batch["n_negatives"], generator).to(device)
        pair = (torch.cat([images, images]), torch.cat([labels, labels]), torch.cat([positive, negative]))
        chosen, rejected = policy(*pair).chunk(2)
        with torch.no_grad():
            ref_chosen, ref_rejected = reference(*pair).chunk(2)
        loss = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, config.beta)
        parts = {"dpo": loss.detach(), "margin": ((chosen - ref_chosen) - (rejected - ref_rejected)).mean().detach()}
        if config.sft_weight:
            loss = loss - config.sft_weight * chosen.mean() / 4
        return {"loss": loss, **parts}

    result = train_loop(
        accelerator=run.accelerator, stage=STAGE, folder=run.folder, models={STAGE: model}, dataset=dataset,
        collate_fn=collate_placements, compute_losses=losses, config=config.loop,
    )  # fmt: skip
    if not result.interrupted and run.accelerator.is_main_process:
        atomic_save_pretrained(result.models[STAGE].eval(), run.out)
    run.accelerator.wait_for_everyone()
    return result


class PlacementDataset(torch.utils.data.Dataset):
    """Training examples of a locator: pixels (3, S, S) in [-1, 1], label index, positives and negatives padded
    to `slots` with counts."""

    def __init__(self, placements: Placements, labels: Sequence[str], image_size: int, slots: int = 8):
        self.placements, self.image_size, self.slots = placements, image_size, slots
        self.index = {name: i for i, name in enumerate(labels)}

    def __len__(self) -> int:
        return len(self.placements.entries)

    def __getitem__(self, i: int) -> dict:
        from PIL import Image

        entry = self.placements.entries[i]
        image = read_rgb(self.placements.paths[i])
        if image.size != (self.image_size, self.image_size):
            image = image.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1

        def padded(boxes: list) -> tuple[torch.Tensor, int]:
            boxes = boxes[: self.slots]
            out = torch.zeros(self.slots, 4)
            out[: len(boxes)] = torch.tensor(boxes, dtype=torch.float32)
            return out, len(boxes)

        positives, n_pos = padded(entry["positives"])
        negatives, n_neg = padded(entry["negatives"])
        return {
            "pixel_values": pixels, "label": self.index[entry["label"]], "positives": positives,
            "negatives": negatives, "n_positives": n_pos, "n_negatives": n_neg,
        }  # fmt: skip


def collate_placements(items: list[dict]) -> dict:
    return {key: torch.stack([torch.as_tensor(item[key]) for item in items]) for key in items[0]}


def pick(boxes: torch.Tensor, counts: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One of the first `counts[i]` boxes of each row of `boxes` (B, slots, 4), drawn with `generator`."""
    draw = torch.rand(counts.shape[0], generator=generator, device=generator.device).to(counts.device)
    index = (draw * counts).long().clamp(max=counts - 1)
    return boxes[torch.arange(boxes.shape[0]), index]


@torch.no_grad()
def plausibility(
    locator: Locator, data: str | os.PathLike, split: str = "val", samples: int = 10, seed: int = 0,
    limit: int | None = None, batch_size: int = 64,
) -> dict:  # fmt: skip
    """How often the locator's boxes keep the shelves rules on a split's held-out scenes (the object removed):
    `top1_plausible`, the share of scenes whose most likely of `samples` sampled boxes is plausible;
    `plausible_rate`, the share of all sampled boxes that are; `scenes`."""
    from spatiallock.data.shelves import plausible

    folder = Path(data)
    placements, scenes = held_out(folder, split, limit, locator.config.labels, "a class of this locator")
    generator = torch.Generator().manual_seed(seed)
    top, good, total = 0, 0, 0
    for start in range(0, len(placements), batch_size):
        chunk = placements[start : start + batch_size]
        pixels = torch.stack([load_background(folder / e["file_name"], locator.config.image_size) for e in chunk])
        pixels = pixels.to(locator.device)
        labels = locator.label_index([e["label"] for e in chunk])
        drawn = [locator.sample(pixels, labels, generator) for _ in range(samples)]
        boxes = torch.stack([b for b, _ in drawn], dim=1)  # (B, samples, 4)
        scores = torch.stack([s for _, s in drawn], dim=1)
        for i, (entry, scene) in enumerate(zip(chunk, scenes[start : start + batch_size])):
            ok = [plausible(scene, box.tolist(), entry["label"]) for box in boxes[i]]
            good += sum(ok)
            total += len(ok)
            top += ok[int(scores[i].argmax())]
    scenes = len(placements)
    return {"top1_plausible": top / max(scenes, 1), "plausible_rate": good / max(total, 1), "scenes": scenes}
