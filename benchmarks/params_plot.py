"""AP against trainable parameters: one point per adapter configuration in the synthetic benchmark.

Each adapter row of benchmarks/results/synthetic.json records the recipe that built it and `sd_v1_4_ratio`: what
that recipe trains on Stable Diffusion v1.4 as a share of GLIGEN's trainable parameters there (the paper's
budget is 0.507; this project's target 0.35). The plot puts each row's AP against that share, with the two
budgets as dashed lines and the real-image and autoencoder APs as dotted ceilings.

    python benchmarks/params_plot.py              # writes benchmarks/results/ap_vs_params.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

RESULTS = Path(__file__).resolve().parent / "results"
BUDGETS = ((0.35, "target 0.35", (200, 60, 60)), (0.507, "paper 0.507", (120, 120, 120)))


def points(rows: list[dict]) -> list[tuple[str, float, float, str]]:
    """(variant, ratio, AP, decoder) of every row that records its SD v1.4 parameter ratio."""
    return [
        (row["variant"], row["sd_v1_4_ratio"], row["ap"], row.get("decoder", "?"))
        for row in rows
        if row.get("sd_v1_4_ratio") is not None and row.get("ap") is not None
    ]


def draw(rows: list[dict], path: Path) -> None:
    width, height, left, right, top, bottom = 900, 560, 70, 30, 40, 60
    image = Image.new("RGB", (width, height), (255, 255, 255))
    canvas = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=13)
    x_of = lambda r: left + (width - left - right) * r / 1.2  # noqa: E731  ratio 0..1.2
    y_of = lambda ap: height - bottom - (height - top - bottom) * ap  # noqa: E731  AP 0..1
    canvas.text((10, 10), "AP (synthetic benchmark) against trainable parameters on SD v1.4, as a share of "
                "GLIGEN's", fill=(0, 0, 0), font=font)  # fmt: skip
    canvas.line((left, height - bottom, width - right, height - bottom), fill=(0, 0, 0))
    canvas.line((left, top, left, height - bottom), fill=(0, 0, 0))
    for tick in range(0, 11, 2):
        value = tick / 10
        canvas.text((x_of(value * 1.2) - 8, height - bottom + 6), f"{value * 1.2:.2f}", fill=(0, 0, 0), font=font)
        canvas.text((left - 34, y_of(value) - 7), f"{value:.1f}", fill=(0, 0, 0), font=font)
    canvas.text(
        (width // 2 - 120, height - 24), "trainable parameters / GLIGEN's (SD v1.4)", fill=(0, 0, 0), font=font
    )
    for ratio, label, colour in BUDGETS:
        for y in range(top, height - bottom, 10):
            canvas.line((x_of(ratio), y, x_of(ratio), y + 5), fill=colour, width=2)
        canvas.text((x_of(ratio) + 4, top), label, fill=colour, font=font)
    by_name = {row["variant"]: row for row in rows}
    for name in ("real-images", "autoencoder"):
        if name in by_name:
            y = y_of(by_name[name]["ap"])
            for x in range(left, width - right, 8):
                canvas.line((x, y, x + 2, y), fill=(90, 90, 90))
            canvas.text(
                (width - right - 150, y - 15), f"{name} {by_name[name]['ap']:.3f}", fill=(90, 90, 90), font=font
            )
    decoders = sorted({d for *_, d in points(rows)})
    colours = [(60, 110, 200), (230, 140, 40), (60, 160, 90), (150, 80, 180)]
    placed: list[tuple[float, float]] = []
    for name, ratio, ap, decoder in points(rows):
        colour = colours[decoders.index(decoder) % len(colours)]
        x, y = x_of(ratio), y_of(ap)
        canvas.ellipse((x - 5, y - 5, x + 5, y + 5), fill=colour)
        dy = -16
        while any(abs(x - px) < 150 and abs(y + dy - py) < 14 for px, py in placed):
            dy += 14
        placed.append((x, y + dy))
        canvas.text((x + 7, y + dy), f"{name} {ap:.3f}", fill=(0, 0, 0), font=font)
    for k, decoder in enumerate(decoders):
        y = height - bottom - 24 - 16 * k
        canvas.ellipse((width - right - 200, y + 2, width - right - 190, y + 12), fill=colours[k % len(colours)])
        canvas.text((width - right - 184, y), f"decoder {decoder}", fill=(0, 0, 0), font=font)
    image.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="?", default=str(RESULTS / "synthetic.json"), help="results JSON file")
    parser.add_argument("--out", default=str(RESULTS / "ap_vs_params.png"), help="PNG to write")
    args = parser.parse_args()
    rows = json.loads(Path(args.results).read_text())["rows"]
    draw(rows, Path(args.out))
    for name, ratio, ap, decoder in sorted(points(rows), key=lambda p: p[1]):
        print(f"{name:28s} ratio {ratio:.3f}  AP {ap:.3f}  decoder {decoder}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
