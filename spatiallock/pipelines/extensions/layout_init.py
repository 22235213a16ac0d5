"""Spatial-aware latent initialisation (seed 002): sampling starts from a DDIM-inverted reference image.

A reference image, given or rendered from the layout (flat coloured boxes on a neutral grey), is encoded by
the autoencoder and run *up* the noise schedule with diffusers' `DDIMInverseScheduler`; sampling then starts
from that latent at the matching timestep instead of from random noise, so objects tend to appear where the
reference has them. The inversion uses the caption alone (no classifier-free guidance, no grounding).

The inverted latent replaces the seed's noise: with a deterministic sampler the same reference and settings
give the same image whatever the seed.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch
from diffusers import DDIMInverseScheduler

from spatiallock.data.draw import label_colour
from spatiallock.errors import SpatialLockError
from spatiallock.layout import Layout
from spatiallock.pipelines.extensions.base import Extension

BACKGROUND = (128, 128, 128)


def render_layout(layout: Layout, width: int, height: int) -> PIL.Image.Image:
    """A reference image of `layout`: each box filled with its label's colour on grey, larger boxes first so
    that smaller ones stay visible."""
    image = PIL.Image.new("RGB", (width, height), BACKGROUND)
    draw = PIL.ImageDraw.Draw(image)
    area = lambda item: (item[1][2] - item[1][0]) * (item[1][3] - item[1][1])  # noqa: E731
    for label, (x0, y0, x1, y1) in sorted(zip(layout.labels, layout.boxes), key=area, reverse=True):
        left, top = round(x0 * width), round(y0 * height)
        right, bottom = max(left + 1, round(x1 * width)), max(top + 1, round(y1 * height))
        draw.rectangle([left, top, right - 1, bottom - 1], fill=label_colour(label))
    return image


def load_image(path: str | os.PathLike) -> PIL.Image.Image:
    """An RGB image from a file, or a `SpatialLockError` naming it."""
    from spatiallock.files import read_rgb

    try:
        return read_rgb(path)
    except FileNotFoundError:
        raise SpatialLockError(f"init image: {path}: file not found") from None
    except (OSError, ValueError) as err:
        raise SpatialLockError(f"init image: {path}: cannot read it as an image ({err})") from None


def reference_images(images, batch: int) -> list:
    """One reference per image to generate: a single image (PIL, numpy, tensor or file path) is used for all."""
    if isinstance(images, (str, os.PathLike)):
        images = load_image(images)
    if isinstance(images, torch.Tensor) and images.ndim == 4 or isinstance(images, np.ndarray) and images.ndim == 4:
        images = list(images)
    if not isinstance(images, (list, tuple)):
        images = [images]
    images = [load_image(image) if isinstance(image, (str, os.PathLike)) else image for image in images]
    if len(images) == 1:
        images = images * batch
    if len(images) != batch:
        raise SpatialLockError(f"init_image: {len(images)} images for {batch} images to generate (give 1 or {batch})")
    return images


@torch.no_grad()
def encode_images(pipe, images: Sequence, height: int, width: int) -> torch.Tensor:
    """Images -> scaled latents (B, C, h, w): the mode of the autoencoder's posterior, times its scaling factor."""
    pixels = pipe.image_processor.preprocess(list(images), height=height, width=width)
    pixels = pixels.to(device=pipe.vae.device, dtype=pipe.vae.dtype)
    return pipe.encode_pixels(pixels, "mode")


def inverse_scheduler(scheduler) -> DDIMInverseScheduler:
    """A `DDIMInverseScheduler` on the sampler's noise schedule (same prediction type, offset and clipping)."""
    accepted = set(inspect.signature(DDIMInverseScheduler.__init__).parameters)
    config = {key: value for key, value in scheduler.config.items() if key in accepted}
    if config.get("timestep_spacing") not in ("leading", "trailing"):
        config["timestep_spacing"] = "trailing"  # "linspace" samplers (DPM-Solver, Euler) start at t = T - 1 too
    config["clip_sample"] = getattr(scheduler.config, "clip_sample", False)
    return DDIMInverseScheduler(**config)


@torch.no_grad()
def invert(
    pipe,
    latents: torch.Tensor,
    states: torch.Tensor,
    caption_mask: torch.Tensor | None,
    num_inference_steps: int,
    strength: float = 1.0,
    steps: int | None = None,
    added: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DDIM-invert clean `latents` a share `strength` up a schedule of `num_inference_steps` steps.

    `steps`: inversion steps (default: round(strength * num_inference_steps), so that inversion and sampling
    walk the same timesteps). Returns the inverted latents and the timestep they have reached.
    """
    if not 0.0 < strength <= 1.0:
        raise SpatialLockError(f"init_strength: a share of the schedule in (0, 1], got {strength}")
    if steps is not None and steps < 1:
        raise SpatialLockError(f"init_steps: at least 1, got {steps}")
    inverse = inverse_scheduler(pipe.scheduler)
    if steps is None:
        steps, total = max(1, round(strength * num_inference_steps)), num_inference_steps
    else:
        total = max(steps, round(steps / strength))
    inverse.set_timesteps(total, device=latents.device)
    for t in inverse.timesteps[:steps]:
        noise = pipe.predict(latents, t, states, caption_mask, None, added)
        latents = inverse.step(noise, t, latents, return_dict=False)[0]
    return latents, inverse.timesteps[steps - 1]


def start_sampling_at(scheduler, timesteps: torch.Tensor, latents: torch.Tensor, reached: torch.Tensor):
    """Enter the sampler's schedule at the timestep nearest to `reached`: returns (latents, start index).

    Samplers on sigma-scaled latents (Euler) get the latents rescaled from the variance-preserving form.
    """
    start = int((timesteps.float() - float(reached)).abs().argmin())
    if start > 0 and len(set(timesteps.tolist())) != len(timesteps):
        raise SpatialLockError(
            f"init_strength < 1 starts part-way through the schedule, which {type(scheduler).__name__} cannot do "
            "(its schedule repeats timesteps); use the ddim, dpm, euler, unipc or ddpm scheduler"
        )
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    if float(scheduler.init_noise_sigma) > 1.0:  # x = x0 + sigma * noise, i.e. the VP latent / sqrt(alpha_bar)
        latents = latents * (scheduler.sigmas[start].to(latents.device) ** 2 + 1).sqrt().to(latents.dtype)
    return latents, start


def initial_latents(
    pipe,
    layouts: Sequence[Layout],
    image,
    from_layout: bool,
    states: torch.Tensor,
    caption_mask: torch.Tensor | None,
    timesteps: torch.Tensor,
    height: int,
    width: int,
    strength: float = 1.0,
    steps: int | None = None,
    added: dict | None = None,
) -> tuple[torch.Tensor, int]:
    """The spatial-aware initial latents of a batch and the index of `timesteps` to start sampling at.

    `image`: reference image(s) (see `reference_images`); `from_layout`: render each layout instead.
    `states` / `caption_mask` / `added`: the batch's caption encoding and the base's extra U-Net inputs
    (conditional branch only).
    """
    if from_layout and image is not None:
        raise SpatialLockError("init: give init_image or init_from_layout, not both")
    if from_layout:
        images = [render_layout(layout, width, height) for layout in layouts]
    else:
        images = reference_images(image, len(layouts))
    clean = encode_images(pipe, images, height, width).to(states.dtype)
    inverted, reached = invert(
        pipe, clean, states, caption_mask, pipe.scheduler.num_inference_steps, strength, steps, added
    )
    return start_sampling_at(pipe.scheduler, timesteps, inverted, reached)


class LayoutInit(Extension):
    """Spatial-aware initialisation in the sampling loop: start from a DDIM-inverted reference image (`init_image`:
    one for all, or one per image) or from each layout rendered as coloured boxes on grey (`init_from_layout`)
    instead of random noise. `init_strength`: the share of the schedule inverted through (sampling runs that share
    of the steps); `init_steps`: DDIM inversion steps (default: as many as sampling then runs)."""

    arguments = {"init_image": None, "init_from_layout": False, "init_strength": 1.0, "init_steps": None}

    def __init__(self, values: dict):
        self.values = values

    @classmethod
    def from_call(cls, pipe, values, layouts):
        on = values["init_image"] is not None or values["init_from_layout"]
        return cls({name: values[name] for name in cls.arguments}) if on else None

    def start(self, pipe, call) -> None:
        if call.given_latents is not None:
            raise SpatialLockError("latents: give latents or an init image / init_from_layout, not both")
        v, c = self.values, call.conditioning
        call.latents, start = initial_latents(
            pipe, call.layouts, v["init_image"], v["init_from_layout"], c.cond_states, c.cond_mask, call.timesteps,
            call.height, call.width, v["init_strength"], v["init_steps"], c.cond_added,
        )  # fmt: skip
        call.timesteps = call.timesteps[start:]
