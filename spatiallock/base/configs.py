"""Architectures held in code: Stable Diffusion v1.x's and SDXL's U-Nets (for shapes and parameter counts, built on
the `meta` device, no download) and tiny U-Nets for tests. SDXL's configuration is a small JSON carried in
`architectures/` (its U-Net config and the two text encoders' sizes)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from spatiallock.errors import SpatialLockError
from spatiallock.files import read_json

# The `unet/config.json` of CompVis/stable-diffusion-v1-4 (SD v1.5 shares the architecture).
SD_V1_UNET = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
# CLIP ViT-L/14 text model: pooled phrase embedding size.
SD_V1_PHRASE_DIM = 768
COCO_CLASSES = 80

ARCHITECTURES = Path(__file__).parent / "architectures"


@cache
def sdxl_architecture() -> dict:
    """SDXL base 1.0's U-Net config and its text encoders' sizes (`architectures/sdxl-base-1.0.json`)."""
    return json.loads((ARCHITECTURES / "sdxl-base-1.0.json").read_text())


KNOWN_BASES = {"sd-v1-4": SD_V1_UNET, "sd-v1-5": SD_V1_UNET, "sdxl": None}


def tiny_unet_config(**overrides) -> dict:
    """A U-Net of SD's structure small enough for CPU tests: attention in both down and both up stages."""
    config = {
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "cross_attention_dim": 32,
        "attention_head_dim": 8,
        "norm_num_groups": 8,
    }
    config.update(overrides)
    return config


def unet_config(base: str) -> dict:
    """The U-Net config of a known base name (`sd-v1-4`, `sd-v1-5`, `sdxl`) or of a diffusers model folder."""
    if base == "sdxl":
        return dict(sdxl_architecture()["unet"])
    if base in KNOWN_BASES:
        return dict(KNOWN_BASES[base])
    path = Path(base) / "unet" / "config.json"
    if not path.is_file():
        raise SpatialLockError(
            f"base: {base!r} is neither a known architecture ({', '.join(KNOWN_BASES)}) "
            "nor a diffusers model folder with unet/config.json"
        )
    config = read_json(path, "U-Net config", limit=2**20, bad_json="not valid JSON")  # binary or huge: one line
    if not isinstance(config, dict):
        raise SpatialLockError(f"{path}: not a U-Net config (a JSON object)")
    return config


def build_unet(config: dict, device: str | torch.device = "cpu") -> UNet2DConditionModel:
    """Build a U-Net from a config; on `meta` no memory is allocated (shapes and counts only)."""
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device(device):
        return UNet2DConditionModel(**config)
