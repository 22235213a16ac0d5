"""The benchmarks' figures: charts (grouped bars, line plots, labelled points) drawn with matplotlib's Agg backend,
and sheets of sample images (stacked labelled strips) drawn with PIL.

The charts need the `bench` extra (`pip install -e ".[bench]"`); the sample sheets need PIL alone.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

PALETTE = (
    "#999999", "#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
)  # fmt: skip
DPI = 100


def figure(width: float, height: float):
    """A matplotlib figure of `width` x `height` inches on the Agg canvas (no pyplot, no display), and its axes."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise SystemExit('the benchmark charts need matplotlib: pip install -e ".[bench]"') from None
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def save(fig, path: Path) -> None:
    """Write `fig` as a PNG at `path` (its folder made if need be)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI, bbox_inches="tight", facecolor="white")


def grouped_bars(
    groups: Sequence[str],
    series: Sequence[tuple[str, str, Sequence[float | None]]],
    title: str,
    ylabel: str,
    path: Path,
    top: float = 1.0,
    horizontal: bool = False,
    references: Sequence[tuple[float, str, str]] = (),
) -> None:
    """One group of bars per entry of `groups`; `series` holds (name, colour, one value per group or None), each
    bar labelled with its value. `references`: (value, colour, label) drawn as dashed lines across the bars.
    `horizontal`: groups top to bottom, values along x (for many groups)."""
    import numpy as np

    count = max(len(series), 1)
    width = 0.8 / count
    if horizontal:
        fig, ax = figure(9.0, 1.0 + 0.25 * count * max(len(groups), 1))
    else:
        fig, ax = figure(max(4.0, 1.0 + 0.55 * count * len(groups)), 4.2)
    at = np.arange(len(groups))
    for s, (name, colour, values) in enumerate(series):
        offsets = at - 0.4 + width * (s + 0.5)
        shown = [(o, v) for o, v in zip(offsets, values) if v is not None]
        if not shown:
            continue
        where, heights = zip(*shown)
        draw = ax.barh if horizontal else ax.bar
        bars = draw(where, heights, width * 0.92, color=colour, label=name)
        ax.bar_label(bars, fmt="%.3f", padding=2, fontsize=7)
    for value, colour, label in references:
        line = ax.axvline if horizontal else ax.axhline
        line(value, color=colour, linestyle="--", linewidth=1.2, label=label)
    value_axis, group_axis = (ax.xaxis, ax.yaxis) if horizontal else (ax.yaxis, ax.xaxis)
    group_axis.set_ticks(at, list(groups))
    value_axis.grid(True, color="#e5e5e5")
    ax.set_axisbelow(True)
    if horizontal:
        ax.set_xlim(0, top * 1.1)
        ax.set_ylim(len(groups) - 0.5, -0.5)  # the first group on top
        ax.set_xlabel(ylabel)
    else:
        ax.set_ylim(0, top * 1.1)
        ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10, loc="left")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)  # beside the bars
    save(fig, path)


def lines(
    curves: Sequence[tuple[str, str, Sequence[tuple[float, float, str]]]],
    title: str,
    xlabel: str,
    ylabel: str,
    path: Path,
) -> None:
    """Line plots of shares (values in [0, 1], the axes from 0 to the next tenth above the largest value):
    `curves` holds (name, colour, points (x, y, point label))."""
    import math

    fig, ax = figure(8.0, 5.5)
    for name, colour, points in curves:
        xs, ys = [x for x, _, _ in points], [y for _, y, _ in points]
        ax.plot(xs, ys, color=colour, marker="o", markersize=4, linewidth=1.6, label=name)
        for x, y, label in points:
            ax.annotate(label, (x, y), xytext=(4, 3), textcoords="offset points", fontsize=7, color=colour)
    every = [point for _, _, points in curves for point in points]
    for axis, limit in ((0, ax.set_xlim), (1, ax.set_ylim)):
        largest = max((point[axis] for point in every), default=1.0)
        limit(0, min(1.0, max(0.1, math.ceil(largest * 10 + 0.5) / 10)))
    ax.grid(True, color="#e5e5e5")
    ax.set_axisbelow(True)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10, loc="left")
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, frameon=False)
    save(fig, path)


def labelled_points(
    points: Sequence[tuple[str, float, float, str]],
    title: str,
    xlabel: str,
    ylabel: str,
    path: Path,
    xlim: tuple[float, float] = (0.0, 1.0),
    ylim: tuple[float, float] = (0.0, 1.0),
    vertical: Sequence[tuple[float, str, str]] = (),
    horizontal: Sequence[tuple[float, str, str]] = (),
) -> None:
    """A scatter of `points` (label, x, y, group; one colour and legend entry per group), each point labelled
    beside it, labels that would overlap moved apart. `vertical` and `horizontal`: (value, colour, label)
    reference lines, dashed and dotted, labelled at their ends."""
    fig, ax = figure(9.0, 5.6)
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    for value, colour, label in vertical:
        ax.axvline(value, color=colour, linestyle="--", linewidth=1.4)
        ax.annotate(label, (value, ylim[1]), xytext=(4, -12), textcoords="offset points", color=colour, fontsize=9)
    for value, colour, label in horizontal:
        ax.axhline(value, color=colour, linestyle=":", linewidth=1.2)
        ax.annotate(label, (xlim[1], value), xytext=(-4, 3), textcoords="offset points", color=colour, fontsize=8,
                    ha="right")  # fmt: skip
    groups = sorted({group for *_, group in points})
    for k, group in enumerate(groups):
        mine = [(x, y) for _, x, y, g in points if g == group]
        ax.scatter(*zip(*mine), s=36, color=PALETTE[(k + 2) % len(PALETTE)], label=group, zorder=3)
    placed: list[tuple[float, float]] = []  # label positions in pixels
    for label, x, y, _ in sorted(points, key=lambda p: (p[1], -p[2])):
        px, py = ax.transData.transform((x, y))
        dy = 6.0
        while any(abs(px - qx) < 150 and abs(py + dy - qy) < 11 for qx, qy in placed):
            dy -= 11
        placed.append((px, py + dy))
        leader = {"arrowstyle": "-", "color": "#aaaaaa", "linewidth": 0.6, "relpos": (0, 0.5)}  # to a moved label
        ax.annotate(label, (x, y), xytext=(8, dy), textcoords="offset pixels", fontsize=7, va="center",
                    arrowprops=leader if dy < 0 else None)  # fmt: skip
    ax.grid(True, color="#eeeeee")
    ax.set_axisbelow(True)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10, loc="left")
    ax.legend(loc="lower left", bbox_to_anchor=(0.5, 0.02), fontsize=8, framealpha=0.9)
    save(fig, path)


def sample_strip(images: Sequence[Image.Image], layouts: Sequence | None = None) -> Image.Image:
    """Images side by side, each shown at least 128 px, with its layout's requested boxes drawn dashed when
    `layouts` (one per image) are given."""
    from spatiallock.data.draw import draw_boxes, grid

    cells = [
        draw_boxes(image, layout.labels, layout.boxes, min_side=128, dashed=True) if layout is not None else
        draw_boxes(image, [], [], min_side=128)
        for image, layout in zip(images, layouts or [None] * len(images))
    ]  # fmt: skip
    return grid(cells, columns=len(cells), gap=2)


def labelled_strips(strips: Sequence[tuple[str, Image.Image]], path: Path, left: int) -> None:
    """Image strips stacked one under another on white, each with its label in the `left` pixels beside it (more
    where the longest label needs them)."""
    font = ImageFont.load_default(size=15)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left = max([left] + [int(measure.textlength(label, font=font)) + 16 for label, _ in strips])
    width = left + max(strip.size[0] for _, strip in strips)
    sheet = Image.new("RGB", (width, sum(strip.size[1] + 4 for _, strip in strips)), (255, 255, 255))
    draw, y = ImageDraw.Draw(sheet), 0
    for label, strip in strips:
        sheet.paste(strip, (left, y))
        draw.text((8, y + strip.size[1] // 2 - 8), label, fill=(0, 0, 0), font=font)
        y += strip.size[1] + 4
    sheet.save(path)


def redraw_from_results(parser, out: str | Path, plot: Callable[[dict, Path], None]) -> int:
    """`--plot-only`: redraw the chart beside the results file `out` from that file alone."""
    out = Path(out)
    if not out.is_file():
        parser.error(f"--plot-only: no results file {out}")
    plot(json.loads(out.read_text()), out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.png')}")
    return 0
