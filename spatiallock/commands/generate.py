"""`spatiallock generate` (images for layouts) and `spatiallock generate-dataset` (a COCO-format data set)."""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from pathlib import Path

from spatiallock.errors import SpatialLockError

GENERATE_HELP = """\
Generate images whose objects sit in the boxes of a layout. The layout file is JSON:

  {"caption": "a red circle left of a blue square",
   "objects": [{"label": "red circle", "box": [0.05, 0.3, 0.45, 0.7]},
               {"label": "blue square", "box": [0.55, 0.3, 0.95, 0.7]}]}

or a list of such layouts (boxes normalised to [0, 1] as x0, y0, x1, y1). For each layout and each of
the K samples it writes OUT/<name>_<k>.png, a copy with the boxes drawn (OUT/<name>_<k>_boxes.png)
and, when K > 1, a grid OUT/<name>_grid.png.

MODEL is a pipeline folder written by `save_pretrained` (base + adapter), a base alone (the small base,
or a Stable Diffusion v1.x folder or hub id) with --adapter ADAPTER, or `default` for the shipped model.

Training-free layout control, with or without an adapter (a plain base follows the layout too):
--layout-guidance-steps N moves the latents, during the first N steps, so that each label's caption
tokens attend inside its box (cross-attention guidance); --init-from-layout or --init-image PATH starts
sampling from a DDIM-inverted reference image instead of random noise (spatial-aware initialisation).

examples:
  spatiallock generate --layout examples/two_shapes.json --model default --out outputs --n 4
  spatiallock generate --layout layout.json --model runwayml/stable-diffusion-v1-5 --adapter my-adapter \\
      --out outputs --steps 50 --guidance 7.5 --scheduler dpm
  spatiallock generate --layout layout.json --model runwayml/stable-diffusion-v1-5 --out outputs \\
      --layout-guidance-steps 10 --init-from-layout --scheduler ddim
"""

DATASET_HELP = """\
Generate a COCO-format data set from layouts: the paper's "MSCOCO expansion". LAYOUTS is a COCO instances
file (captions come from captions_<split>.json beside it when present, else from the labels) or a layout
JSON list. Writes

  DIR/images/000000000001.png ...   DIR/instances.json (the requested boxes as annotations)
  DIR/captions.json                 DIR/generate.json (the settings, to resume safely)

Killed or interrupted, the same command continues where it stopped: images already written are kept and
the result is the same as one uninterrupted run. Several processes or GPUs share the work under
`accelerate launch -m spatiallock.cli generate-dataset ...`.

example:
  spatiallock generate-dataset --layouts data/shapes/instances_val.json --model default --out gen/val --per-layout 2
"""

DTYPES = ("fp32", "fp16", "bf16")


def default_model_path() -> Path:
    """The small base + SpatialLock adapter shipped inside the package."""
    return Path(__file__).resolve().parent.parent / "assets" / "default"


def resolve_model(name: str) -> str:
    """`default` -> the shipped model; a local path must exist; anything else is passed on (a hub id)."""
    if name == "default":
        path = default_model_path()
        if not (path / "model_index.json").is_file():
            raise SpatialLockError(f"model: the shipped default model is missing from {path}")
        return str(path)
    path = Path(name)
    if path.exists():
        return name
    if name.startswith((".", "/", "~")) or name.count("/") != 1 or name.endswith(("/", ".json")):
        raise SpatialLockError(f"model: {name} not found")
    return name  # a hub id such as runwayml/stable-diffusion-v1-5


def add_sampling_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by every command that samples."""
    from spatiallock.pipeline import SCHEDULERS

    parser.add_argument("--model", required=True, metavar="MODEL", help="model folder, hub id or `default`")
    parser.add_argument("--adapter", default=None, metavar="ADAPTER", help="adapter folder to attach to MODEL")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default: 0)")
    parser.add_argument("--steps", type=int, default=25, metavar="T", help="sampling steps (default: 25)")
    parser.add_argument(
        "--guidance", type=float, default=5.0, metavar="G", help="classifier-free guidance scale (default: 5.0)"
    )
    parser.add_argument(
        "--scheduler", default=None, choices=sorted(SCHEDULERS),
        help="sampler (default: the model's own; DPM-Solver++ for the small base)",
    )  # fmt: skip
    parser.add_argument(
        "--grounding-steps", type=float, default=1.0, metavar="F",
        help="share of the steps, from the first, that use the layout (default: 1.0)",
    )  # fmt: skip
    parser.add_argument("--size", type=int, default=None, metavar="PX", help="image side (default: the model's)")
    parser.add_argument("--batch-size", type=int, default=8, metavar="B", help="images per batch (default: 8)")
    parser.add_argument("--dtype", default="fp32", choices=DTYPES, help="weights' precision (default: fp32)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_layout_control_options(parser)


def add_layout_control_options(parser: argparse.ArgumentParser) -> None:
    """Training-free layout control: cross-attention guidance and spatial-aware initialisation."""
    group = parser.add_argument_group(
        "training-free layout control",
        "with or without an adapter; see the modules spatiallock.guidance and spatiallock.init",
    )
    group.add_argument(
        "--layout-guidance-steps", "--guidance-steps", type=int, default=0, metavar="N",
        help="cross-attention layout guidance for the first N sampling steps: the latents follow the gradient of "
        "a loss that wants each label's tokens to attend inside its box (default: 0, off). Not --guidance, which "
        "is classifier-free guidance",
    )  # fmt: skip
    group.add_argument(
        "--layout-guidance-scale", type=float, default=20.0, metavar="S",
        help="step size of that gradient update at the first step, decaying linearly to S/N at step N (default: 20)",
    )  # fmt: skip
    group.add_argument(
        "--layout-guidance-iterations", "--guidance-iterations", type=int, default=3, metavar="K",
        help="gradient updates per guided step, each about three U-Net calls (default: 3)",
    )  # fmt: skip
    group.add_argument(
        "--layout-guidance-layers", default=None, metavar="NAMES",
        help="comma-separated U-Net blocks whose cross-attention is guided, e.g. mid_block,up_blocks.1 "
        "(default: the mid block and the first up block with attention)",
    )  # fmt: skip
    group.add_argument(
        "--missing-labels", default="add", choices=("add", "error"),
        help="with layout guidance, a label its caption does not name is added to the caption "
        "(', a red circle', with a warning) or is an error (default: add)",
    )  # fmt: skip
    group.add_argument(
        "--init-image", default=None, metavar="PATH",
        help="start from this reference image, DDIM-inverted, instead of random noise: objects tend to appear "
        "where it has them (the seed then no longer changes the image with a deterministic sampler)",
    )  # fmt: skip
    group.add_argument(
        "--init-from-layout", action="store_true",
        help="as --init-image, with each layout rendered as a reference: its boxes filled with the label's colour "
        "word's colour (else a fixed colour per label) on grey",
    )  # fmt: skip
    group.add_argument(
        "--init-strength", type=float, default=1.0, metavar="F",
        help="share of the noise schedule the reference is inverted through; sampling runs that share of --steps "
        "(default: 1.0, all of it)",
    )  # fmt: skip
    group.add_argument(
        "--init-steps", type=int, default=None, metavar="N",
        help="DDIM inversion steps (default: as many as sampling then runs, so both walk the same timesteps; "
        "exactly so with --scheduler ddim)",
    )  # fmt: skip


def layout_control_kwargs(args: argparse.Namespace) -> dict:
    """The pipeline options of `add_layout_control_options`; empty when all are off (the plain call)."""
    kwargs = {}
    if args.layout_guidance_steps:
        kwargs.update(
            layout_guidance_steps=args.layout_guidance_steps, layout_guidance_scale=args.layout_guidance_scale,
            layout_guidance_iterations=args.layout_guidance_iterations,
            layout_guidance_layers=args.layout_guidance_layers, missing_labels=args.missing_labels,
        )  # fmt: skip
    if args.init_image is not None or args.init_from_layout:
        kwargs.update(init_from_layout=args.init_from_layout, init_strength=args.init_strength)
        kwargs.update(init_steps=args.init_steps, init_image=args.init_image)
    return kwargs


def check_layout_control(pipe, args: argparse.Namespace, layouts: list) -> None:
    """Refuse, before anything is written, guidance layers the U-Net lacks, a caption without one of its labels
    (with --missing-labels error) and an init image that cannot be read."""
    from spatiallock.guidance import caption_targets, guidance_layers
    from spatiallock.init import load_image

    if args.layout_guidance_steps:
        guidance_layers(pipe.unet, args.layout_guidance_layers)
        if args.missing_labels == "error":
            caption_targets(layouts, pipe.tokenizer, pipe.caption_tokens, "error")
    if args.init_image is not None:
        load_image(args.init_image)


def check_sampling_options(args: argparse.Namespace) -> None:
    for name in ("steps", "batch_size"):
        if getattr(args, name) < 1:
            raise SpatialLockError(f"--{name.replace('_', '-')}: must be at least 1, got {getattr(args, name)}")
    if args.guidance < 0:
        raise SpatialLockError(f"--guidance: must be 0 or more, got {args.guidance}")
    if not 0.0 <= args.grounding_steps <= 1.0:
        raise SpatialLockError(f"--grounding-steps: a share in [0, 1], got {args.grounding_steps}")
    if args.size is not None and args.size < 8:
        raise SpatialLockError(f"--size: must be at least 8, got {args.size}")
    if args.layout_guidance_steps < 0:
        raise SpatialLockError(f"--layout-guidance-steps: must be 0 or more, got {args.layout_guidance_steps}")
    if args.layout_guidance_iterations < 1:
        raise SpatialLockError(f"--layout-guidance-iterations: at least 1, got {args.layout_guidance_iterations}")
    if not args.layout_guidance_scale >= 0:
        raise SpatialLockError(f"--layout-guidance-scale: must be 0 or more, got {args.layout_guidance_scale}")
    if args.init_image is not None and args.init_from_layout:
        raise SpatialLockError("--init-image and --init-from-layout: give one of them")
    if args.init_image is not None and not Path(args.init_image).is_file():
        raise SpatialLockError(f"--init-image: {args.init_image}: file not found")
    if not 0.0 < args.init_strength <= 1.0:
        raise SpatialLockError(f"--init-strength: a share in (0, 1], got {args.init_strength}")
    if args.init_steps is not None and args.init_steps < 1:
        raise SpatialLockError(f"--init-steps: at least 1, got {args.init_steps}")


def load_pipeline(args: argparse.Namespace, device=None):
    """The pipeline the sampling options describe, on `device` (default: CUDA when there is one)."""
    import torch

    from spatiallock.pipeline import SpatialLockPipeline

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    if args.adapter is not None and not Path(args.adapter).exists():
        raise SpatialLockError(f"adapter: {args.adapter} not found")
    pipe = SpatialLockPipeline.from_pretrained(
        resolve_model(args.model), adapter=args.adapter, torch_dtype=dtype, scheduler=args.scheduler
    )
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def image_generator(seed: int, layout_index: int, sample: int, device="cpu"):
    """The noise of sample `sample` of layout `layout_index`: the same whatever the batching or process."""
    import torch

    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + layout_index) * 1009 + sample)


def sample_batch(pipe, args, jobs: list[tuple[int, int]], layouts: list) -> list:
    """Images for (layout index, sample) jobs in one pipeline call."""
    return pipe(
        layouts=[layouts[i] for i, _ in jobs],
        generator=[image_generator(args.seed, i, k) for i, k in jobs],
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        grounding_steps=args.grounding_steps,
        height=args.size,
        width=args.size,
        **layout_control_kwargs(args),
    ).images


# ---- generate ------------------------------------------------------------------------------------------------


def run_generate(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from spatiallock.draw import draw_boxes, grid, save_image_atomic
    from spatiallock.layout import read_layouts

    check_sampling_options(args)
    if args.n < 1:
        raise SpatialLockError(f"--n: must be at least 1, got {args.n}")
    layouts = read_layouts(args.layout)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise SpatialLockError(f"--out: {out} exists and is not a folder")
    pipe = load_pipeline(args)
    check_layout_control(pipe, args, layouts)
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(args.layout).stem) or "layout"
    names = [stem] if len(layouts) == 1 else [f"{stem}_{i:03d}" for i in range(len(layouts))]
    jobs = [(i, k) for i in range(len(layouts)) for k in range(args.n)]
    drawn: dict[int, list] = {}
    written = []
    out.mkdir(parents=True, exist_ok=True)
    with tqdm(total=len(jobs), unit="img", disable=args.no_progress, desc="generate") as bar:
        for start in range(0, len(jobs), args.batch_size):
            batch = jobs[start : start + args.batch_size]
            for (i, k), image in zip(batch, sample_batch(pipe, args, batch, layouts)):
                layout = layouts[i]
                written.append(save_image_atomic(image, out / f"{names[i]}_{k}.png"))
                boxed = draw_boxes(image, layout.labels, layout.boxes)
                written.append(save_image_atomic(boxed, out / f"{names[i]}_{k}_boxes.png"))
                drawn.setdefault(i, []).append(boxed)
                bar.update(1)
    if args.n > 1:
        for i, images in drawn.items():
            written.append(save_image_atomic(grid(images), out / f"{names[i]}_grid.png"))
    print(f"wrote {len(written)} files to {out} ({len(jobs)} images for {len(layouts)} layouts)")
    return 0


# ---- generate-dataset ----------------------------------------------------------------------------------------


def _settings(args: argparse.Namespace, layouts_digest: str) -> dict:
    keys = ("model", "adapter", "seed", "steps", "guidance", "scheduler", "grounding_steps", "size", "dtype")
    settings = {key: getattr(args, key) for key in keys}
    settings.update(layout_control_kwargs(args))  # only when on: data sets written before it still resume
    settings.update(layouts_sha256=layouts_digest, per_layout=args.per_layout, batch_size=args.batch_size)
    return settings


def _categories(layouts: list, source: dict | None) -> list[dict]:
    if source is not None:
        return [{"id": c["id"], "name": c["name"], "supercategory": c.get("supercategory", "")} for c in source]
    names = sorted({label for layout in layouts for label in layout.labels})
    return [{"id": n + 1, "name": name, "supercategory": ""} for n, name in enumerate(names)]


def dataset_annotations(layouts: list, per_layout: int, size: tuple[int, int], categories: list[dict]):
    """The COCO instances and captions of the data set: one image per (layout, sample), boxes as asked."""
    width, height = size
    ids = {c["name"]: c["id"] for c in categories}
    images, objects, captions = [], [], []
    for i, layout in enumerate(layouts):
        for k in range(per_layout):
            image_id = i * per_layout + k + 1
            entry = {"id": image_id, "file_name": f"images/{image_id:012d}.png", "width": width, "height": height}
            if layout.image_id is not None:
                entry["source_image_id"] = layout.image_id
            images.append(entry)
            captions.append({"id": len(captions) + 1, "image_id": image_id, "caption": layout.caption})
            for label, (x0, y0, x1, y1) in zip(layout.labels, layout.boxes):
                w, h = (x1 - x0) * width, (y1 - y0) * height
                objects.append({
                    "id": len(objects) + 1, "image_id": image_id, "category_id": ids[label],
                    "bbox": [round(x0 * width, 3), round(y0 * height, 3), round(w, 3), round(h, 3)],
                    "area": round(w * h, 3), "iscrowd": 0,
                })  # fmt: skip
    instances = {"images": images, "annotations": objects, "categories": categories}
    return instances, {"images": images, "annotations": captions}


def run_generate_dataset(args: argparse.Namespace) -> int:
    from accelerate import PartialState
    from tqdm.auto import tqdm

    from spatiallock.data.cocofile import write_json_atomic
    from spatiallock.draw import save_image_atomic
    from spatiallock.layout import is_coco_instances, read_layouts

    check_sampling_options(args)
    if args.per_layout < 1:
        raise SpatialLockError(f"--per-layout: must be at least 1, got {args.per_layout}")
    layouts = read_layouts(args.layouts)
    if args.limit is not None:
        if args.limit < 1:
            raise SpatialLockError(f"--limit: must be at least 1, got {args.limit}")
        layouts = layouts[: args.limit]
    raw = Path(args.layouts).read_bytes()
    source = json.loads(raw)
    categories = _categories(layouts, source["categories"] if is_coco_instances(source) else None)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise SpatialLockError(f"--out: {out} exists and is not a folder")
    settings = _settings(args, hashlib.sha256(raw).hexdigest())
    settings_file = out / "generate.json"
    if settings_file.is_file():
        previous = json.loads(settings_file.read_text())
        changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
        if changed:
            raise SpatialLockError(
                f"--out: {out} holds a data set generated with other settings ({', '.join(changed)}); "
                "use the same command to resume, or another folder"
            )
    state = PartialState()
    pipe = load_pipeline(args, device=state.device)
    check_layout_control(pipe, args, layouts)
    size = args.size or pipe.native_size
    if state.is_main_process:
        (out / "images").mkdir(parents=True, exist_ok=True)
        for partial in (out / "images").glob(".*.part"):  # left by a run killed in the middle of a write
            partial.unlink()
        write_json_atomic(settings_file, settings)
    state.wait_for_everyone()

    jobs = [(i, k) for i in range(len(layouts)) for k in range(args.per_layout)]
    path_of = lambda i, k: out / "images" / f"{i * args.per_layout + k + 1:012d}.png"  # noqa: E731
    # fixed batches: a resumed run regenerates whole batches, so every file is what one run would write
    batches = [jobs[s : s + args.batch_size] for s in range(0, len(jobs), args.batch_size)]
    mine = [b for n, b in enumerate(batches) if n % state.num_processes == state.process_index]
    todo = [b for b in mine if not all(path_of(i, k).is_file() for i, k in b)]
    done = sum(len(b) for b in mine) - sum(len(b) for b in todo)
    with tqdm(
        total=sum(len(b) for b in mine), initial=done, unit="img", desc="generate-dataset",
        disable=args.no_progress or not state.is_main_process,
    ) as bar:  # fmt: skip
        for batch in todo:
            for (i, k), image in zip(batch, sample_batch(pipe, args, batch, layouts)):
                save_image_atomic(image, path_of(i, k))
            bar.update(len(batch))
    state.wait_for_everyone()
    if state.is_main_process:
        missing = [path_of(i, k) for i, k in jobs if not path_of(i, k).is_file()]
        if missing:
            raise SpatialLockError(f"{len(missing)} images are missing (first: {missing[0]}); run again to finish")
        instances, captions = dataset_annotations(layouts, args.per_layout, (size, size), categories)
        write_json_atomic(out / "instances.json", instances)
        write_json_atomic(out / "captions.json", captions)
        print(f"wrote {out}: {len(jobs)} images, {len(instances['annotations'])} objects")
    return 0


def register(subparsers) -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    gen = subparsers.add_parser(
        "generate", help="generate images for layouts", description=GENERATE_HELP, formatter_class=formatter
    )
    gen.add_argument("--layout", required=True, metavar="FILE", help="layout JSON (one layout or a list)")
    gen.add_argument("--out", required=True, metavar="PATH", help="output folder")
    gen.add_argument("--n", type=int, default=1, metavar="K", help="images per layout (default: 1)")
    add_sampling_options(gen)
    gen.set_defaults(func=run_generate)

    data = subparsers.add_parser(
        "generate-dataset", help="generate a COCO-format data set from layouts", description=DATASET_HELP,
        formatter_class=formatter,
    )  # fmt: skip
    data.add_argument("--layouts", required=True, metavar="FILE", help="COCO instances file or layout JSON list")
    data.add_argument("--out", required=True, metavar="DIR", help="output folder")
    data.add_argument("--per-layout", type=int, default=1, metavar="K", help="images per layout (default: 1)")
    data.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N layouts")
    add_sampling_options(data)
    data.set_defaults(func=run_generate_dataset)
