"""Refit the first layer of a U-Net's time embedding so that the base can be stored in fp16.

    python scripts/refit_time_input.py --base runs/base-f1 --out runs/base-f1r
    python scripts/assemble_base.py --base runs/base-f1r --vae runs/p2-dec2 --out models/base

A U-Net started with `train base --unet-warm-start` into plain finer levels, before that fit was a ridge regression,
has a time input layer of weights in the millions (an exact least-squares fit on nearly collinear low-frequency
sinusoids), which fp16 stores as inf. This fits the layer again, on the same features, by ridge regression to its
own outputs over the 1,000 training timesteps (`spatiallock.training.base.fit_time_input`) and writes a copy of the
base folder (its train/ left out) with that U-Net; it prints how far the whole time embedding moved.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from spatiallock.checkpoint import from_pretrained_safetensors
from spatiallock.errors import SpatialLockError
from spatiallock.training.base import fit_time_input
from spatiallock.training.decoder import write_copy


def refit(base: Path, out: Path) -> tuple[float, float]:
    """Write `out`; returns (the time embedding's relative change over the 1,000 timesteps, the new max |weight|)."""
    if not (base / "unet" / "config.json").is_file():
        raise SpatialLockError(f"base: {base} is not a base folder (unet/config.json)")
    if out.exists():
        raise SpatialLockError(f"out: {out} already exists")
    unet = from_pretrained_safetensors(UNet2DConditionModel, base, "base", subfolder="unet", torch_dtype=torch.float32)
    layer, steps = unet.time_embedding.linear_1, torch.arange(1000)
    with torch.no_grad():
        before = unet.time_embedding(unet.time_proj(steps))
        width = layer.weight.shape[1]
        layer.weight.copy_(fit_time_input(layer.weight, width, unet.config.flip_sin_to_cos, unet.config.freq_shift))
        moved = float((unet.time_embedding(unet.time_proj(steps)) - before).norm() / before.norm())
    write_copy(base, out, {"unet": unet})  # the rest as it is; train/ is never copied
    return moved, float(layer.weight.detach().abs().max())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, type=Path, help="base folder whose U-Net's time input is refitted")
    parser.add_argument("--out", required=True, type=Path, help="new base folder (must not exist)")
    args = parser.parse_args(argv)
    try:
        moved, largest = refit(args.base, args.out)
    except SpatialLockError as err:
        print(f"refit_time_input: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: the time embedding moved by {moved:.4f} of its norm; largest weight {largest:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
