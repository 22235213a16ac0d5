"""`spatiallock insert`: draw a new object into an existing image, where the location model puts it or in a
given box, and keep the rest of the image."""

from __future__ import annotations

import argparse
from pathlib import Path

from spatiallock.errors import SpatialLockError

MAX_SIDE = 1024  # --image: the insertion samples at the image's size

HELP = """\
Insert an object labelled --label into --image: in --box x0,y0,x1,y1 (image fractions) if given, else in the
most likely of --n boxes the location model (--locator, default: the shipped one) samples. The SpatialLock
model (--model) draws it by masked latent blending (the input image, re-noised, replaces the latents outside the
box at every step), then the input's own pixels are put back outside the box (blended over --feather pixels).
Prints the box used.

examples:
  spatiallock insert --image examples/scene.png --label "red circle" --out out.png
  spatiallock insert --image examples/scene.png --label "red circle" --locator runs/locator-dpo --out out.png
  spatiallock insert --image examples/scene.png --label "blue square" --box 0.1,0.55,0.3,0.83 --out out.png
"""


def run(args: argparse.Namespace) -> int:
    import torch

    from spatiallock.commands.locate import MAX_BOXES, load_locator, parse_box, sample_boxes
    from spatiallock.files import atomic_output, read_image_option, writable_folder
    from spatiallock.layout import quoted
    from spatiallock.location.insert import insert_object
    from spatiallock.pipelines.protocol import DIFFUSION
    from spatiallock.sampling import load_pipeline
    from spatiallock.sampling.options import BY_NAME

    out = Path(args.out)
    if out.is_dir():
        raise SpatialLockError(f"--out {out}: is a folder; give the PNG file to write")
    writable_folder(out.parent, "--out")
    for option in ("seed", "steps", "guidance"):  # the checks of every sampling command
        BY_NAME[option].check(getattr(args, option))
    if not 1 <= args.n <= MAX_BOXES:
        raise SpatialLockError(f"--n: must be 1 to {MAX_BOXES}, got {args.n}")
    if not 0 <= args.feather <= 64:
        raise SpatialLockError(f"--feather: must be 0 to 64 pixels, got {args.feather}")
    box = parse_box(args.box, "--box") if args.box else None
    image = read_image_option(args.image, "--image")
    if max(image.size) > MAX_SIDE:
        raise SpatialLockError(f"--image: {image.size[0]}x{image.size[1]}, more than {MAX_SIDE} px a side; resize it")
    pipe = load_pipeline(args.model, adapter=args.adapter)
    if pipe.kind != DIFFUSION:
        raise SpatialLockError(f"--model: {args.model} is a layout GAN (LAMA), which cannot insert into an image")
    schedule = pipe.scheduler.config.num_train_timesteps
    if args.steps > schedule:
        raise SpatialLockError(f"--steps: at most the model's {schedule} noise levels, got {args.steps}")
    if box is None:
        locator = load_locator(args.locator, "--locator")
        labels = locator.label_index([args.label] * args.n, what="--label")
        box = tuple(sample_boxes(locator, args.image, labels, args.seed)[0][0])  # the most likely
    if pipe.adapter is None:
        raise SpatialLockError("--adapter none: insertion needs a SpatialLock adapter to place the object")
    known = pipe.adapter.config.class_names
    if known and args.label not in known:
        raise SpatialLockError(
            f"--label {quoted(args.label)}: not a class of this model ({', '.join(known[:8])}, ...)"
        )
    factor = pipe.vae_scale_factor
    if image.size[0] % factor or image.size[1] % factor:
        raise SpatialLockError(f"--image: {image.size[0]}x{image.size[1]} is not a multiple of {factor} pixels a side")
    result = insert_object(
        pipe, image, box, args.label, caption=args.caption, generator=torch.Generator().manual_seed(args.seed),
        num_inference_steps=args.steps, guidance_scale=args.guidance, feather=args.feather,
    )  # fmt: skip
    with atomic_output(out, "wb") as handle:
        result.save(handle, format="PNG")
    print(f"inserted {args.label!r} at {' '.join(f'{v:.4f}' for v in box)}; wrote {out}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "insert", help="draw a new object into an image, where it fits or in a given box", description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--image", required=True, metavar="IMG", help="the image to insert into")
    parser.add_argument("--label", required=True, help='the object\'s class, e.g. "red circle"')
    parser.add_argument("--box", metavar="X0,Y0,X1,Y1", help="where (image fractions); default: the locator's choice")
    parser.add_argument("--out", required=True, metavar="PNG", help="the image to write")
    parser.add_argument("--locator", default="default", metavar="LOC", help="location model (default: shipped)")
    parser.add_argument("--n", type=int, default=10, help="boxes the locator samples to choose from (default: 10)")
    parser.add_argument("--model", default="default", help="SpatialLock model (default: the shipped one)")
    parser.add_argument("--adapter", default=None, help="adapter folder (default: the model's own)")
    parser.add_argument("--caption", default=None, help='caption (default: "a <label>")')
    parser.add_argument("--steps", type=int, default=25, help="sampling steps (default: 25)")
    parser.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance (default: 5)")
    parser.add_argument("--feather", type=int, default=2, metavar="PX", help="blend band around the box (default: 2)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.set_defaults(func=run)
