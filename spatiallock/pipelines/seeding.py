"""Seeding and batching for every layout-to-image pipeline: each image's noise depends only on (seed, layout index,
sample index), and a list of jobs is always cut into calls the same way, so batching, resuming and the number of
processes never change an image."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def image_generator(seed: int, layout_index: int, sample: int, device="cpu") -> torch.Generator:
    """The noise of sample `sample` of layout `layout_index`: the same whatever the batching or process. Seeds
    are taken modulo 2**64, as torch takes a negative one: any integer is a seed."""
    return torch.Generator(device=device).manual_seed(((seed * 1_000_003 + layout_index) * 1009 + sample) % 2**64)


def jobs_of(layouts: Sequence, per_layout: int = 1) -> list[tuple[int, int]]:
    """(layout index, sample index) of every image, layout by layout."""
    return [(i, k) for i in range(len(layouts)) for k in range(per_layout)]


def batches(jobs: Sequence[tuple[int, int]], batch_size: int) -> list[list[tuple[int, int]]]:
    """Jobs cut into pipeline calls of at most `batch_size` images, always the same way for the same jobs."""
    return [list(jobs[s : s + batch_size]) for s in range(0, len(jobs), batch_size)]
