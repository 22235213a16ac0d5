"""Command-line options shared by every command that samples (generate, generate-dataset, evaluate)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from spatiallock.errors import SpatialLockError

DTYPES = ("fp32", "fp16", "bf16")  # the keys of spatiallock.sampling.run.DTYPES, without importing torch for --help


def check_out_folder(out: str | os.PathLike, option: str = "--out") -> Path:
    """Refuse, before any work and without creating anything, an output folder that could not be written: one
    that is a file, lies under a file, or lies in a folder this user cannot write."""
    from spatiallock.data.cocofile import writable_folder

    return writable_folder(out, option)


def make_out_folder(out: Path, option: str = "--out") -> Path:
    """Create the output folder checked by `check_out_folder`, at the first file written to it."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SpatialLockError(f"{option}: cannot make {out}: {err.strerror}") from None
    return out


def _yes_no(text: str) -> bool:
    if text.lower() in ("yes", "no"):
        return text.lower() == "yes"
    raise argparse.ArgumentTypeError(f"expected yes or no, got {text!r}")


def add_sampling_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by every command that samples."""
    from spatiallock.pipelines.diffusion import SCHEDULERS

    parser.add_argument(
        "--model",
        required=True,
        metavar="MODEL",
        help="model folder, hub id (from the Hugging Face cache, fetched there once if need be) or `default`",
    )
    parser.add_argument(
        "--adapter", default=None, metavar="ADAPTER",
        help="adapter folder to attach to MODEL, or `none` for the base alone (default: MODEL's own adapter, if any)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="random seed, 0 to 4294967295 (default: 0)")
    parser.add_argument("--steps", type=int, default=25, metavar="T", help="sampling steps (default: 25)")
    parser.add_argument(
        "--guidance", type=float, default=5.0, metavar="G", help="classifier-free guidance scale (default: 5.0)"
    )
    parser.add_argument(
        "--scheduler", default=None, choices=sorted(SCHEDULERS),
        help="sampler (default: the model's own; DPM-Solver++ for the small base)",
    )  # fmt: skip
    parser.add_argument(
        "--grounding-steps", type=float, default=None, metavar="F",
        help="share of the steps, from the first, that use the layout; after them the base runs alone, at its own "
        "speed (default: the adapter's own, recorded in its config; 1.0 unless it says otherwise)",
    )  # fmt: skip
    parser.add_argument(
        "--ground-unconditional", type=_yes_no, default=None, metavar="yes|no",
        help="with classifier-free guidance, whether the unconditional half of each U-Net call also goes through "
        "the adapter, with an empty layout (yes, as it was trained), or is the plain base's (no: the adapter runs "
        "on the conditional half alone, half its cost) (default: the adapter's own; yes unless it says otherwise)",
    )  # fmt: skip
    parser.add_argument(
        "--candidates", type=int, default=1, metavar="K",
        help="sample K candidates per image in one batch, score them with the adapter's PoG perception head against "
        "the requested layout after --select-at of the steps and finish only the best (default: 1, no selection)",
    )  # fmt: skip
    parser.add_argument(
        "--select-at", type=float, default=0.3, metavar="F",
        help="share of the steps, in (0, 1), after which --candidates are scored (default: 0.3)",
    )  # fmt: skip
    parser.add_argument(
        "--perception-guidance-steps", type=int, default=0, metavar="N",
        help="for the first N steps, move the latents down the gradient of the adapter's PoG head's detection loss "
        "against the requested layout (the backward pass through the U-Net's down blocks only) (default: 0, off)",
    )  # fmt: skip
    parser.add_argument(
        "--perception-guidance-scale", type=float, default=0.1, metavar="S",
        help="size of each such move in latent units, the gradient normalised per image (default: 0.1)",
    )  # fmt: skip
    parser.add_argument(
        "--size", type=int, default=None, metavar="PX", help="image side, at most 4096 (default: the model's)"
    )
    parser.add_argument("--batch-size", type=int, default=8, metavar="B", help="images per batch (default: 8)")
    parser.add_argument("--dtype", default="fp32", choices=DTYPES, help="weights' precision (default: fp32)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_layout_control_options(parser)


def add_layout_control_options(parser: argparse.ArgumentParser) -> None:
    """Training-free layout control: cross-attention guidance and spatial-aware initialisation."""
    group = parser.add_argument_group(
        "training-free layout control",
        "with or without an adapter; see spatiallock/pipelines/extensions/ (layout_guidance, layout_init)",
    )
    group.add_argument(
        "--layout-guidance-steps", "--guidance-steps", type=int, default=0, metavar="N",
        help="cross-attention layout guidance for the first N sampling steps: the latents follow the gradient of "
        "a loss that wants each label's tokens to attend inside its box (default: 0, off). Not --guidance, which "
        "is classifier-free guidance",
    )  # fmt: skip
    group.add_argument(
        "--layout-guidance-scale", type=float, default=20.0, metavar="S",
        help="step size of that gradient update at the first step, decaying linearly to S/N at step N (default: 20)",
    )  # fmt: skip
    group.add_argument(
        "--layout-guidance-iterations", "--guidance-iterations", type=int, default=3, metavar="K",
        help="gradient updates per guided step, each about three U-Net calls (default: 3)",
    )  # fmt: skip
    group.add_argument(
        "--layout-guidance-layers", default=None, metavar="NAMES",
        help="comma-separated U-Net blocks whose cross-attention is guided, e.g. mid_block,up_blocks.1 "
        "(default: the mid block and the first up block with attention)",
    )  # fmt: skip
    group.add_argument(
        "--missing-labels", default="add", choices=("add", "error"),
        help="with layout guidance, a label its caption does not name is added to the caption "
        "(', a red circle', with a warning) or is an error (default: add)",
    )  # fmt: skip
    group.add_argument(
        "--init-image", default=None, metavar="PATH",
        help="start from this reference image, DDIM-inverted, instead of random noise: objects tend to appear "
        "where it has them (the seed then no longer changes the image with a deterministic sampler)",
    )  # fmt: skip
    group.add_argument(
        "--init-from-layout", action="store_true",
        help="as --init-image, with each layout rendered as a reference: its boxes filled with the label's colour "
        "word's colour (else a fixed colour per label) on grey",
    )  # fmt: skip
    group.add_argument(
        "--init-strength", type=float, default=1.0, metavar="F",
        help="share of the noise schedule the reference is inverted through; sampling runs that share of --steps "
        "(default: 1.0, all of it)",
    )  # fmt: skip
    group.add_argument(
        "--init-steps", type=int, default=None, metavar="N",
        help="DDIM inversion steps (default: as many as sampling then runs, so both walk the same timesteps; "
        "exactly so with --scheduler ddim)",
    )  # fmt: skip
