"""What the `train` commands share: the argparse types and the checks of their options, the loop options every
trainer takes (`add_loop_options`, checked into a `LoopConfig` by `loop_config`) and the exit code of a run."""

from __future__ import annotations

import argparse
import math

from spatiallock.errors import SpatialLockError
from spatiallock.training.recipe import MAX_RESOLUTION, Interval, LossWeights

MAX_SEED = 2**32 - 1


def argument_type(allowed: Interval | LossWeights):
    """An argparse type: `allowed.parse(text)`, refused as argparse refuses ("argument --x: expected ...")."""

    def parse(text: str):
        try:
            return allowed.parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return parse


positive = argument_type(Interval(0.0, open_low=True))
positive_int = argument_type(Interval(0, open_low=True, whole=True))


def step_list(text: str, option: str) -> tuple[int, ...]:
    """Comma-separated step numbers of `option` (e.g. "3000,4000"), each at least 1; a `SpatialLockError` naming
    the option otherwise."""
    try:
        steps = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise SpatialLockError(f"{option}: comma-separated step numbers, got {text!r}") from None
    if any(step < 1 for step in steps):
        raise SpatialLockError(f"{option}: steps must be at least 1, got {text!r}")
    return steps


def widths(text: str) -> tuple[int, ...]:
    """An argparse type: comma-separated positive channel counts, e.g. "32,64,64"."""
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1 or max(values) > 4096:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated channel counts from 1 to 4096 (e.g. 32,64,64), got {text!r}"
        )
    return values


def add_loop_options(parser: argparse.ArgumentParser, steps: int, batch: int, lr: float) -> None:
    parser.add_argument("--max-steps", type=int, default=steps, metavar="N", help=f"training steps (default: {steps})")
    parser.add_argument(
        "--batch-size", type=int, default=batch, metavar="B", help=f"batch size per process (default: {batch})"
    )
    parser.add_argument("--lr", type=float, default=lr, help=f"learning rate (default: {lr})")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--checkpoint-every", type=int, default=500, metavar="K", help="steps between checkpoints")
    parser.add_argument("--keep", type=int, default=3, help="checkpoints kept (default: 3)")
    parser.add_argument("--num-workers", type=int, default=0, help="data loader processes (default: 0)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the output")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def check_number(name: str, value: float, low: float, high: float, *, open_low=False, open_high=False) -> None:
    """`SpatialLockError` naming the option unless `value` is finite and within [low, high] (ends open as asked)."""
    inside = math.isfinite(value) and (value > low if open_low else value >= low)
    inside = inside and (value < high if open_high else value <= high)
    if not inside:
        where = f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
        raise SpatialLockError(f"{name}: must be a finite number in {where}, got {value}")


def check_resolution(name: str, value: int | None, multiple: int = 8) -> None:
    if value is not None and (not 16 <= value <= MAX_RESOLUTION or value % multiple):
        raise SpatialLockError(f"{name}: must be a multiple of {multiple} from 16 to {MAX_RESOLUTION}, got {value}")


def loop_config(args: argparse.Namespace, steps: int, batch: int, lr: float, warmup: int = 0, lr_option: str = "--lr"):
    from spatiallock.training.loop import LoopConfig

    for name, value in (
        ("--max-steps", steps),
        ("--batch-size", batch),
        ("--checkpoint-every", args.checkpoint_every),
    ):
        if value < 1:
            raise SpatialLockError(f"{name}: must be at least 1, got {value}")
    for name, value in (("--num-workers", args.num_workers), ("--warmup-steps", warmup)):
        if value < 0:
            raise SpatialLockError(f"{name}: must be 0 or more, got {value}")
    check_number(lr_option, lr, 0.0, 1.0, open_low=True)
    if not 0 <= args.seed <= MAX_SEED:
        raise SpatialLockError(f"--seed: must be 0 to {MAX_SEED}, got {args.seed}")
    return LoopConfig(
        max_steps=steps, batch_size=batch, learning_rate=lr, warmup_steps=warmup, seed=args.seed,
        checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep, num_workers=args.num_workers,
        resume=args.resume, progress=not args.no_progress,
    )  # fmt: skip


def exit_code(result, message: str) -> int:
    """130 when Ctrl-C stopped the run (a checkpoint is written); else print `message` and give 0."""
    if result.interrupted:
        return 130
    print(message)
    return 0
