"""Resize, crop and flip an image together with its boxes; swap "left" and "right" in a flipped caption."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from PIL import Image

_SIDES = re.compile(r"\b(left|right|Left|Right|LEFT|RIGHT)\b")
_SWAP = {"left": "right", "right": "left", "Left": "Right", "Right": "Left", "LEFT": "RIGHT", "RIGHT": "LEFT"}


def swap_left_right(caption: str) -> str:
    """The caption of the mirrored image: every whole word "left" becomes "right" and back."""
    return _SIDES.sub(lambda m: _SWAP[m.group(1)], caption)


@dataclass(frozen=True)
class CropPlan:
    """Where an image goes: resized to (width, height), then cut at (left, top) to a square, maybe mirrored."""

    width: int
    height: int
    left: int
    top: int
    resolution: int
    flip: bool


def plan_crop(
    width: int, height: int, resolution: int, rng: np.random.Generator | None = None, flip: bool = False
) -> CropPlan:
    """Shorter side to `resolution`, then a centre crop (no `rng`) or a random crop (with `rng`)."""
    scale = resolution / min(width, height)
    new_w, new_h = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    if rng is None:
        left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
    else:
        left, top = int(rng.integers(0, new_w - resolution + 1)), int(rng.integers(0, new_h - resolution + 1))
    return CropPlan(new_w, new_h, left, top, resolution, flip)


def apply_to_image(image: Image.Image, plan: CropPlan) -> Image.Image:
    """Resize (bicubic, anti-aliased when shrinking), crop and mirror an image as planned."""
    if image.size != (plan.width, plan.height):
        image = image.resize((plan.width, plan.height), Image.Resampling.BICUBIC)
    r = plan.resolution
    image = image.crop((plan.left, plan.top, plan.left + r, plan.top + r))
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if plan.flip else image


def apply_to_boxes(
    boxes: np.ndarray, size: tuple[int, int], plan: CropPlan, min_area: float = 0.0, min_kept: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Map boxes (n, 4) xyxy in pixels of an image of `size` (width, height) through the plan.

    Returns the boxes (n, 4) as xyxy normalised to [0, 1] in the output square, and a keep mask (n,): a box
    is dropped when the crop leaves less than `min_kept` of its area or less than `min_area` of the square.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    r = plan.resolution
    scale = np.array([plan.width / size[0], plan.height / size[1]] * 2)
    shift = np.array([plan.left, plan.top] * 2, dtype=np.float64)
    moved = boxes * scale - shift
    clipped = np.clip(moved, 0.0, float(r))
    full = (moved[:, 2] - moved[:, 0]) * (moved[:, 3] - moved[:, 1])
    kept = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
    keep = (kept > 0) & (kept >= min_kept * full) & (kept >= min_area * r * r)
    if plan.flip:
        clipped = np.stack([r - clipped[:, 2], clipped[:, 1], r - clipped[:, 0], clipped[:, 3]], axis=1)
    return clipped / r, keep
