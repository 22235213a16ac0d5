"""`spatiallock params`: trainable parameters of SpatialLock and the GLIGEN baseline on a base architecture."""

from __future__ import annotations

import argparse
import json

import torch

from spatiallock.base.configs import COCO_CLASSES, SD_V1_PHRASE_DIM, build_unet, unet_config
from spatiallock.errors import SpatialLockError
from spatiallock.models.adapter import RECIPE, SpatialLockAdapter
from spatiallock.models.injection import count_parameters
from spatiallock.sampling import adapter_like


def count(
    base: str,
    num_classes: int = COCO_CLASSES,
    phrase_dim: int = SD_V1_PHRASE_DIM,
    positions=None,
    config_from: str | None = None,
    first_blocks: int | None = None,
) -> dict:
    """Parameter counts for `base`, built on the meta device (no weights, no download): the paper's SpatialLock
    at `positions`, or an adapter built by the recipe of `config_from`'s adapter; `first_blocks` keeps only the
    first K transformer blocks of each attention module of the placement (the GLIGEN-style count keeps all)."""
    unet = build_unet(unet_config(base), device="meta")
    with torch.device("meta"):
        if config_from is None:
            spatiallock = SpatialLockAdapter.from_unet(
                unet, "spatiallock", positions, phrase_dim, num_classes, first_blocks=first_blocks
            )
        else:
            spatiallock = adapter_like(config_from, unet, phrase_dim, num_classes)
            if first_blocks is not None:
                config = {**spatiallock.config, "first_blocks": first_blocks}
                spatiallock = SpatialLockAdapter.like(config, unet, phrase_dim, num_classes)
        gligen = SpatialLockAdapter.from_unet(unet, "gligen", None, phrase_dim, num_classes)
    parts = spatiallock.parameter_counts()
    gligen_total = gligen.parameter_counts()["total"]
    result = {
        "base": base,
        "base_params": count_parameters(unet),
        "spatiallock_trainable": parts["total"],
        "spatiallock_parts": parts,
        "spatiallock_blocks": list(spatiallock.config.blocks),
        "gligen_trainable": gligen_total,
        "ratio": parts["total"] / gligen_total,
    }
    if config_from is not None:
        result["config_from"] = config_from
        result["recipe"] = {
            key: spatiallock.config[key] for key in (*RECIPE, "positions") if key in spatiallock.config
        }
    return result


def run(args: argparse.Namespace) -> int:
    if args.config_from and args.positions:
        raise SpatialLockError("positions: give --positions or --config-from (whose placement it uses), not both")
    for name, value, high in (("--num-classes", args.num_classes, 100_000), ("--phrase-dim", args.phrase_dim, 65_536)):
        if not 1 <= value <= high:
            raise SpatialLockError(f"{name}: from 1 to {high}, got {value}")
    if args.first_blocks is not None and args.first_blocks < 1:
        raise SpatialLockError(f"--first-blocks: at least 1, got {args.first_blocks}")
    result = count(args.base, args.num_classes, args.phrase_dim, args.positions, args.config_from, args.first_blocks)
    if args.json:
        print(json.dumps(result))
        return 0
    parts = result["spatiallock_parts"]
    rows = [
        ("base U-Net (frozen)", result["base_params"]),
        ("SpatialLock: grounding tokens", parts["grounding_tokens"]),
        ("SpatialLock: Grounding-Attention blocks", parts["attention_blocks"]),
        ("SpatialLock: PoG (FPN, Enh-Fusion, heads)", parts["perception"]),
        ("SpatialLock: loss weights", parts["loss_weights"]),
        ("SpatialLock: trainable total", parts["total"]),
        ("GLIGEN-style: trainable total", result["gligen_trainable"]),
    ]
    what = f", the recipe of {args.config_from}" if args.config_from else ""
    print(f"Parameters on {result['base']} (PoG with {args.num_classes} classes{what}):")
    for name, value in rows:
        print(f"  {name:<44} {value:>14,}")
    print(f"  {'ratio SpatialLock / GLIGEN':<44} {result['ratio']:>14.4f}")
    print(f"  attention blocks: {', '.join(result['spatiallock_blocks'])}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "params",
        help="count base and trainable parameters (SpatialLock vs GLIGEN-style)",
        description="Build the base U-Net on the meta device (no weights, no download) and count the trainable "
        "parameters of the SpatialLock adapter and of a GLIGEN-style adapter on it.",
        epilog="examples:\n  spatiallock params --base sd-v1-4 --json\n"
        "  spatiallock params --base sd-v1-4 --config-from default   # the shipped recipe, counted on SD v1.4\n"
        "  spatiallock params --base sdxl --config-from default --first-blocks 1   # on SDXL, first block of each",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--base", default="sd-v1-4", help="sd-v1-4, sd-v1-5, sdxl (SDXL base 1.0), or a diffusers model folder"
    )
    parser.add_argument("--num-classes", type=int, default=COCO_CLASSES, help="PoG classes (default: 80, COCO)")
    parser.add_argument(
        "--phrase-dim", type=int, default=SD_V1_PHRASE_DIM, help="pooled phrase embedding size (default: 768, CLIP)"
    )
    parser.add_argument("--positions", default=None, help="attention placement: a preset or comma-separated names")
    parser.add_argument(
        "--config-from", default=None, metavar="MODEL",
        help="count an adapter built by the recipe of MODEL's adapter (`default`, a model folder or an adapter "
        "folder): its variant, placement and options such as --box-attention or --no-feed-forward, sized for --base",
    )  # fmt: skip
    parser.add_argument(
        "--first-blocks", type=int, default=None, metavar="K",
        help="count the placement's first K transformer blocks of each attention module only (SDXL stacks ten)",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)
