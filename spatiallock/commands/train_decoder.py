"""`spatiallock train decoder`: a base's autoencoder with a sharper decoder."""

from __future__ import annotations

import argparse

from spatiallock.commands.train_common import add_loop_options, check_resolution, exit_code, loop_config

DECODER_HELP = """\
Sharpen a base's autoencoder: train its decoder alone on the images of DIR (L1 + MSE), the encoder frozen.
The latent space does not move, so the base's U-Net and every adapter trained on it still fit; only the pixels
their latents decode to change. The autoencoder bounds every layout score (real images sent through it and
back score what a perfect U-Net would: the `autoencoder` row of benchmarks/synthetic.py), so a better decoder
lifts every row at once. Writes a copy of the base folder with the new vae/ (an adapter/ in it is copied along);
checkpoints and the loss log go to OUT/train/. Ctrl-C writes a checkpoint and stops; --resume continues.
MODEL may also be an autoencoder alone (a `train base --vae-only` run): OUT then holds the new vae/ alone, and
the decoder trains while a U-Net trains on the same latents (`train base --vae-from`).

example:
  spatiallock train decoder --base spatiallock/assets/default --data data/shapes --out models/base-sharp
  spatiallock train decoder --base runs/ae-32x32x4 --data data/shapes --out runs/ae-32x32x4-dec
"""


def run_decoder(args: argparse.Namespace) -> int:
    from spatiallock.shipped import resolve_model
    from spatiallock.training.decoder import DecoderTrainConfig, train_decoder

    check_resolution("--resolution", args.resolution)
    base = resolve_model(args.base) if args.base == "default" else args.base  # the shipped small base
    config = DecoderTrainConfig(
        base=base, data=args.data, out=args.out, resolution=args.resolution, split=args.split,
        mixed_precision=args.mixed_precision,
        loop=loop_config(args, args.max_steps, args.batch_size, args.lr, warmup=50),
    )  # fmt: skip
    result = train_decoder(config)
    message = (
        f"base with the new decoder written to {args.out} ({result.step} steps, last losses {result.last_losses})"
    )
    return exit_code(result, message)


def register(sub) -> None:
    """Add `train decoder` to the subcommands of `train`."""
    formatter = argparse.RawDescriptionHelpFormatter
    decoder = sub.add_parser(
        "decoder", help="sharpen a base's autoencoder (its decoder alone; U-Net and adapters still fit)",
        description=DECODER_HELP, formatter_class=formatter,
    )  # fmt: skip
    decoder.add_argument(
        "--base", required=True, metavar="MODEL",
        help="model folder (or autoencoder folder) whose decoder is trained",
    )  # fmt: skip
    decoder.add_argument("--data", required=True, metavar="DIR", help="COCO-format layout folder (its images)")
    decoder.add_argument("--out", required=True, metavar="MODEL", help="model folder to write (a copy of the base)")
    decoder.add_argument("--resolution", type=int, default=64, help="image side in pixels (default: 64)")
    decoder.add_argument("--split", default="train", help="split of the data folder (default: train)")
    decoder.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"], help="default: no")
    add_loop_options(decoder, steps=3000, batch=16, lr=3e-4)
    decoder.set_defaults(func=run_decoder)
