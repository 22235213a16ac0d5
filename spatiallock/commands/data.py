"""`spatiallock data`: write the synthetic layout data set (`synth`) and look at any COCO-format split (`show`)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from spatiallock.errors import SpatialLockError

MAX_SYNTH_SIZE = 1024  # `data synth --size`: the synthetic domain is drawn at 32 to 1024 pixels
MAX_SYNTH_OBJECTS = 30  # `data synth --max-objects`: the most object slots a layout may have
MAX_CELL = 1024  # `data show --cell`
SCENE_KINDS = ("shapes", "shelves")  # `data synth --scene` (spatiallock.data.synth.SCENES)

SYNTH_HELP = """\
Draw the synthetic layout domain: 16 categories ("red circle" ... "yellow diamond"), 1 to 6 objects
per image on textured backgrounds, 5 captions per image, in the COCO 2017 file formats:

  DIR/train/000000000001.png ...      DIR/instances_train.json   DIR/captions_train.json
  DIR/val/000000000001.png ...        DIR/instances_val.json     DIR/captions_val.json

The same seed writes the same bytes. The scene options draw harder sets than the training domain, to see
how a model holds up on layouts unlike those it learnt from: more objects, smaller ones, more overlap.

--scene shelves draws a domain where placement has rules (spatiallock.data.shelves): two or three boards,
objects standing on them, sized to their shelf, proportioned to their shape, not piled on each other. Each
image's `shelves` are in the instances file, and for each image one object is taken out again:

  DIR/train-removed/000000000001.png  the image without that object
  DIR/placements_train.json           its label, its box, and positive and negative boxes for it
                                      (normalised xyxy; the rules' checker says which are which)

examples:
  spatiallock data synth --out data/shapes --train 10000 --val 1000 --seed 0
  spatiallock data synth --out data/hard --train 0 --val 300 --seed 7 --min-objects 5 --max-objects 6 \
      --max-extent 0.3 --min-visible 0.3     # five or six small objects, overlapping, often at the border
  spatiallock data synth --out data/shelves --train 5000 --val 300 --scene shelves --min-objects 2
"""

SHOW_HELP = """\
Draw boxes, labels and the first caption on images of a COCO-format split, as one grid PNG.
DIR is a folder written by `data synth`, or a COCO 2017 folder (annotations/instances_val2017.json,
val2017/); or give the three paths with --instances, --captions and --images.

examples:
  spatiallock data show data/shapes --split val --out val-grid.png
  spatiallock data show coco --split val2017 --num 9 --seed 1 --out coco-grid.png
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `data` command and its `synth` and `show` subcommands."""
    data = subparsers.add_parser(
        "data", help="make or inspect layout data sets", description="Make or inspect COCO-format layout data sets."
    )
    sub = data.add_subparsers(dest="data_command", metavar="<subcommand>", required=True)
    formatter = argparse.RawDescriptionHelpFormatter

    synth = sub.add_parser(
        "synth", help="write the synthetic shapes data set", description=SYNTH_HELP, formatter_class=formatter
    )
    synth.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    synth.add_argument("--train", type=int, required=True, metavar="N", help="number of training images")
    synth.add_argument("--val", type=int, required=True, metavar="M", help="number of validation images")
    synth.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default: 0)")
    synth.add_argument(
        "--size", type=int, default=64, metavar="PX",
        help=f"image side in pixels, 32 to {MAX_SYNTH_SIZE} (default: 64)",
    )  # fmt: skip
    synth.add_argument(
        "--workers", type=int, default=None, metavar="W", help="processes (default: CPU count, at most 8)"
    )
    scene = synth.add_argument_group("scene (defaults: the training domain)")
    scene.add_argument(
        "--scene", choices=SCENE_KINDS, default="shapes",
        help="shapes scattered on a background (default), or standing on shelves (see above)",
    )  # fmt: skip
    scene.add_argument("--min-objects", type=int, default=1, metavar="K", help="fewest objects per image (default: 1)")
    scene.add_argument(
        "--max-objects", type=int, default=6, metavar="K",
        help=f"most objects per image, at most {MAX_SYNTH_OBJECTS} (default: 6; fewer where no room is left)",
    )  # fmt: skip
    scene.add_argument(
        "--max-extent", type=float, default=None, metavar="F",
        help="largest object side as a share of the image side, 0.08 to 1 (default: 0.6; objects are 0.08 and up; "
        "shapes only: on shelves, sizes follow the shelf)",
    )  # fmt: skip
    scene.add_argument(
        "--min-visible", type=float, default=None, metavar="F",
        help="share of each object that later ones may not cover, 0.05 to 1 (default: 0.5; lower: more overlap; "
        "shapes only)",
    )  # fmt: skip
    synth.add_argument("--no-progress", action="store_true", help="no progress bar")
    synth.set_defaults(func=run_synth)

    show = sub.add_parser(
        "show", help="draw layouts on images as a grid PNG", description=SHOW_HELP, formatter_class=formatter
    )
    show.add_argument("data", nargs="?", metavar="DIR", help="data set folder (see above)")
    show.add_argument("--split", default="val", help="split name: train, val, val2017, ... (default: val)")
    show.add_argument("--instances", metavar="FILE", help="COCO instances JSON (instead of DIR)")
    show.add_argument("--captions", metavar="FILE", help="COCO captions JSON (instead of DIR)")
    show.add_argument("--images", metavar="DIR", help="image folder (instead of DIR)")
    show.add_argument("--out", required=True, metavar="PNG", help="grid image to write")
    show.add_argument("--num", type=int, default=16, metavar="N", help="number of images (default: 16)")
    show.add_argument(
        "--cell", type=int, default=192, metavar="PX",
        help=f"side of one image in the grid, 32 to {MAX_CELL} (default: 192)",
    )  # fmt: skip
    show.add_argument(
        "--seed", type=int, default=None, help="pick images at random with this seed (default: the first N)"
    )
    show.set_defaults(func=run_show)


def run_synth(args: argparse.Namespace) -> int:
    """Handle `data synth`: check the arguments, write the data set, print what was written."""
    from spatiallock.data.synth import synthesize
    from spatiallock.files import writable_folder

    for name in ("train", "val", "seed"):
        if getattr(args, name) < 0:
            raise SpatialLockError(f"--{name} must be 0 or more, got {getattr(args, name)}")
    if args.train + args.val == 0:
        raise SpatialLockError("--train and --val are both 0: nothing to write")
    if not 32 <= args.size <= MAX_SYNTH_SIZE:
        raise SpatialLockError(f"--size must be 32 to {MAX_SYNTH_SIZE} pixels, got {args.size}")
    if args.workers is not None and args.workers < 1:
        raise SpatialLockError(f"--workers must be 1 or more, got {args.workers}")
    if not 1 <= args.min_objects <= args.max_objects <= MAX_SYNTH_OBJECTS:
        raise SpatialLockError(
            f"--min-objects and --max-objects: need 1 <= min <= max <= {MAX_SYNTH_OBJECTS}, "
            f"got {args.min_objects} and {args.max_objects}"
        )
    if args.scene == "shelves":
        for name in ("max_extent", "min_visible"):
            if getattr(args, name) is not None:
                raise SpatialLockError(
                    f"--{name.replace('_', '-')}: shapes scenes only (on shelves, the rules decide)"
                )
    args.max_extent = 0.6 if args.max_extent is None else args.max_extent
    args.min_visible = 0.5 if args.min_visible is None else args.min_visible
    if not 0.08 <= args.max_extent <= 1:  # also refuses nan
        raise SpatialLockError(f"--max-extent must be 0.08 to 1, got {args.max_extent}")
    if not 0.05 <= args.min_visible <= 1:
        raise SpatialLockError(f"--min-visible must be 0.05 to 1, got {args.min_visible}")
    scene = {
        "min_objects": args.min_objects, "max_objects": args.max_objects, "max_extent": args.max_extent,
        "min_visible": args.min_visible, "scene": args.scene,
    }  # fmt: skip
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise SpatialLockError(f"--out {out}: exists and is not a folder")
    writable_folder(out, "--out")
    start = time.perf_counter()
    try:
        written = synthesize(
            out, args.train, args.val, args.seed, args.size, args.workers, not args.no_progress, **scene
        )
    except OSError as err:  # a full disk, or the folder made read-only or replaced meanwhile
        raise SpatialLockError(f"--out {out}: cannot write {err.filename or ''}: {err.strerror or err}") from None
    seconds = time.perf_counter() - start
    images = sum(n for n, _ in written.values())
    parts = ", ".join(f"{split}: {n} images, {k} objects" for split, (n, k) in written.items())
    print(f"wrote {out} ({parts}) in {seconds:.1f} s, {images / max(seconds, 1e-9):.0f} images/s")
    return 0


def run_show(args: argparse.Namespace) -> int:
    """Handle `data show`: read the split, draw the grid, write the PNG."""
    from PIL import Image

    from spatiallock.data.coco import LayoutDataset, split_files
    from spatiallock.data.show import contact_sheet
    from spatiallock.files import atomic_output, writable_folder

    explicit = (args.instances, args.captions, args.images)
    if any(explicit):
        if not all(explicit) or args.data:
            raise SpatialLockError("give either DIR, or all three of --instances, --captions and --images")
        files = explicit
    elif args.data:
        files = split_files(args.data, args.split)
    else:
        raise SpatialLockError("give a data set folder DIR, or --instances, --captions and --images")
    if args.num < 1 or not 32 <= args.cell <= MAX_CELL:
        raise SpatialLockError(f"--num must be 1 or more and --cell 32 to {MAX_CELL}, got {args.num} and {args.cell}")
    if args.seed is not None and args.seed < 0:
        raise SpatialLockError(f"--seed must be 0 or more, got {args.seed}")
    out = Path(args.out)
    if out.is_dir():
        raise SpatialLockError(f"--out {out}: is a folder; give the PNG file to write")
    writable_folder(out.parent, "--out")
    dataset = LayoutDataset(*files, min_objects=0)
    if len(dataset) == 0:
        raise SpatialLockError(f"{files[0]}: no usable image to show")
    shown = min(args.num, len(dataset))
    if shown * (args.cell + 4) ** 2 > Image.MAX_IMAGE_PIXELS:
        raise SpatialLockError(
            f"--num {args.num} images of --cell {args.cell} pixels make a grid too large to read back; use fewer"
        )
    sheet, unreadable = contact_sheet(dataset, shown, args.cell, args.seed)
    if unreadable:
        print(
            f"spatiallock: warning: {len(unreadable)} of {shown} images cannot be read and are left out "
            f"(first: {unreadable[0]})",
            file=sys.stderr,
        )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(out, "wb") as handle:
            sheet.save(handle, format="PNG")
    except OSError as err:
        raise SpatialLockError(f"--out {out}: cannot write: {err.strerror or err}") from None
    print(f"wrote {out} ({shown - len(unreadable)} of {len(dataset)} images)")
    return 0
