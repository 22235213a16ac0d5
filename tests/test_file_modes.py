"""What the toolkit writes gets the modes any program's new files get (0o644 and 0o755 under umask 022), not the
owner-only modes of temporary folders (0o700) and of safetensors' writer (0o600): a model folder written on a
shared machine is readable by the others who should use it."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL

from spatiallock.checkpoint import atomic_save_pretrained, save_checkpoint, write_model_folder


@pytest.fixture
def umask_022():
    before = os.umask(0o022)
    yield
    os.umask(before)


def modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in [folder, *folder.rglob("*")]}


def expected(folder: Path) -> dict[str, int]:
    return {name: 0o755 if (folder / name).is_dir() else 0o644 for name in modes(folder)}


@pytest.mark.usefixtures("umask_022")
def test_model_folders_and_checkpoints_are_readable_by_all(tmp_path):
    write_model_folder(tmp_path / "own", {"w": torch.ones(2)}, {"kind": "test"})
    assert modes(tmp_path / "own") == expected(tmp_path / "own") and len(modes(tmp_path / "own")) == 3

    vae = AutoencoderKL(block_out_channels=(4,), norm_num_groups=2, latent_channels=2, layers_per_block=1)
    atomic_save_pretrained(vae, tmp_path / "vae")
    assert "diffusion_pytorch_model.safetensors" in modes(tmp_path / "vae")
    assert modes(tmp_path / "vae") == expected(tmp_path / "vae")

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    checkpoint = save_checkpoint(tmp_path / "run", 1, {"model": model}, optimizer)
    found = modes(checkpoint)
    assert {"model.safetensors", "optimizer.safetensors", "state.json"} <= set(found)
    assert found == expected(checkpoint)


@pytest.mark.usefixtures("umask_022")
def test_a_stricter_umask_is_kept(tmp_path):
    os.umask(0o077)
    write_model_folder(tmp_path / "own", {"w": torch.ones(2)}, {"kind": "test"})
    assert stat.S_IMODE((tmp_path / "own" / "model.safetensors").stat().st_mode) == 0o600
