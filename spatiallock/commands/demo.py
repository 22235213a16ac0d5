"""`spatiallock demo`: the shipped model on the example layouts, checked by the shipped detector."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from spatiallock.errors import SpatialLockError

HELP = """\
Generate images for every layout file in EXAMPLES (default: examples/) with the shipped model, write them to
OUT (default: outputs/) with the requested boxes drawn, run the shipped detector on them and print, for
each requested object, the IoU of its best detection of the same class (0 when none is found).

Then, on the scene image (--scene, default: EXAMPLES/scene.png): the shipped location model samples 5 boxes
for a new --label object (OUT/scene_locate.png, best first), and the model draws it into the most likely one
(OUT/scene_insert.png); the detector says whether it finds it there.

example:
  spatiallock demo
  spatiallock generate --layout examples/two_shapes.json --model default --out outputs --n 4
  spatiallock locate --image examples/scene.png --label "red circle" --n 5 --out outputs/boxes.png
  spatiallock insert --image examples/scene.png --label "red circle" --out outputs/inserted.png
"""
PLACES = 5  # boxes the locator samples for the scene


def run_demo(args: argparse.Namespace) -> int:
    from spatiallock.commands.generate import output_names
    from spatiallock.commands.options import check_out_folder, make_out_folder
    from spatiallock.data.draw import draw_boxes, grid
    from spatiallock.evaluation.detector import Detector
    from spatiallock.evaluation.scoring import score_images
    from spatiallock.files import read_image_option, save_image_atomic
    from spatiallock.layout import read_layouts
    from spatiallock.sampling import run as sampling
    from spatiallock.shipped import resolve_detector

    start = time.perf_counter()
    examples = Path(args.examples)
    files = sorted(examples.glob("*.json")) if examples.is_dir() else [examples]
    if not files or not files[0].exists():
        raise SpatialLockError(f"--examples: no layout JSON files in {examples}")
    requests = []
    for file in files:  # a file of several layouts: one name each (two_shapes_000, ...), none overwritten
        layouts = read_layouts(file)
        requests += zip(output_names(file.stem, len(layouts)), layouts)
    options = sampling.SamplingOptions(seed=args.seed, steps=args.steps)
    options.check()
    scene = scene_path(args)
    scene_image = read_image_option(scene, "--scene") if scene is not None else None  # before any work
    out = check_out_folder(args.out)
    pipe = sampling.load_pipeline(args.model, args.adapter)
    detector = Detector.from_pretrained(resolve_detector(args.detector)).to(pipe.device)
    layouts = [layout for _, layout in requests]
    options.check_for(pipe, layouts)
    images, _, _ = sampling.sample(pipe, layouts, options)
    _, objects, detections = score_images(detector, images, layouts)
    make_out_folder(out)
    drawn = []
    for n, ((name, layout), image) in enumerate(zip(requests, images)):
        save_image_atomic(image, out / f"{name}.png")
        drawn.append(draw_boxes(image, layout.labels, layout.boxes))
        save_image_atomic(drawn[-1], out / f"{name}_boxes.png")
        print(f"{name}: {layout.caption!r}")
        for record in (o for o in objects if o["image"] == n):
            found = "not found"
            if record["score"] is not None:
                found = f"IoU {record['iou']:.2f} (score {record['score']:.2f})"
            print(f"  {record['label']:16s} box {[round(v, 2) for v in record['box']]}  {found}")
    save_image_atomic(grid(drawn), out / "demo_grid.png")
    mean = sum(o["iou"] for o in objects) / max(len(objects), 1)
    print(f"mean IoU {mean:.2f} over {len(objects)} objects")
    if scene is not None:
        place_and_insert(args, scene, scene_image, pipe, detector, out)
    print(f"images in {out}/ ({time.perf_counter() - start:.1f} s)")
    return 0


def scene_path(args: argparse.Namespace) -> Path | None:
    """--scene as a path, None for `none` or when the default one is not there."""
    if args.scene == "none":
        return None
    if args.scene is None:
        default = Path(args.examples) / "scene.png"
        return default if default.is_file() else None
    return Path(args.scene)


def place_and_insert(args: argparse.Namespace, scene: Path, image, pipe, detector, out: Path) -> None:
    """The shipped locator's boxes for a new --label object in `scene` (read as `image`), and the object drawn
    into the best one."""
    import torch
    from torchvision.ops import box_iou

    from spatiallock.commands.locate import load_locator, sample_boxes
    from spatiallock.data.draw import draw_boxes
    from spatiallock.files import save_image_atomic
    from spatiallock.location.insert import insert_object

    locator = load_locator(args.locator, "--locator")
    labels = locator.label_index([args.label] * PLACES, what="--label")
    found = sample_boxes(locator, image, labels, args.seed, option="--scene")
    save_image_atomic(draw_boxes(image, [args.label] * PLACES, [box for box, _ in found]), out / "scene_locate.png")
    best = torch.tensor(found[0][0])
    print(f"{scene.name}: where a {args.label!r} could go (best first, log-probability):")
    for box, score in found:
        print(f"  box {[round(v, 2) for v in box]}  log p {score:.2f}")
    inserted = insert_object(pipe, image, tuple(found[0][0]), args.label, num_inference_steps=args.steps,
                             generator=torch.Generator().manual_seed(args.seed))  # fmt: skip
    save_image_atomic(inserted, out / "scene_insert.png")
    (found,) = detector.detect([inserted])
    same = [n == args.label for n in found["names"]]
    iou = 0.0
    if any(same):
        iou = float(box_iou(found["boxes"][torch.tensor(same)], best[None]).max())
    seen = f"found by the detector, IoU {iou:.2f}" if iou >= 0.5 else f"not found in the box (best IoU {iou:.2f})"
    print(f"  {args.label!r} drawn into the best box: {seen}")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="generate the example layouts with the shipped model and check them", description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--examples", default="examples", metavar="DIR", help="layout files (default: examples/)")
    parser.add_argument("--out", default="outputs", metavar="DIR", help="output folder (default: outputs/)")
    parser.add_argument("--model", default="default", help="model folder (default: the shipped one)")
    parser.add_argument("--adapter", default=None, help="adapter folder to attach to --model")
    parser.add_argument("--detector", default="default", help="detector folder (default: the shipped one)")
    parser.add_argument("--steps", type=int, default=25, help="sampling steps (default: 25)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument(
        "--scene", default=None, metavar="IMG",
        help="image to place and insert a new object into (default: EXAMPLES/scene.png when there; none: skip)",
    )  # fmt: skip
    parser.add_argument("--label", default="red circle", help='the new object\'s class (default: "red circle")')
    parser.add_argument(
        "--locator", default="default", metavar="LOC", help="location model (default: the shipped one)"
    )
    parser.set_defaults(func=run_demo)
