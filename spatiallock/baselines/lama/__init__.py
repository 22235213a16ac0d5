"""LAMA (seed 003): layout -> object masks -> Locality-Aware Mask Adaption -> image, a GAN baseline.

    generator = LamaGenerator(LamaConfig(categories=["red circle", "blue square"]))
    noise = generator.noise(batch=2, generators=[torch.Generator().manual_seed(s) for s in (0, 1)])
    images, mask, raw = generator(labels, boxes, valid, noise)

The parts, each as the paper builds it, sized for 64 px on a CPU:

- layout-to-mask (`MaskGenerator`): every object's feature o = [class embedding y, noise z, box w, h] becomes a
  16 x 16 mask (a sigmoid), resized into its box (`place_masks`); the masks of all objects are the raw semantic
  mask. A whole-image background object (`BACKGROUND`) comes first in every layout, as in LostGAN.
- `MaskAdaption` (LAMA): object queries summed per pixel with the raw mask as weights (pixel query), summarised
  by two 3 x 3 ResNet blocks (local query), matched against object keys (E); the raw mask is scaled by
  tanh(alpha E) + 1 with alpha starting at zero, then normalised over objects (`normalise`). Without adaption
  (`LamaConfig.adaption` False, the paper's control) the raw mask is only normalised.
- mask-to-image (`LamaGenerator`): ResNet up-blocks with ISLA-Norm (each object's own scale and shift, spread
  over the image by its mask) on batch-group normalisation, noise injection after each convolution and ReZero
  residuals.
- `LamaDiscriminator`: an image discriminator of spectral-norm ResNet blocks and an object discriminator on
  RoIAlign crops (torchvision) with a class projection; hinge losses (`discriminator_loss`, `generator_loss`).

`mask_entropy` is the paper's mask clarity measure (its Eq. 5): the mean per-pixel entropy over objects.

Modules: `config` (`LamaConfig`), `masks` (layout-to-mask and the mask adaption), `generator` (mask-to-image),
`discriminator` (both discriminators and the hinge losses), `pipeline` (`LamaPipeline`, sampling from layouts).
"""

from spatiallock.baselines.lama.config import BACKGROUND, CLASS_NAME, LamaConfig
from spatiallock.baselines.lama.discriminator import (
    DownBlock,
    LamaDiscriminator,
    discriminator_loss,
    generator_loss,
)
from spatiallock.baselines.lama.generator import BatchGroupNorm, IslaNorm, LamaGenerator, NoiseInjection, UpBlock
from spatiallock.baselines.lama.masks import EPS, MaskAdaption, MaskGenerator, mask_entropy, normalise, place_masks
from spatiallock.baselines.lama.pipeline import (
    BACKGROUND_COLOUR,
    PALETTE,
    LamaOutput,
    LamaPipeline,
    is_lama_folder,
    mask_picture,
)

__all__ = [
    "BACKGROUND", "BACKGROUND_COLOUR", "CLASS_NAME", "EPS", "PALETTE", "BatchGroupNorm", "DownBlock", "IslaNorm",
    "LamaConfig", "LamaDiscriminator", "LamaGenerator", "LamaOutput", "LamaPipeline", "MaskAdaption",
    "MaskGenerator", "NoiseInjection", "UpBlock", "discriminator_loss", "generator_loss", "is_lama_folder",
    "mask_entropy", "mask_picture", "normalise", "place_masks",
]  # fmt: skip
