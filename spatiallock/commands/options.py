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
    from spatiallock.files import writable_folder

    return writable_folder(out, option)


def make_out_folder(out: Path, option: str = "--out") -> Path:
    """Create the output folder checked by `check_out_folder`, at the first file written to it."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SpatialLockError(f"{option}: cannot make {out}: {err.strerror}") from None
    return out


def add_sampling_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by every command that samples: the model, then the sampling options table
    (`spatiallock.sampling.options.OPTIONS`), then --no-progress."""
    from spatiallock.sampling.options import add_arguments

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
    add_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def set_judge(pipe, options) -> None:
    """Give `pipe` the image-only judge of `--judge` (a detector folder), if any; refusals name the option."""
    if getattr(options, "judge", None) is None:
        return
    from spatiallock.evaluation.reward import ImageJudge
    from spatiallock.shipped import resolve_judge

    try:
        pipe.set_judge(ImageJudge.from_pretrained(resolve_judge(options.judge)))
    except SpatialLockError as err:
        raise SpatialLockError(f"--judge: {str(err).partition(': ')[2]}") from None
