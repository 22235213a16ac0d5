"""Small charts drawn with PIL alone (the benchmarks need no plotting library): grouped bars and line plots."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

PALETTE = (
    "#999999", "#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
)  # fmt: skip


def _font(size: int = 13):
    return ImageFont.load_default(size=size)


def grouped_bars(
    groups: Sequence[str],
    series: Sequence[tuple[str, str, Sequence[float | None]]],
    title: str,
    ylabel: str,
    path: Path,
    top: float = 1.0,
) -> None:
    """One group of bars per entry of `groups`; `series` holds (name, colour, one value per group or None)."""
    width, height, left, bottom, head = 150 + 170 * len(groups), 380, 60, 50, 40
    image = Image.new("RGB", (width, height), "white")
    draw, font = ImageDraw.Draw(image), _font()
    plot_h = height - bottom - head
    draw.text((10, 10), title, fill="black", font=font)
    for tick in range(0, 11, 2):
        y = head + plot_h * (1 - tick / 10)
        draw.line((left, y, width - 120, y), fill="#e5e5e5")
        draw.text((left - 30, y - 7), f"{top * tick / 10:.1f}", fill="black", font=_font(11))
    draw.text((6, head - 18), ylabel, fill="black", font=_font(11))
    bar = 150 // max(len(series), 1) - 4
    for g, group in enumerate(groups):
        x0 = left + 10 + 170 * g
        for s, (_, colour, values) in enumerate(series):
            value = values[g]
            if value is None:
                continue
            x = x0 + s * (bar + 4)
            y = head + plot_h * (1 - min(value, top) / top)
            draw.rectangle((x, y, x + bar, head + plot_h), fill=colour)
            draw.text((x, y - 14), f"{value:.3f}", fill="black", font=_font(10))
        draw.text((x0 + 40, head + plot_h + 8), group, fill="black", font=font)
    for s, (name, colour, _) in enumerate(series):
        y = head + 10 + 20 * s
        draw.rectangle((width - 112, y, width - 100, y + 12), fill=colour)
        draw.text((width - 95, y - 1), name, fill="black", font=_font(11))
    image.save(path)


def lines(
    curves: Sequence[tuple[str, str, Sequence[tuple[float, float, str]]]],
    title: str,
    xlabel: str,
    ylabel: str,
    path: Path,
) -> None:
    """Line plots on [0, 1] x [0, 1]: `curves` holds (name, colour, points (x, y, point label))."""
    size, left, bottom, head, legend = 360, 55, 45, 52, 230
    image = Image.new("RGB", (left + size + legend, head + size + bottom), "white")
    draw, font = ImageDraw.Draw(image), _font()
    draw.text((10, 8), title, fill="black", font=font)

    def at(x: float, y: float) -> tuple[float, float]:
        return left + size * x, head + size * (1 - y)

    for tick in range(0, 11, 2):
        v = tick / 10
        draw.line((*at(0, v), *at(1, v)), fill="#e5e5e5")
        draw.line((*at(v, 0), *at(v, 1)), fill="#e5e5e5")
        draw.text((left - 28, at(0, v)[1] - 7), f"{v:.1f}", fill="black", font=_font(10))
        draw.text((at(v, 0)[0] - 8, head + size + 4), f"{v:.1f}", fill="black", font=_font(10))
    draw.rectangle((*at(0, 1), *at(1, 0)), outline="black")
    draw.text((left + size // 2 - 60, head + size + 22), xlabel, fill="black", font=font)
    draw.text((4, head - 20), ylabel, fill="black", font=_font(11))
    for c, (name, colour, points) in enumerate(curves):
        xy = [at(x, y) for x, y, _ in points]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        for (px, py), (_, _, label) in zip(xy, points):
            draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=colour)
            draw.text((px + 4, py - 12), label, fill=colour, font=_font(9))
        y = head + 10 + 20 * c
        draw.line((left + size + 15, y + 6, left + size + 35, y + 6), fill=colour, width=3)
        draw.text((left + size + 40, y), name, fill="black", font=_font(11))
    image.save(path)


def labelled_strips(strips: Sequence[tuple[str, Image.Image]], path: Path, left: int) -> None:
    """Image strips stacked one under another on white, each with its label in the `left` pixels beside it."""
    width = left + max(strip.size[0] for _, strip in strips)
    sheet = Image.new("RGB", (width, sum(strip.size[1] + 4 for _, strip in strips)), (255, 255, 255))
    draw, font, y = ImageDraw.Draw(sheet), ImageFont.load_default(size=15), 0
    for label, strip in strips:
        sheet.paste(strip, (left, y))
        draw.text((8, y + strip.size[1] // 2 - 8), label, fill=(0, 0, 0), font=font)
        y += strip.size[1] + 4
    sheet.save(path)
