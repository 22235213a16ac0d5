"""Where should it go: the location models against random boxes, and object insertion, on held-out shelves scenes.

Location (seed 004's Figure 6, with the shelves checker as the ground truth): for each held-out scene (the val
split's images with one object removed) every model samples boxes for the removed object's label. At k samples:

    TPR  the share of the scene's positive boxes that one of the k samples hits (IoU >= --iou)
    FPR  the share of its negative boxes that one of them hits
    top1_plausible   the share of scenes whose most likely of --top-of samples keeps every rule (random: the first)
    plausible_rate   the share of all samples that keep every rule

Models: `random` (uniform boxes: two sorted uniform x and two sorted uniform y), and each --model NAME=LOCATOR
(e.g. positive-only=runs/locator, dpo=runs/locator-dpo).

Insertion: on the first --insert-cases scenes, the removed object is drawn back into its own box by the SpatialLock
model (--sampler, `location.insert`); the shipped detector looks for it (found: a detection of its class with
IoU >= 0.5 in the box, score >= 0.3), and PSNR and SSIM compare the result with the input outside the box (the box
itself replaced by the input's pixels in both). `psnr_outside_raw` is the same before the input's pixels are put
back (what masked latent blending alone keeps through the autoencoder).

    python benchmarks/location.py --data data/shelves --model positive-only=runs/locator \\
        --model dpo=runs/locator-dpo
    python benchmarks/location.py --plot-only       # redraw the chart from the results file alone

A run with the same settings as the results file keeps the file's rows of the models it does not compute (and
its insertion row with --insert-cases 0), so a new model is added without sampling the others again.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.ops import box_iou
from tqdm.auto import tqdm

from spatiallock.data.shelves import plausible
from spatiallock.location.locator import Locator, held_out, load_background

RESULTS = Path(__file__).resolve().parent / "results"
COUNTS = (1, 2, 5, 10, 20, 50)


def random_boxes(count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    xs = torch.rand(count, 2, generator=generator).sort(dim=1).values
    ys = torch.rand(count, 2, generator=generator).sort(dim=1).values
    boxes = torch.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], dim=1)
    return boxes, -torch.arange(count, dtype=torch.float32)  # "most likely" = the first drawn


@torch.no_grad()
def sampled(model: Locator | None, data: Path, entries: list[dict], count: int, seed: int) -> list[tuple]:
    """Per scene: (count, 4) boxes in the order drawn, and their log-probabilities."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for entry in tqdm(entries, desc="sampling", leave=False):
        if model is None:
            out.append(random_boxes(count, generator))
            continue
        pixels = load_background(data / entry["file_name"], model.config.image_size).unsqueeze(0)
        labels = model.label_index([entry["label"]] * count)
        out.append(model.sample(pixels.expand(count, -1, -1, -1), labels, generator))
    return out


def location_row(name: str, draws: list[tuple], entries: list[dict], scenes: list, iou: float, top_of: int) -> dict:
    curve, top, good, total = [], 0, 0, 0
    for k in COUNTS:
        hit_pos = hit_neg = n_pos = n_neg = 0
        for (boxes, _), entry in zip(draws, entries):
            positives, negatives = torch.tensor(entry["positives"]), torch.tensor(entry["negatives"])
            hit_pos += int((box_iou(positives, boxes[:k]) >= iou).any(dim=1).sum())
            hit_neg += int((box_iou(negatives, boxes[:k]) >= iou).any(dim=1).sum())
            n_pos, n_neg = n_pos + len(positives), n_neg + len(negatives)
        curve.append([k, round(hit_pos / n_pos, 4), round(hit_neg / n_neg, 4)])
    for (boxes, scores), entry, scene in zip(draws, entries, scenes):
        ok = [plausible(scene, box.tolist(), entry["label"]) for box in boxes]
        good, total = good + sum(ok), total + len(ok)
        top += ok[int(scores[:top_of].argmax())]
    return {
        "name": name, "top1_plausible": round(top / len(entries), 4), "plausible_rate": round(good / total, 4),
        "tpr_fpr": curve,
    }  # fmt: skip


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0**2 / mse)


def insertion(args, entries: list[dict], data: Path) -> dict:
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    from spatiallock.evaluation.detector import Detector
    from spatiallock.location.insert import insert_object
    from spatiallock.sampling import load_pipeline

    pipe = load_pipeline(args.sampler)
    detector = Detector.from_pretrained(args.detector)
    found, psnrs, raws, ssims, cases = 0, [], [], [], entries[: args.insert_cases]
    start = time.perf_counter()
    for n, entry in enumerate(tqdm(cases, desc="inserting", leave=False)):
        image = Image.open(data / entry["file_name"]).convert("RGB")
        box = entry["removed_box"]
        made = {}
        for paste in (True, False):
            made[paste] = insert_object(pipe, image, box, entry["label"], generator=torch.Generator().manual_seed(n),
                                        num_inference_steps=args.steps, paste_back=paste)  # fmt: skip
        before = np.asarray(image)
        h, w = before.shape[:2]
        inside = np.zeros((h, w), dtype=bool)
        inside[int(box[1] * h) : int(np.ceil(box[3] * h)), int(box[0] * w) : int(np.ceil(box[2] * w))] = True
        after, raw = np.asarray(made[True]).copy(), np.asarray(made[False]).copy()
        psnrs.append(psnr(after[~inside], before[~inside]))
        raws.append(psnr(raw[~inside], before[~inside]))
        after[inside] = before[inside]
        as_tensor = [torch.from_numpy(x).permute(2, 0, 1)[None].float() / 255.0 for x in (after, np.array(before))]
        ssims.append(float(ssim(*as_tensor, data_range=1.0)))
        detections = detector.detect([made[True]], score_threshold=0.3)[0]
        right = [i for i, name in enumerate(detections["names"]) if name == entry["label"]]
        if right:
            overlap = box_iou(torch.tensor([box]), detections["boxes"][right])
            found += int(overlap.max() >= 0.5)
    finite = [p for p in psnrs if np.isfinite(p)]
    return {
        "cases": len(cases), "found_rate": round(found / len(cases), 4),
        "psnr_outside": round(float(np.mean(finite)), 2) if finite else float("inf"),
        "psnr_outside_identical": sum(not np.isfinite(p) for p in psnrs),
        "ssim_outside": round(float(np.mean(ssims)), 4), "psnr_outside_raw": round(float(np.mean(raws)), 2),
        "box": "the removed object's own box", "sampler": args.sampler, "steps": args.steps,
        "seconds_per_case": round((time.perf_counter() - start) / len(cases), 2),
    }  # fmt: skip


SETTINGS = ("data", "split", "scenes", "iou", "top_of", "samples", "seed")


def plot(result: dict, path: Path) -> None:
    from charts import PALETTE, lines

    curves = [
        (f"{row['name']} (top-1: {row['top1_plausible']:.0%})", PALETTE[i % len(PALETTE)],
         [(fpr, tpr, str(int(k))) for k, tpr, fpr in row["tpr_fpr"]])
        for i, row in enumerate(result["models"])
    ]  # fmt: skip
    title = f"{result['scenes']} held-out shelves scenes; points: boxes sampled"
    lines(curves, title, "FPR (negative boxes hit)", "TPR (positive boxes hit)", path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/shelves", help="shelves data folder (default: data/shelves)")
    parser.add_argument("--split", default="val", help="held-out split (default: val)")
    parser.add_argument("--model", action="append", default=[], metavar="NAME=LOCATOR", help="repeatable")
    parser.add_argument("--limit", type=int, default=None, help="scenes used (default: all)")
    parser.add_argument("--samples", type=int, default=max(COUNTS), help=f"boxes per scene (default: {max(COUNTS)})")
    parser.add_argument("--top-of", type=int, default=10, help="top-1 among this many samples (default: 10)")
    parser.add_argument("--iou", type=float, default=0.5, help="IoU of a hit (default: 0.5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--insert-cases", type=int, default=100, help="insertion cases; 0: skip (default: 100)")
    parser.add_argument("--sampler", default="default", help="SpatialLock model that inserts (default: shipped)")
    parser.add_argument("--detector", default="spatiallock/assets/detector", help="detector that looks for it")
    parser.add_argument("--steps", type=int, default=25, help="sampling steps of insertion (default: 25)")
    parser.add_argument("--out", default=str(RESULTS / "location.json"), help="results file; the chart beside it")
    parser.add_argument("--plot-only", action="store_true", help="redraw the chart from the results file alone")
    args = parser.parse_args(argv)
    if args.plot_only:
        from charts import redraw_from_results

        return redraw_from_results(parser, args.out, plot)
    data = Path(args.data)
    entries, scenes = held_out(data, args.split, args.limit)
    if not entries:
        sys.exit(f"--data: {data} has no {args.split} placements")
    models = [("random", None)]
    for text in args.model:
        name, _, folder = text.partition("=")
        if not folder:
            sys.exit(f"--model: expected NAME=LOCATOR, got {text!r}")
        models.append((name, Locator.from_pretrained(folder)))
    rows = []
    for name, model in models:
        draws = sampled(model, data, entries, args.samples, args.seed)
        rows.append(location_row(name, draws, entries, scenes, args.iou, args.top_of))
        row = rows[-1]
        print(f"{name:14s} top-1 plausible {row['top1_plausible']:.3f}  plausible {row['plausible_rate']:.3f}  "
              f"[k, TPR, FPR]: {row['tpr_fpr']}")  # fmt: skip
    result = {
        "data": str(data), "split": args.split, "scenes": len(entries), "iou": args.iou, "top_of": args.top_of,
        "samples": args.samples, "seed": args.seed, "models": rows,
    }  # fmt: skip
    out = Path(args.out)
    previous = json.loads(out.read_text()) if out.is_file() else {}
    if all(previous.get(key) == result[key] for key in SETTINGS):  # the same measurement: keep its other rows
        computed = {row["name"]: row for row in rows}
        kept = [computed.pop(row["name"], row) for row in previous.get("models", [])]
        result["models"] = kept + list(computed.values())
        if "insertion" in previous:
            result["insertion"] = previous["insertion"]
    if args.insert_cases > 0:
        result["insertion"] = insertion(args, entries, data)
        print(f"insertion: {result['insertion']}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
