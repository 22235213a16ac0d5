"""`spatiallock train lama`: the LAMA baseline (`spatiallock.baselines.lama`) on a COCO-format data set.

Adversarial training as the paper's (hinge losses, Adam with betas (0, 0.999), the discriminator at 3x the
generator's learning rate, horizontal flips), with both players updated at every step on the same batch: the
discriminator on real images and detached generated ones, the generator through the discriminator with the
discriminator's parameters out of its graph, so each loss moves only its own player's parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from spatiallock.baselines.lama import (
    LamaConfig,
    LamaDiscriminator,
    LamaGenerator,
    discriminator_loss,
    generator_loss,
)
from spatiallock.checkpoint import atomic_save_pretrained
from spatiallock.data.coco import collate_layouts
from spatiallock.errors import SpatialLockError
from spatiallock.training.common import start_training
from spatiallock.training.loop import LoopConfig, LoopResult, train_loop

STAGE = "lama"


@dataclass
class LamaTrainConfig:
    """Everything `train lama` needs; written to `<out>/train/config.json`."""

    data: str
    out: str
    split: str = "train"
    flip_prob: float = 0.5
    adaption: bool = True
    resolution: int = 64
    max_objects: int = 8
    channels: int = 16
    d_channels: int = 16
    alpha_lr_scale: float = 1.0  # the adaption strength learns at this times the generator's learning rate
    loop: LoopConfig = field(
        default_factory=lambda: LoopConfig(
            max_steps=3000, batch_size=32, learning_rate=1e-4, betas=(0.0, 0.999), max_grad_norm=0.0,
            model_lr_scales=(("discriminator", 3.0),),
        )
    )  # fmt: skip


def lama_losses(generator, discriminator, batch: dict, rng: torch.Generator) -> dict[str, torch.Tensor]:
    """One step's losses: the discriminator's and the generator's, summed under "loss" (each reaches only its own
    player's parameters), with their parts."""
    labels, boxes, valid = batch["category_ids"], batch["boxes"], batch["masks"]
    noise = getattr(generator, "module", generator).noise(labels.shape[0], rng)
    fake, _, _ = generator(labels, boxes, valid, noise)
    d = discriminator_loss(discriminator, batch["pixel_values"], fake, labels, boxes, valid)
    g = generator_loss(discriminator, fake, labels, boxes, valid)
    parts = {k: v for k, v in {**d, **g}.items() if k != "loss"}
    return {"loss": d["loss"] + g["loss"], "d_loss": d["loss"].detach(), "g_loss": g["loss"].detach(), **parts}


def train_lama(config: LamaTrainConfig) -> LoopResult:
    """Train as configured; writes the generator folder at `config.out` when done (not when stopped)."""
    run = start_training(config, (STAGE,), config.loop.resume)
    dataset = run.layout_data(config.resolution, config.loop.seed, max_boxes=config.max_objects)
    if len(dataset) == 0:
        raise SpatialLockError(f"data: {config.data} has no {config.split} images to train on")
    torch.manual_seed(config.loop.seed)
    model_config = LamaConfig(
        categories=list(dataset.categories), image_size=config.resolution, max_objects=config.max_objects,
        channels=config.channels, d_channels=config.d_channels, adaption=config.adaption,
    )  # fmt: skip
    models = {"generator": LamaGenerator(model_config), "discriminator": LamaDiscriminator(model_config)}
    run.record_config()
    device = run.accelerator.device

    def losses(prepared: dict, batch: dict, rng: torch.Generator) -> dict[str, torch.Tensor]:
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        return lama_losses(prepared["generator"], prepared["discriminator"], batch, rng)

    def collate(samples: list[dict]) -> dict:
        return collate_layouts(samples, max_boxes=config.max_objects)

    loop = config.loop
    if config.alpha_lr_scale != 1.0:
        loop = replace(loop, lr_scales=(*loop.lr_scales, ("adaption.alpha", config.alpha_lr_scale)))
    result = train_loop(
        accelerator=run.accelerator, stage=STAGE, folder=run.folder, models=models, dataset=dataset,
        collate_fn=collate, compute_losses=losses, config=loop,
    )  # fmt: skip
    if not result.interrupted and run.accelerator.is_main_process:
        atomic_save_pretrained(result.models["generator"].eval(), run.out)
    run.accelerator.wait_for_everyone()
    return result
