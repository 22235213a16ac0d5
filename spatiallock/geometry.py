"""Boxes on the grids of a U-Net: which cells of a latent level a normalised xyxy box covers, and by how much.

Used wherever a layout meets a feature map: box attention (`spatiallock.models.grounding`) and cross-attention
layout guidance (`spatiallock.pipelines.extensions.layout_guidance`).
"""

from __future__ import annotations

import torch

from spatiallock.errors import SpatialLockError


def level_grid(tokens: int, latent: tuple[int, int]) -> tuple[int, int]:
    """(rows, columns) of a U-Net level with `tokens` positions, for an input latent of `latent` (h, w): every
    down-sampling halves a side, rounding up as diffusers' strided convolutions (padding 1) do."""
    h, w = latent
    while h * w > tokens and h > 1:
        h, w = -(-h // 2), -(-w // 2)
    if h * w != tokens:
        raise SpatialLockError(f"{tokens} positions of a U-Net level do not tile a {latent[0]}x{latent[1]} latent")
    return h, w


def box_coverage(boxes: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
    """(B, N, 4) normalised xyxy boxes -> (B, rows * columns, N): the share of each grid cell's area that lies
    inside each box (1 deep inside, 0 outside, a fraction on the border)."""
    xs = torch.arange(columns + 1, device=boxes.device, dtype=boxes.dtype) / columns
    ys = torch.arange(rows + 1, device=boxes.device, dtype=boxes.dtype) / rows
    b = boxes[:, None, :, :]  # (B, 1, N, 4)
    # overlap of each cell's span with each box's span, per axis: (B, columns, N) and (B, rows, N)
    over_x = (torch.minimum(xs[1:, None], b[..., 2]) - torch.maximum(xs[:-1, None], b[..., 0])).clamp(min=0)
    over_y = (torch.minimum(ys[1:, None], b[..., 3]) - torch.maximum(ys[:-1, None], b[..., 1])).clamp(min=0)
    coverage = over_y[:, :, None, :] * over_x[:, None, :, :] * (rows * columns)  # (B, rows, columns, N)
    return coverage.reshape(boxes.shape[0], rows * columns, boxes.shape[1])
