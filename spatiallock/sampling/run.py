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

import argparse
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from spatiallock.errors import SpatialLockError
from spatiallock.layout import Layout
from spatiallock.pipelines.seeding import batches, image_generator, jobs_of
from spatiallock.shipped import resolve_model

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
NO_ADAPTER = "none"  # --adapter none: the base alone, even when the model folder has an adapter
MAX_SEED = 2**32 - 1  # with it every image's own seed (`image_generator`) stays within torch's 64 bits
MAX_SIZE = 4096  # --size: a side beyond this is a typo, not an image (SD v1 is made for 512)


def adapter_recipe(model: str) -> tuple[dict, dict | None]:
    """The adapter config of MODEL (`default`, a model folder with adapter/, or an adapter folder) and, when MODEL
    is a model folder, its U-Net config (to tell an unrecorded placement)."""
    from spatiallock.base.configs import unet_config
    from spatiallock.layout import read_json
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


@dataclass
class SamplingOptions:
    """Everything that decides a generated image besides the model and the layout, under the command line's
    option names (`--layout-guidance-steps` is `layout_guidance_steps`). `size` None: the model's own;
    `scheduler` None: the model folder's; `grounding_steps` and `ground_unconditional` None: the adapter's own."""

    seed: int = 0
    steps: int = 25
    guidance: float = 5.0
    scheduler: str | None = None
    grounding_steps: float | None = None
    ground_unconditional: bool | None = None
    size: int | None = None
    dtype: str = "fp32"
    batch_size: int = 8
    layout_guidance_steps: int = 0
    layout_guidance_scale: float = 20.0
    layout_guidance_iterations: int = 3
    layout_guidance_layers: str | None = None
    missing_labels: str = "add"
    init_image: str | None = None
    init_from_layout: bool = False
    init_strength: float = 1.0
    init_steps: int | None = None
    candidates: int = 1
    select_at: float = 0.3
    perception_guidance_steps: int = 0
    perception_guidance_scale: float = 0.1

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SamplingOptions:
        """The options a parsed command line holds (those it lacks keep their defaults)."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})

    def check(self) -> None:
        """Refuse, in one line naming the option, a value no pipeline call could use: every number finite and in
        its range, an init image that cannot be read."""

        def in_range(name: str, low: float, high: float = math.inf, what: str = "") -> None:
            value = getattr(self, name)
            if value is None:
                return
            if isinstance(value, float) and not math.isfinite(value) or not low <= value <= high:
                limits = f"from {low} to {high}" if high < math.inf else f"at least {low}"
                raise SpatialLockError(f"--{name.replace('_', '-')}: {what or 'must be'} {limits}, got {value}")

        for name, low in (
            ("steps", 1), ("batch_size", 1), ("layout_guidance_iterations", 1), ("init_steps", 1), ("candidates", 1)
        ):  # fmt: skip
            in_range(name, low)
        in_range("layout_guidance_steps", 0)
        in_range("perception_guidance_steps", 0)
        in_range("perception_guidance_scale", 0.0, what="a finite number")
        in_range("seed", 0, MAX_SEED)
        in_range("size", 8, MAX_SIZE)
        if self.dtype not in DTYPES:
            raise SpatialLockError(f"--dtype: one of {', '.join(DTYPES)}, got {self.dtype!r}")
        in_range("guidance", 0.0, what="a finite number")
        in_range("layout_guidance_scale", 0.0, what="a finite number")
        in_range("grounding_steps", 0.0, 1.0, what="a share")
        if not 0.0 < self.select_at < 1.0:  # nan fails too
            raise SpatialLockError(f"--select-at: a share of the steps in (0, 1), got {self.select_at}")
        if self.candidates > 1 and self.uses_init:
            raise SpatialLockError("--candidates: not with --init-image or --init-from-layout (same start for all)")
        if not 0.0 < self.init_strength <= 1.0:  # nan fails too
            raise SpatialLockError(f"--init-strength: a share in (0, 1], got {self.init_strength}")
        if self.init_image is not None and self.init_from_layout:
            raise SpatialLockError("--init-image and --init-from-layout: give one of them")
        if self.init_image is not None:
            self._check_init_image()

    def _check_init_image(self) -> None:
        import PIL.Image

        from spatiallock.pipelines.extensions.layout_init import load_image

        if not Path(self.init_image).is_file():
            raise SpatialLockError(f"--init-image: {self.init_image}: file not found")
        try:
            load_image(self.init_image)
        except PIL.Image.DecompressionBombError as err:  # a header declaring billions of pixels
            raise SpatialLockError(f"--init-image: {self.init_image}: {err}") from None

    @property
    def uses_init(self) -> bool:
        return self.init_image is not None or self.init_from_layout

    def pipeline_kwargs(self) -> dict:
        """The `SpatialLockPipeline.__call__` arguments these options mean (layout control only when on)."""
        kwargs = {
            "num_inference_steps": self.steps,
            "guidance_scale": self.guidance,
            "grounding_steps": self.grounding_steps,
            "ground_unconditional": self.ground_unconditional,
            "height": self.size,
            "width": self.size,
        }
        if self.layout_guidance_steps:
            kwargs.update(
                layout_guidance_steps=self.layout_guidance_steps, layout_guidance_scale=self.layout_guidance_scale,
                layout_guidance_iterations=self.layout_guidance_iterations,
                layout_guidance_layers=self.layout_guidance_layers, missing_labels=self.missing_labels,
            )  # fmt: skip
        if self.candidates > 1:
            kwargs.update(candidates=self.candidates, select_at=self.select_at)
        if self.perception_guidance_steps:
            kwargs.update(
                perception_guidance_steps=self.perception_guidance_steps,
                perception_guidance_scale=self.perception_guidance_scale,
            )
        if self.uses_init:
            kwargs.update(
                init_image=self.init_image, init_from_layout=self.init_from_layout,
                init_strength=self.init_strength, init_steps=self.init_steps,
            )  # fmt: skip
        return kwargs

    def record(self, pipe=None) -> dict:
        """Every option under its name, for a report; with `pipe`, the scheduler and size it actually uses."""
        record = asdict(self)
        if getattr(pipe, "is_layout_gan", False):  # no scheduler, steps or guidance: one forward pass
            record.update(scheduler=None, size=self.size or pipe.native_size, steps=None, guidance=None)
        elif pipe is not None:
            record["scheduler"] = self.scheduler or type(pipe.scheduler).__name__
            record["size"] = self.size or pipe.native_size
            if self.grounding_steps is None:
                record["grounding_steps"] = pipe.default_grounding_steps
            if self.ground_unconditional is None:
                record["ground_unconditional"] = pipe.default_ground_unconditional
        return record

    def check_for(self, pipe, layouts: Sequence[Layout]) -> None:
        """Refuse, before anything is generated or written, guidance layers the U-Net lacks, a caption without one
        of its labels (with missing_labels "error"), a size the autoencoder cannot take and more steps than the
        noise schedule has; warn once when captions or labels are longer than the text encoder reads (they are
        cut); candidate selection the adapter cannot do. A LAMA model checks its own (`LamaPipeline.check_options`)."""
        from spatiallock.base.text import PHRASE_TOKENS, warn_cut_texts
        from spatiallock.pipelines.extensions.layout_guidance import caption_targets, guidance_layers

        if getattr(pipe, "is_layout_gan", False):
            pipe.check_options(self, layouts)
            return

        if self.size is not None and self.size % pipe.vae_scale_factor:
            raise SpatialLockError(f"--size: must be a multiple of {pipe.vae_scale_factor}, got {self.size}")
        schedule = pipe.scheduler.config.num_train_timesteps
        for name in ("steps", "init_steps"):
            value = getattr(self, name)
            if value is not None and value > schedule:
                option = f"--{name.replace('_', '-')}"
                raise SpatialLockError(f"{option}: at most the model's {schedule} noise levels, got {value}")
        warn_cut_texts(pipe.tokenizer, [layout.caption for layout in layouts], pipe.caption_tokens, "captions")
        labels = [label for layout in layouts for label in layout.labels]
        warn_cut_texts(pipe.tokenizer, labels, PHRASE_TOKENS, "labels")
        if self.layout_guidance_steps:
            guidance_layers(pipe.unet, self.layout_guidance_layers)
            if self.missing_labels == "error":
                caption_targets(layouts, pipe.tokenizer, pipe.caption_tokens, "error")
        try:
            pipe.check_candidates(self.candidates, self.select_at, layouts, self.uses_init)
            pipe.check_perception_guidance(self.perception_guidance_steps, self.perception_guidance_scale, layouts)
        except SpatialLockError as err:  # the pipeline's argument name -> the command line's
            option, _, rest = str(err).partition(":")
            raise SpatialLockError(f"--{option.replace('_', '-')}:{rest}") from None


def load_pipeline(
    model: str,
    adapter: str | None = None,
    dtype: str = "fp32",
    scheduler: str | None = None,
    device: str | torch.device | None = None,
):
    """The pipeline for a model name (`default`, a folder or a hub id), with `adapter` (a folder, `none` for the
    base alone, None for the folder's own), on `device` (default: CUDA when there is one), progress bars off.
    A folder written by `train lama` gives the LAMA baseline behind the same interface (`LamaPipeline`)."""
    from spatiallock.baselines.lama import LamaPipeline, is_lama_folder
    from spatiallock.pipelines.diffusion import SpatialLockPipeline

    if dtype not in DTYPES:
        raise SpatialLockError(f"--dtype: one of {', '.join(DTYPES)}, got {dtype!r}")
    if is_lama_folder(model):
        if adapter is not None:
            raise SpatialLockError(f"--adapter: {model} is a LAMA model, which takes no adapter")
        if dtype != "fp32" or scheduler is not None:
            option = "--dtype" if dtype != "fp32" else "--scheduler"
            raise SpatialLockError(f"{option}: {model} is a LAMA model, which samples in fp32 without a scheduler")
        return LamaPipeline.from_pretrained(model).to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if adapter is not None and adapter != NO_ADAPTER and not Path(adapter).exists():
        raise SpatialLockError(f"adapter: {adapter} not found")
    pipe = SpatialLockPipeline.from_pretrained(
        resolve_model(model),
        adapter=None if adapter == NO_ADAPTER else adapter,
        torch_dtype=DTYPES[dtype],
        scheduler=scheduler,
    )
    if adapter == NO_ADAPTER:
        pipe.set_adapter(None)
    pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample_batch(pipe, layouts: Sequence[Layout], jobs: Sequence[tuple[int, int]], options: SamplingOptions) -> list:
    """The images of (layout index, sample index) jobs, in one pipeline call."""
    return pipe(
        layouts=[layouts[i] for i, _ in jobs],
        generator=[image_generator(options.seed, i, k) for i, k in jobs],
        **options.pipeline_kwargs(),
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
