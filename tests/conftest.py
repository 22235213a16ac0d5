"""Shared fixtures: tiny models built in code, seeded, on CPU."""

from __future__ import annotations

import pytest
import torch

from spatiallock.base.configs import build_unet, tiny_unet_config
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


# ---- tiny bases and data on disk, built once per session (see tiny_models.py) ----------------------------------


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    """A tiny Stable-Diffusion-format model folder (CLIP text encoder), native resolution 32 px."""
    from tiny_models import make_tiny_sd

    return make_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
def tiny_small_base(tmp_path_factory):
    """A tiny model folder in the project's small-base format (all-MiniLM-L6-v2 text encoder), 32 px."""
    from tiny_models import make_tiny_small_base

    return make_tiny_small_base(tmp_path_factory.mktemp("tiny-small-base"))


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory):
    """A synthetic layout data set at 32 px written by `spatiallock data synth`: 16 train and 4 val images."""
    from spatiallock.cli import main

    out = tmp_path_factory.mktemp("shapes")
    args = ["data", "synth", "--out", str(out), "--train", "16", "--val", "4", "--size", "32", "--workers", "1"]
    assert main([*args, "--no-progress"]) == 0
    return out


@pytest.fixture
def one_thread():
    """Run on one CPU thread: tiny models gain nothing from more, and on a small machine shared with other jobs
    several threads per process slow training down many times over."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
