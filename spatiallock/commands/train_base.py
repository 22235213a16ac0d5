"""`spatiallock train base`: the small text-to-image base of the synthetic domain."""

from __future__ import annotations

import argparse

from spatiallock.commands.train_common import (
    add_loop_options,
    check_number,
    check_resolution,
    exit_code,
    loop_config,
    positive,
    positive_int,
    step_list,
    widths,
)

BASE_HELP = """\
Train the small text-to-image base of the synthetic domain on captions only: first a small autoencoder
(--vae-steps), then the U-Net (--max-steps) on its latents, conditioned on the frozen all-MiniLM-L6-v2.
Writes a diffusers-layout folder (unet/, vae/, scheduler/, tokenizer/, model_index.json) and keeps
checkpoints and a JSON-lines log of the losses in MODEL/train/. Ctrl-C writes a checkpoint and stops;
--resume continues from the newest one.

example:
  spatiallock data synth --out data/shapes --train 10000 --val 1000
  spatiallock train base --data data/shapes --out models/base
"""


def run_base(args: argparse.Namespace) -> int:
    from spatiallock.training.base import BaseTrainConfig, train_base

    check_resolution("--resolution", args.resolution, multiple=16)
    check_number("--ema-decay", args.ema_decay, 0.0, 1.0, open_high=True)
    config = BaseTrainConfig(
        data=args.data, out=args.out, resolution=args.resolution, init_from=args.init_from, vae_from=args.vae_from,
        mixed_precision=args.mixed_precision, snr_gamma=args.snr_gamma, latent_channels=args.latent_channels,
        latent_size=args.latent_size, vae_widths=args.vae_widths, vae_layers=args.vae_layers,
        vae_only=args.vae_only, unet_widths=args.unet_widths, unet_plain_levels=args.unet_plain_levels,
        latent_patch=args.latent_patch, unet_warm_start=args.unet_warm_start,
        vae=loop_config(args, args.vae_steps, args.vae_batch_size, args.vae_lr, lr_option="--vae-lr"),
        unet=loop_config(args, args.max_steps, args.batch_size, args.lr, warmup=100),
    )  # fmt: skip
    config.unet.ema_decay = args.ema_decay
    if args.vae_lr_drops is not None:
        config.vae.lr_milestones = step_list(args.vae_lr_drops, "--vae-lr-drops")
    result = train_base(config)
    if args.vae_only:
        message = (
            f"autoencoder written to {args.out}/vae ({result.step} steps, last loss {result.last_losses.get('loss')})"
        )
    else:
        message = (
            f"base model written to {args.out} ({result.step} U-Net steps, last loss {result.last_losses.get('loss')})"
        )
    return exit_code(result, message)


def register(sub) -> None:
    """Add `train base` to the subcommands of `train`."""
    formatter = argparse.RawDescriptionHelpFormatter
    base = sub.add_parser("base", help="train the small base model", description=BASE_HELP, formatter_class=formatter)
    base.add_argument("--data", required=True, metavar="DIR", help="COCO-format layout folder (train split)")
    base.add_argument("--out", required=True, metavar="MODEL", help="model folder to write")
    base.add_argument("--resolution", type=int, default=64, help="image side in pixels (default: 64)")
    base.add_argument("--vae-steps", type=int, default=1500, metavar="N", help="autoencoder steps (default: 1500)")
    base.add_argument("--vae-batch-size", type=int, default=16, metavar="B", help="autoencoder batch (default: 16)")
    base.add_argument("--vae-lr", type=float, default=1e-3, help="autoencoder learning rate (default: 1e-3)")
    base.add_argument(
        "--vae-lr-drops", default=None, metavar="STEP,STEP",
        help="autoencoder steps from which its learning rate is 10x lower each (default: constant)",
    )  # fmt: skip
    base.add_argument(
        "--ema-decay", type=float, default=0.999, metavar="D",
        help="save the U-Net as a moving average of its weights with this decay; 0: off (default: 0.999)",
    )  # fmt: skip
    base.add_argument(
        "--init-from", default=None, metavar="MODEL",
        help="start from an existing base folder (the shipped one: spatiallock/assets/default): keep its autoencoder "
        "and train its U-Net further",
    )  # fmt: skip
    base.add_argument(
        "--vae-from", default=None, metavar="FOLDER",
        help="train a new U-Net on an autoencoder trained before (an autoencoder folder, e.g. the vae/ of a "
        "--vae-only run, or a base folder): the latent shape options then follow it",
    )  # fmt: skip
    base.add_argument(
        "--unet-warm-start", default=None, metavar="MODEL",
        help="a new U-Net (as --unet-widths and --latent-patch say) that starts from every tensor of MODEL's U-Net "
        "with the same name and shape, the rest fresh: e.g. the shipped U-Net's blocks for a U-Net on the latents "
        "of another autoencoder (--vae-from), whose input and output layers alone differ; with plain finer levels "
        "in front of MODEL's widths (--unet-widths 32,64,128,192 --unet-plain-levels 1 on 64,128,192) MODEL's blocks "
        "start the coarser levels",
    )  # fmt: skip
    base.add_argument(
        "--mixed-precision", default="no", choices=["no", "bf16", "fp16"],
        help="autocast; bf16 is about 1.3x faster on CPUs with AMX or AVX-512 BF16 (default: no)",
    )  # fmt: skip
    base.add_argument(
        "--snr-gamma", type=positive, default=None, metavar="G",
        help="Min-SNR-gamma loss weighting (5 is the usual value): faster convergence (default: plain MSE)",
    )  # fmt: skip
    shape = base.add_argument_group(
        "latent shape", "the autoencoder's latent and the U-Net on it (measure candidates with benchmarks/ceiling.py)"
    )
    shape.add_argument(
        "--latent-channels", type=positive_int, default=4, metavar="C", help="latent channels (default: 4)"
    )
    shape.add_argument(
        "--latent-size", type=positive_int, default=None, metavar="S",
        help="latent side: the resolution over a power of 2 (default: resolution / 4, 16 at 64 px)",
    )  # fmt: skip
    shape.add_argument(
        "--vae-widths", type=widths, default=None, metavar="W,W,..",
        help="autoencoder channels per level, finest first: log2(resolution / latent size) + 1 of them "
        "(default: 32,64,64 at factor 4, 32,64 at factor 2)",
    )  # fmt: skip
    shape.add_argument(
        "--vae-layers", type=positive_int, default=1, metavar="L", help="autoencoder layers a block (default: 1)"
    )
    shape.add_argument(
        "--vae-only", action="store_true",
        help="stop once the autoencoder is trained (written to MODEL/vae); a later run without it and with "
        "--resume trains the U-Net on it",
    )  # fmt: skip
    shape.add_argument(
        "--unet-widths", type=widths, default=(64, 128, 192), metavar="W,W,..",
        help="U-Net channels per level, attention at all but the coarsest (default: 64,128,192)",
    )  # fmt: skip
    shape.add_argument(
        "--unet-plain-levels", type=int, default=0, metavar="N",
        help="the N finest U-Net levels without attention: keeps a 32x32 latent's U-Net cheap (default: 0)",
    )  # fmt: skip
    base.add_argument(
        "--latent-patch", type=positive_int, default=1, metavar="P",
        help="the U-Net takes each PxP patch of the latent as one cell of P*P times the channels: a 32x32x4 latent "
        "is diffused as 16x16x16, at the cost of a 16x16 U-Net (default: 1, the latent as it is)",
    )  # fmt: skip
    add_loop_options(base, steps=5000, batch=32, lr=3e-4)
    base.set_defaults(func=run_base)
