"""`spatiallock train lama`: the LAMA baseline, a layout-to-image GAN."""

from __future__ import annotations

import argparse

from spatiallock.commands.train_common import add_loop_options, check_number, exit_code, loop_config, step_list
from spatiallock.errors import SpatialLockError

LAMA_HELP = """\
Train the LAMA baseline (seed 003), a layout-to-image GAN: each object's mask is generated from its class,
size and noise and put into its box; the Locality-Aware Mask Adaption sharpens where masks overlap; a
mask-to-image generator (ISLA-Norm ResNet blocks) draws the image; an image and an object discriminator
train it. Modules and training follow the authors' code (ZejianLi/LAMA): spectral norm and orthogonal
initialisation, gated residuals, alternating updates (the discriminator, then the generator through the
updated discriminator), the generator held for the first 31 steps of every epoch, learning rates 10x lower
from 60 % and again from 80 % of --max-steps. --no-adaption trains the control without the adaption (masks
only normalised); --pixel-query the paper's Table 5 ablation (matching on the pixel query only). Writes
LAMA/config.json + LAMA/model.safetensors (the generator), which `generate`, `evaluate` and
`generate-dataset` take as --model. Checkpoints (both players) and the loss log go to LAMA/train/;
Ctrl-C writes a checkpoint and stops; --resume continues. A loss that becomes NaN stops the run.

example:
  spatiallock train lama --data data/shapes --out runs/lama
  spatiallock train lama --data data/shapes --out runs/lama-no-adaption --no-adaption
  spatiallock train lama --data data/shapes --out runs/lama-pixel-query --pixel-query
  spatiallock generate --model runs/lama --layout examples/two_shapes.json --out outputs --save-masks
"""


def lr_drops(args: argparse.Namespace) -> tuple[int, ...]:
    """The steps from which the learning rates drop 10x: --lr-drops; else those a resumed run recorded (so that
    a longer --max-steps on --resume does not move them); else 60 % and 80 % of --max-steps."""
    import json
    from pathlib import Path

    from spatiallock.training.lama import lr_milestones

    if args.lr_drops is not None:
        return step_list(args.lr_drops, "--lr-drops")
    recorded = Path(args.out) / "train" / "config.json"
    if args.resume and recorded.is_file():
        try:
            return tuple(json.loads(recorded.read_text(encoding="utf-8"))["loop"]["lr_milestones"])
        except (OSError, ValueError, KeyError, TypeError):
            pass  # unreadable: the resume check names the problem
    return lr_milestones(args.max_steps)


def run_lama(args: argparse.Namespace) -> int:
    from spatiallock.training.lama import LR_SCALES, LamaTrainConfig, train_lama

    check_number("--flip-prob", args.flip_prob, 0.0, 1.0)
    check_number("--d-lr-scale", args.d_lr_scale, 0.0, 1e3, open_low=True)
    check_number("--alpha-lr-scale", args.alpha_lr_scale, 0.0, 1e4, open_low=True)
    check_number("--gate-lr-scale", args.gate_lr_scale, 0.0, 1e4, open_low=True)
    if args.no_adaption and args.alpha_lr_scale != 1.0:
        raise SpatialLockError("--alpha-lr-scale: there is no adaption strength with --no-adaption")
    if args.no_adaption and args.pixel_query:
        raise SpatialLockError("--pixel-query: there is no query to match with --no-adaption")
    if not 0 <= args.generator_delay <= 10_000:
        raise SpatialLockError(f"--generator-delay: must be 0 to 10000, got {args.generator_delay}")
    d_channels = args.d_channels if args.d_channels is not None else max(args.channels // 2, 1)
    sizes = (("--max-objects", args.max_objects), ("--channels", args.channels), ("--d-channels", d_channels))
    for name, value in sizes:
        if not 1 <= value <= 256:
            raise SpatialLockError(f"{name}: must be 1 to 256, got {value}")
    if args.resolution not in (32, 64, 128, 256):
        raise SpatialLockError(f"--resolution: one of 32, 64, 128, 256, got {args.resolution}")
    loop = loop_config(args, args.max_steps, args.batch_size, args.lr)
    loop.betas, loop.max_grad_norm, loop.model_lr_scales = (0.0, 0.999), 0.0, (("discriminator", args.d_lr_scale),)
    loop.lr_scales, loop.lr_milestones = LR_SCALES, lr_drops(args)
    config = LamaTrainConfig(
        data=args.data, out=args.out, split=args.split, flip_prob=args.flip_prob, adaption=not args.no_adaption,
        local_query=not args.pixel_query, resolution=args.resolution, max_objects=args.max_objects,
        channels=args.channels, d_channels=d_channels, alpha_lr_scale=args.alpha_lr_scale,
        gate_lr_scale=args.gate_lr_scale, generator_delay=args.generator_delay, loop=loop,
    )  # fmt: skip
    result = train_lama(config)
    message = f"LAMA model written to {args.out} ({result.step} steps, last losses {result.last_losses})"
    return exit_code(result, message)


def register(sub) -> None:
    """Add `train lama` to the subcommands of `train`."""
    formatter = argparse.RawDescriptionHelpFormatter
    lama = sub.add_parser(
        "lama", help="train the LAMA baseline (layout -> masks -> image GAN)", description=LAMA_HELP,
        formatter_class=formatter,
    )  # fmt: skip
    lama.add_argument("--data", required=True, metavar="DIR", help="COCO-format layout folder")
    lama.add_argument("--out", required=True, metavar="LAMA", help="model folder to write")
    lama.add_argument("--split", default="train", help="split to train on (default: train)")
    lama.add_argument("--no-adaption", action="store_true", help="the control: no Locality-Aware Mask Adaption")
    lama.add_argument(
        "--pixel-query", action="store_true",
        help="the paper's Table 5 ablation: the adaption matches keys with the pixel query, no local query",
    )  # fmt: skip
    lama.add_argument("--resolution", type=int, default=64, help="image side: 32, 64, 128 or 256 (default: 64)")
    lama.add_argument("--max-objects", type=int, default=8, help="objects per layout, largest first (default: 8)")
    lama.add_argument("--channels", type=int, default=16, help="generator width: 8c down to c (default: 16)")
    lama.add_argument(
        "--d-channels", type=int, default=None, metavar="C",
        help="discriminator base width: C to 16C (default: half of --channels, so both players' widest layers match)",
    )  # fmt: skip
    lama.add_argument("--flip-prob", type=float, default=0.5, help="horizontal flip probability (default: 0.5)")
    lama.add_argument(
        "--d-lr-scale", type=float, default=3.0, help="discriminator learning rate / --lr (default: 3, the paper's)"
    )
    lama.add_argument(
        "--alpha-lr-scale", type=float, default=1.0, metavar="F",
        help="the adaption strength alpha learns at F x --lr (default: 1; it starts at 0 and, at 1e-4, moves at "
        "most 0.1 in 1,000 steps)",
    )  # fmt: skip
    lama.add_argument(
        "--gate-lr-scale", type=float, default=1.0, metavar="F",
        help="ours, not the authors': every gate that starts at 0 (residual, ISLA, mask and local-query gates, the "
        "strength alpha, the discriminator's gates) learns at F x its rate (default: 1, the authors'). At 1e-4 a "
        "gate moves about 1e-4 a step: at most about 0.2 in 3,000 steps, where the authors train some 40,000",
    )  # fmt: skip
    lama.add_argument(
        "--generator-delay", type=int, default=31, metavar="N",
        help="steps at the start of every epoch in which only the discriminator learns (default: 31, the authors')",
    )  # fmt: skip
    lama.add_argument(
        "--lr-drops", default=None, metavar="STEP,STEP",
        help="steps from which the learning rates drop 10x each (default: 60 %% and 80 %% of --max-steps, the "
        "authors' epochs 120 and 160 of 200; a resumed run keeps the ones it recorded)",
    )  # fmt: skip
    add_loop_options(lama, steps=3000, batch=32, lr=1e-4)
    lama.set_defaults(func=run_lama)
