"""How well does the adapter's own PoG perception head see objects, noise level by noise level?

The head reads the U-Net's down-block features while sampling (`--candidates`, `--perception-guidance-steps`).
This scores it as a detector: real validation images are encoded, noised to timestep t (of the 1,000 training
steps), run through the U-Net's down path with the adapter grounding their own layout (as in training), and the
head's detections are scored with COCO AP against the real boxes, beside a detector's AP on the same real images
(the shipped detector's unless --detector names another). It tells at which point of sampling the head's
judgement can be trusted.

The head reads features of a U-Net that is told the layout. `--grounding` says which layout: `own` (the
image's, as in training), `none` (no objects: only the image to go by) or `other` (the next image's layout:
scored both against what is in the image and against what was asked, to see whether the head reports the
request instead of the image).

    python benchmarks/perception_head.py --limit 300 --timesteps 0 100 250 400 600 800 --grounding own none other

The leak test (`--leak N`, `spatiallock.evaluation.leak`): on N images the model generates from the first N
layouts, every perception part is scored against the layouts the images were made from and against a shuffled
layout (another image's), each told to the part: the model's PoG head at --leak-timestep (reading what its
perception input reads: the grounded U-Net's features on the noised latents, or, `rendered`, the U-Net's without
grounding), the evaluation detector, and each --leak-detector NAME=DET. A part that reports the layout it is told
scores the shuffled layouts as well as the real ones. Writes the `leak` entries into the results file, its other
entries kept:

    python benchmarks/perception_head.py --leak 300 --leak-detector reward=runs/det-reward
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch
from diffusers import DDPMScheduler
from diffusers.image_processor import VaeImageProcessor

from spatiallock.evaluation.detector import Detector, coco_ap, to_coco_results
from spatiallock.evaluation.scoring import load_real_images, real_image_paths
from spatiallock.files import write_text_atomic
from spatiallock.layout import read_layouts
from spatiallock.models.perception import PERCEPTION_INPUTS
from spatiallock.pipelines.extensions.perception import down_features
from spatiallock.sampling import load_pipeline
from spatiallock.shipped import resolve_detector
from spatiallock.training.recipe import DEFAULT_PERCEPTION_INPUT

RESULTS = Path(__file__).resolve().parent / "results"
# what `train adapter` trains the PoG head on unless told otherwise: the head input used by default
HEAD_INPUT_BY_DEFAULT = DEFAULT_PERCEPTION_INPUT


@torch.no_grad()
def head_detections(pipe, layouts, latents, t: int, seed: int, batch: int) -> list[dict]:
    noising = DDPMScheduler.from_config(pipe.scheduler.config)
    head = pipe.adapter.perception
    found = []
    for start in range(0, len(layouts), batch):
        chunk, clean = layouts[start : start + batch], latents[start : start + batch]
        noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed + start))
        steps = torch.full((len(chunk),), t, dtype=torch.long)
        noisy = noising.add_noise(clean, noise, steps) if t > 0 else clean
        made = pipe.condition(
            chunk, guided=False, ground_unconditional=False, latent_size=tuple(clean.shape[-2:]), device=clean.device
        )
        features = down_features(pipe, noisy, steps, made.states, made.caption_mask, made.grounding)
        found += head.detect([f.float() for f in features], score_threshold=0.05)
    return found


def encode(pipe, images) -> torch.Tensor:
    processor = VaeImageProcessor(vae_scale_factor=pipe.vae_scale_factor)
    with torch.no_grad():
        pixels = processor.preprocess(images, height=pipe.native_size, width=pipe.native_size)
        return torch.cat([pipe.encode_pixels(pixels[i : i + 64]) for i in range(0, len(pixels), 64)])


def head_part(pipe, t: int, seed: int, batch: int, class_ids: torch.Tensor, perception_input: str | None = None):
    """The model's PoG head as a perception part: told the layout when it reads the grounded U-Net.
    `perception_input`: what it reads (default: what it was trained on, the adapter's config)."""
    from spatiallock.models.perception import rendered_features

    head = pipe.adapter.perception
    rendered = (perception_input or pipe.adapter.config.perception_input) == "rendered"

    def part(images, layouts) -> list[dict]:
        latents = encode(pipe, images)
        if rendered:
            found = []
            with torch.no_grad():
                for start in range(0, len(images), batch):
                    chunk = layouts[start : start + batch]
                    made = pipe.condition(chunk, guided=False, ground_unconditional=False,
                                          latent_size=tuple(latents.shape[-2:]), device=latents.device)  # fmt: skip
                    features = rendered_features(pipe.unet, latents[start : start + batch], made.states,
                                                 made.caption_mask)  # fmt: skip
                    found += head.detect([f.float() for f in features], score_threshold=0.05)
        else:
            found = head_detections(pipe, layouts, latents, t, seed, batch)
        for f in found:
            f["labels"] = class_ids[f["labels"]]
        return found

    return part


def leak_run(args, pipe) -> int:
    """--leak: the leak entries of every perception part on images the model generates, into the results file."""
    from spatiallock.evaluation.leak import detector_part, leak_score
    from spatiallock.sampling.options import SamplingOptions
    from spatiallock.sampling.run import sample

    layouts = read_layouts(args.layouts)[: args.leak]
    categories = json.loads(Path(args.layouts).read_text())["categories"]
    category_of = {c["name"]: c["id"] for c in categories}
    class_ids = torch.tensor([category_of[name] for name in pipe.adapter.config.class_names])
    from tqdm.auto import tqdm

    with tqdm(total=len(layouts), desc="generating", unit="img") as progress:
        images, _, seconds = sample(pipe, layouts, SamplingOptions(seed=args.seed), progress=progress)
    print(f"generated {len(images)} images ({seconds:.2f} s/image)", flush=True)
    trained_on = pipe.adapter.config.perception_input
    parts = []
    for perception_input in args.leak_head_input or [trained_on]:
        name = f"pog-head ({perception_input}, t={args.leak_timestep})"
        if perception_input != trained_on:
            name = f"pog-head ({perception_input}; trained on {trained_on})"
        part = head_part(pipe, args.leak_timestep, args.seed, args.batch_size, class_ids, perception_input)
        parts.append((name, part, perception_input == HEAD_INPUT_BY_DEFAULT))
    parts.append(("evaluation detector", detector_part(Detector.from_pretrained(resolve_detector(args.detector))),
                  True))  # fmt: skip
    for text in args.leak_detector:
        name, _, folder = text.partition("=")
        parts.append((name, detector_part(Detector.from_pretrained(resolve_detector(folder))), False))
    entries = []
    for component, part, default in parts:
        score = leak_score(part, images, layouts, categories, component, default, seed=args.seed)
        images_from = args.model + (f" with adapter {args.adapter}" if args.adapter else "")
        entries.append({**score.as_dict(), "images_from": images_from})
        print(f"  {component:32s} AP requested {score.ap_requested:.4f}  shuffled {score.ap_shuffled:.4f}"
              + ("  LEAKS" if score.leaks else ""), flush=True)  # fmt: skip
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {}
    # entries of parts scored before and not now are kept (another model's head, another run's detector)
    scored = {entry["component"] for entry in entries}
    result["leak"] = [e for e in result.get("leak", []) if e["component"] not in scored] + entries
    result["leak_setting"] = {
        "images": len(images), "layouts": args.layouts, "seed": args.seed, "model": args.model,
        "adapter": args.adapter or "the model's own", "timestep": args.leak_timestep,
        "command": "python benchmarks/perception_head.py " + " ".join(args.argv),
    }  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--adapter", default=None, help="adapter folder (default: the model's own)")
    parser.add_argument("--layouts", default="data/shapes/instances_val.json")
    parser.add_argument("--limit", type=int, default=300)
    parser.add_argument("--timesteps", type=int, nargs="+", default=[0, 100, 250, 400, 600, 800])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--grounding", nargs="+", default=["own"], choices=["own", "none", "other"])
    parser.add_argument("--detector", default="default", help="detector scored on the real images (default: shipped)")
    parser.add_argument("--out", default=str(RESULTS / "perception_head.json"))
    parser.add_argument("--leak", type=int, default=0, metavar="N", help="the leak test on N generated images")
    parser.add_argument("--leak-timestep", type=int, default=250, help="--leak: the PoG head's timestep")
    parser.add_argument(
        "--leak-head-input", action="append", choices=PERCEPTION_INPUTS,
        help="--leak: what the PoG head reads, repeatable (default: what it was trained on)",
    )  # fmt: skip
    parser.add_argument(
        "--leak-detector", action="append", default=[], metavar="NAME=DET", help="--leak: one more detector"
    )
    args = parser.parse_args(argv)
    args.argv = argv if argv is not None else sys.argv[1:]

    pipe = load_pipeline(args.model, args.adapter, device="cpu")
    if pipe.adapter is None or pipe.adapter.perception is None:
        print("the adapter has no PoG head", file=sys.stderr)
        return 2
    if args.leak:
        pipe.set_progress_bar_config(disable=True)
        return leak_run(args, pipe)
    layouts = read_layouts(args.layouts)[: args.limit]
    paths = real_image_paths(args.layouts, layouts)
    images = load_real_images(paths)
    instances = json.loads(Path(args.layouts).read_text())
    ids = {layout.image_id for layout in layouts}
    instances = {
        "images": [im for im in instances["images"] if im["id"] in ids],
        "annotations": [a for a in instances["annotations"] if a["image_id"] in ids],
        "categories": instances["categories"],
    }
    image_ids = [layout.image_id for layout in layouts]
    sizes = {im["id"]: (im["width"], im["height"]) for im in instances["images"]}
    category_of = {c["name"]: c["id"] for c in instances["categories"]}
    class_ids = torch.tensor([category_of[name] for name in pipe.adapter.config.class_names])

    latents = encode(pipe, images)

    detector = Detector.from_pretrained(resolve_detector(args.detector))
    ceiling = coco_ap(instances, to_coco_results(detector.detect(images), image_ids, [sizes[i] for i in image_ids]))
    print(f"detector on the real images: AP {ceiling['ap']:.4f}")
    # the annotations moved one image back: what `other` asks of each image
    asked = {"images": instances["images"], "categories": instances["categories"], "annotations": []}
    following = {image_ids[i]: image_ids[(i + 1) % len(image_ids)] for i in range(len(image_ids))}
    by_image = {}
    for a in instances["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    for i in image_ids:
        asked["annotations"] += [{**a, "image_id": i} for a in by_image.get(following[i], [])]
    rows = []
    for mode in args.grounding:
        if mode == "own":
            grounded = layouts
        elif mode == "none":
            grounded = [dataclasses.replace(layout, labels=(), boxes=()) for layout in layouts]
        else:
            grounded = [layouts[(i + 1) % len(layouts)] for i in range(len(layouts))]
        for t in args.timesteps:
            found = head_detections(pipe, grounded, latents, t, args.seed, args.batch_size)
            for f in found:
                f["labels"] = class_ids[f["labels"]]
            results = to_coco_results(found, image_ids, [sizes[i] for i in image_ids])
            metrics = coco_ap(instances, results)
            row = {"grounding": mode, "timestep": t, **{k: round(v, 4) for k, v in metrics.items()}}
            line = f"grounding {mode:5s} t={t:4d}: head AP {metrics['ap']:.4f} (AP50 {metrics['ap50']:.4f})"
            if mode == "other":
                request = coco_ap(asked, results)
                row["ap_against_request"] = round(request["ap"], 4)
                line += f"; against the requested layout AP {request['ap']:.4f}"
            rows.append(row)
            print(line, flush=True)
    result = {
        "model": args.model, "adapter": args.adapter or "the model's own", "layouts": args.layouts,
        "images": len(layouts), "seed": args.seed, "detector": args.detector,
        "detector_on_real_images": ceiling, "rows": rows,
        "command": "python benchmarks/perception_head.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(Path(args.out), json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
