"""`spatiallock params`: trainable parameters of SpatialLock and the GLIGEN baseline on a base architecture."""

from __future__ import annotations

import argparse
import json

import torch

from spatiallock.configs import COCO_CLASSES, SD_V1_PHRASE_DIM, build_unet, unet_config
from spatiallock.models.adapter import SpatialLockAdapter
from spatiallock.models.injection import count_parameters


def count(base: str, num_classes: int = COCO_CLASSES, phrase_dim: int = SD_V1_PHRASE_DIM, positions=None) -> dict:
    """Parameter counts for `base`, built on the meta device (no weights, no download)."""
    unet = build_unet(unet_config(base), device="meta")
    with torch.device("meta"):
        spatiallock = SpatialLockAdapter.from_unet(unet, "spatiallock", positions, phrase_dim, num_classes)
        gligen = SpatialLockAdapter.from_unet(unet, "gligen", None, phrase_dim, num_classes)
    parts = spatiallock.parameter_counts()
    gligen_total = gligen.parameter_counts()["total"]
    return {
        "base": base,
        "base_params": count_parameters(unet),
        "spatiallock_trainable": parts["total"],
        "spatiallock_parts": parts,
        "spatiallock_blocks": list(spatiallock.config.blocks),
        "gligen_trainable": gligen_total,
        "ratio": parts["total"] / gligen_total,
    }


def run(args: argparse.Namespace) -> int:
    result = count(args.base, args.num_classes, args.phrase_dim, args.positions)
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
    print(f"Parameters on {result['base']} (PoG with {args.num_classes} classes):")
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
        epilog="example: spatiallock params --base sd-v1-4 --json",
    )
    parser.add_argument("--base", default="sd-v1-4", help="sd-v1-4, sd-v1-5, or a diffusers model folder")
    parser.add_argument("--num-classes", type=int, default=COCO_CLASSES, help="PoG classes (default: 80, COCO)")
    parser.add_argument(
        "--phrase-dim", type=int, default=SD_V1_PHRASE_DIM, help="pooled phrase embedding size (default: 768, CLIP)"
    )
    parser.add_argument("--positions", default=None, help="attention placement: a preset or comma-separated names")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)
