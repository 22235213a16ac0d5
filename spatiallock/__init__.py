"""SpatialLock: layout-controlled text-to-image generation on a frozen latent diffusion model."""

__version__ = "0.1.0"
