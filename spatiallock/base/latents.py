"""Between the autoencoder and the U-Net: the latents a base diffuses.

In Stable Diffusion the U-Net diffuses the autoencoder's latents as they are, one U-Net cell a latent cell. A
small base may instead give its U-Net each p x p patch of the latent as one cell of p * p times the channels (the
patch size of DiT and of Hoogeboom et al.'s "simple diffusion"): a 32x32x4 latent, which keeps objects of a few
pixels, is diffused as 16x16x16 by a U-Net that costs what a 16x16x4 one does, and whose attention and grounding
see the same 16x16 cells. The patch is no setting of its own: it is what the two configs imply, the U-Net's output
channels over the autoencoder's latent channels (p * p); both folders stay plain diffusers ones.

Every encode and decode of a base goes through `encode_pixels` and `decode_latents`, so the rest of the toolkit
sees only the U-Net's latents.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from spatiallock.errors import SpatialLockError


def latent_patch(vae, unet) -> int:
    """p: the side of the latent patch one U-Net cell holds (1 for Stable Diffusion's bases).

    Read off the configs: the U-Net's `out_channels` are the autoencoder's `latent_channels` times p * p (output,
    not input channels: an inpainting U-Net takes masks and masked latents besides)."""
    latent, channels = int(vae.config.latent_channels), int(unet.config.out_channels)
    patch = math.isqrt(channels // latent) if channels % latent == 0 else 0
    if patch < 1 or patch * patch * latent != channels:
        raise SpatialLockError(
            f"unet: {channels} output channels do not fit an autoencoder of {latent} latent channels (the same, or "
            f"{latent} times a square: 4, 9, 16, ...)"
        )
    return patch


def autoencoder_factor(vae) -> int:
    """Pixels per latent cell a side: 2 to the power of the autoencoder's levels less one (8 for SD's)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def image_factor(vae, unet) -> int:
    """Pixels per U-Net cell a side: the autoencoder's factor times the latent patch."""
    return autoencoder_factor(vae) * latent_patch(vae, unet)


def to_unet(latents: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) latents -> (B, C p p, H / p, W / p): each p x p patch one cell."""
    return F.pixel_unshuffle(latents, patch) if patch > 1 else latents


def to_autoencoder(latents: torch.Tensor, patch: int) -> torch.Tensor:
    """The inverse of `to_unet`."""
    return F.pixel_shuffle(latents, patch) if patch > 1 else latents


def encode_pixels(
    vae, patch: int, pixels: torch.Tensor, how: str = "mean", generator: torch.Generator | None = None
) -> torch.Tensor:
    """Images in [-1, 1] -> the U-Net's latents: the autoencoder's posterior `how` ("mean", "mode", or "sample"
    with `generator`), times its scaling factor, in patches."""
    posterior = vae.encode(pixels).latent_dist
    latents = posterior.sample(generator=generator) if how == "sample" else getattr(posterior, how)
    if callable(latents):  # `mode` is a method, `mean` an attribute
        latents = latents()
    return to_unet(latents * vae.config.scaling_factor, patch)


def decode_latents(vae, patch: int, latents: torch.Tensor) -> torch.Tensor:
    """The U-Net's latents -> images in [-1, 1] (differentiable through the decoder)."""
    return vae.decode(to_autoencoder(latents, patch) / vae.config.scaling_factor, return_dict=False)[0]
