"""What a sampling extension is: one idea hooked into `SpatialLockPipeline.__call__`'s denoising loop.

The loop calls each extension of a call, in the order of `SpatialLockPipeline.extensions`, at four points:

    prepare(pipe, call)                  before the conditioning is computed: check, complete captions, add rows
    start(pipe, call)                    after the timesteps are set: may give the initial latents
    before_step(pipe, call, i, t)        before the U-Net call of step i: may move `call.latents`
    after_prediction(pipe, call, i, t, model_input, noise, features) -> noise
                                         after the guided prediction of step i, before the scheduler's step

`taps(call, i)` asks the loop to keep the U-Net's down-block features of step i's call (`features` above).
An extension declares the keyword arguments of the pipeline call it takes (`arguments`, with defaults) and is
built from them by `from_call` only when they switch it on. `SamplingCall` is the state they share.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from spatiallock.layout import Layout


@dataclass
class Conditioning:
    """The conditioning of a batch's rows, computed once per call: caption states and mask (the unconditional rows
    first when guided), grounding tokens (None without an adapter), extra U-Net inputs of the base (None for SD
    v1 and the small base), and the conditional rows alone (`cond_*`), which guidance and inversion run."""

    states: torch.Tensor
    caption_mask: torch.Tensor | None
    grounding: Any
    cond_rows: slice
    cond_mask: torch.Tensor | None
    cond_grounding: Any
    added: dict | None = None

    @property
    def extra_inputs(self) -> dict:
        """`predict`'s keyword arguments for the base's extra U-Net inputs (none for SD v1 and the small base)."""
        return {} if self.added is None else {"added": self.added}

    @property
    def cond_states(self) -> torch.Tensor:
        return self.states[self.cond_rows]

    @property
    def cond_added(self) -> dict | None:
        """The conditional rows' extra U-Net inputs (None for SD v1 and the small base)."""
        return None if self.added is None else {k: v[self.cond_rows] for k, v in self.added.items()}


@dataclass
class SamplingCall:
    """The state of one pipeline call. `layouts`: one per image made; `rows`: the layouts of the batch's rows
    (an extension may sample several rows per image until it keeps one); `grounded`: the steps with grounding."""

    layouts: list[Layout]
    guided: bool
    guidance_scale: float
    ground_unconditional: bool
    height: int
    width: int
    latent_size: tuple[int, int]
    device: torch.device
    generator: Any
    eta: float
    rows: list[Layout] = field(default_factory=list)
    generators: Any = None
    conditioning: Conditioning | None = None
    timesteps: torch.Tensor | None = None
    latents: torch.Tensor | None = None
    given_latents: torch.Tensor | None = None
    grounded: int = 0
    extra: dict = field(default_factory=dict)

    def grounding_at(self, step: int):
        """The conditional rows' grounding at `step` (None once grounding has stopped)."""
        return None if step >= self.grounded else self.conditioning.cond_grounding


class Extension:
    """One sampling idea (see the module's docstring). Subclasses set `arguments` and override the hooks they
    need; every hook does nothing by default."""

    arguments: ClassVar[dict[str, Any]] = {}

    @classmethod
    def from_call(cls, pipe, values: dict[str, Any], layouts: Sequence[Layout]) -> Extension | None:
        """The extension for a call's `values` of `arguments` (checked), or None when they leave it off."""
        raise NotImplementedError

    @classmethod
    def check_options(cls, pipe, options, layouts: Sequence[Layout]) -> None:
        """Refuse, in one line naming the command-line option, options this pipeline cannot do (before any work)."""

    def prepare(self, pipe, call: SamplingCall) -> None:
        pass

    def start(self, pipe, call: SamplingCall) -> None:
        pass

    def before_step(self, pipe, call: SamplingCall, i: int, t) -> None:
        pass

    def taps(self, pipe, call: SamplingCall, i: int) -> bool:
        return False

    def after_prediction(self, pipe, call: SamplingCall, i: int, t, model_input, noise, features) -> torch.Tensor:
        return noise


def make_extensions(pipe, classes: Sequence[type[Extension]], options: dict, layouts: Sequence[Layout]) -> list:
    """The extensions of `classes` that a call's extra keyword arguments switch on, in order; an argument none of
    them takes is a `TypeError`, as for any function."""
    known = {name: default for extension in classes for name, default in extension.arguments.items()}
    for name in options:
        if name not in known:
            raise TypeError(f"{type(pipe).__name__}.__call__() got an unexpected keyword argument {name!r}")
    values = {**known, **options}
    made = [extension.from_call(pipe, values, layouts) for extension in classes]
    return [extension for extension in made if extension is not None]
