"""The benchmark of the synthetic domain: every variant scored by the same detector on the same layouts.

Rows: `real-images` (the detector on the real validation images: the ceiling), `autoencoder` (the same images
through the base's autoencoder and back: what a perfect U-Net could reach), `base` (the base model alone,
caption only), and one row per adapter given with --row NAME=ADAPTER_FOLDER. Rows may carry pipeline options
after the folder, e.g. `--row base+guidance=none:layout_guidance_steps=10`. Each run updates the rows it
computes in benchmarks/results/synthetic.json (others are kept), so the table can be filled over several
sessions, and redraws benchmarks/results/synthetic.png. A report of `spatiallock evaluate` on the same layouts
and detector becomes a row with --report NAME=REPORT.json (the training-free rows are scored that way). A
folder written by `train lama` in --row is the LAMA baseline (seed 003), scored the same way, with the mean
per-pixel entropy of its semantic masks (`mask_entropy`; `mask_entropy_raw` before the adaption; each split
into the background object's part and the objects') and its adaption strength. `--also-at 0.25` scores every
row it computes a second time counting only detections from 0.25, the authors' protocol of LAMA
(`ap_t025`, `miou_t025`).

    python benchmarks/synthetic.py --data data/shapes --base models/base --detector models/detector \\
        --row gligen=runs/gligen --row spatiallock=runs/spatiallock --limit 300 --train-steps 2000
    python benchmarks/synthetic.py --plot-only     # redraw the figures from the results file alone

`--out` names the results file; the chart (`.png`), the samples figure (`_samples.png`), the strips of sample
images behind it (`_samples/`) and the LAMA figure (`lama.png`) are written beside it.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import platform
import time
from dataclasses import asdict
from pathlib import Path

import torch
from charts import labelled_strips, sample_strip
from diffusers import AutoencoderKL
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from spatiallock.base.folders import base_fingerprint, weights_digest
from spatiallock.baselines.lama import LamaPipeline, is_lama_folder, mask_picture, normalise
from spatiallock.evaluation.detector import Detector
from spatiallock.evaluation.reward import ImageJudge
from spatiallock.evaluation.scoring import (
    AUTHORS_THRESHOLD,
    DetectorFeatures,
    evaluate_pipeline,
    frechet_distance,
    load_real_images,
    score_images,
)
from spatiallock.files import write_text_atomic
from spatiallock.layout import read_layouts
from spatiallock.models.adapter import RECIPE
from spatiallock.pipelines.diffusion import SpatialLockPipeline, load_adapter
from spatiallock.sampling import SamplingOptions, image_generator

RESULTS = Path(__file__).resolve().parent / "results"
METRICS = ("ap", "ap50", "ap75", "miou", "miou_any", "fd")


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    info = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in info.read_text().splitlines() if "model name" in line]
    return f"{names[0] if names else platform.processor()} ({torch.get_num_threads()} threads), CPU"


def second_opinion(second: Detector | None, images, layouts, folder: str | None) -> dict:
    """`ap_second` (and the detector it is from) of `images` by the second evaluator, or nothing without one."""
    if second is None:
        return {}
    scores, _, _ = score_images(second, images, layouts)
    return {"ap_second": round(scores["ap"], 4), "second_detector": folder}


def at_threshold(detector: Detector, images, layouts, threshold: float | None) -> dict:
    """`ap_tXXX` and `miou_tXXX` of `images` counting only detections scoring at least `threshold` (XXX its
    hundredths: `ap_t025` at 0.25), or nothing without a threshold."""
    if threshold is None:
        return {}
    scores, _, _ = score_images(detector, images, layouts, threshold)
    suffix = f"t{round(threshold * 100):03d}"
    return {f"ap_{suffix}": round(scores["ap"], 4), f"miou_{suffix}": round(scores["miou"], 4)}


def parse_row(text: str) -> tuple[str, str | None, dict]:
    """NAME=FOLDER[:key=value:...] -> (name, adapter folder or None for `none`, pipeline options)."""
    name, _, rest = text.partition("=")
    folder, *options = rest.split(":")
    parsed = {}
    for option in options:
        key, _, value = option.partition("=")
        parsed[key] = json.loads(value) if value[:1].isdigit() or value in ("true", "false") else value
    return name, (None if folder in ("", "none") else folder), parsed


@torch.no_grad()
def round_trip(vae: AutoencoderKL, images: list[Image.Image], batch: int = 50) -> list[Image.Image]:
    """Each image encoded (posterior mean) and decoded by `vae`."""
    vae.eval()
    processor = VaeImageProcessor()  # the pipeline's own conversions: PIL -> [-1, 1] and back
    out = []
    for start in range(0, len(images), batch):
        pixels = processor.preprocess(images[start : start + batch])
        out += processor.postprocess(vae.decode(vae.encode(pixels).latent_dist.mean).sample, output_type="pil")
    return out


def vae_fingerprint(base: Path) -> str:
    """The digest of the base's autoencoder weights: which decoder made a row."""
    return weights_digest(base / "vae") or "unknown"


def adapter_recipe_of(adapter, training: dict) -> dict:
    """What built `adapter`: its variant, placement and options (the placement from its training record when
    the adapter predates recorded placements)."""
    config = dict(adapter.config)
    recipe = {key: config[key] for key in RECIPE if key in config}
    recipe["positions"] = config.get("positions") or training.get("positions") or "default"
    return recipe


def sd_ratio(recipe: dict) -> float | None:
    """Trainable parameters of `recipe` on Stable Diffusion v1.4 as a share of GLIGEN's there (meta device); None
    for a recipe SD v1.4 cannot hold (`ground_plain_levels`: it has no level without attention finer than one with
    it)."""
    if recipe.get("ground_plain_levels"):
        return None
    from spatiallock.base.configs import COCO_CLASSES, SD_V1_PHRASE_DIM, build_unet, unet_config
    from spatiallock.models.adapter import SpatialLockAdapter

    options = {k: v for k, v in recipe.items() if k not in ("variant", "positions")}
    positions = recipe.get("positions")
    with torch.device("meta"):
        unet = build_unet(unet_config("sd-v1-4"), device="meta")
        adapter = SpatialLockAdapter.from_unet(
            unet, recipe["variant"], positions, SD_V1_PHRASE_DIM, COCO_CLASSES, **options
        )
        gligen = SpatialLockAdapter.from_unet(unet, "gligen", None, SD_V1_PHRASE_DIM, COCO_CLASSES)
    return adapter.parameter_counts()["total"] / gligen.parameter_counts()["total"]


def plot(rows: list[dict], path: Path) -> None:
    """Bars of ap and miou per row, with the issue's targets as dashed lines: AP 0.8 of the `real-images` AP
    (blue) and mIoU 0.8 (orange)."""
    from charts import grouped_bars

    blue, orange = "#3c6ec8", "#e68c28"
    real = next((row for row in rows if row["variant"] == "real-images" and row.get("ap") is not None), None)
    targets = ([(0.8 * real["ap"], blue, "AP target: 0.8 x real-images")] if real else []) + [
        (0.8, orange, "mIoU target: 0.8")
    ]
    series = [(title, colour, [row.get(metric) for row in rows]) for metric, title, colour in
              (("ap", "AP", blue), ("miou", "mIoU", orange))]  # fmt: skip
    title = "synthetic domain: AP and mIoU, same detector and layouts; dashed: targets"
    grouped_bars([row["variant"] for row in rows], series, title, "AP, mIoU", path, horizontal=True,
                 references=targets)  # fmt: skip


def samples_folder(out: Path) -> Path:
    """Where the strips of sample images behind the results file `out` go (results/synthetic_samples/ for
    results/synthetic.json)."""
    return out.with_name(out.stem + "_samples")


def save_strip(images: list[Image.Image], layouts: list, name: str, folder: Path) -> None:
    """The first generated images of a row, each at 2x with its requested boxes drawn (dashed), into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    sample_strip(images, layouts).save(folder / f"{name.replace('/', '_')}.png")


def samples_figure(names: list[str], path: Path, folder: Path) -> None:
    """One row per benchmark row (real images first), the same layouts in every column: the strips in `folder`."""
    strips = [
        (n, Image.open(folder / f"{n.replace('/', '_')}.png"))
        for n in names
        if (folder / f"{n.replace('/', '_')}.png").is_file()
    ]
    if strips:
        labelled_strips(strips, path, left=190)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="synthetic data folder (instances_val.json, val/, train/); required")
    parser.add_argument("--base", help="the small base model folder; required")
    parser.add_argument("--detector", help="detector folder; required")
    parser.add_argument("--row", action="append", default=[], help="NAME=ADAPTER[:option=value...]; repeatable")
    parser.add_argument(
        "--report", action="append", default=[], metavar="NAME=REPORT.json",
        help="a `spatiallock evaluate` report (same layouts and detector) as row NAME; repeatable",
    )  # fmt: skip
    parser.add_argument(
        "--second-detector", metavar="DET",
        help="a second evaluator (another architecture, trained on the real training images, used by nothing "
        "else): each row computed also gets its AP as `ap_second`, so that a gain by a reward detector is not a "
        "gain only in that detector's eyes",
    )  # fmt: skip
    parser.add_argument(
        "--also-at", type=float, default=None, metavar="T",
        help=f"score each row computed again counting only detections from T (ap_tXXX, miou_tXXX); "
        f"{AUTHORS_THRESHOLD} is the authors' protocol of LAMA",
    )  # fmt: skip
    parser.add_argument("--no-base", action="store_true", help="skip the `base` row")
    parser.add_argument("--no-real", action="store_true", help="skip the `real-images` row")
    parser.add_argument("--limit", type=int, default=300, help="validation layouts used (default: 300)")
    parser.add_argument("--steps", type=int, default=25, help="sampling steps (default: 25)")
    parser.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance (default: 5.0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-steps", type=int, default=None, help="adapter training steps, recorded")
    parser.add_argument("--samples", type=int, default=6, help="layouts shown per row in the samples figure")
    parser.add_argument("--out", default=str(RESULTS / "synthetic.json"), help="results file; the figures beside it")
    parser.add_argument(
        "--plot-only", action="store_true",
        help="redraw the chart and the samples figure from the results file (and its saved sample strips) alone",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.plot_only:
        out = Path(args.out)
        if not out.is_file():
            parser.error(f"--plot-only: no results file {out}")
        draw_figures(json.loads(out.read_text()), out)
        print(f"wrote {out.with_suffix('.png')} and {out.with_name(out.stem + '_samples.png')}")
        return
    missing = [f"--{name}" for name in ("data", "base", "detector") if getattr(args, name) is None]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")

    data = Path(args.data)
    layouts = read_layouts(data / "instances_val.json")[: args.limit]
    detector = Detector.from_pretrained(args.detector)
    second = None if args.second_detector is None else Detector.from_pretrained(args.second_detector)
    real = load_real_images([data / "val" / layout.meta["file_name"] for layout in layouts])
    out = Path(args.out)
    common = {"layouts": len(layouts), "sampling_steps": args.steps, "guidance": args.guidance, "seed": args.seed}
    decoder, fingerprint = vae_fingerprint(Path(args.base)), base_fingerprint(args.base)  # which base made a row

    def image_row(name: str, images: list[Image.Image], reference: list[Image.Image], note: str) -> None:
        """Score images that are not generated (the real ones, or them after the autoencoder) as row `name`."""
        start = time.perf_counter()
        scores, _, _ = score_images(detector, images, layouts)
        scores["fd"] = frechet_distance(reference, images, DetectorFeatures(detector))
        row = {"variant": name, **{k: round(v, 4) for k, v in scores.items()}, **common, "note": note}
        row.update(second_opinion(second, images, layouts, args.second_detector))
        row.update(at_threshold(detector, images, layouts, args.also_at))
        if name == "autoencoder":
            row.update(decoder=decoder, base_fingerprint=fingerprint)
        save_strip(images[: args.samples], layouts[: args.samples], name, samples_folder(out))
        write_row(out, row, args)
        print(f"{name}: {row}  ({time.perf_counter() - start:.0f} s)")

    if not args.no_real:
        train_layouts = read_layouts(data / "instances_train.json")[: len(layouts)]
        reference = load_real_images([data / "train" / layout.meta["file_name"] for layout in train_layouts])
        image_row("real-images", real, reference, "detector on real val images; fd: train vs val images (the floor)")
        # the same real images sent through the base's autoencoder and back: what a perfect U-Net would score
        vae = AutoencoderKL.from_pretrained(args.base, subfolder="vae", torch_dtype=torch.float32)
        note = "real val images through the base's autoencoder (posterior mean) and back: the generator's ceiling"
        image_row("autoencoder", round_trip(vae, real), reference, note)

    for text in args.report:
        name, _, path = text.partition("=")
        write_row(out, report_row(name, Path(path), len(layouts), fingerprint, decoder), args)
        print(f"{name}: from {path}")

    pipe = SpatialLockPipeline.from_pretrained(args.base)
    pipe.set_progress_bar_config(disable=True)
    todo = ([] if args.no_base else [("base", None, {})]) + [parse_row(text) for text in args.row]
    for name, folder, options in todo:
        if folder is not None and is_lama_folder(folder):
            lama_row(name, folder, options, layouts, detector, real, common, args, second)
            continue
        pipe.set_adapter(None if folder is None else load_adapter(folder))
        pipe.set_judge(None if options.get("judge") is None else ImageJudge.from_pretrained(options["judge"]))
        sampling = SamplingOptions(seed=args.seed, steps=args.steps, guidance=args.guidance, **options)
        start = time.perf_counter()
        report, images, *_ = evaluate_pipeline(pipe, detector, layouts, sampling, 1, real)
        save_strip(images[: args.samples], layouts[: args.samples], name, samples_folder(out))
        row = {"variant": name, **{k: report[k] for k in METRICS}, "seconds_per_image": report["seconds_per_image"]}
        row.update(second_opinion(second, images, layouts, args.second_detector))
        row.update(at_threshold(detector, images, layouts, args.also_at))
        row.update(common, adapter=folder, options=options, decoder=decoder, base_fingerprint=fingerprint)
        if folder is not None:
            saved = Path(folder) / "train" / "config.json"
            config = json.loads(saved.read_text()) if saved.is_file() else {}
            row["train_steps"] = config.get("loop", {}).get("max_steps")
            if config.get("init_from"):
                row["init_from"] = config["init_from"]
            row["recipe"] = adapter_recipe_of(pipe.adapter, config)
            ratio = sd_ratio(row["recipe"])
            row["sd_v1_4_ratio"] = None if ratio is None else round(ratio, 4)
            if config.get("reward_detector"):
                row["reward"] = {k: config[k] for k in ("reward_detector", "reward_weight", "reward_timesteps")}
        write_row(out, row, args)
        print(f"{name}: {row}  ({time.perf_counter() - start:.0f} s)")

    result = json.loads(out.read_text())
    shown = (*METRICS, "ap_second")
    header = f"{'variant':28s} " + " ".join(f"{m[:7]:>7s}" for m in shown) + "  s/image"
    print(header)
    for row in result["rows"]:
        values = " ".join(f"{row[m]:7.3f}" if row.get(m) is not None else "    n/a" for m in shown)
        print(f"{row['variant']:28s} {values}  {row.get('seconds_per_image', float('nan')):.3f}")


def lama_row(name, folder, options, layouts, detector, real, common: dict, args, second=None) -> None:
    """Score the LAMA model in `folder` as row `name`: the same layouts, seed and detector as every row."""
    pipe = LamaPipeline.from_pretrained(folder)
    sampling = SamplingOptions(seed=args.seed, **options)
    start = time.perf_counter()
    report, images, *_ = evaluate_pipeline(pipe, detector, layouts, sampling, 1, real)
    out = Path(args.out)
    save_strip(images[: args.samples], layouts[: args.samples], name, samples_folder(out))
    save_mask_strips(pipe, layouts[: args.samples], args.seed, name, samples_folder(out))
    lama_figure(samples_folder(out), out.with_name("lama.png"))
    row = {"variant": name, **{k: report[k] for k in METRICS}, "seconds_per_image": report["seconds_per_image"]}
    row.update(at_threshold(detector, images, layouts, args.also_at))
    row.update(second_opinion(second, images, layouts, args.second_detector))
    row.update(common, sampling_steps=None, guidance=None, model=folder, options=options)
    row.update({k: v for k, v in report.items() if k.startswith("mask_entropy")})
    row["alpha"] = report.get("alpha")  # as learnt; adaption_strength: clamped to [-1, 1], as the model uses it
    row["adaption_strength"] = report.get("adaption_strength")
    saved = Path(folder) / "train" / "config.json"
    config = json.loads(saved.read_text()) if saved.is_file() else {}
    row["train_steps"] = config.get("loop", {}).get("max_steps")
    model = pipe.generator.config
    row["recipe"] = {
        "model": "lama", "architecture": model.architecture, "adaption": model.adaption,
        "local_query": model.local_query if model.adaption else None, "truncation": model.truncation,
        "channels": model.channels, "d_channels": model.d_channels,
        "gate_lr_scale": config.get("gate_lr_scale", 1.0),  # 1: the authors' learning rates
    }  # fmt: skip
    write_row(out, row, args)
    print(f"{name}: {row}  ({time.perf_counter() - start:.0f} s)")


def save_mask_strips(pipe: LamaPipeline, layouts: list, seed: int, name: str, folder: Path) -> None:
    """The semantic masks behind the first images of a LAMA row (those `save_strip` shows): the final ones and,
    with the adaption, the raw ones before it; and the requested layouts on grey."""
    generators = [image_generator(seed, i, 0) for i in range(len(layouts))]
    final, raw = pipe.masks(layouts, generators)
    categories = pipe.generator.config.categories
    kinds = [("masks", final)] + ([("raw_masks", normalise(raw))] if pipe.generator.adaption is not None else [])
    folder.mkdir(parents=True, exist_ok=True)
    for kind, masks in kinds:
        pictures = [mask_picture(mask, categories, layout.labels) for mask, layout in zip(masks, layouts)]
        sample_strip(pictures).save(folder / f"{name}_{kind}.png")
    grey = Image.new("RGB", (64, 64), (200, 200, 200))
    sample_strip([grey] * len(layouts), layouts).save(folder / "layouts.png")


def lama_figure(folder: Path, path: Path) -> None:
    """Layouts, then for each LAMA row its raw masks (with the adaption), final masks and images, one row each."""
    rows = [("layouts", "layouts")]
    names = sorted(p.name[: -len("_masks.png")] for p in folder.glob("*_masks.png") if "_raw_masks" not in p.name)
    for name in sorted(names, key=lambda n: ("no-adaption" in n, n)):
        rows += [(f"{name}: raw masks", f"{name}_raw_masks"), (f"{name}: masks", f"{name}_masks"), (name, name)]
    strips = [
        (label, Image.open(folder / f"{stem}.png")) for label, stem in rows if (folder / f"{stem}.png").is_file()
    ]
    labelled_strips(strips, path, left=230)


def report_row(name: str, path: Path, layouts: int, fingerprint: str | None, decoder: str | None) -> dict:
    """A row from a `spatiallock evaluate` report: its scores, the base that made its images (`base_fingerprint`,
    which must be this benchmark's base, and then its `decoder` too), and its sampling options where they differ
    from the defaults (as `options`, like the rows this script samples itself)."""
    try:
        report = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SystemExit(f"--report: cannot read {path}: {err}") from None
    if report.get("num_layouts") != layouts:
        raise SystemExit(f"--report: {path} scored {report.get('num_layouts')} layouts, this benchmark {layouts}")
    made_on = report.get("base_fingerprint")
    if made_on is not None and made_on != fingerprint:
        raise SystemExit(f"--report: {path} was made on base {made_on}, this benchmark's --base is {fingerprint}")
    defaults = asdict(SamplingOptions())
    skip = ("seed", "steps", "guidance", "size", "dtype", "batch_size", "scheduler")
    options = {k: report[k] for k in defaults if k not in skip and k in report and report[k] != defaults[k]}
    row = {"variant": name, **{k: report[k] for k in METRICS}, "seconds_per_image": report["seconds_per_image"]}
    row.update(layouts=layouts, sampling_steps=report["steps"], guidance=report["guidance"], seed=report["seed"])
    row.update(adapter=report["adapter"], options=options, scheduler=report["scheduler"], report=str(path))
    row["base_fingerprint"] = made_on
    if made_on is not None:
        row["decoder"] = decoder
    return row


def write_row(out: Path, row: dict, args: argparse.Namespace) -> None:
    """Put one row into the results file as soon as it is computed (rows other runs wrote are kept), atomically,
    and redraw the figures. A lock file serialises runs that write the same results side by side."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(f".{out.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _write_row(out, row, args)


def _write_row(out: Path, row: dict, args: argparse.Namespace) -> None:
    latest = json.loads(out.read_text()) if out.is_file() else {}
    rows = {r["variant"]: r for r in latest.get("rows", [])}
    rows[row["variant"]] = row
    first = ("real-images", "autoencoder", "base")
    order = [n for n in first if n in rows] + [n for n in rows if n not in first]
    result = {
        "device": device_name(),
        "train_steps": args.train_steps if args.train_steps is not None else latest.get("train_steps"),
        "detector": args.detector,
        "base": args.base,
        "rows": [rows[n] for n in order if n in rows],
    }
    write_text_atomic(out, json.dumps(result, indent=2) + "\n")
    draw_figures(result, out)


def draw_figures(result: dict, out: Path) -> None:
    """The chart of the results file `out` (`out` as .png) and its samples figure (`<out>_samples.png`)."""
    plot(result["rows"], out.with_suffix(".png"))
    samples_figure([r["variant"] for r in result["rows"]], out.with_name(out.stem + "_samples.png"),
                   samples_folder(out))  # fmt: skip


if __name__ == "__main__":
    main()
