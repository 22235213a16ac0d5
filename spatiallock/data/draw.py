"""Pictures: boxes and labels drawn on images, grids, and files written atomically."""

from __future__ import annotations

import colorsys
import hashlib
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

from spatiallock.data.shapes import COLOURS

# colour words a label may start with or contain ("red circle", "a dark blue car"); the synthetic domain's own first
NAMED_COLOURS: dict[str, tuple[int, int, int]] = {
    **{name: tuple(int(v) for v in rgb) for name, rgb in COLOURS.items()},
    "orange": (240, 140, 30),
    "purple": (130, 50, 170),
    "violet": (150, 90, 210),
    "pink": (240, 130, 180),
    "brown": (130, 80, 40),
    "black": (20, 20, 20),
    "white": (240, 240, 240),
    "grey": (160, 160, 160),
    "gray": (160, 160, 160),
    "cyan": (40, 200, 210),
    "magenta": (210, 40, 180),
    "gold": (220, 180, 40),
    "silver": (190, 190, 200),
}


def label_colour(label: str) -> tuple[int, int, int]:
    """The colour of a label wherever it is drawn (boxes, layout pictures, reference images): the RGB of the first
    colour word in `label` ("green circle" is green), else a fixed colour of the label (the same in every run)."""
    for word in label.lower().replace("-", " ").split():
        if word in NAMED_COLOURS:
            return NAMED_COLOURS[word]
    hue = int.from_bytes(hashlib.sha256(label.lower().encode()).digest()[:4], "big") / 2**32
    return tuple(round(255 * c) for c in colorsys.hsv_to_rgb(hue, 0.65, 0.85))


def draw_boxes(
    image: Image.Image,
    labels: Sequence[str],
    boxes: Sequence[Sequence[float]],
    scores: Sequence[float] | None = None,
    min_side: int = 256,
    dashed: bool = False,
) -> Image.Image:
    """A copy of `image` (enlarged to at least `min_side`) with normalised xyxy boxes and labels drawn on."""
    scale = max(1, -(-min_side // max(image.size)))
    out = image.convert("RGB").resize((image.size[0] * scale, image.size[1] * scale), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default(size=max(10, out.size[0] // 24))
    w, h = out.size
    for n, (label, box) in enumerate(zip(labels, boxes)):
        # a box thinner than a pixel of `out` (any side under 1/256) is drawn one pixel wide, not inverted
        x0, y0 = box[0] * w, box[1] * h
        x1, y1 = max(x0, box[2] * w - 1), max(y0, box[3] * h - 1)
        colour = label_colour(label)
        if dashed:
            _dashed_rectangle(draw, (x0, y0, x1, y1), colour)
        else:
            draw.rectangle((x0, y0, x1, y1), outline=(0, 0, 0), width=3)
            draw.rectangle((x0, y0, x1, y1), outline=colour, width=1)
        text = label if scores is None else f"{label} {scores[n]:.2f}"
        ty = y0 - font.getbbox("Ag")[3] - 2 if y0 > font.getbbox("Ag")[3] + 2 else y0 + 1
        draw.rectangle(draw.textbbox((x0 + 1, ty), text, font=font), fill=(0, 0, 0))
        draw.text((x0 + 1, ty), text, fill=colour, font=font)
    return out


def _dashed_rectangle(draw: ImageDraw.ImageDraw, box, colour, dash: int = 6) -> None:
    x0, y0, x1, y1 = box
    for a, b, horizontal, fixed in ((x0, x1, True, y0), (x0, x1, True, y1), (y0, y1, False, x0), (y0, y1, False, x1)):
        position = a
        while position < b:
            end = min(position + dash, b)
            line = (position, fixed, end, fixed) if horizontal else (fixed, position, fixed, end)
            draw.line(line, fill=colour, width=2)
            position += 2 * dash


def grid(images: Sequence[Image.Image], columns: int | None = None, gap: int = 4) -> Image.Image:
    """Images (same size) in a grid with white gaps; `columns` default: about square."""
    columns = columns or max(1, round(len(images) ** 0.5 + 0.49))
    rows = -(-len(images) // columns)
    w, h = images[0].size
    sheet = Image.new("RGB", (columns * (w + gap) + gap, rows * (h + gap) + gap), (255, 255, 255))
    for n, image in enumerate(images):
        sheet.paste(image, (gap + (n % columns) * (w + gap), gap + (n // columns) * (h + gap)))
    return sheet
