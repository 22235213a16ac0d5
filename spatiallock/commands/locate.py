"""`spatiallock locate`: where a new object of a class could go in an image, sampled from the location model."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from spatiallock.errors import SpatialLockError

MAX_BOXES = 1000  # --n: boxes sampled at once

HELP = """\
Sample boxes for a new object in an image from a location model (the shipped one of the shelves domain, or
--model, one of `spatiallock train locator`): where an object labelled --label could go. Prints one box per
line (normalised x0 y0 x1 y1, most likely first) with its log-probability, or one JSON object with --json;
--out draws them on the image. --region x0,y0,x1,y1 keeps the boxes inside that part of the image (image
fractions).

examples:
  spatiallock locate --image examples/scene.png --label "red circle" --n 5
  spatiallock locate --model runs/locator-dpo --image examples/scene.png --label "blue square" \\
      --region 0,0,0.5,1 --out boxes.png --json
"""


def parse_box(text: str, name: str) -> tuple[float, float, float, float]:
    """ "x0,y0,x1,y1" in image fractions, inside the image with x1 > x0 and y1 > y0; else one error line."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4:
        raise SpatialLockError(f"{name}: expected x0,y0,x1,y1 (four numbers), got {text!r}")
    x0, y0, x1, y1 = values
    if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
        raise SpatialLockError(f"{name}: {text!r} is not a box inside the image (need 0 <= x0 < x1 <= 1, same for y)")
    return x0, y0, x1, y1


def load_locator(model: str, option: str = "--model"):
    from spatiallock.location.locator import Locator
    from spatiallock.shipped import default_locator_path

    folder = default_locator_path() if model == "default" else Path(model)
    if not folder.is_dir():
        if model == "default":
            raise SpatialLockError(f"{option}: the shipped locator is missing from {folder}; reinstall the package")
        raise SpatialLockError(f"{option}: {model}: not a folder (spatiallock train locator --data DIR --out LOC)")
    return Locator.from_pretrained(folder)


def sample_boxes(locator, image, labels, seed: int, region=None, option: str = "--image") -> list[tuple[list, float]]:
    """Boxes for a new object in `image` (a file, or an RGB image already read), one per entry of `labels`
    (`locator.label_index`), with their log-probabilities, most likely first."""
    import torch

    from spatiallock.location.locator import load_background

    pixels = load_background(image, locator.config.image_size, option).to(locator.device)
    generator = torch.Generator().manual_seed(seed)
    boxes, scores = locator.sample(pixels.expand(len(labels), -1, -1, -1), labels, generator, region=region)
    return [(boxes[i].tolist(), float(scores[i])) for i in scores.argsort(descending=True).tolist()]


def run(args: argparse.Namespace) -> int:
    from spatiallock.files import writable_folder
    from spatiallock.sampling.options import BY_NAME

    if not 1 <= args.n <= MAX_BOXES:
        raise SpatialLockError(f"--n: must be 1 to {MAX_BOXES}, got {args.n}")
    BY_NAME["seed"].check(args.seed)
    region = parse_box(args.region, "--region") if args.region else None
    out = Path(args.out) if args.out else None
    if out is not None and out.is_dir():
        raise SpatialLockError(f"--out {out}: is a folder; give the PNG file to write")
    if out is not None:  # before any sampling: a file in the way or a folder this user cannot write
        writable_folder(out.parent, "--out")
    locator = load_locator(args.model)
    labels = locator.label_index([args.label] * args.n, what="--label")
    if region is not None:
        bins = locator.config.bins
        if (region[2] - region[0]) * bins < 2 or (region[3] - region[1]) * bins < 2:
            raise SpatialLockError(f"--region: {args.region} has no room for a box (under 2/{bins} of the image)")
    found = sample_boxes(locator, args.image, labels, args.seed, region)
    if out is not None:
        from spatiallock.data.draw import draw_boxes
        from spatiallock.files import atomic_output, read_image_option

        drawn = draw_boxes(read_image_option(args.image, "--image"), [args.label] * len(found), [b for b, _ in found])
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(out, "wb") as handle:
            drawn.save(handle, format="PNG")
    if args.json:
        print(json.dumps({
            "image": str(args.image), "label": args.label, "region": region,
            "boxes": [{"box": [round(v, 4) for v in box], "log_prob": round(score, 4)} for box, score in found],
        }))  # fmt: skip
    else:
        for box, score in found:
            print(" ".join(f"{v:.4f}" for v in box) + f"  log p {score:.3f}")
        if out is not None:
            print(f"wrote {out}", file=sys.stderr)
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "locate", help="sample boxes where a new object could go in an image", description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--image", required=True, metavar="IMG", help="the image to place the object in")
    parser.add_argument("--label", required=True, help='the object\'s class, e.g. "red circle"')
    parser.add_argument("--model", default="default", metavar="LOC", help="locator folder (default: the shipped one)")
    parser.add_argument("--n", type=int, default=10, help="boxes to sample (default: 10)")
    parser.add_argument("--region", metavar="X0,Y0,X1,Y1", help="keep the boxes inside this box (image fractions)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--out", metavar="PNG", help="also draw the boxes on the image into this file")
    parser.set_defaults(func=run)
