"""What every trainer shares: the start of a run (output folder, accelerator, data, recorded config) and the
diffusion helpers of the trainers that denoise latents (the small base's U-Net, the adapters)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from spatiallock.base.folders import BaseModel
from spatiallock.base.latents import encode_pixels
from spatiallock.checkpoint import checkpoint_step, list_checkpoints
from spatiallock.data.coco import LayoutDataset
from spatiallock.errors import SpatialLockError, first_line
from spatiallock.files import writable_folder, write_text_atomic
from spatiallock.invocation import command_line
from spatiallock.training.loop import make_accelerator

CONFIG_NAME = "config.json"
COMMANDS_NAME = "commands.txt"  # one line per start or resume of the run: when, and the command line
# settings that may change when a run is resumed: how long it runs and how it is watched, not what it learns
# (gradient checkpointing trades memory for compute and gives the same steps)
RESUMABLE_CHANGES = frozenset(
    {"out", "max_steps", "checkpoint_every", "keep_checkpoints", "log_every", "num_workers", "resume", "progress",
     "gradient_checkpointing", "vae_only"}
)  # fmt: skip
# the same folder, however it is written
PATH_SETTINGS = frozenset({"data", "base", "init_from", "vae_from", "unet_warm_start", "reward_detector"})

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
        """Write the resolved config to `train/config.json` and add the command line that started (or resumed) the
        run to `train/commands.txt` (main process): call it once the models are built, so that a run which fails
        to start leaves no folder behind."""
        if self.accelerator.is_main_process:
            self.folder.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.folder / CONFIG_NAME, json.dumps(asdict(self.config), indent=2) + "\n")
            line = command_line()
            if line is not None:
                when = time.strftime("%Y-%m-%dT%H:%M:%S%z")
                with open(self.folder / COMMANDS_NAME, "a") as commands:
                    commands.write(f"{when}  {line}\n")


def _flat(values: dict, prefix: str = "") -> dict[str, Any]:
    """Nested settings as {"loop.batch_size": 16, ...}; lists and tuples compare alike (JSON has only lists)."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return flat


def _same(key: str, recorded: Any, now: Any) -> bool:
    if recorded == now:
        return True
    name = key.rsplit(".", 1)[-1]
    if name in PATH_SETTINGS and isinstance(recorded, str) and isinstance(now, str):
        return Path(recorded).resolve() == Path(now).resolve()
    return False


def _ahead(key: str, recorded: Any, now: Any, step: int) -> bool:
    """A learning-rate schedule whose drops changed only from `step` on (the step resumed from): the steps taken
    are those a run started with the new schedule takes, so it may change on --resume (to add a drop late)."""
    if key.rsplit(".", 1)[-1] != "lr_milestones" or not isinstance(recorded, list) or not isinstance(now, list):
        return False
    changed = set(recorded) ^ set(now)
    return all(isinstance(m, int) and m >= step for m in changed)


def changed_settings(recorded: dict, config, step: int | None = None) -> list[str]:
    """The settings of `config` that decide what a run learns and differ from `recorded` (a run's config.json):
    "name: recorded -> now" for each, by their names in config.json. With `step` (the newest checkpoint's), a
    learning-rate drop added or moved at that step or later is no change."""
    before, now = _flat(recorded), _flat(json.loads(json.dumps(asdict(config))))
    changes = []
    for key in sorted(before.keys() & now.keys()):  # a setting only one side knows: another version's, not compared
        if key.rsplit(".", 1)[-1] in RESUMABLE_CHANGES or _same(key, before[key], now[key]):
            continue
        if step is not None and _ahead(key, before[key], now[key], step):
            continue
        changes.append(f"{key}: {before[key]!r} -> {now[key]!r}")
    return changes


def check_resumed_settings(folder: Path, config) -> None:
    """Refuse to resume the run recorded in `folder/config.json` with other settings than it was started with."""
    path = folder / CONFIG_NAME
    if not path.exists():
        return  # nothing recorded (the run was killed before it started): nothing to compare
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(recorded, dict):
            raise ValueError(f"a JSON {type(recorded).__name__}, not an object")
    except (OSError, ValueError, RecursionError) as err:
        raise SpatialLockError(f"--resume: {path} cannot be read ({first_line(err)})") from None
    stages = [p for p in (folder / "checkpoints").glob("*") if p.is_dir()]
    steps = [checkpoint_step(c) for stage in stages for c in list_checkpoints(stage)]
    changes = changed_settings(recorded, config, max(steps, default=0))
    if changes:
        raise SpatialLockError(
            f"--resume: the run in {folder.parent} was started with other settings ({'; '.join(changes)}); resume "
            "with the recorded ones (see its train/config.json) or train into another folder"
        )


def start_training(config, stages: tuple[str, ...], resume: bool, mixed_precision: str = "no") -> TrainingRun:
    """The prologue of every trainer, after it has checked its options: refuse an output folder that cannot be
    written, or that already holds checkpoints of one of `stages` unless `resume`, and then a resumed run whose
    settings differ from those it recorded; make the accelerator."""
    out = writable_folder(config.out, "out")
    folder = out / "train"
    started = any(list_checkpoints(folder / "checkpoints" / stage) for stage in stages)
    if started and not resume:
        raise SpatialLockError(f"out: {out} already holds checkpoints; pass --resume to continue or choose another")
    if started:
        check_resumed_settings(folder, config)
    return TrainingRun(config, make_accelerator(mixed_precision), out, folder)


# ---- diffusion training steps ---------------------------------------------------------------------------------


def latents_of(base: BaseModel, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Images in [-1, 1] -> scaled latents, sampled from the autoencoder's posterior."""
    with torch.no_grad():
        return encode_pixels(base.vae, base.latent_patch, pixels, "sample", generator)


def noisy_inputs(scheduler, latents: torch.Tensor, generator: torch.Generator, sampling: str = "uniform"):
    """(noisy latents, timesteps, diffusion target) for epsilon or v-prediction.

    `sampling` (one of `training.recipe.TIMESTEP_SAMPLING`): "uniform" timesteps, or "cubic": t = (1 - u^3) T
    with u uniform, which favours the noisy early steps where a layout decides where objects go (T2I-Adapter's
    non-uniform sampling for spatial control).
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
