"""What every trainer shares: the start of a run (output folder, accelerator, data, recorded config) and the
diffusion helpers of the trainers that denoise latents (the small base's U-Net, the adapters)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from spatiallock.base import BaseModel
from spatiallock.checkpoint import list_checkpoints
from spatiallock.data.coco import LayoutDataset
from spatiallock.errors import SpatialLockError
from spatiallock.training.loop import make_accelerator

# ---- the start of a run ---------------------------------------------------------------------------------------


@dataclass
class TrainingRun:
    """One trainer's run: its config, its accelerator and its folders.

    `config` is the trainer's config dataclass; it has `out`, `data`, `split` and `flip_prob` fields.
    """

    config: Any
    accelerator: Accelerator
    out: Path
    folder: Path  # out/train: config.json, log.jsonl, checkpoints/<stage>/

    def layout_data(self, resolution: int, seed: int, **options) -> LayoutDataset:
        """The training split of `config.data` at `resolution`; `options` go to `LayoutDataset`."""
        return LayoutDataset.from_split(
            self.config.data, self.config.split, resolution=resolution, flip_prob=self.config.flip_prob, seed=seed,
            **options,
        )  # fmt: skip

    def record_config(self) -> None:
        """Write the resolved config to `train/config.json` (main process): call it once the models are built, so
        that a run which fails to start leaves no folder behind."""
        if self.accelerator.is_main_process:
            self.folder.mkdir(parents=True, exist_ok=True)
            (self.folder / "config.json").write_text(json.dumps(asdict(self.config), indent=2) + "\n")


def start_training(config, stages: tuple[str, ...], resume: bool, mixed_precision: str = "no") -> TrainingRun:
    """The prologue of every trainer, after it has checked its options: refuse an output folder that already holds
    checkpoints of one of `stages` unless `resume`, then make the accelerator."""
    out = Path(config.out)
    folder = out / "train"
    if not resume and any(list_checkpoints(folder / "checkpoints" / stage) for stage in stages):
        raise SpatialLockError(f"out: {out} already holds checkpoints; pass --resume to continue or choose another")
    return TrainingRun(config, make_accelerator(mixed_precision), out, folder)


# ---- diffusion training steps ---------------------------------------------------------------------------------

TIMESTEP_SAMPLING = ("uniform", "cubic")


def latents_of(base: BaseModel, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Images in [-1, 1] -> scaled latents, sampled from the autoencoder's posterior."""
    with torch.no_grad():
        posterior = base.vae.encode(pixels).latent_dist
        return posterior.sample(generator=generator) * base.vae.config.scaling_factor


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
    """Replace each item by `empty` with `probability` (classifier-free guidance needs unconditional steps).

    Returns the items and the (len(items),) boolean tensor of those kept.
    """
    keep = torch.rand(len(items), generator=generator, device=generator.device) >= probability
    return [item if k else empty for item, k in zip(items, keep.tolist())], keep
