"""Shared fixtures: tiny models built in code, seeded, on CPU."""

from __future__ import annotations

import pytest
import torch

from spatiallock.configs import build_unet, tiny_unet_config
from spatiallock.models.injection import freeze

PHRASE_DIM = 24
NUM_CLASSES = 5


@pytest.fixture
def unet():
    torch.manual_seed(0)
    return freeze(build_unet(tiny_unet_config()))


def make_inputs(batch: int = 2, slots: int = 4, objects: int = 2, seed: int = 0) -> dict:
    """Latents, timesteps, caption states and a layout with `objects` real objects in `slots` slots."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(batch, slots, 2, generator=g) * 0.5
    wh = 0.2 + torch.rand(batch, slots, 2, generator=g) * 0.3
    masks = torch.zeros(batch, slots)
    masks[:, :objects] = 1.0
    return {
        "sample": torch.randn(batch, 4, 8, 8, generator=g),
        "timestep": torch.tensor([10, 500][:batch] + [250] * max(0, batch - 2)),
        "encoder_hidden_states": torch.randn(batch, 6, 32, generator=g),
        "phrase_embeds": torch.randn(batch, slots, PHRASE_DIM, generator=g),
        "boxes": torch.cat([xy, xy + wh], dim=-1),
        "masks": masks,
        "labels": torch.randint(0, NUM_CLASSES, (batch, slots), generator=g),
    }
