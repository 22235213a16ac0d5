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

example:
  spatiallock demo
  spatiallock generate --layout examples/two_shapes.json --model default --out outputs --n 4
"""


def run_demo(args: argparse.Namespace) -> int:
    from spatiallock.commands.generate import output_names
    from spatiallock.commands.options import check_out_folder, make_out_folder
    from spatiallock.data.draw import draw_boxes, grid
    from spatiallock.evaluation.detector import Detector
    from spatiallock.evaluation.scoring import score_images
    from spatiallock.files import save_image_atomic
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
    print(f"mean IoU {mean:.2f} over {len(objects)} objects; images in {out}/ ({time.perf_counter() - start:.1f} s)")
    return 0


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
    parser.set_defaults(func=run_demo)
