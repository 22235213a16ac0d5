"""A contact sheet of a COCO-format split: images with their boxes, labels and first caption drawn on."""

from __future__ import annotations

import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from spatiallock.data.coco import LayoutDataset
from spatiallock.data.draw import label_colour
from spatiallock.errors import SpatialLockError


def draw_cell(
    dataset: LayoutDataset, i: int, cell: int, font: ImageFont.ImageFont, caption_lines: int = 4
) -> Image.Image:
    """One image of the dataset, fitted into a `cell` square, with boxes, labels and its first caption below."""
    record = dataset.records[i]
    image = dataset.load_image(i)
    scale = cell / max(image.size)
    shown = image.resize(
        (max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale))),
        Image.Resampling.NEAREST if scale >= 2 else Image.Resampling.BICUBIC,
    )
    line_height = font.getbbox("Ag")[3] + 3
    out = Image.new("RGB", (cell, cell + caption_lines * line_height + 4), (255, 255, 255))
    out.paste(shown, (0, 0))
    draw = ImageDraw.Draw(out)
    sx, sy = shown.size[0] / record.width, shown.size[1] / record.height
    for obj in record.objects:
        x, y, w, h = obj.bbox
        box = (x * sx, y * sy, (x + w) * sx - 1, (y + h) * sy - 1)
        k = dataset.category_index[obj.category_id]
        colour = label_colour(dataset.categories[k])
        draw.rectangle(box, outline=(0, 0, 0), width=3)
        draw.rectangle(box, outline=colour, width=1)
        label = dataset.categories[k]
        tx, ty = box[0], max(0.0, box[1] - line_height)
        draw.rectangle(draw.textbbox((tx, ty), label, font=font), fill=(0, 0, 0))
        draw.text((tx, ty), label, fill=colour, font=font)
    width_chars = max(8, int(cell / max(1, font.getbbox("abcdefghij")[2] / 10)))
    lines = textwrap.wrap(record.captions[0], width_chars)[:caption_lines]
    for n, line in enumerate(lines):
        draw.text((2, cell + 2 + n * line_height), line, fill=(0, 0, 0), font=font)
    return out


def contact_sheet(
    dataset: LayoutDataset, count: int = 16, cell: int = 192, seed: int | None = None
) -> tuple[Image.Image, list[str]]:
    """A grid of `count` images (the first ones, or a random choice with `seed`) with their layouts drawn on.

    Returns the grid and the images left out of it because they cannot be read ("path: why"); none readable
    raises `SpatialLockError`.
    """
    count = min(count, len(dataset))
    if seed is None:
        chosen = list(range(count))
    else:
        chosen = sorted(np.random.default_rng(seed).choice(len(dataset), count, replace=False).tolist())
    font = ImageFont.load_default(size=max(9, cell // 16))
    cells, unreadable = [], []
    for i in chosen:
        try:
            cells.append(draw_cell(dataset, i, cell, font))
        except (OSError, ValueError) as err:  # an unreadable file is left out of the sheet, and said so
            unreadable.append(f"{dataset.records[i].path}: {err}")
    if not cells:
        raise SpatialLockError(f"none of the {len(chosen)} images can be read (first: {unreadable[0]})")
    count = len(cells)
    columns = max(1, int(np.ceil(np.sqrt(count))))
    rows = max(1, -(-count // columns))
    gap = 4
    cell_h = cells[0].size[1]
    sheet = Image.new("RGB", (columns * (cell + gap) + gap, rows * (cell_h + gap) + gap), (255, 255, 255))
    for n, image in enumerate(cells):
        sheet.paste(image, (gap + (n % columns) * (cell + gap), gap + (n // columns) * (cell_h + gap)))
    return sheet, unreadable
