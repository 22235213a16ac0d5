"""`spatiallock generate` (images for layouts) and `spatiallock generate-dataset` (a COCO-format data set)."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import struct
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
or a Stable Diffusion v1.x or SDXL folder or hub id) with --adapter ADAPTER, or `default` for the shipped model.
--adapter none samples MODEL's base alone, without the adapter its folder holds. MODEL may also be a
folder written by `train lama`: the LAMA baseline, a GAN that draws in one pass (no steps, guidance or
scheduler); --save-masks writes its semantic mask beside each image. A hub id is read from the
Hugging Face cache, fetched there once (configs and safetensors) when it is not; offline, fetch it first
with `huggingface-cli download ID`.

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

`spatiallock train detector --extra-data DIR` trains a detector on such a folder beside real images.

examples:
  spatiallock generate-dataset --layouts data/shapes/instances_val.json --model default --out gen/val --per-layout 2
  spatiallock generate-dataset --layouts data/shapes/instances_train.json --skip 1000 --limit 2000 \
      --model default --out gen/train-layouts
"""

# ---- generate ------------------------------------------------------------------------------------------------


def run_generate(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from spatiallock.commands.options import check_out_folder, make_out_folder, set_judge
    from spatiallock.data.draw import draw_boxes, grid
    from spatiallock.files import save_image_atomic
    from spatiallock.layout import read_layouts
    from spatiallock.pipelines.protocol import LAYOUT_GAN
    from spatiallock.sampling import run as sampling

    options = sampling.SamplingOptions.from_args(args)
    options.check()
    if args.n < 1:
        raise SpatialLockError(f"--n: must be at least 1, got {args.n}")
    layouts = read_layouts(args.layout)
    out = check_out_folder(args.out)
    names = output_names(Path(args.layout).stem, len(layouts))
    sample_names = [f"{k:0{len(str(args.n - 1))}d}" for k in range(args.n)]  # padded too: _08, _09, _10
    targets = [out / f"{name}_{k}{end}.png" for name in names for k in sample_names for end in ("", "_boxes")]
    targets += [out / f"{name}_grid.png" for name in names] if args.n > 1 else []
    if args.save_masks:
        targets += [out / f"{name}_{k}_mask.png" for name in names for k in sample_names]
    for target in targets:
        if target.exists() and not target.is_file():
            raise SpatialLockError(f"--out: {target} exists and is not a file")
    pipe = sampling.load_pipeline(args.model, args.adapter, options.dtype, options.scheduler)
    set_judge(pipe, options)
    options.check_for(pipe, layouts)
    if args.save_masks and pipe.kind != LAYOUT_GAN:
        raise SpatialLockError(f"--save-masks: only a LAMA model draws semantic masks; {args.model} is not one")
    jobs = sampling.jobs_of(layouts, args.n)
    drawn: dict[int, list] = {}
    written = []
    with tqdm(total=len(jobs), unit="img", disable=args.no_progress, desc="generate") as bar:
        for batch, images in sampling.sample_batches(pipe, layouts, jobs, options):
            make_out_folder(out)  # only once there is something to write: a refusal leaves no empty folder
            for (i, k), image in zip(batch, images):
                layout = layouts[i]
                name = f"{names[i]}_{sample_names[k]}"
                written.append(save_image_atomic(image, out / f"{name}.png"))
                boxed = draw_boxes(image, layout.labels, layout.boxes)
                written.append(save_image_atomic(boxed, out / f"{name}_boxes.png"))
                drawn.setdefault(i, []).append(boxed)
                bar.update(1)
            if args.save_masks:
                written += _save_masks(
                    pipe,
                    layouts,
                    batch,
                    options.seed,
                    [out / f"{names[i]}_{sample_names[k]}_mask.png" for i, k in batch],
                )
    if args.n > 1:
        for i, images in drawn.items():
            written.append(save_image_atomic(grid(images), out / f"{names[i]}_grid.png"))
    print(f"wrote {len(written)} files to {out} ({len(jobs)} images for {len(layouts)} layouts)")
    return 0


def _save_masks(pipe, layouts: list, batch: list, seed: int, paths: list[Path]) -> list[Path]:
    """The semantic masks a LAMA pipeline drew for `batch` (the same generators as its images), as pictures."""
    from spatiallock.baselines.lama import mask_picture
    from spatiallock.files import save_image_atomic
    from spatiallock.sampling import run as sampling

    generators = [sampling.image_generator(seed, i, k) for i, k in batch]
    masks, _ = pipe.masks([layouts[i] for i, _ in batch], generators)
    categories = pipe.generator.config.categories
    return [
        save_image_atomic(mask_picture(mask, categories, layouts[i].labels), path)
        for mask, (i, _), path in zip(masks, batch, paths)
    ]


def output_names(stem: str, count: int) -> list[str]:
    """File name stems of `count` layouts read from a file named `stem`: `stem` alone for one layout, else
    `stem_000`, `stem_001`, ..., padded to the largest index, so that names sort as the layouts do."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem) or "layout"
    if count == 1:
        return [stem]
    width = max(3, len(str(count - 1)))
    return [f"{stem}_{i:0{width}d}" for i in range(count)]


# ---- generate-dataset ----------------------------------------------------------------------------------------


def _settings(args: argparse.Namespace, options, layouts: list, categories: list[dict]) -> dict:
    """What decides the data set's bytes, kept in DIR/generate.json so that a rerun resumes only the same job.
    `layouts_sha256` covers the layouts used (after --skip and --limit; captions as read, from a captions file
    too) and the categories, not the bytes of the file they came from."""
    # every option that changes an image (the options table's `output`), so a rerun that changes any is refused
    settings = {"model": args.model, "adapter": args.adapter, **options.settings()}
    used = [[layout.caption, layout.labels, layout.boxes, layout.image_id] for layout in layouts]
    text = json.dumps({"layouts": used, "categories": categories}, sort_keys=True, separators=(",", ":"))
    settings.update(
        layouts_sha256=hashlib.sha256(text.encode()).hexdigest(), limit=args.limit, per_layout=args.per_layout,
        batch_size=args.batch_size,
    )  # fmt: skip
    if args.skip:  # only when used: data sets written before it existed still resume
        settings["skip"] = args.skip
    return settings


def _previous_settings(path: Path) -> dict | None:
    """The settings a run left in DIR/generate.json, None when there are none; refused when it is not one."""
    from spatiallock.files import read_json

    if not os.path.lexists(path):
        return None
    hint = "it is not the settings file of a generate-dataset run: use another folder, or remove it to start over"
    try:
        previous = read_json(path, "settings file")
    except SpatialLockError as err:
        raise SpatialLockError(f"--out: {err}; {hint}") from None
    if not isinstance(previous, dict):
        raise SpatialLockError(f"--out: {path}: {hint}")
    return previous


PNG_START, PNG_END = b"\x89PNG\r\n\x1a\n", b"\x00\x00\x00\x00IEND\xaeB`\x82"


def is_finished_image(path: Path, size: int) -> bool:
    """A complete PNG of `size` x `size` pixels: what a finished write leaves. A 0-byte, cut, unreadable or
    foreign file is not one, and is written again."""
    if not path.is_file():
        return False
    try:
        with open(path, "rb") as stream:
            head = stream.read(24)
            stream.seek(-len(PNG_END), os.SEEK_END)
            tail = stream.read()
    except OSError:  # unreadable, or shorter than a PNG's end
        return False
    if len(head) < 24 or not head.startswith(PNG_START) or head[12:16] != b"IHDR" or tail != PNG_END:
        return False
    return struct.unpack(">II", head[16:24]) == (size, size)


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
    import torch
    from accelerate import PartialState
    from tqdm.auto import tqdm

    from spatiallock.commands.options import check_out_folder, set_judge
    from spatiallock.files import read_json, save_image_atomic, write_json_atomic
    from spatiallock.layout import is_coco_instances, read_layouts
    from spatiallock.sampling import run as sampling
    from spatiallock.sampling.options import setting_differences

    options = sampling.SamplingOptions.from_args(args)
    options.check()
    if args.per_layout < 1:
        raise SpatialLockError(f"--per-layout: must be at least 1, got {args.per_layout}")
    if args.limit is not None and args.limit < 1:
        raise SpatialLockError(f"--limit: must be at least 1, got {args.limit}")
    if args.skip < 0:
        raise SpatialLockError(f"--skip: must be 0 or more, got {args.skip}")
    layouts = read_layouts(args.layouts)[args.skip :][: args.limit]
    if not layouts:
        raise SpatialLockError(f"--skip: {args.layouts} has no layouts after the first {args.skip}")
    source = read_json(args.layouts, "layout JSON file")
    categories = _categories(layouts, source["categories"] if is_coco_instances(source) else None)
    out = check_out_folder(args.out)
    for part, kind in ((out / "images", "folder"), (out / "generate.json", "file")):
        if part.is_symlink():  # written through, its target would get the images and lose its .part files
            raise SpatialLockError(f"--out: {part} is a link; give a folder whose {part.name} is a real {kind}")
        if os.path.lexists(part) and not (part.is_dir() if kind == "folder" else part.is_file()):
            raise SpatialLockError(f"--out: {part} exists and is not a {kind}")
    settings = _settings(args, options, layouts, categories)
    settings_file = out / "generate.json"
    previous = _previous_settings(settings_file)
    if previous is not None:
        changed = setting_differences(previous, settings)
        if changed:
            raise SpatialLockError(
                f"--out: {out} holds a data set generated with other settings ({', '.join(changed)}); "
                "use the same command to resume, or another folder"
            )
    state = PartialState(cpu=not torch.cuda.is_available())  # CPU processes join too (`accelerate launch --cpu`)
    pipe = sampling.load_pipeline(args.model, args.adapter, options.dtype, options.scheduler, state.device)
    set_judge(pipe, options)
    options.check_for(pipe, layouts)
    size = args.size or pipe.native_size
    if state.is_main_process:
        (out / "images").mkdir(parents=True, exist_ok=True)
        for partial in (out / "images").glob(".*.part"):  # left by a run killed in the middle of a write
            if partial.is_file() or partial.is_symlink():
                partial.unlink()
        write_json_atomic(settings_file, settings)
    state.wait_for_everyone()

    jobs = sampling.jobs_of(layouts, args.per_layout)
    path_of = lambda i, k: out / "images" / f"{i * args.per_layout + k + 1:012d}.png"  # noqa: E731
    done_of = lambda i, k: is_finished_image(path_of(i, k), size)  # noqa: E731
    # fixed batches: a resumed run regenerates whole batches, so every file is what one run would write
    batches = sampling.batches(jobs, options.batch_size)
    mine = [b for n, b in enumerate(batches) if n % state.num_processes == state.process_index]
    todo = [b for b in mine if not all(done_of(i, k) for i, k in b)]
    done = sum(len(b) for b in mine) - sum(len(b) for b in todo)
    with tqdm(
        total=sum(len(b) for b in mine), initial=done, unit="img", desc="generate-dataset",
        disable=args.no_progress or not state.is_main_process,
    ) as bar:  # fmt: skip
        for batch in todo:
            for (i, k), image in zip(batch, sampling.sample_batch(pipe, layouts, batch, options)):
                save_image_atomic(image, path_of(i, k))
            bar.update(len(batch))
    state.wait_for_everyone()
    if state.is_main_process:
        missing = [path_of(i, k) for i, k in jobs if not done_of(i, k)]
        if missing:
            raise SpatialLockError(f"{len(missing)} images are missing (first: {missing[0]}); run again to finish")
        instances, captions = dataset_annotations(layouts, args.per_layout, (size, size), categories)
        write_json_atomic(out / "instances.json", instances)
        write_json_atomic(out / "captions.json", captions)
        print(f"wrote {out}: {len(jobs)} images, {len(instances['annotations'])} objects")
    return 0


def register(subparsers) -> None:
    from spatiallock.commands.options import add_sampling_options

    formatter = argparse.RawDescriptionHelpFormatter
    gen = subparsers.add_parser(
        "generate", help="generate images for layouts", description=GENERATE_HELP, formatter_class=formatter
    )
    gen.add_argument("--layout", required=True, metavar="FILE", help="layout JSON (one layout or a list)")
    gen.add_argument("--out", required=True, metavar="PATH", help="output folder")
    gen.add_argument("--n", type=int, default=1, metavar="K", help="images per layout (default: 1)")
    gen.add_argument(
        "--save-masks", action="store_true",
        help="a LAMA model: also write each image's semantic mask (OUT/<name>_<k>_mask.png, objects' colours mixed)",
    )  # fmt: skip
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
    data.add_argument(
        "--skip", type=int, default=0, metavar="N",
        help="leave out the first N layouts of the file (e.g. those of the real images a detector trains on)",
    )  # fmt: skip
    add_sampling_options(data)
    data.set_defaults(func=run_generate_dataset)
