"""`spatiallock train adapter`: train a SpatialLock (or GLIGEN-style) adapter on a frozen base.

The base is the project's small base or a Stable Diffusion v1.x or SDXL folder / hub id; only the adapter is
trained, goes through `accelerator.prepare` and is saved. Data: any COCO-format layout folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from spatiallock.base.folders import BaseModel, load_base
from spatiallock.base.latents import image_factor
from spatiallock.base.text import PhraseCache, phrase_dim
from spatiallock.checkpoint import atomic_save_pretrained
from spatiallock.data.coco import collate_layouts
from spatiallock.errors import SpatialLockError, first_line
from spatiallock.evaluation.reward import DetectionReward, ImageJudge
from spatiallock.models.adapter import SpatialLockAdapter
from spatiallock.models.grounding import GATES
from spatiallock.training.common import drop, latents_of, noisy_inputs, start_training
from spatiallock.training.loop import LoopConfig, LoopResult, train_loop
from spatiallock.training.recipe import MIXED_PRECISION, AdapterRecipe

DTYPES = dict(zip(MIXED_PRECISION, (torch.float32, torch.float16, torch.bfloat16)))


@dataclass(kw_only=True)
class AdapterTrainConfig(AdapterRecipe):
    """Everything `train adapter` needs: the recipe (`AdapterRecipe`), the folders and the loop; written to
    `<out>/train/config.json`, each recipe setting under its own name."""

    base: str
    data: str
    out: str
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(max_steps=1000, batch_size=16, learning_rate=1e-4))


def drop_conditions(
    captions: list[str], masks: torch.Tensor, caption_dropout: float, layout_dropout: float, generator: torch.Generator
) -> tuple[list[str], torch.Tensor]:
    """Classifier-free guidance dropout of one batch: each caption becomes "" with `caption_dropout` and,
    independently, each whole layout is hidden with `layout_dropout`.

    `masks`: (B, N) slot masks of the real objects. Returns the captions and the grounding masks the adapter
    sees, (B, N): those of a hidden layout all 0.
    """
    captions, _ = drop(captions, caption_dropout, generator, "")
    _, keep_layout = drop(captions, layout_dropout, generator, None)
    return captions, masks * keep_layout.to(masks.device, masks.dtype)[:, None]


def adapter_weights_file(source: str) -> Path:
    """The weights of `source`'s adapter (`default`, a model folder with adapter/, or an adapter folder)."""
    from spatiallock.shipped import resolve_model

    folder = Path(resolve_model(source) if source == "default" else source)
    files = [
        folder / "adapter" / "diffusion_pytorch_model.safetensors",
        folder / "diffusion_pytorch_model.safetensors",
    ]
    found = [f for f in files if f.is_file()]
    if not found:
        raise SpatialLockError(
            f"init-from: {source} holds no adapter weights (adapter/diffusion_pytorch_model.safetensors)"
        )
    return found[0]


def warm_start(adapter: SpatialLockAdapter, source: str) -> tuple[int, int]:
    """Copy into `adapter` every weight of `source`'s adapter (see `adapter_weights_file`) with the same name and
    shape; the rest keep their fresh values (a lean block simply has no feed-forward to take). Returns (tensors
    taken, tensors left fresh). A checkpoint of `--resume` replaces both."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = adapter_weights_file(source)
    try:
        weights = load_file(path)
    except (OSError, SafetensorError) as err:
        raise SpatialLockError(f"init-from: cannot read {path}: {first_line(err)}") from None
    own = adapter.state_dict()
    taken = {k: v for k, v in weights.items() if k in own and own[k].shape == v.shape}
    if not taken:
        raise SpatialLockError(f"init-from: no weight of {path} fits this adapter (another base or variant?)")
    with torch.no_grad():
        for name, value in taken.items():
            own[name].copy_(value)
    return len(taken), len(own) - len(taken)


def load_reward(config: AdapterTrainConfig, class_names: list[str], device) -> DetectionReward | None:
    """The frozen image-only reward of `--reward-detector` for data of `class_names`, or None; refusals in one
    line naming the option."""
    if config.reward_detector is None:
        return None
    from spatiallock.shipped import resolve_judge

    try:
        judge = ImageJudge.from_pretrained(resolve_judge(config.reward_detector), device)
    except SpatialLockError as err:
        raise SpatialLockError(f"--reward-detector: {str(err).partition(': ')[2]}") from None
    return DetectionReward(judge, judge.class_map(class_names, "--reward-detector"), config.reward_timesteps)


def native_resolution(base: BaseModel) -> int:
    return base.unet.config.sample_size * image_factor(base.vae, base.unet)


def train_adapter(config: AdapterTrainConfig) -> LoopResult:
    """Train an adapter as configured; writes the adapter folder at `config.out` when done."""
    config.check()
    if config.init_from:
        adapter_weights_file(config.init_from)  # before any work
    run = start_training(config, ("adapter",), config.loop.resume, config.mixed_precision)
    accelerator = run.accelerator
    dtype = DTYPES[config.mixed_precision]
    base = load_base(config.base, dtype)  # the frozen base in the training precision, loaded as such
    resolution = config.resolution or native_resolution(base)
    dataset = run.layout_data(
        resolution, config.loop.seed, random_caption=True,
        max_boxes=config.max_objects, max_images=config.max_train_samples,
    )  # fmt: skip
    torch.manual_seed(config.loop.seed)
    options = config.adapter_options(dataset.categories)
    adapter = SpatialLockAdapter.from_unet(
        base.unet, config.variant, config.positions, phrase_dim(base.text_encoder), len(dataset.categories), **options
    )
    if config.init_from:
        taken, left = warm_start(adapter, config.init_from)
        print(f"init-from {config.init_from}: {taken} tensors taken, {left} of this adapter's start fresh")
    adapter.attach(base.unet)
    if config.gradient_checkpointing:
        base.unet.enable_gradient_checkpointing()
    base.to(accelerator.device)
    reward = load_reward(config, dataset.categories, accelerator.device)
    phrases = PhraseCache(base.text_encoder, base.tokenizer)
    run.record_config()

    def compute_losses(models: dict, batch: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
        device = accelerator.device
        latents = latents_of(base, batch["pixel_values"].to(device, dtype), generator)
        objects = batch["masks"].to(device)
        captions, grounding = drop_conditions(
            batch["captions"], objects, config.caption_dropout, config.layout_dropout, generator
        )
        # a dropped caption is what sampling's unconditional rows get (SDXL: zeros)
        states, caption_mask, added = base.text_conditioning.dropped(base, captions, (resolution, resolution))
        phrase_embeds, _ = phrases(batch["phrases"], config.max_objects)
        noisy, steps, target = noisy_inputs(base.scheduler, latents, generator, config.timestep_sampling)
        output = models["adapter"](
            base.unet, noisy, steps, states, phrase_embeds, batch["boxes"].to(device, dtype), grounding,
            labels=batch["category_ids"].to(device),
            encoder_attention_mask=caption_mask, added_cond_kwargs=added, target=target, object_masks=objects,
            perception_rows=None if config.perception_timesteps is None else steps < config.perception_timesteps,
            scheduler=base.scheduler,
        )  # fmt: skip
        losses = {"loss": output.loss, **output.losses}
        if reward is not None:  # only the images whose layout the adapter was told
            told = grounding.sum(dim=1) > 0
            losses["reward"] = reward(
                base.vae, base.scheduler, noisy[told], steps[told], output.sample[told], batch["boxes"][told.cpu()],
                batch["category_ids"][told.cpu()], objects[told], patch=base.latent_patch,
            )  # fmt: skip
            losses["loss"] = losses["loss"] + config.reward_weight * losses["reward"]
        return losses

    def log_extra() -> dict:
        return {"weights": adapter.weighting.weights()}

    result = train_loop(
        accelerator=accelerator, stage="adapter", folder=run.folder, models={"adapter": adapter}, dataset=dataset,
        collate_fn=lambda samples: collate_layouts(samples, config.max_objects), compute_losses=compute_losses,
        config=replace(config.loop, lr_scales=tuple((name, config.gate_lr_scale) for name in GATES)),
        log_extra=log_extra,
    )  # fmt: skip
    if not result.interrupted and accelerator.is_main_process:
        atomic_save_pretrained(accelerator.unwrap_model(adapter), run.out)
    accelerator.wait_for_everyone()
    return result
