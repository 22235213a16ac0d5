"""The sampling options, each declared once: flag, help, type and range, default, the model kinds that take it,
whether it changes the images, and the pipeline argument it becomes.

Everything else is made from `OPTIONS`: the argparse options of every command that samples (`add_arguments`),
the `SamplingOptions` dataclass and its checks (errors name the option), the pipeline's keyword arguments, the
refusal of an option a model kind does not take, the page's defaults, and the settings that `generate-dataset`
records and compares on resume (`SamplingOptions.settings`: every option that changes an image). A new option is
one entry here.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, make_dataclass

from spatiallock.errors import SpatialLockError
from spatiallock.layout import Layout
from spatiallock.pipelines.loading import SCHEDULERS
from spatiallock.pipelines.protocol import DIFFUSION, LAYOUT_GAN

EVERY_KIND = frozenset({DIFFUSION, LAYOUT_GAN})
DTYPES = ("fp32", "fp16", "bf16")
MISSING_LABELS = ("add", "error")
MAX_SEED = 2**32 - 1  # with it every image's own seed (`image_generator`) stays within torch's 64 bits
MAX_CANDIDATES = 64  # --candidates: a batch K times as large as the images asked for
MAX_SIZE = 4096  # --size: a side beyond this is a typo, not an image (SD v1 is made for 512)
SAMPLING, CONTROL = "sampling", "training-free layout control"


def yes_no(text: str) -> bool:
    """argparse type of a yes|no option."""
    if text.lower() in ("yes", "no"):
        return text.lower() == "yes"
    raise argparse.ArgumentTypeError(f"expected yes or no, got {text!r}")


@dataclass(frozen=True)
class Option:
    """One sampling option.

    `low`/`high` bound a number (`open_low`/`open_high`: the bound itself is refused; `what` words the range
    in the error); `kinds`: the model kinds that take it (another kind refuses any value but the default);
    `output`: whether it changes the images (recorded and compared on resume); `argument`: the pipeline call's
    keyword (None: not a pipeline argument); `active`: the option that switches its group on (its arguments
    reach the pipeline only when that one is not at its default)."""

    name: str
    type: Callable
    default: object
    help: str
    metavar: str | None = None
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    what: str = "must be"
    choices: tuple | None = None
    kinds: frozenset = frozenset({DIFFUSION})
    output: bool = True
    argument: str | None = None
    active: str | None = None
    aliases: tuple[str, ...] = ()
    group: str = SAMPLING
    flag: bool = False  # a switch (store_true)

    @property
    def flag_name(self) -> str:
        return "--" + self.name.replace("_", "-")

    def check(self, value) -> None:
        """Refuse, in one line naming the option, a value of the wrong kind or out of range."""
        if value is None:
            return
        if self.choices is not None:
            if value not in self.choices:
                raise SpatialLockError(f"{self.flag_name}: one of {', '.join(self.choices)}, got {value!r}")
            return
        if self.type in (int, float) and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise SpatialLockError(f"{self.flag_name}: a number, got {value!r}")
        if self.type is int and isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
            raise SpatialLockError(f"{self.flag_name}: a whole number, got {value}")
        if self.low is None and self.high is None:
            return
        low = -math.inf if self.low is None else self.low
        high = math.inf if self.high is None else self.high
        inside = (low < value if self.open_low else low <= value) and (
            value < high if self.open_high else value <= high
        )
        if isinstance(value, float) and not math.isfinite(value) or not inside:
            if self.open_low or self.open_high:
                limits = f"in {'(' if self.open_low else '['}{low:g}, {high:g}{')' if self.open_high else ']'}"
            else:
                limits = f"from {self.low} to {self.high}" if high < math.inf else f"at least {self.low}"
            raise SpatialLockError(f"{self.flag_name}: {self.what} {limits}, got {value}")


OPTIONS: tuple[Option, ...] = (
    Option("seed", int, 0, "random seed, 0 to 4294967295 (default: 0)", "S", 0, MAX_SEED, kinds=EVERY_KIND),
    Option("steps", int, 25, "sampling steps (default: 25)", "T", 1, argument="num_inference_steps"),
    Option(
        "guidance",
        float,
        5.0,
        "classifier-free guidance scale (default: 5.0)",
        "G",
        0.0,
        what="a finite number",
        argument="guidance_scale",
    ),  # fmt: skip
    Option(
        "scheduler",
        str,
        None,
        "sampler (default: the model's own; DPM-Solver++ for the small base)",
        choices=tuple(SCHEDULERS),
    ),  # fmt: skip
    Option(
        "grounding_steps",
        float,
        None,
        "share of the steps, from the first, that use the layout; after them the base runs alone, at its own "
        "speed (default: the adapter's own, recorded in its config; 1.0 unless it says otherwise)",
        "F",
        0.0,
        1.0,
        what="a share",
        argument="grounding_steps",
    ),  # fmt: skip
    Option(
        "ground_unconditional",
        yes_no,
        None,
        "with classifier-free guidance, whether the unconditional half of each U-Net call also goes through "
        "the adapter, with an empty layout (yes, as it was trained), or is the plain base's (no: the adapter runs "
        "on the conditional half alone, half its cost) (default: the adapter's own; yes unless it says otherwise)",
        "yes|no",
        argument="ground_unconditional",
    ),  # fmt: skip
    Option(
        "candidates",
        int,
        1,
        "sample K candidates per image in one batch, score them with the adapter's PoG perception head against "
        "the requested layout after --select-at of the steps and finish only the best (default: 1, no selection)",
        "K",
        1,
        MAX_CANDIDATES,
        argument="candidates",
    ),  # fmt: skip
    Option(
        "select_at",
        float,
        0.3,
        "share of the steps, in (0, 1), after which --candidates are scored (default: 0.3)",
        "F",
        0.0,
        1.0,
        open_low=True,
        open_high=True,
        what="a share of the steps",
        argument="select_at",
        active="candidates",
    ),  # fmt: skip
    Option(
        "perception_guidance_steps",
        int,
        0,
        "for the first N steps, move the latents down the gradient of the adapter's PoG head's detection loss "
        "against the requested layout (the backward pass through the U-Net's down blocks only) (default: 0, off)",
        "N",
        0,
        argument="perception_guidance_steps",
    ),  # fmt: skip
    Option(
        "perception_guidance_scale",
        float,
        0.1,
        "size of each such move in latent units, the gradient normalised per image (default: 0.1)",
        "S",
        0.0,
        what="a finite number",
        argument="perception_guidance_scale",
        active="perception_guidance_steps",
    ),  # fmt: skip
    Option(
        "judge",
        str,
        None,
        "score --candidates and steer --perception-guidance-steps with this frozen detector on the image each "
        "step's clean estimate decodes to, instead of the adapter's PoG head: it sees only what was drawn, never "
        "the layout. `default`: the shipped judge (a detector of the synthetic domain trained apart from the "
        "evaluation detector); or a `train detector` folder, not the one you evaluate with. On the shipped model "
        "`--judge default --perception-guidance-steps 10` places objects better at about twice the time "
        "(default: the PoG head)",
        "DET",
    ),  # fmt: skip
    Option(
        "size",
        int,
        None,
        "image side, at most 4096 (default: the model's)",
        "PX",
        8,
        MAX_SIZE,
        kinds=EVERY_KIND,
        argument="height",
    ),  # fmt: skip
    Option("batch_size", int, 8, "images per batch (default: 8)", "B", 1, kinds=EVERY_KIND, output=False),  # fmt: skip
    Option("dtype", str, "fp32", "weights' precision (default: fp32)", choices=DTYPES),
    Option(
        "layout_guidance_steps",
        int,
        0,
        "cross-attention layout guidance for the first N sampling steps: the latents follow the gradient of "
        "a loss that wants each label's tokens to attend inside its box (default: 0, off). Not --guidance, which "
        "is classifier-free guidance",
        "N",
        0,
        argument="layout_guidance_steps",
        aliases=("--guidance-steps",),
        group=CONTROL,
    ),  # fmt: skip
    Option(
        "layout_guidance_scale",
        float,
        20.0,
        "step size of that gradient update at the first step, decaying linearly to S/N at step N (default: 20)",
        "S",
        0.0,
        what="a finite number",
        argument="layout_guidance_scale",
        active="layout_guidance_steps",
        group=CONTROL,
    ),  # fmt: skip
    Option(
        "layout_guidance_iterations",
        int,
        3,
        "gradient updates per guided step, each about three U-Net calls (default: 3)",
        "K",
        1,
        argument="layout_guidance_iterations",
        active="layout_guidance_steps",
        aliases=("--guidance-iterations",),
        group=CONTROL,
    ),  # fmt: skip
    Option(
        "layout_guidance_layers",
        str,
        None,
        "comma-separated U-Net blocks whose cross-attention is guided, e.g. mid_block,up_blocks.1 "
        "(default: the mid block and the first up block with attention)",
        "NAMES",
        argument="layout_guidance_layers",
        active="layout_guidance_steps",
        group=CONTROL,
    ),  # fmt: skip
    Option(
        "missing_labels",
        str,
        "add",
        "with layout guidance, a label its caption does not name is added to the caption "
        "(', a red circle', with a warning) or is an error (default: add)",
        choices=MISSING_LABELS,
        argument="missing_labels",
        active="layout_guidance_steps",
        group=CONTROL,
    ),  # fmt: skip
    Option(
        "init_image",
        str,
        None,
        "start from this reference image, DDIM-inverted, instead of random noise: objects tend to appear "
        "where it has them (the seed then no longer changes the image with a deterministic sampler)",
        "PATH",
        argument="init_image",
        group=CONTROL,
    ),  # fmt: skip
    Option(
        "init_from_layout",
        bool,
        False,
        "as --init-image, with each layout rendered as a reference: its boxes filled with the label's colour "
        "word's colour (else a fixed colour per label) on grey",
        argument="init_from_layout",
        group=CONTROL,
        flag=True,
    ),  # fmt: skip
    Option(
        "init_strength",
        float,
        1.0,
        "share of the noise schedule the reference is inverted through; sampling runs that share of --steps "
        "(default: 1.0, all of it)",
        "F",
        0.0,
        1.0,
        open_low=True,
        what="a share",
        argument="init_strength",
        active="init",
        group=CONTROL,
    ),  # fmt: skip
    Option(
        "init_steps",
        int,
        None,
        "DDIM inversion steps (default: as many as sampling then runs, so both walk the same timesteps; "
        "exactly so with --scheduler ddim)",
        "N",
        1,
        argument="init_steps",
        active="init",
        group=CONTROL,
    ),  # fmt: skip
)
BY_NAME = {option.name: option for option in OPTIONS}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `OPTIONS` as argparse options of a command that samples, in groups."""
    groups = {SAMPLING: parser}
    for option in OPTIONS:
        if option.group not in groups:
            groups[option.group] = parser.add_argument_group(
                option.group, "with or without an adapter; see spatiallock/pipelines/extensions/"
            )
        target = groups[option.group]
        names = (option.flag_name, *option.aliases)
        if option.flag:
            target.add_argument(*names, action="store_true", help=option.help)
            continue
        kwargs = {"default": option.default, "help": option.help}
        if option.choices is not None:
            kwargs["choices"] = sorted(option.choices) if option.name == "scheduler" else option.choices
        else:
            kwargs.update(type=option.type, metavar=option.metavar)
        target.add_argument(*names, **kwargs)


class _Options:
    """The methods of `SamplingOptions` (its fields come from `OPTIONS`)."""

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SamplingOptions:
        """The options a parsed command line holds (those it lacks keep their defaults)."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})

    def changed(self) -> list[Option]:
        """The options not at their default."""
        return [option for option in OPTIONS if getattr(self, option.name) != option.default]

    def check(self) -> None:
        """Refuse, in one line naming the option, a value no pipeline call could use: every number finite and in
        its range, options that exclude each other, an init image that cannot be read."""
        for option in OPTIONS:
            option.check(getattr(self, option.name))
        if self.candidates > 1 and self.uses_init:
            raise SpatialLockError("--candidates: not with --init-image or --init-from-layout (same start for all)")
        if self.init_image is not None and self.init_from_layout:
            raise SpatialLockError("--init-image and --init-from-layout: give one of them")
        if self.init_image is not None:
            self._check_init_image()

    def _check_init_image(self) -> None:
        from spatiallock.files import read_image_option

        read_image_option(self.init_image, "--init-image")

    @property
    def uses_init(self) -> bool:
        return self.init_image is not None or self.init_from_layout

    def _is_active(self, option: Option) -> bool:
        if option.active is None:
            return True
        if option.active == "init":
            return self.uses_init
        switch = BY_NAME[option.active]
        return getattr(self, switch.name) != switch.default

    def pipeline_kwargs(self, kind: str = DIFFUSION) -> dict:
        """The pipeline call's keyword arguments these options mean for a model of `kind`: the options it takes
        that are pipeline arguments, those of a feature only when the feature is on."""
        kwargs = {}
        for option in OPTIONS:
            if option.argument is None or kind not in option.kinds:
                continue
            if option.argument in ("init_image", "init_from_layout"):
                if self.uses_init:
                    kwargs[option.argument] = getattr(self, option.name)
            elif getattr(self, option.name) != option.default or option.active is None:
                if self._is_active(option):
                    kwargs[option.argument] = getattr(self, option.name)
        if "height" in kwargs:
            kwargs["width"] = kwargs["height"]
        return kwargs

    def refuse_for(self, kind: str, what: str) -> None:
        """Refuse, in one line, the first option not at its default that a model of `kind` does not take
        (`what`: the model, in words, for the message)."""
        for option in self.changed():
            if kind not in option.kinds:
                raise SpatialLockError(f"{option.flag_name}: a {DIFFUSION} sampling option; {what} has no use for it")

    def record(self, pipe=None) -> dict:
        """Every option under its name, for a report; with `pipe`, the values it actually uses for those left to
        the model (scheduler, size, the adapter's own grounding choices), None for those it has no use for."""
        record = {option.name: getattr(self, option.name) for option in OPTIONS}
        if pipe is not None:
            record.update(pipe.resolved_options(self))
        return record

    def settings(self) -> dict:
        """Every option that changes an image, under its name: what a resumed data set must match."""
        return {option.name: getattr(self, option.name) for option in OPTIONS if option.output}

    def check_for(self, pipe, layouts: Sequence[Layout]) -> None:
        """Refuse, before anything is generated or written, what this model cannot do with these options and
        layouts (`pipe.check_options`): one line naming the option."""
        pipe.check_options(self, layouts)


SamplingOptions = make_dataclass(
    "SamplingOptions",
    [(option.name, object, field(default=option.default)) for option in OPTIONS],
    bases=(_Options,),
    namespace={
        "__doc__": "Everything that decides a generated image besides the model and the layout, under the command "
        "line's option names (`--layout-guidance-steps` is `layout_guidance_steps`); see `OPTIONS`. `size` None: "
        "the model's own; `scheduler` None: the model folder's; `grounding_steps` and `ground_unconditional` None: "
        "the adapter's own.",
        "__module__": __name__,
    },
)


def setting_differences(previous: dict, settings: dict) -> list[str]:
    """The names whose values differ between two recorded settings; an option missing from `previous` (a data
    set written before the option existed) counts as its default."""
    defaults = {option.name: option.default for option in OPTIONS}
    names = set(previous) | set(settings)
    return sorted(n for n in names if previous.get(n, defaults.get(n)) != settings.get(n, defaults.get(n)))
