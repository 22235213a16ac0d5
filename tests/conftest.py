"""Shared fixtures: tiny models built in code, seeded, on CPU (what they are built from: helpers.py)."""

from __future__ import annotations

import pytest
import torch
from helpers import make_tiny_sd, make_tiny_sdxl, make_tiny_small_base

from spatiallock.base.configs import build_unet, tiny_unet_config
from spatiallock.models.injection import freeze


@pytest.fixture
def unet():
    """A tiny frozen U-Net in memory (cross-attention 32, latents 8 x 8): fed by `helpers.make_inputs`."""
    torch.manual_seed(0)
    return freeze(build_unet(tiny_unet_config()))


# ---- tiny bases and data on disk, built once per session --------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    """A tiny Stable-Diffusion-format model folder (CLIP text encoder), native resolution 32 px."""
    return make_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    """A tiny SDXL-format model folder (two CLIP text encoders, size ids), native resolution 32 px."""
    return make_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture(scope="session")
def tiny_small_base(tmp_path_factory):
    """A tiny model folder in the project's small-base format (all-MiniLM-L6-v2 text encoder), 32 px."""
    return make_tiny_small_base(tmp_path_factory.mktemp("tiny-small-base"))


@pytest.fixture(params=["sd", "small-base"])
def base_folder(request):
    """Each tiny base in turn."""
    return request.getfixturevalue({"sd": "tiny_sd", "small-base": "tiny_small_base"}[request.param])


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
