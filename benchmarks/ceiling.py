"""The autoencoder's ceiling, per object size: what a perfect U-Net on its latents could reach.

The real validation images are sent through each autoencoder and back (posterior mean) and scored by the
shipped detector against their own boxes, beside the real images themselves: AP, mIoU and both per object size
(`spatiallock.evaluation.scoring.SIZE_BUCKETS`: small under 1/8 of the image side, medium 1/8 to 1/4, large from
1/4), with the latent shape, the autoencoder's size, its reconstruction PSNR and the digest of its weights.
Every generated image passes the decoder, so no generator on that base scores above its row.

    python benchmarks/ceiling.py --data data/shapes --detector spatiallock/assets/detector \\
        --vae shipped=spatiallock/assets/default --vae wide8=runs/ae-16x16x8 --limit 300

Each NAME=FOLDER is a base folder (with `vae/`) or an autoencoder folder itself. Rows computed replace the rows
of the same name in --out (default benchmarks/results/ceiling.json); the others are kept.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from diffusers.image_processor import VaeImageProcessor
from PIL import Image
from synthetic import device_name, round_trip

from spatiallock.base.folders import autoencoder_folder, weights_digest
from spatiallock.evaluation.detector import Detector
from spatiallock.evaluation.scoring import SIZE_BUCKETS, load_real_images, score_images, size_of
from spatiallock.files import write_text_atomic
from spatiallock.layout import read_layouts

RESULTS = Path(__file__).resolve().parent / "results"
SIZES = tuple(SIZE_BUCKETS)


def psnr(images: list[Image.Image], reference: list[Image.Image]) -> float:
    """Mean PSNR in dB of `images` against `reference` (8-bit RGB)."""
    values = []
    for image, real in zip(images, reference):
        a = np.asarray(image.convert("RGB"), dtype=np.float64)
        b = np.asarray(real.convert("RGB"), dtype=np.float64)
        values.append(10 * np.log10(255.0**2 / max(float(np.mean((a - b) ** 2)), 1e-10)))
    return float(np.mean(values))


def scored(detector: Detector, images, layouts) -> dict:
    scores, _, _ = score_images(detector, images, layouts, by_size=True)
    keys = ["ap", "ap50", "ap75", "miou"] + [f"{m}_{s}" for s in SIZES for m in ("ap", "miou")]
    return {k: (None if scores[k] is None else round(scores[k], 4)) for k in keys}


def table(rows: list[dict]) -> str:
    """The rows as the Markdown table the benchmarks document shows."""
    head = ["variant", "latent", "AP"] + [f"AP {s}" for s in SIZES] + ["mIoU"] + [f"mIoU {s}" for s in SIZES]
    lines = ["| " + " | ".join(head + ["PSNR", "params"]) + " |", "|---" * (len(head) + 2) + "|"]
    for row in rows:
        cells = [row["variant"], "x".join(map(str, row.get("latent", []))) or "-"]
        for key in ["ap"] + [f"ap_{s}" for s in SIZES] + ["miou"] + [f"miou_{s}" for s in SIZES]:
            cells.append("-" if row.get(key) is None else f"{row[key]:.3f}")
        cells.append(f"{row['psnr']:.1f}" if row.get("psnr") is not None else "-")
        cells.append(f"{row['params'] / 1e6:.2f} M" if row.get("params") else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="synthetic data folder (instances_val.json, val/)")
    parser.add_argument("--detector", required=True, help="detector folder (the shipped one scores every row)")
    parser.add_argument(
        "--vae", action="append", default=[], metavar="NAME=FOLDER",
        help="an autoencoder (or a base folder holding one in vae/) to measure as row NAME; repeatable",
    )  # fmt: skip
    parser.add_argument("--limit", type=int, default=300, help="validation images used (default: 300)")
    parser.add_argument("--no-real", action="store_true", help="skip the `real-images` row")
    parser.add_argument("--out", default=str(RESULTS / "ceiling.json"), help="results file (JSON)")
    args = parser.parse_args(argv)
    named = []
    for text in args.vae:
        name, sep, folder = text.partition("=")
        if not sep or not name or not folder:
            parser.error(f"--vae: {text!r} is not NAME=FOLDER")
        found = autoencoder_folder(folder)
        if found is None:
            sys.exit(f"--vae: {folder} holds no AutoencoderKL (config.json with _class_name AutoencoderKL, or vae/)")
        named.append((name, found))

    data = Path(args.data)
    layouts = read_layouts(data / "instances_val.json")[: args.limit]
    real = load_real_images([data / "val" / layout.meta["file_name"] for layout in layouts])
    detector = Detector.from_pretrained(args.detector)
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.is_file() else {"rows": []}
    computed = []
    if not args.no_real:
        computed.append({"variant": "real-images", **scored(detector, real, layouts), "note": "the detector's own"})
    for name, folder in named:
        start = time.perf_counter()
        vae = AutoencoderKL.from_pretrained(folder, torch_dtype=torch.float32)
        images = round_trip(vae, real)
        with torch.no_grad():
            latent = tuple(vae.encode(VaeImageProcessor().preprocess(real[:1])).latent_dist.mean.shape[1:])
        row = {"variant": name, **scored(detector, images, layouts), "latent": list(latent)}
        row.update(psnr=round(psnr(images, real), 2), params=sum(p.numel() for p in vae.parameters()))
        row.update(folder=str(folder), autoencoder=weights_digest(folder))
        computed.append(row)
        print(f"{name}: AP {row['ap']:.3f}, latent {latent} ({time.perf_counter() - start:.0f} s)")
    sizes = {s: sum(1 for layout in layouts for box in layout.boxes if size_of(box) == s) for s in SIZES}
    kept = [row for row in result["rows"] if row["variant"] not in {r["variant"] for r in computed}]
    result = {
        "layouts": len(layouts),
        "objects_per_size": sizes,
        "size_buckets": {s: [lo, None if hi == float("inf") else hi] for s, (lo, hi) in SIZE_BUCKETS.items()},
        "device": device_name(),
        "rows": sorted(kept + computed, key=lambda r: (r["variant"] != "real-images", -(r.get("ap") or 0))),
    }
    write_text_atomic(out, json.dumps(result, indent=2) + "\n")
    print(table(result["rows"]))


if __name__ == "__main__":
    main()
