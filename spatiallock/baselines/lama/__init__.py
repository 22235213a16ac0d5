"""LAMA (seed 003): layout -> object masks -> Locality-Aware Mask Adaption -> image, a GAN baseline.

    generator = LamaGenerator(LamaConfig(categories=["red circle", "blue square"]))
    noise = generator.noise(batch=2, generators=[torch.Generator().manual_seed(s) for s in (0, 1)])
    images, mask, raw = generator(labels, boxes, valid, noise)

The parts, each as the authors' public code (ZejianLi/LAMA) builds it, sized for 64 px on a CPU; spectral norm on
every convolution and linear layer, orthogonal initialisation, residual branches behind gates that start at 0:

- layout-to-mask (`MaskGenerator`): every object's feature o = [class embedding y, noise z, box w, h] becomes a
  16 x 16 mask (gated BN blocks, bilinear doublings, a sigmoid), resized into its box (`place_masks`); the masks
  of all objects are the raw semantic mask. A whole-image background object (`BACKGROUND`) comes first in every
  layout (the synthetic data has no stuff classes to cover the background).
- `MaskAdaption` (LAMA): object queries summed per pixel with the raw mask as weights (pixel query), summarised by
  two gated GroupNorm blocks (local query: the pixel query at first, a 5 x 5 neighbourhood once the gates open),
  matched against object keys (E); the raw mask is scaled by tanh(clamp(alpha, -1, 1) E) + 1, alpha starting at
  zero. `local_query=False` is the paper's Table 5 ablation; without adaption (`LamaConfig.adaption` False, the
  paper's control) the raw mask is used as it is. Either is normalised over objects (`normalise`).
- mask-to-image (`LamaGenerator`): the authors' ResBlockG up-blocks, with ISLA-Norm (each object's scale and
  shift from [y, MLP(z)], spread over the image by its mask, behind a gate) on batch-group normalisation
  (`BatchGroupNorm`: BN + rho (GN - BN)), and noise injection (softplus weights) after each convolution.
- `LamaDiscriminator`: the authors' 64 px discriminator, an image path of gated ResNet blocks and an object path
  on RoIAlign crops (torchvision) of the shared trunk with a class projection; hinge losses
  (`discriminator_loss`, `generator_loss`). Sampling truncates the noise at `LamaConfig.truncation`.

`mask_entropy` is the paper's mask clarity measure (its Eq. 5): the mean per-pixel entropy over objects.

Modules: `config` (`LamaConfig`), `masks` (layout-to-mask and the mask adaption), `generator` (mask-to-image),
`discriminator` (both discriminators and the hinge losses), `pipeline` (`LamaPipeline`, sampling from layouts).
"""

from spatiallock.baselines.lama.config import ARCHITECTURE, BACKGROUND, CLASS_NAME, LamaConfig
from spatiallock.baselines.lama.discriminator import (
    DownBlock,
    LamaDiscriminator,
    discriminator_loss,
    generator_loss,
)
from spatiallock.baselines.lama.generator import BatchGroupNorm, IslaNorm, LamaGenerator, NoiseInjection, UpBlock
from spatiallock.baselines.lama.masks import (
    EPS,
    GatedBlock,
    MaskAdaption,
    MaskGenerator,
    entropy_terms,
    mask_entropy,
    normalise,
    place_masks,
)
from spatiallock.baselines.lama.pipeline import (
    BACKGROUND_COLOUR,
    PALETTE,
    LamaOutput,
    LamaPipeline,
    is_lama_folder,
    mask_picture,
)

__all__ = [
    "ARCHITECTURE", "BACKGROUND", "BACKGROUND_COLOUR", "CLASS_NAME", "EPS", "PALETTE", "BatchGroupNorm", "DownBlock",
    "GatedBlock", "IslaNorm",
    "LamaConfig", "LamaDiscriminator", "LamaGenerator", "LamaOutput", "LamaPipeline", "MaskAdaption",
    "MaskGenerator", "NoiseInjection", "UpBlock", "discriminator_loss", "generator_loss", "is_lama_folder",
    "entropy_terms", "mask_entropy", "mask_picture", "normalise", "place_masks",
]  # fmt: skip
