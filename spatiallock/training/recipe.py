"""The adapter's training recipe, declared once: `AdapterRecipe` holds every setting of `train adapter` but its
folders (--base, --data, --out) and the loop every trainer shares (steps, batch, learning rate, ...), each field
with its type, default, allowed values and help (`setting`).

Everything else is made from it: the argparse options of `train adapter` (one per field with a help, the flag
named after the field), their one check (`AdapterRecipe.check`: each error one line naming the option), the
keyword arguments of the adapter it builds (`adapter_options`, which the adapter records in its config.json, the
keys `SpatialLockAdapter.like` and `params --config-from` read back), and the run's record: `AdapterTrainConfig`
extends it field by field, so `train/config.json` holds each setting under its field's name.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from spatiallock.errors import SpatialLockError
from spatiallock.layout import MAX_OBJECTS
from spatiallock.models.adapter import VARIANTS
from spatiallock.models.perception import PERCEPTION_INPUTS

MAX_RESOLUTION = 2048  # image side in pixels; Stable Diffusion v1 trains at 512
TIMESTEP_SAMPLING = ("uniform", "cubic")  # `training.common.noisy_inputs`
MIXED_PRECISION = ("no", "fp16", "bf16")
# what `train adapter` trains the PoG head on unless told: what was drawn, never the layout (the paper's `grounded`
# features carry the requested boxes: see `evaluation.leak`)
DEFAULT_PERCEPTION_INPUT = "rendered"
# `--feed-forward` -> the adapter config's `feed_forward` (`spatiallock.models.adapter.FEED_FORWARD`)
FEED_FORWARD_CHOICES = {"all": True, "finest": "finest", "none": False}


@dataclass(frozen=True)
class Interval:
    """The numbers a setting takes: from `low` to `high`, an end left out where open; whole numbers only with
    `whole`, and then multiples of `step` only."""

    low: float = -math.inf
    high: float = math.inf
    open_low: bool = False
    open_high: bool = False
    whole: bool = False
    step: int = 1

    @property
    def words(self) -> str:
        """What the interval holds, as an error message says it: "a positive number", "a number in (0, 1]"."""
        if self.step > 1:
            return f"a multiple of {self.step} from {self.low:g} to {self.high:g}"
        number = "whole number" if self.whole else "number"
        if self.low == 0 and self.open_low and self.high == math.inf:
            return f"a positive {number}"
        return (
            f"a {number} in {'(' if self.open_low else '['}{self.low:g}, {self.high:g}{')' if self.open_high else ']'}"
        )

    def __contains__(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            return False
        if self.whole and (value != int(value) or int(value) % self.step):
            return False
        above = value > self.low if self.open_low else value >= self.low
        return above and (value < self.high if self.open_high else value <= self.high)

    def parse(self, text: str) -> int | float:
        """`text` as a number of this interval; else a `ValueError` saying what was expected."""
        try:
            value = (int if self.whole else float)(text)
        except ValueError:
            value = None
        if value is None or value not in self:
            raise ValueError(f"expected {self.words}, got {text!r}")
        return value


class LossWeights:
    """Fixed (diffusion, perception) loss weights: two finite numbers of at least 0, written "0.5,0.5"."""

    words = "two non-negative numbers such as 0.5,0.5"

    def __contains__(self, value: Any) -> bool:
        return (
            isinstance(value, Sequence) and len(value) == 2
            and all(not isinstance(v, bool) and isinstance(v, int | float) and 0 <= v < math.inf for v in value)
        )  # fmt: skip

    def parse(self, text: str) -> tuple[float, float]:
        try:
            values = tuple(float(v) for v in text.split(","))
        except ValueError:
            raise ValueError(f"expected two numbers such as 0.5,0.5, got {text!r}") from None
        if values not in self:
            raise ValueError(f"expected {self.words}, got {text!r}")
        return values


def setting(
    default: Any,
    help: str | None,
    *,
    choices: Sequence | None = None,
    allowed: Interval | LossWeights | None = None,
    cast: type | None = None,
    metavar: str | None = None,
    adapter: bool | dict = False,
):
    """A recipe field: its default, the help of its option (None: no option, the default is kept), its `choices`
    or the values it is `allowed` (the option's parser refuses others, unless it only `cast`s the text and leaves
    them to `check`), and whether it goes into the adapter's config (`adapter`: True as it is, a dict to translate
    it)."""
    metadata = {
        "help": help, "choices": choices, "allowed": allowed, "cast": cast, "metavar": metavar, "adapter": adapter,
    }  # fmt: skip
    return field(default=default, metadata=metadata)


def flag_of(name: str) -> str:
    """The command-line option of field `name`: `feed_forward` -> `--feed-forward`."""
    return "--" + name.replace("_", "-")


@dataclass(kw_only=True)
class AdapterRecipe:
    """What adapter `train adapter` builds and how it learns it; the fields in the order `--help` lists them."""

    variant: str = setting("spatiallock", "what to train", choices=tuple(VARIANTS))
    positions: str | None = setting(
        None,
        "attention placement: default, all, down, up, inner, or names of attention modules "
        "(down_blocks.2.attentions.1) or of levels (down_blocks.2, mid_block)",
    )
    first_blocks: int | None = setting(
        None,
        "in each attention module the placement names, only its first K transformer blocks (SDXL stacks up to "
        "ten in one module at its coarse levels; default: all of them)",
        allowed=Interval(0, open_low=True, whole=True),
        cast=int,
        metavar="K",
        adapter=True,
    )
    loss_weights: tuple[float, float] | None = setting(
        None, "fixed diffusion,perception weights (default: learned uncertainty weights)", allowed=LossWeights(),
        metavar="WD,WP",
    )  # fmt: skip
    resolution: int | None = setting(
        None, "image side (default: the base's native size)", allowed=Interval(16, MAX_RESOLUTION, whole=True, step=8),
        cast=int,
    )  # fmt: skip
    mixed_precision: str = setting("no", "default: no", choices=MIXED_PRECISION)
    gradient_checkpointing: bool = setting(False, "trade compute for memory")
    split: str = setting("train", "split of the data folder (default: train)")
    query_positions: bool = setting(
        False,
        "add each visual token's cell position to its Grounding-Attention query (beyond the paper; for small "
        "bases whose features carry little absolute position)",
        adapter=True,
    )
    box_attention: bool = setting(
        False,
        "each visual token attends only to the objects whose boxes cover it, plus a learned term for where in "
        "the box it lies (beyond the paper: the attention is told where each object is instead of learning it, and "
        "can trace its outline; places objects in far fewer steps)",
        adapter=True,
    )
    ground_plain_levels: bool = setting(
        False,
        "also ground the levels without attention finer than every level with it (a U-Net that spares attention "
        "at its finest latent level): a Grounding-Attention block on each of their resnets' outputs, with box "
        "attention when --box-attention; where the objects' outlines are drawn (beyond the paper)",
        adapter=True,
    )
    feed_forward: str = setting(
        "all",
        "which Grounding-Attention blocks keep the paper's gated feed-forward: all (default, the paper's), "
        "finest (only those at the finest latent level, the narrowest) or none (lean blocks: on Stable Diffusion "
        "v1.4 the feed-forward holds 6 of every 7 parameters of a block; see `spatiallock params --config-from`)",
        choices=tuple(FEED_FORWARD_CHOICES),
        adapter=FEED_FORWARD_CHOICES,
    )
    attention_width: float = setting(
        1.0,
        "inner width of each Grounding-Attention as a share of its block's width, heads kept and each head "
        "narrower (default: 1, the paper's; 0.5 halves it)",
        allowed=Interval(0.0, 1.0, open_low=True),
        metavar="F",
        adapter=True,
    )
    grounding_steps: float = setting(
        1.0,
        "share of the sampling steps, from the first, the adapter grounds by default (saved in its config; "
        "sampling's --grounding-steps overrides it): 0.3 grounds the first 30% of the steps, where the layout is "
        "settled, and samples the rest at the base's own speed, as GLIGEN does (default: 1, every step)",
        allowed=Interval(0.0, 1.0),
        metavar="F",
        adapter=True,
    )
    perception_timesteps: int | None = setting(
        None,
        "compute the PoG perception loss only on the images noised at a timestep below T (of the schedule's "
        "1000): the head cannot see objects in nearly pure noise, and there its gradient only competes with the "
        "diffusion loss (default: every timestep, the paper's)",
        allowed=Interval(0, open_low=True, whole=True),
        metavar="T",
    )
    perception_input: str | None = setting(
        None,
        "what the PoG head reads: `rendered` (the U-Net's down-block features, without grounding, of the clean "
        "latents the adapter's prediction implies: the head sees only what was drawn, so its loss rewards objects "
        "drawn where asked; costs one down pass more per step) or `grounded` (the paper's: the grounded U-Net's "
        "down-block features of the noisy latents; they carry the requested boxes themselves, so the head reports "
        "the layout it is told whatever is drawn: AP 0.61 against another image's layout in the leak test, "
        "benchmarks/results/perception_head.json); saved in the config, and candidate selection and perception "
        "guidance read the same (default: rendered; a variant without a PoG head takes neither)",
        choices=PERCEPTION_INPUTS,
        adapter=True,
    )
    init_from: str | None = setting(
        None,
        "start from the weights of another adapter (`default`, a model folder or an adapter folder) wherever "
        "name and shape match, the rest fresh: continue a trained adapter as a lean one (its feed-forward left "
        "behind) in far fewer steps than from scratch",
        metavar="ADAPTER",
    )
    timestep_sampling: str = setting(
        "uniform",
        "training timesteps: uniform, or cubic (t = (1 - u^3) T: more of the noisy steps where layout matters)",
        choices=TIMESTEP_SAMPLING,
    )
    gate_lr_scale: float = setting(
        1.0,
        "the zero-initialised gates learn at F times the learning rate (default: 1): they open sooner",
        allowed=Interval(0.0, open_low=True),
        metavar="F",
    )
    max_train_samples: int | None = setting(
        None,
        "train on the first N images of the split only: an overfitting check (can the adapter place objects "
        "on layouts it sees again and again?) or a quick trial",
        allowed=Interval(0, open_low=True, whole=True),
        metavar="N",
    )
    reward_detector: str | None = setting(
        None,
        "fine-tune with an image-only detection reward: this frozen detector (`default`: the shipped judge; or a "
        "`train detector` folder trained on real images, not the one you evaluate with) scores the decoded clean "
        "estimate of the adapter's prediction against the image's boxes, and `loss = diffusion + s * detection` "
        "(--reward-weight) on the images noised at most to --reward-timesteps; unlike the PoG head it sees only "
        "what was drawn, never the layout (default: off)",
        metavar="DET",
    )
    reward_weight: float = setting(
        0.5, "s, the detection reward's weight (default: 0.5)", allowed=Interval(0.0, open_low=True), metavar="S"
    )
    reward_timesteps: int = setting(
        200,
        "the reward only on the images noised at a timestep of at most T of 1000, where the one-step clean estimate "
        "is sharp (default: 200, ControlNet++'s)",
        allowed=Interval(0, 999, whole=True),
        metavar="T",
    )
    # no option: the defaults of every run
    caption_dropout: float = setting(0.1, None, allowed=Interval(0.0, 1.0))
    layout_dropout: float = setting(0.1, None, allowed=Interval(0.0, 1.0))
    flip_prob: float = setting(0.5, None, allowed=Interval(0.0, 1.0))
    max_objects: int = setting(MAX_OBJECTS, None, allowed=Interval(0, open_low=True, whole=True))

    def check(self) -> None:
        """Refuse, with a `SpatialLockError` of one line naming the option, the first setting that is not one of
        its choices or not in its allowed values, or that another setting rules out."""
        for spec in fields(AdapterRecipe):
            value, meta = getattr(self, spec.name), spec.metadata
            if value is None and spec.default is None:
                continue
            if meta["choices"] is not None and value not in meta["choices"]:
                choices = ", ".join(map(str, meta["choices"]))
                raise SpatialLockError(f"{flag_of(spec.name)}: one of {choices}, got {value!r}")
            if meta["allowed"] is not None and value not in meta["allowed"]:
                raise SpatialLockError(f"{flag_of(spec.name)}: expected {meta['allowed'].words}, got {value!r}")
        if self.perception_input not in (None, "grounded") and not VARIANTS[self.variant][1]:
            raise SpatialLockError(f"--perception-input: variant {self.variant} has no PoG perception head")
        if self.ground_plain_levels and self.gradient_checkpointing:  # the plain levels' hooks cannot recompute
            raise SpatialLockError("--ground-plain-levels: not with --gradient-checkpointing")

    def adapter_options(self, class_names: Sequence[str]) -> dict[str, Any]:
        """The keyword arguments of `SpatialLockAdapter.from_unet`, after the variant and the placement, that build
        this recipe's adapter for data of `class_names` (the perception head's classes, by index)."""
        options = {}
        for spec in fields(AdapterRecipe):
            to_adapter = spec.metadata["adapter"]
            if to_adapter:
                value = getattr(self, spec.name)
                options[spec.name] = value if to_adapter is True else to_adapter[value]
        if self.perception_input is None:  # a head reads what was drawn; a variant without one records the default
            options["perception_input"] = DEFAULT_PERCEPTION_INPUT if VARIANTS[self.variant][1] else "grounded"
        if self.loss_weights is not None:  # else the adapter's own: learned (uncertainty) weights
            options.update(loss_weighting="fixed", loss_weights=self.loss_weights)
        options["class_names"] = list(class_names)
        return options


def recipe_options() -> list:
    """The fields of `AdapterRecipe` that are options of `train adapter`, in the order `--help` lists them."""
    return [spec for spec in fields(AdapterRecipe) if spec.metadata["help"] is not None]
