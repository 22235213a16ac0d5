"""Put a base together from a U-Net and an autoencoder whose decoder was trained apart.

    spatiallock train base --data data/shapes --out runs/ae --latent-size 32 --vae-only
    spatiallock train base --data data/shapes --out runs/base --vae-from runs/ae/vae --latent-patch 2
    spatiallock train decoder --base runs/ae --data data/shapes --out runs/ae-dec     # beside the U-Net
    python scripts/assemble_base.py --base runs/base --vae runs/ae-dec --out models/base

The U-Net of --base with the autoencoder of --vae, the rest of --base's folder (scheduler, tokenizer, index) as it
is. The two autoencoders must share their encoder weight for weight and their scaling factor, so the latents the
U-Net learnt mean the same; only the decoder may differ. Weights in fp16 (as shipped) unless --fp32.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from spatiallock.base.folders import autoencoder_folder, base_fingerprint
from spatiallock.checkpoint import from_pretrained_safetensors, refuse_fp16_overflow
from spatiallock.errors import SpatialLockError
from spatiallock.training.decoder import write_copy

ENCODER_SIDE = ("encoder.", "quant_conv.")


def same_latents(base_vae: AutoencoderKL, vae: AutoencoderKL) -> None:
    """Refuse, in one line, an autoencoder whose encoder or scaling factor differ from the base's own."""
    if base_vae.config.scaling_factor != vae.config.scaling_factor:
        raise SpatialLockError(
            f"vae: scaling factor {vae.config.scaling_factor} is not the base's {base_vae.config.scaling_factor}"
        )
    ours, theirs = base_vae.state_dict(), vae.state_dict()
    keys = sorted(k for k in ours if k.startswith(ENCODER_SIDE))
    differ = [k for k in keys if k not in theirs or not torch.equal(ours[k].float(), theirs[k].float())]
    if differ or not keys:
        raise SpatialLockError(
            f"vae: its encoder is not the base's ({len(differ)} of {len(keys)} tensors differ, first {differ[:1]}): "
            "the U-Net's latents would mean something else; train the decoder of the autoencoder the U-Net was "
            "trained on (`train decoder --base AUTOENCODER`)"
        )


def assemble(base: Path, vae_path: Path, out: Path, fp16: bool = True) -> str:
    """Write the assembled base to `out`; returns its `base_fingerprint`."""
    if not (base / "unet" / "config.json").is_file() or not (base / "vae" / "config.json").is_file():
        raise SpatialLockError(f"base: {base} is not a base folder (unet/ and vae/)")
    source = autoencoder_folder(vae_path)
    if source is None:
        raise SpatialLockError(f"vae: {vae_path} holds no autoencoder (the config.json of an AutoencoderKL)")
    if out.exists():
        raise SpatialLockError(f"out: {out} already exists")
    dtype = torch.float16 if fp16 else torch.float32
    unet = from_pretrained_safetensors(UNet2DConditionModel, base, "base", subfolder="unet", torch_dtype=torch.float32)
    base_vae = from_pretrained_safetensors(AutoencoderKL, base, "base", subfolder="vae", torch_dtype=torch.float32)
    vae = from_pretrained_safetensors(AutoencoderKL, source, "vae", torch_dtype=torch.float32)
    same_latents(base_vae, vae)
    if fp16:
        refuse_fp16_overflow(unet, "base")
        refuse_fp16_overflow(vae, "vae")
    write_copy(base, out, {"unet": unet.to(dtype), "vae": vae.to(dtype)})  # scheduler, tokenizer, index: as they are
    return base_fingerprint(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, type=Path, help="base folder whose U-Net is taken")
    parser.add_argument("--vae", required=True, type=Path, help="autoencoder folder (or a folder with vae/)")
    parser.add_argument("--out", required=True, type=Path, help="new base folder (must not exist)")
    parser.add_argument("--fp32", action="store_true", help="keep fp32 weights (default: fp16, as shipped)")
    args = parser.parse_args(argv)
    try:
        fingerprint = assemble(args.base, args.vae, args.out, fp16=not args.fp32)
    except SpatialLockError as err:
        print(f"assemble_base: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} (base_fingerprint {fingerprint})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
