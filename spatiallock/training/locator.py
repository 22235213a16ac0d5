"""`spatiallock train locator`: the location model (`spatiallock.location.locator`) on a shelves data set.

Two stages, one command each. Without `dpo`: maximum likelihood of the positive boxes (one drawn per example
and step), the removed-object images as the background. With `dpo` and `init_from` a locator of the first
stage: Direct Preference Optimization on pairs of a positive and a negative box of the same example, against a
frozen copy of `init_from` as the reference; `sft_weight` adds the positive's likelihood to keep the policy
near the data.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from spatiallock.checkpoint import atomic_save_pretrained
from spatiallock.errors import SpatialLockError
from spatiallock.location.locator import (
    Locator,
    LocatorConfig,
    PlacementDataset,
    Placements,
    collate_placements,
    dpo_loss,
    pick,
)
from spatiallock.training.common import start_training
from spatiallock.training.loop import LoopConfig, LoopResult, train_loop

STAGE = "locator"


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
        raise SpatialLockError(f"data: {path} not found")
    instances = json.loads(path.read_text())
    size = instances["images"][0]["width"] if instances.get("images") else 64
    return [c["name"] for c in instances["categories"]], int(size)


def train_locator(config: LocatorTrainConfig) -> LoopResult:
    """Train as configured; writes the locator folder at `config.out` when done (not when stopped)."""
    if config.dpo and not config.init_from:
        raise SpatialLockError("--dpo: needs --init-from, the positive-only locator it refines (and its reference)")
    if config.beta <= 0:
        raise SpatialLockError(f"--beta: must be above 0, got {config.beta}")
    placements = Placements.read(config.data, config.split)
    if not placements.entries:
        raise SpatialLockError(f"data: {config.data} has no {config.split} placements to train on")
    if config.init_from:
        model = Locator.from_pretrained(config.init_from).train()
    else:
        labels, size = data_labels(config.data)
        torch.manual_seed(config.loop.seed)
        table = label_table(labels)
        model = Locator(
            LocatorConfig(labels=labels, label_dim=table.shape[1], bins=config.bins, image_size=size, dim=config.dim,
                          layers=config.layers),
            table,
        )  # fmt: skip
    unknown = sorted({e["label"] for e in placements.entries} - set(model.config.labels))
    if unknown:
        raise SpatialLockError(f"data: labels the locator does not know: {', '.join(unknown)}")
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
