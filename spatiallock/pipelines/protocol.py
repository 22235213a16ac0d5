"""What every layout-to-image model offers the commands, the page and the benchmarks: `LayoutPipeline`.

`SpatialLockPipeline` (a denoising pipeline, kind `diffusion`) and `LamaPipeline` (a layout GAN, kind
`layout-gan`) both satisfy it; `spatiallock.sampling.run.MODEL_KINDS` says which folders load as which. A new
baseline is a class with these members and one entry there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from spatiallock.layout import Layout

DIFFUSION = "diffusion"  # a denoising pipeline: steps, guidance, a scheduler, extensions
LAYOUT_GAN = "layout-gan"  # one forward pass per image


@runtime_checkable
class LayoutPipeline(Protocol):
    """A model that draws images from layouts.

    `kind`: which sampling options it takes (`spatiallock.sampling.options.Option.kinds`); `native_size`: the
    side of its images; `__call__(layouts=..., generator=[one per layout], **options)` returns an object with
    `.images` (PIL images), options being `SamplingOptions.pipeline_kwargs(kind)`."""

    kind: str

    @property
    def device(self) -> torch.device: ...

    @property
    def native_size(self) -> int: ...

    def __call__(self, layouts: Sequence[Layout], generator: Any = None, **options) -> Any: ...

    def to(self, device) -> Any: ...

    def set_progress_bar_config(self, **config) -> None: ...

    def check_options(self, options, layouts: Sequence[Layout]) -> None:
        """Refuse, in one line naming the option, before anything is generated or written, what this model cannot
        do with `options` (a `SamplingOptions`) and `layouts`."""

    def resolved_options(self, options) -> dict:
        """The values it actually uses for the options left to the model (None for those it has no use for)."""

    def extra_scores(self, layouts: Sequence[Layout], seed: int, per_layout: int) -> dict[str, float]:
        """Measures of its own for an evaluation report (LAMA: mask entropy), {} when none."""
