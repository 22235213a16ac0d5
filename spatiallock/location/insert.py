"""Object insertion: draw a new object into an existing image, in a given box, and keep the rest of the image.

The SpatialLock pipeline samples with the layout of the one new object (its label in its box), while every
step puts the input image back outside the box: after each solver step the latents outside the box are the
input's latents noised to the next step's level (masked latent blending, as diffusers' inpainting pipelines
do), so the new object is drawn to fit what surrounds it. At the end the input's own pixels are put back
outside the box and a `feather`-pixel band around it, blended linearly across that band.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from spatiallock.errors import SpatialLockError
from spatiallock.layout import Layout


def box_mask(box: Sequence[float], height: int, width: int, grow: float = 0.0) -> torch.Tensor:
    """(height, width) float: 1 inside the normalised box grown by `grow` cells on each side, 0 outside."""
    x0, y0, x1, y1 = box
    ys = (torch.arange(height, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, dtype=torch.float32) + 0.5) / width
    inside_y = (ys >= y0 - grow / height) & (ys <= y1 + grow / height)
    inside_x = (xs >= x0 - grow / width) & (xs <= x1 + grow / width)
    return (inside_y[:, None] & inside_x[None, :]).float()


def feathered(box: Sequence[float], height: int, width: int, feather: int) -> np.ndarray:
    """(height, width, 1) weights of the generated image: 1 inside the box, falling linearly to 0 over
    `feather` pixels outside it."""
    x0, y0, x1, y1 = box[0] * width, box[1] * height, box[2] * width, box[3] * height
    xs, ys = np.arange(width) + 0.5, np.arange(height) + 0.5
    dx = np.maximum(np.maximum(x0 - xs, xs - x1), 0.0)[None, :]
    dy = np.maximum(np.maximum(y0 - ys, ys - y1), 0.0)[:, None]
    distance = np.maximum(dx, dy)
    if feather <= 0:
        return (distance <= 0).astype(np.float32)[:, :, None]
    return np.clip(1.0 - distance / feather, 0.0, 1.0).astype(np.float32)[:, :, None]


@torch.no_grad()
def insert_object(
    pipe,
    image: Image.Image,
    box: Sequence[float],
    label: str,
    caption: str | None = None,
    generator: torch.Generator | None = None,
    num_inference_steps: int = 25,
    guidance_scale: float = 5.0,
    feather: int = 2,
    paste_back: bool = True,
) -> Image.Image:
    """`image` with an object labelled `label` drawn in `box` (normalised xyxy) by `pipe` (a
    `SpatialLockPipeline`); the image is sampled at its own size (a multiple of the autoencoder's factor).
    `paste_back=False` returns the decoded image as it is (the autoencoder's round trip outside the box)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
        raise SpatialLockError(f"box: {list(box)} is not inside the image")
    image = image.convert("RGB")
    width, height = image.size
    factor = pipe.vae_scale_factor
    if width % factor or height % factor:
        raise SpatialLockError(f"image: {width}x{height} is not a multiple of {factor} pixels on each side")
    device = pipe._execution_device
    pixels = pipe.image_processor.preprocess(image).to(device=device, dtype=pipe.vae.dtype)
    init = pipe.encode_pixels(pixels)
    mask = box_mask((x0, y0, x1, y1), init.shape[-2], init.shape[-1], grow=1.0).to(device, init.dtype)
    noise = torch.randn(init.shape, generator=generator, device=generator.device if generator else "cpu")
    noise = noise.to(device, init.dtype)
    scheduler = pipe.scheduler
    scheduler.set_timesteps(num_inference_steps, device=device)
    timesteps = scheduler.timesteps.clone()
    sigma = scheduler.init_noise_sigma
    start = mask * noise * sigma + (1 - mask) * scheduler.add_noise(init, noise, timesteps[:1])

    def keep_outside(pipe_, i: int, t, values: dict) -> dict:
        latents = values["latents"]
        if i + 1 < len(timesteps):
            background = scheduler.add_noise(init, noise, timesteps[i + 1 : i + 2])
        else:
            background = init
        return {"latents": mask * latents + (1 - mask) * background}

    layout = Layout(caption or f"a {label}", (label,), ((x0, y0, x1, y1),))
    out = pipe(
        layouts=[layout], height=height, width=width, num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale, generator=generator, latents=start / sigma, output_type="np",
        callback_on_step_end=keep_outside,
    )  # fmt: skip
    drawn = out.images[0].astype(np.float32)
    if not paste_back:
        return Image.fromarray(np.clip(np.rint(drawn * 255.0), 0, 255).astype(np.uint8))
    original = np.asarray(image, dtype=np.float32) / 255.0
    weight = feathered((x0, y0, x1, y1), height, width, feather)
    result = weight * drawn + (1 - weight) * original
    return Image.fromarray(np.clip(np.rint(result * 255.0), 0, 255).astype(np.uint8))
