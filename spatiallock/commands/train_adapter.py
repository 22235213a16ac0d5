"""`spatiallock train adapter`: its options besides the folders and the loop are the fields of the adapter's
training recipe (`spatiallock.training.recipe.AdapterRecipe`), each made into an option here."""

from __future__ import annotations

import argparse

from spatiallock.commands.train_common import add_loop_options, argument_type, exit_code, loop_config
from spatiallock.training.recipe import flag_of, recipe_options

ADAPTER_HELP = """\
Train an adapter on a frozen base: the small base's folder, or a Stable Diffusion v1.x or SDXL folder or hub
id (then use --resolution 512 or 1024, --mixed-precision bf16 and --gradient-checkpointing on a GPU; on SDXL's
deep stacks --first-blocks 1 keeps the first transformer block of each attention module). Only the adapter
is trained and saved (config.json + safetensors in ADAPTER/); checkpoints and the loss log go to
ADAPTER/train/. Ctrl-C writes a checkpoint and stops; --resume continues from the newest one.
Several GPUs or machines: `accelerate launch -m spatiallock.cli train adapter ...`.

variants:
  spatiallock  Grounding-Attention + PoG with Enh-Fusion (the method)
  poi          Grounding-Attention only
  poi-pog      Grounding-Attention + PoG without Enh-Fusion
  gligen       GLIGEN-style gated self-attention in every transformer block (the baseline)

lean blocks (under a third of GLIGEN's parameters on Stable Diffusion v1.4 in every down and up block; count
any recipe with `spatiallock params --base sd-v1-4 --config-from ADAPTER`):
  --feed-forward none   Grounding-Attention without the paper's gated feed-forward (finest: only at the
                        finest latent level, where the blocks are narrowest)
  --attention-width F   each block's attention F times as wide (heads kept)
  --init-from ADAPTER   start from a trained adapter's weights wherever they fit

examples:
  spatiallock train adapter --base models/base --data data/shapes --out models/spatiallock   # the paper's
  spatiallock train adapter --base models/base --data data/shapes --out models/spatiallock-lean \\
      --box-attention --positions all --feed-forward none --lr 5e-4 --gate-lr-scale 10 --max-steps 3000
  spatiallock train adapter --base models/base --data data/shapes --out runs/all --positions all
  spatiallock train adapter --base models/base --data data/shapes --out runs/fixed --loss-weights 0.5,0.5
"""


def add_recipe_options(parser: argparse.ArgumentParser) -> None:
    """One option per field of the recipe that has a help: its flag, default, choices or type, metavar and help
    (a field that is off by default is a switch)."""
    for spec in recipe_options():
        meta = spec.metadata
        text = meta["help"].replace("%", "%%")  # argparse formats help with %
        if spec.default is False:
            parser.add_argument(flag_of(spec.name), action="store_true", help=text)
            continue
        kind = None  # the text as it is
        if meta["cast"] is not None:  # only cast: the recipe's check refuses what is not allowed
            kind = meta["cast"]
        elif meta["allowed"] is not None:
            kind = argument_type(meta["allowed"])
        parser.add_argument(
            flag_of(spec.name), type=kind, default=spec.default, choices=meta["choices"], metavar=meta["metavar"],
            help=text,
        )  # fmt: skip


def run_adapter(args: argparse.Namespace) -> int:
    from spatiallock.shipped import resolve_model
    from spatiallock.training.adapter import AdapterTrainConfig, train_adapter

    recipe = {spec.name: getattr(args, spec.name) for spec in recipe_options()}
    loop = loop_config(args, args.max_steps, args.batch_size, args.lr, warmup=50)
    base = resolve_model(args.base) if args.base == "default" else args.base  # the shipped small base
    result = train_adapter(AdapterTrainConfig(base=base, data=args.data, out=args.out, loop=loop, **recipe))
    message = f"adapter written to {args.out} ({result.step} steps, last losses {result.last_losses})"
    return exit_code(result, message)


def register(sub) -> None:
    """Add `train adapter` to the subcommands of `train`."""
    adapter = sub.add_parser(
        "adapter", help="train a SpatialLock or GLIGEN-style adapter", description=ADAPTER_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    adapter.add_argument("--base", required=True, metavar="MODEL", help="base model folder, hub id or default")
    adapter.add_argument("--data", required=True, metavar="DIR", help="COCO-format layout folder")
    adapter.add_argument("--out", required=True, metavar="ADAPTER", help="adapter folder to write")
    add_recipe_options(adapter)
    add_loop_options(adapter, steps=2000, batch=16, lr=1e-4)
    adapter.set_defaults(func=run_adapter)
