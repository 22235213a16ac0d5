"""Sampling for every caller (generate, generate-dataset, evaluate, demo, the benchmarks): which model a name
means, how a list of layouts is cut into pipeline calls, how each image is seeded, and which options reach the
pipeline.

    options = SamplingOptions(steps=25, guidance=5.0, layout_guidance_steps=10)
    pipe = load_pipeline("default", dtype=options.dtype, scheduler=options.scheduler)
    images, asked, seconds = sample(pipe, layouts, options, per_layout=2)

Every image's noise depends only on (seed, layout index, sample index) (`image_generator`), so batching,
resuming and the number of processes never change an image.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from spatiallock.errors import SpatialLockError
from spatiallock.layout import Layout
from spatiallock.pipelines.protocol import DIFFUSION, LAYOUT_GAN
from spatiallock.pipelines.seeding import batches, image_generator, jobs_of
from spatiallock.sampling.options import SamplingOptions
from spatiallock.shipped import resolve_model

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
NO_ADAPTER = "none"  # --adapter none: the base alone, even when the model folder has an adapter


def adapter_recipe(model: str) -> tuple[dict, dict | None]:
    """The adapter config of MODEL (`default`, a model folder with adapter/, or an adapter folder) and, when MODEL
    is a model folder, its U-Net config (to tell an unrecorded placement)."""
    from spatiallock.base.configs import unet_config
    from spatiallock.files import read_json
    from spatiallock.models.adapter import SpatialLockAdapter

    folder = Path(resolve_model(model) if model == "default" else model)
    if not folder.is_dir():
        raise SpatialLockError(f"config-from: {model} is not `default` or a folder")
    adapter = folder / "adapter" if (folder / "adapter" / "config.json").is_file() else folder
    path = adapter / "config.json"
    if not path.is_file():
        raise SpatialLockError(f"config-from: {folder} holds no adapter (no adapter/config.json or config.json)")
    config = read_json(path, "config-from")
    if not isinstance(config, dict) or config.get("_class_name") != SpatialLockAdapter.__name__:
        raise SpatialLockError(f"config-from: {path} is not a SpatialLock adapter's config")
    unet = folder / "unet" / "config.json"
    return config, (unet_config(str(folder)) if adapter != folder and unet.is_file() else None)


def adapter_like(model: str, unet, phrase_dim: int, num_classes: int):
    """A fresh adapter for `unet` built by the recipe of MODEL's adapter (see `adapter_recipe`): what the same
    training command would build on `unet`. A config that cannot build one is a `SpatialLockError`."""
    from spatiallock.base.configs import build_unet
    from spatiallock.models.adapter import SpatialLockAdapter

    recipe, built_for = adapter_recipe(model)
    source = None if built_for is None else build_unet(built_for, device="meta")
    try:
        return SpatialLockAdapter.like(recipe, unet, phrase_dim, num_classes, source)
    except (KeyError, TypeError, ValueError) as err:
        raise SpatialLockError(f"config-from: {model}'s adapter config is not usable ({err})") from None


@dataclass(frozen=True)
class ModelKind:
    """A kind of layout-to-image model: how to tell its folder (`is_folder`) and load it (`load(model, adapter,
    dtype, scheduler)`, a `pipelines.protocol.LayoutPipeline`)."""

    name: str
    is_folder: Callable[[str], bool]
    load: Callable


def load_spatiallock(model: str, adapter: str | None, dtype: str, scheduler: str | None):
    from spatiallock.pipelines.diffusion import SpatialLockPipeline

    if adapter is not None and adapter != NO_ADAPTER and not Path(adapter).exists():
        raise SpatialLockError(f"adapter: {adapter} not found")
    pipe = SpatialLockPipeline.from_pretrained(
        resolve_model(model), adapter=None if adapter == NO_ADAPTER else adapter, torch_dtype=DTYPES[dtype],
        scheduler=scheduler,
    )  # fmt: skip
    if adapter == NO_ADAPTER:
        pipe.set_adapter(None)
    return pipe


def load_lama(model: str, adapter: str | None, dtype: str, scheduler: str | None):
    from spatiallock.baselines.lama import LamaPipeline

    if adapter is not None:
        raise SpatialLockError(f"--adapter: {model} is a LAMA model, which takes no adapter")
    if dtype != "fp32" or scheduler is not None:
        option = "--dtype" if dtype != "fp32" else "--scheduler"
        raise SpatialLockError(f"{option}: {model} is a LAMA model, which samples in fp32 without a scheduler")
    return LamaPipeline.from_pretrained(model)


def is_lama_folder(model: str) -> bool:
    from spatiallock.baselines.lama import is_lama_folder as is_lama

    return is_lama(model)


# the model kinds `load_pipeline` knows, tried in order; the last takes any other name (a folder, a hub id)
MODEL_KINDS = (
    ModelKind(LAYOUT_GAN, is_lama_folder, load_lama),
    ModelKind(DIFFUSION, lambda model: True, load_spatiallock),
)


def load_pipeline(
    model: str,
    adapter: str | None = None,
    dtype: str = "fp32",
    scheduler: str | None = None,
    device: str | torch.device | None = None,
):
    """The pipeline for a model name (`default`, a folder or a hub id) of whichever kind of `MODEL_KINDS` it is,
    with `adapter` (a folder, `none` for the base alone, None for the folder's own), on `device` (default: CUDA
    when there is one), progress bars off. A folder written by `train lama` gives the LAMA baseline."""
    if dtype not in DTYPES:
        raise SpatialLockError(f"--dtype: one of {', '.join(DTYPES)}, got {dtype!r}")
    kind = next(kind for kind in MODEL_KINDS if kind.is_folder(model))
    pipe = kind.load(model, adapter, dtype, scheduler)
    pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample_batch(pipe, layouts: Sequence[Layout], jobs: Sequence[tuple[int, int]], options: SamplingOptions) -> list:
    """The images of (layout index, sample index) jobs, in one pipeline call."""
    return pipe(
        layouts=[layouts[i] for i, _ in jobs],
        generator=[image_generator(options.seed, i, k) for i, k in jobs],
        **options.pipeline_kwargs(pipe.kind),
    ).images


def sample_batches(
    pipe, layouts: Sequence[Layout], jobs: Sequence[tuple[int, int]], options: SamplingOptions
) -> Iterator[tuple[list[tuple[int, int]], list]]:
    """(jobs, images) per pipeline call of `options.batch_size` images, as they are made."""
    for batch in batches(jobs, options.batch_size):
        yield batch, sample_batch(pipe, layouts, batch, options)


def sample(
    pipe, layouts: Sequence[Layout], options: SamplingOptions, per_layout: int = 1, progress=None
) -> tuple[list, list[Layout], float]:
    """`per_layout` images per layout. Returns (images, the layout of each, seconds per image)."""
    jobs = jobs_of(layouts, per_layout)
    images = []
    start = time.perf_counter()
    for batch, made in sample_batches(pipe, layouts, jobs, options):
        images += made
        if progress is not None:
            progress.update(len(batch))
    seconds = (time.perf_counter() - start) / max(len(jobs), 1)
    return images, [layouts[i] for i, _ in jobs], seconds
