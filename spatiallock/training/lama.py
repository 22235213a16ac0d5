"""`spatiallock train lama`: the LAMA baseline (`spatiallock.baselines.lama`) on a COCO-format data set.

Trained as the authors' `train.py` (ZejianLi/LAMA): hinge losses, Adam with betas (0, 0.999), the discriminator
at 3x the generator's learning rate, horizontal flips, and alternating updates: each step updates the
discriminator on real images and detached generated ones, then the generator through the updated discriminator
on the same generated images. The generator is held for the first 31 steps of every epoch (the discriminator
alone learns there). The GN shares rho and the style MLP learn at 0.1x the generator's rate, the
discriminator's gates at 0.2x its own; every learning rate drops 10x at 60 % and again at 80 % of the run (the
authors' epochs 120 and 160 of 200).
"""

from __future__ import annotations

from collections.abc import Callable
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
GENERATOR_DELAY = 31  # the authors hold the generator while idx <= 30 of every epoch
LR_DROPS = (0.6, 0.8)  # the authors' epochs 120 and 160 of 200
# the authors' per-parameter learning rates: rho and the style MLP at 0.1x, the discriminator's gates at 0.2x
LR_SCALES = (("generator.*.rho", 0.1), ("generator.style_mapping.*", 0.1), ("discriminator.*.gate", 0.2))


@dataclass
class LamaTrainConfig:
    """Everything `train lama` needs; written to `<out>/train/config.json`."""

    data: str
    out: str
    split: str = "train"
    flip_prob: float = 0.5
    adaption: bool = True
    local_query: bool = True
    resolution: int = 64
    max_objects: int = 8
    channels: int = 16
    d_channels: int = 16
    alpha_lr_scale: float = 1.0  # the adaption strength learns at this times the generator's learning rate
    gate_lr_scale: float = 1.0  # ours, not the authors': every gate that starts at 0 learns this much faster
    generator_delay: int = GENERATOR_DELAY  # steps of every epoch in which the generator is held
    loop: LoopConfig = field(
        default_factory=lambda: LoopConfig(
            max_steps=3000, batch_size=32, learning_rate=1e-4, betas=(0.0, 0.999), max_grad_norm=0.0,
            model_lr_scales=(("discriminator", 3.0),), lr_scales=LR_SCALES, lr_milestones=(1800, 2400),
        )
    )  # fmt: skip


def gate_lr_scales(gate: float, alpha: float = 1.0) -> tuple[tuple[str, float], ...]:
    """The learning-rate factors in front of `LR_SCALES` for `gate_lr_scale` and `alpha_lr_scale`: every gate that
    starts at 0 (the generator's residual, ISLA, mask-generator and local-query gates; the discriminator's, which
    keep their 0.2) at `gate` times its rate, the adaption strength at `gate * alpha`."""
    scales = [("generator.adaption.alpha", gate * alpha)] if gate * alpha != 1.0 else []
    if gate != 1.0:
        scales += [("generator.*.gate", gate), ("discriminator.*.gate", 0.2 * gate)]
    return tuple(scales)


def lr_milestones(max_steps: int) -> tuple[int, ...]:
    """The steps at which the learning rates drop 10x: 60 % and 80 % of the run."""
    return tuple(round(f * max_steps) for f in LR_DROPS)


def generator_trains(step: int, steps_per_epoch: int, delay: int = GENERATOR_DELAY) -> bool:
    """Whether the generator is updated at (0-based) `step`: not in the first `delay` steps of an epoch."""
    return step % max(steps_per_epoch, 1) >= delay


def lama_step(
    generator,
    discriminator,
    batch: dict,
    rng: torch.Generator,
    optimizer: torch.optim.Optimizer,
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
    train_generator: bool = True,
) -> dict[str, torch.Tensor]:
    """One alternating step: the discriminator's update on real and (detached) generated images, then, when
    `train_generator`, the generator's through the updated discriminator on the same generated images.
    `optimizer` holds both players; each loss reaches only its own player's parameters. Returns the losses
    (their sum under "loss", the generator's 0 when it is held)."""
    labels, boxes, valid = batch["category_ids"], batch["boxes"], batch["masks"]
    noise = getattr(generator, "module", generator).noise(labels.shape[0], rng)
    fake, _, _ = generator(labels, boxes, valid, noise)
    optimizer.zero_grad(set_to_none=True)
    d = discriminator_loss(discriminator, batch["pixel_values"], fake, labels, boxes, valid)
    backward(d["loss"])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    parts = {k: v for k, v in d.items() if k != "loss"}
    g_loss = torch.zeros((), device=fake.device)
    if train_generator:
        g = generator_loss(discriminator, fake, labels, boxes, valid)
        backward(g["loss"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        g_loss = g["loss"].detach()
        parts.update({k: v for k, v in g.items() if k != "loss"})
    return {"loss": d["loss"].detach() + g_loss, "d_loss": d["loss"].detach(), "g_loss": g_loss, **parts}


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
        local_query=config.local_query,
    )  # fmt: skip
    models = {"generator": LamaGenerator(model_config), "discriminator": LamaDiscriminator(model_config)}
    run.record_config()
    device = run.accelerator.device
    steps_per_epoch = len(dataset) // (config.loop.batch_size * run.accelerator.num_processes)
    if steps_per_epoch <= config.generator_delay:
        raise SpatialLockError(
            f"--generator-delay: holding the generator for {config.generator_delay} steps of every epoch leaves it "
            f"none here ({len(dataset)} images at batch {config.loop.batch_size}: {steps_per_epoch} steps an "
            "epoch); pass a smaller one (0: never held)"
        )

    def update(prepared: dict, batch: dict, rng: torch.Generator, step: int, optimizer, backward):
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        train_generator = generator_trains(step, steps_per_epoch, config.generator_delay)
        return lama_step(
            prepared["generator"], prepared["discriminator"], batch, rng, optimizer, backward, train_generator
        )

    def collate(samples: list[dict]) -> dict:
        return collate_layouts(samples, max_boxes=config.max_objects)

    loop = config.loop
    extra = gate_lr_scales(config.gate_lr_scale, config.alpha_lr_scale)
    if extra:
        loop = replace(loop, lr_scales=(*extra, *loop.lr_scales))
    result = train_loop(
        accelerator=run.accelerator, stage=STAGE, folder=run.folder, models=models, dataset=dataset,
        collate_fn=collate, config=loop, update=update,
    )  # fmt: skip
    if not result.interrupted and run.accelerator.is_main_process:
        atomic_save_pretrained(result.models["generator"].eval(), run.out)
    run.accelerator.wait_for_everyone()
    return result
