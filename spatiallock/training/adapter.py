"""`spatiallock train adapter`: train a SpatialLock (or GLIGEN-style) adapter on a frozen base.

The base is the project's small base or a Stable Diffusion v1.x folder / hub id; only the adapter is
trained, goes through `accelerator.prepare` and is saved. Data: any COCO-format layout folder.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from spatiallock.base import BaseModel, load_base
from spatiallock.checkpoint import atomic_save_pretrained, list_checkpoints
from spatiallock.data.coco import LayoutDataset, collate_layouts
from spatiallock.errors import SpatialLockError
from spatiallock.models.adapter import SpatialLockAdapter
from spatiallock.models.grounding import GATES, MAX_OBJECTS
from spatiallock.text import PhraseCache, encode_captions, phrase_dim
from spatiallock.training.loop import LoopConfig, LoopResult, make_accelerator, train_loop

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class AdapterTrainConfig:
    """Everything `train adapter` needs; written to `<out>/train/config.json`."""

    base: str
    data: str
    out: str
    variant: str = "spatiallock"
    positions: str | None = None
    loss_weights: tuple[float, float] | None = None  # None: learned (uncertainty) weights
    resolution: int | None = None  # None: the base's native size
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    caption_dropout: float = 0.1
    layout_dropout: float = 0.1
    flip_prob: float = 0.5
    timestep_sampling: str = "uniform"
    query_positions: bool = False
    box_attention: bool = False
    gate_lr_scale: float = 1.0  # the zero-initialised gates learn at this multiple of the learning rate
    max_objects: int = MAX_OBJECTS
    split: str = "train"
    max_train_samples: int | None = None  # None: the whole split; N: its first N images
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(max_steps=1000, batch_size=16, learning_rate=1e-4))


def latents_of(base: BaseModel, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Images in [-1, 1] -> scaled latents, sampled from the autoencoder's posterior."""
    with torch.no_grad():
        posterior = base.vae.encode(pixels).latent_dist
        return posterior.sample(generator=generator) * base.vae.config.scaling_factor


TIMESTEP_SAMPLING = ("uniform", "cubic")


def noisy_inputs(scheduler, latents: torch.Tensor, generator: torch.Generator, sampling: str = "uniform"):
    """(noisy latents, timesteps, diffusion target) for epsilon or v-prediction.

    `sampling`: "uniform" timesteps, or "cubic": t = (1 - u^3) T with u uniform, which favours the noisy early
    steps where a layout decides where objects go (T2I-Adapter's non-uniform sampling for spatial control).
    """
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    total = scheduler.config.num_train_timesteps
    if sampling == "cubic":
        u = torch.rand(latents.shape[0], generator=generator, device=latents.device)
        steps = ((1 - u**3) * total).long().clamp(0, total - 1)
    else:
        steps = torch.randint(0, total, (latents.shape[0],), generator=generator, device=latents.device)
    noisy = scheduler.add_noise(latents, noise, steps)
    if scheduler.config.prediction_type == "v_prediction":
        return noisy, steps, scheduler.get_velocity(latents, noise, steps)
    return noisy, steps, noise


def drop(items: list, probability: float, generator: torch.Generator, empty):
    """Replace each item by `empty` with `probability` (classifier-free guidance needs unconditional steps)."""
    keep = torch.rand(len(items), generator=generator, device=generator.device) >= probability
    return [item if k else empty for item, k in zip(items, keep.tolist())], keep


def native_resolution(base: BaseModel) -> int:
    factor = 2 ** (len(base.vae.config.block_out_channels) - 1)
    return base.unet.config.sample_size * factor


def train_adapter(config: AdapterTrainConfig) -> LoopResult:
    """Train an adapter as configured; writes the adapter folder at `config.out` when done."""
    out = Path(config.out)
    folder = out / "train"
    if config.timestep_sampling not in TIMESTEP_SAMPLING:
        raise SpatialLockError(
            f"timestep sampling: one of {', '.join(TIMESTEP_SAMPLING)}, got {config.timestep_sampling!r}"
        )
    if list_checkpoints(folder / "checkpoints" / "adapter") and not config.loop.resume:
        raise SpatialLockError(f"out: {out} already holds checkpoints; pass --resume to continue or choose another")
    accelerator = make_accelerator(config.mixed_precision)
    dtype = DTYPES[config.mixed_precision]
    base = load_base(config.base, dtype)  # the frozen base in the training precision, loaded as such
    resolution = config.resolution or native_resolution(base)
    dataset = LayoutDataset.from_split(
        config.data, config.split, resolution=resolution, flip_prob=config.flip_prob, random_caption=True,
        max_boxes=config.max_objects, max_images=config.max_train_samples, seed=config.loop.seed,
    )  # fmt: skip
    torch.manual_seed(config.loop.seed)
    weights = {} if config.loss_weights is None else {"loss_weighting": "fixed", "loss_weights": config.loss_weights}
    for option in ("query_positions", "box_attention"):
        if getattr(config, option):
            weights[option] = True
    adapter = SpatialLockAdapter.from_unet(
        base.unet, config.variant, config.positions, phrase_dim(base.text_encoder), len(dataset.categories), **weights
    )
    adapter.attach(base.unet)
    if config.gradient_checkpointing:
        base.unet.enable_gradient_checkpointing()
    base.to(accelerator.device)
    phrases = PhraseCache(base.text_encoder, base.tokenizer)
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")

    def compute_losses(models: dict, batch: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
        device = accelerator.device
        latents = latents_of(base, batch["pixel_values"].to(device, dtype), generator)
        captions, _ = drop(batch["captions"], config.caption_dropout, generator, "")
        states, caption_mask = encode_captions(base.text_encoder, base.tokenizer, captions, base.caption_tokens)
        phrase_embeds, _ = phrases(batch["phrases"], config.max_objects)
        objects = batch["masks"].to(device)
        _, keep_layout = drop(batch["captions"], config.layout_dropout, generator, None)
        grounding = objects * keep_layout.to(device, objects.dtype)[:, None]
        noisy, steps, target = noisy_inputs(base.scheduler, latents, generator, config.timestep_sampling)
        output = models["adapter"](
            base.unet, noisy, steps, states, phrase_embeds, batch["boxes"].to(device, dtype), grounding,
            labels=batch["category_ids"].to(device),
            encoder_attention_mask=caption_mask if base.uses_caption_mask else None,
            target=target, object_masks=objects,
        )  # fmt: skip
        return {"loss": output.loss, **output.losses}

    def log_extra() -> dict:
        return {"weights": adapter.weighting.weights()}

    result = train_loop(
        accelerator=accelerator, stage="adapter", folder=folder, models={"adapter": adapter}, dataset=dataset,
        collate_fn=lambda samples: collate_layouts(samples, config.max_objects), compute_losses=compute_losses,
        config=replace(config.loop, lr_scales=tuple((name, config.gate_lr_scale) for name in GATES)),
        log_extra=log_extra,
    )  # fmt: skip
    if not result.interrupted and accelerator.is_main_process:
        atomic_save_pretrained(accelerator.unwrap_model(adapter), out)
    accelerator.wait_for_everyone()
    return result
