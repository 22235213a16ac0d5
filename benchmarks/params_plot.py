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

RESULTS = Path(__file__).resolve().parent / "results"
BUDGETS = ((0.35, "#c83c3c", "target 0.35"), (0.507, "#787878", "paper 0.507"))  # (ratio, colour, label)


def points(rows: list[dict]) -> list[tuple[str, float, float, str]]:
    """(variant, ratio, AP, decoder) of every row that records its SD v1.4 parameter ratio."""
    return [
        (row["variant"], row["sd_v1_4_ratio"], row["ap"], row.get("decoder", "?"))
        for row in rows
        if row.get("sd_v1_4_ratio") is not None and row.get("ap") is not None
    ]


def draw(rows: list[dict], path: Path) -> None:
    from charts import labelled_points

    by_name = {row["variant"]: row for row in rows}
    ceilings = [
        (by_name[name]["ap"], "#5a5a5a", f"{name} {by_name[name]['ap']:.3f}")
        for name in ("real-images", "autoencoder")
        if by_name.get(name, {}).get("ap") is not None
    ]
    labelled_points(
        [(f"{name} {ap:.3f}", ratio, ap, f"decoder {decoder}") for name, ratio, ap, decoder in points(rows)],
        "AP (synthetic benchmark) against trainable parameters on SD v1.4, as a share of GLIGEN's",
        "trainable parameters / GLIGEN's (SD v1.4)",
        "AP",
        path,
        xlim=(0.0, 1.2),
        vertical=BUDGETS,
        horizontal=ceilings,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="?", default=str(RESULTS / "synthetic.json"), help="results JSON file")
    parser.add_argument("--out", default=str(RESULTS / "ap_vs_params.png"), help="PNG to write")
    args = parser.parse_args(argv)
    rows = json.loads(Path(args.results).read_text())["rows"]
    draw(rows, Path(args.out))
    for name, ratio, ap, decoder in sorted(points(rows), key=lambda p: p[1]):
        print(f"{name:28s} ratio {ratio:.3f}  AP {ap:.3f}  decoder {decoder}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
