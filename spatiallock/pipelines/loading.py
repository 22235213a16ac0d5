"""Loading the parts a pipeline is built from: an adapter folder, and the sampler a model folder names (or another by
short name on its noise schedule)."""

from __future__ import annotations

import os
from pathlib import Path

import diffusers
import torch

from spatiallock.base.folders import check_configs
from spatiallock.errors import SpatialLockError, first_line
from spatiallock.layout import excerpt
from spatiallock.models.adapter import SpatialLockAdapter


def folder_kind(config: Path) -> str:
    """What a folder with `config` but no model_index.json is, in words, for a refusal."""
    from spatiallock.files import read_json

    try:
        name = read_json(config, "config file", limit=2**20).get("_class_name")
    except (SpatialLockError, AttributeError):
        return "has a config.json that cannot be read and no model_index.json: not a model folder"
    if name == SpatialLockAdapter.__name__:
        return "is an adapter folder, not a model; give its base as the model and this as adapter"
    return f"holds a {excerpt(name)} (config.json) and no model_index.json: not a model folder"


# --scheduler names -> diffusers classes (and the options that make them what the name says)
SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "dpm": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
}


def make_scheduler(name: str, config: dict):
    """A diffusers scheduler by short name (see `SCHEDULERS`), on the noise schedule of `config`."""
    if name not in SCHEDULERS:
        raise SpatialLockError(f"scheduler: {name!r} is not one of {', '.join(SCHEDULERS)}")
    cls_name, options = SCHEDULERS[name]
    return getattr(diffusers, cls_name).from_config(config, **options)


def sampling_scheduler(model: str | os.PathLike, name: str | None = None):
    """The scheduler a model folder names (a training-only `DDPMScheduler` becomes DPM-Solver++), or the one
    `name`d (see `SCHEDULERS`) on the folder's noise schedule."""
    try:
        config = diffusers.DDPMScheduler.load_config(model, subfolder="scheduler")
    except (OSError, ValueError, RecursionError) as err:
        first = first_line(err)[:200]
        raise SpatialLockError(f"model: cannot read the scheduler of {model}: {first}") from None
    where = f"model: {Path(model) / 'scheduler'}"
    class_name = config.get("_class_name", "DDPMScheduler")  # none named: a schedule to sample with DPM-Solver++
    cls = getattr(diffusers, class_name, None) if isinstance(class_name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise SpatialLockError(f"{where}: _class_name {excerpt(class_name)} names no diffusers scheduler")
    try:
        sampler = make_scheduler("dpm", config) if cls is diffusers.DDPMScheduler else cls.from_config(config)
        # another sampler on the folder's schedule, as the folder's own scheduler completes it with its defaults
        return sampler if name is None else make_scheduler(name, sampler.config)
    except (ValueError, TypeError, KeyError, NotImplementedError) as err:  # a value the scheduler cannot take
        first = first_line(err)[:200]
        raise SpatialLockError(f"{where}: cannot make the sampler: {first}") from None


def load_adapter(path: str | os.PathLike, torch_dtype: torch.dtype = torch.float32) -> SpatialLockAdapter:
    """An adapter folder (config.json + safetensors); `SpatialLockError` when it is not one."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise SpatialLockError(f"adapter: {path} is not an adapter folder (no config.json)")
    check_configs(path, ["config.json"], "adapter")
    try:
        adapter = SpatialLockAdapter.from_pretrained(path, torch_dtype=torch_dtype, use_safetensors=True)
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as err:
        first = first_line(err)[:200]
        raise SpatialLockError(f"adapter: cannot load {path}: {first}") from None
    return adapter.eval().requires_grad_(False)
