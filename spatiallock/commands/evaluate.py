"""`spatiallock evaluate`: generate for layouts, detect, score against the layouts."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from spatiallock.errors import SpatialLockError

HELP = """\
Measure how well objects land: generate K images per layout, run a detector on them and score the detections
against the requested boxes with pycocotools (ap, ap50, ap75), plus miou (per requested object the best IoU
with a confident detection of its class, 0 when none, averaged), miou_any (the same with a detection of any
class: placed, whether or not recognised), fd (Frechet distance in the detector's feature space against real
images of the domain; not FID) and, with --fid-weights, FID through torchmetrics.

LAYOUTS is a layout JSON (one or a list) or a COCO instances file. Real images for fd are taken from the
split folder beside a COCO file (data/shapes/instances_val.json -> data/shapes/val/) or from --real DIR.
Writes REPORT.json and a picture REPORT.png: each requested layout beside the generated image with its
detections drawn. MODEL may be a LAMA folder (`train lama`); its report adds mask_entropy, the mean per-pixel
entropy of its semantic masks (mask_entropy_raw: before the adaption; each also split into the background
object's part and the objects'), and adaption_strength.

By default AP counts every detection the detector keeps (from 0.05, ranked by score) and miou those scoring
0.3. --score-threshold T counts only detections scoring at least T, for both; LAMA's authors score with T =
0.25 (darknet's default confidence). The report records which (score_threshold: null for the default).

examples:
  spatiallock evaluate --model default --detector default --layouts examples/two_shapes.json --out r.json
  spatiallock evaluate --model models/base --adapter models/spatiallock --detector models/detector \\
      --layouts data/shapes/instances_val.json --limit 200 --out reports/spatiallock.json
  spatiallock evaluate --model runs/lama --detector default --layouts data/shapes/instances_val.json \\
      --limit 300 --out reports/lama.json
"""


def _real_images(args: argparse.Namespace, layouts: list):
    from spatiallock.evaluation.scoring import load_real_images, real_image_paths

    if args.real:
        folder = Path(args.real)
        if not folder.is_dir():
            raise SpatialLockError(f"--real: {folder} is not a folder")
        paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        if not paths:
            raise SpatialLockError(f"--real: no images in {folder}")
        return load_real_images(paths)
    paths = real_image_paths(args.layouts, layouts)
    return load_real_images(paths) if paths else None


def run_evaluate(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from spatiallock.base.folders import base_fingerprint
    from spatiallock.commands.options import check_out_folder, make_out_folder, set_judge
    from spatiallock.evaluation.detector import Detector
    from spatiallock.evaluation.scoring import category_ids, evaluate_pipeline, layout_picture
    from spatiallock.files import save_image_atomic, write_json_atomic
    from spatiallock.layout import read_layouts
    from spatiallock.pipelines.protocol import DIFFUSION
    from spatiallock.sampling import run as sampling
    from spatiallock.shipped import resolve_detector, resolve_model

    options = sampling.SamplingOptions.from_args(args)
    options.check()
    if args.per_layout < 1:
        raise SpatialLockError(f"--per-layout: must be at least 1, got {args.per_layout}")
    if args.limit is not None and args.limit < 1:
        raise SpatialLockError(f"--limit: must be at least 1, got {args.limit}")
    if args.score_threshold is not None and not 0.0 <= args.score_threshold <= 1.0:
        raise SpatialLockError(f"--score-threshold: must be 0 to 1, got {args.score_threshold}")
    out = Path(args.out)
    if out.suffix.lower() != ".json":
        raise SpatialLockError(f"--out: {out} should name a .json report")
    check_out_folder(out.parent)
    for target in (out, out.with_suffix(".png")):
        if os.path.lexists(target) and not target.is_file():
            raise SpatialLockError(f"--out: {target} exists and is not a file")
    layouts = read_layouts(args.layouts)[: args.limit]
    detector = Detector.from_pretrained(resolve_detector(args.detector))
    category_ids(detector, layouts)
    real = _real_images(args, layouts)
    if args.fid_weights is not None:  # found before sampling, not after it
        if not Path(args.fid_weights).is_file():
            raise SpatialLockError(f"--fid-weights: {args.fid_weights} not found")
        if not real:
            raise SpatialLockError("--fid-weights: FID needs real images of the domain (--real)")
    pipe = sampling.load_pipeline(args.model, args.adapter, options.dtype, options.scheduler)
    set_judge(pipe, options)
    options.check_for(pipe, layouts)
    detector.to(pipe.device)
    total = len(layouts) * args.per_layout
    with tqdm(total=total, unit="img", desc="evaluate", disable=args.no_progress) as bar:
        report, images, asked, objects, detections = evaluate_pipeline(
            pipe, detector, layouts, options, args.per_layout, real, args.fid_weights, bar, args.score_threshold
        )
    # which base made the images: the digest of its U-Net and autoencoder weights (None for LAMA)
    fingerprint = base_fingerprint(resolve_model(args.model)) if pipe.kind == DIFFUSION else None
    report = {
        "model": args.model, "base_fingerprint": fingerprint, "adapter": args.adapter, "detector": args.detector,
        "layouts": str(args.layouts),
        "num_layouts": len(layouts), "per_layout": args.per_layout, **options.record(pipe),
        "device": str(pipe.device), "torch": torch.__version__,
        **report, "real_images": len(real) if real else 0, "objects": objects,
    }  # fmt: skip
    make_out_folder(out.parent)
    write_json_atomic(out, report)
    picture = save_image_atomic(layout_picture(asked, images, detections), out.with_suffix(".png"))
    fd = "n/a (no real images)" if report["fd"] is None else f"{report['fd']:.3f}"
    print(
        f"ap {report['ap']:.3f}  ap50 {report['ap50']:.3f}  ap75 {report['ap75']:.3f}  miou {report['miou']:.3f}  "
        f"miou_any {report['miou_any']:.3f}  fd {fd}  ({total} images, {report['seconds_per_image']:.3f} s/image)"
    )
    print(f"wrote {out} and {picture}")
    return 0


def register(subparsers) -> None:
    from spatiallock.commands.options import add_sampling_options

    parser = subparsers.add_parser(
        "evaluate", help="score generated images with a detector", description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--layouts", required=True, metavar="FILE", help="layout JSON or COCO instances file")
    parser.add_argument("--detector", required=True, metavar="DET", help="detector folder or `default`")
    parser.add_argument("--out", required=True, metavar="REPORT.json", help="report to write (and REPORT.png)")
    parser.add_argument("--per-layout", type=int, default=1, metavar="K", help="images per layout (default: 1)")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N layouts")
    parser.add_argument("--real", default=None, metavar="DIR", help="folder of real images of the domain, for fd")
    parser.add_argument(
        "--score-threshold", type=float, default=None, metavar="T",
        help="count only detections scoring at least T, for ap and miou (LAMA's authors: 0.25; default: every "
        "detection for ap, 0.3 for miou)",
    )  # fmt: skip
    parser.add_argument(
        "--fid-weights", default=None, metavar="PATH", help="local Inception weights file: also report FID"
    )
    add_sampling_options(parser)
    parser.set_defaults(func=run_evaluate)
