"""`spatiallock train locator`: the location model of a shelves data set, scored after training."""

from __future__ import annotations

import argparse

from spatiallock.commands.train_common import add_loop_options, check_number, exit_code, loop_config
from spatiallock.errors import SpatialLockError

LOCATOR_HELP = """\
Train the location model (where a new object of a class could go in an image) on a shelves data set
(`spatiallock data synth --scene shelves`): an autoregressive transformer over a box's four quantised
coordinates, reading the image with the object removed and the class embedded by the text encoder.

Stage 1 (no --dpo): the likelihood of the positive boxes. Stage 2 (--dpo --init-from STAGE1): Direct
Preference Optimization on a positive against a negative box of the same scene, against a frozen copy of
STAGE1. Writes LOC/config.json + LOC/model.safetensors, then samples --eval-samples boxes on each scene
of --eval-split and prints how often the most likely one, and all of them, keep the rules (the scene's
checker decides); written to LOC/eval.json. Checkpoints and the loss log go to LOC/train/; Ctrl-C writes a
checkpoint and stops; --resume continues.

example:
  spatiallock data synth --out data/shelves --train 5000 --val 300 --scene shelves --min-objects 2
  spatiallock train locator --data data/shelves --out runs/locator
  spatiallock train locator --data data/shelves --out runs/locator-dpo --dpo --init-from runs/locator
"""


def run_locator(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from spatiallock.files import write_text_atomic
    from spatiallock.location.locator import Locator
    from spatiallock.training.locator import LocatorTrainConfig, plausibility, train_locator

    check_number("--beta", args.beta, 0.0, 1e3, open_low=True)
    check_number("--sft-weight", args.sft_weight, 0.0, 1e3)
    if not 2 <= args.bins <= 1024:
        raise SpatialLockError(f"--bins: must be 2 to 1024, got {args.bins}")
    if args.eval_samples < 1:
        raise SpatialLockError(f"--eval-samples: must be at least 1, got {args.eval_samples}")
    if args.init_from and not Path(args.init_from).is_dir():
        raise SpatialLockError(f"--init-from: {args.init_from} is not a locator folder")
    loop = loop_config(args, args.max_steps, args.batch_size, args.lr, warmup=100)
    loop.weight_decay = 0.01
    config = LocatorTrainConfig(
        data=args.data, out=args.out, split=args.split, dpo=args.dpo, init_from=args.init_from, beta=args.beta,
        sft_weight=args.sft_weight, bins=args.bins, loop=loop,
    )  # fmt: skip
    result = train_locator(config, eval_split=args.eval_split)  # the split scored after training: checked first
    if exit_code(result, f"locator written to {args.out} ({result.step} steps, last losses {result.last_losses})"):
        return 130
    if not (Path(args.data) / f"placements_{args.eval_split}.json").is_file():
        print(f"no {args.eval_split} placements in {args.data}: not scored")
        return 0
    scores = plausibility(Locator.from_pretrained(args.out), args.data, args.eval_split, args.eval_samples)
    record = {**scores, "samples": args.eval_samples, "split": args.eval_split, "steps": result.step, "dpo": args.dpo}
    write_text_atomic(Path(args.out) / "eval.json", json.dumps(record, indent=2) + "\n")
    print(
        f"{args.eval_split}: top box plausible on {scores['top1_plausible']:.1%} of {scores['scenes']} scenes, "
        f"{scores['plausible_rate']:.1%} of {args.eval_samples} samples each; written to {args.out}/eval.json"
    )
    return 0


def register(sub) -> None:
    """Add `train locator` to the subcommands of `train`."""
    formatter = argparse.RawDescriptionHelpFormatter
    locator = sub.add_parser(
        "locator", help="train the location model (where a new object could go) on a shelves data set",
        description=LOCATOR_HELP, formatter_class=formatter,
    )  # fmt: skip
    locator.add_argument("--data", required=True, metavar="DIR", help="shelves data folder (placements_<split>.json)")
    locator.add_argument("--out", required=True, metavar="LOC", help="locator folder to write")
    locator.add_argument("--split", default="train", help="split to train on (default: train)")
    locator.add_argument("--dpo", action="store_true", help="stage 2: DPO on positive against negative boxes")
    locator.add_argument("--init-from", metavar="LOC", help="locator to start from (with --dpo: also the reference)")
    locator.add_argument("--beta", type=float, default=0.1, help="DPO temperature beta (default: 0.1)")
    locator.add_argument(
        "--sft-weight", type=float, default=0.0, metavar="W",
        help="with --dpo: add W x the positives' negative log-likelihood to the loss (default: 0)",
    )  # fmt: skip
    locator.add_argument("--bins", type=int, default=64, help="tokens per coordinate (default: 64)")
    locator.add_argument("--eval-split", default="val", help="split to score the result on (default: val)")
    locator.add_argument("--eval-samples", type=int, default=10, metavar="N", help="boxes per scene (default: 10)")
    add_loop_options(locator, steps=3000, batch=32, lr=3e-4)
    locator.set_defaults(func=run_locator)
