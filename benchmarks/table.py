"""Print a benchmark results file as the Markdown table the README shows.

python benchmarks/table.py                                   # benchmarks/results/synthetic.json
python benchmarks/table.py benchmarks/results/synthetic.json --label spatiallock="spatiallock (shipped)"
python benchmarks/table.py --rows spatiallock,spatiallock-down,spatiallock-up    # these rows, in this order
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
COLUMNS = (
    ("ap", "AP", 3),
    ("ap50", "AP50", 3),
    ("ap75", "AP75", 3),
    ("miou", "mIoU", 3),
    ("miou_any", "mIoU any class", 3),
    ("fd", "fd", 2),
    ("ap_second", "AP, second evaluator", 3),
)


def markdown(result: dict, labels: dict[str, str], only: list[str] | None = None) -> str:
    """The rows of `result` (those named in `only`, in that order, when given) as a Markdown table."""
    by_name = {row["variant"]: row for row in result["rows"]}
    missing = [name for name in only or [] if name not in by_name]
    if missing:
        raise LookupError(f"no row {', '.join(missing)}")
    rows = [by_name[name] for name in only] if only else result["rows"]
    columns = [c for c in COLUMNS if any(row.get(c[0]) is not None for row in rows)]
    lines = ["| variant | " + " | ".join(title for _, title, _ in columns) + " |", "|---|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"{row[key]:.{digits}f}" if row.get(key) is not None else "-" for key, _, digits in columns]
        lines.append(f"| {labels.get(row['variant'], row['variant'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="?", default=str(RESULTS / "synthetic.json"), help="results JSON file")
    parser.add_argument("--label", action="append", default=[], help="VARIANT=TEXT shown instead of the name")
    parser.add_argument("--rows", default=None, help="comma-separated variants to show, in order (default: all)")
    args = parser.parse_args(argv)
    path = Path(args.results)
    if not path.is_file():
        sys.exit(f"error: results: no file {path}")
    try:
        result = json.loads(path.read_text())
        labels = dict(text.split("=", 1) for text in args.label)
        print(markdown(result, labels, args.rows.split(",") if args.rows else None))
    except LookupError as error:
        if not isinstance(error, KeyError):
            sys.exit(f"error: --rows: {error} in {path}")
        sys.exit(f"error: results: {path} is not a benchmark results file (missing {error})")
    except (json.JSONDecodeError, ValueError) as error:
        sys.exit(f"error: results: {path} is not a benchmark results file ({error})")
    print(f"\n{result.get('device', '?')}, {result.get('train_steps', '?')} training steps", file=sys.stderr)


if __name__ == "__main__":
    main()
