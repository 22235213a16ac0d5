"""`spatiallock train decoder`: sharpen a base's autoencoder by training its decoder alone.

The encoder stays frozen, so the latent space does not move: the U-Net and every adapter trained on that base
still fit, and only the pixels their latents decode to change. The autoencoder bounds every layout score
(a detector on real images sent through the autoencoder and back scores what a perfect U-Net would), so a
better decoder lifts every row at once without retraining anything. The result is a copy of the base folder
with the new `vae/`. The base may also be an autoencoder alone (a `train base --vae-only` run, or its `vae/`):
then the result is the new `vae/` alone, and its decoder can train while a U-Net trains on its encoder's latents.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import nn

from spatiallock.base.folders import autoencoder_folder
from spatiallock.checkpoint import atomic_save_pretrained, from_pretrained_safetensors
from spatiallock.data.coco import collate_layouts
from spatiallock.errors import SpatialLockError
from spatiallock.files import atomic_output
from spatiallock.training.common import start_training
from spatiallock.training.loop import LoopConfig, LoopResult, train_loop

STAGE = "decoder"


@dataclass
class DecoderTrainConfig:
    """Everything `train decoder` needs; written to `<out>/train/config.json`."""

    base: str
    data: str
    out: str
    resolution: int = 64
    flip_prob: float = 0.5
    mixed_precision: str = "no"
    split: str = "train"
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(max_steps=3000, batch_size=16, learning_rate=3e-4))


class _Decoding(nn.Module):
    """Images -> frozen encoder -> posterior sample -> trainable decoder: the reconstruction, in one module call."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        with torch.no_grad():
            latents = self.vae.encode(pixels).latent_dist.sample(generator=generator)
        return self.vae.decode(latents).sample


def trainable_decoder(vae: AutoencoderKL) -> AutoencoderKL:
    """Freeze the encoder side (`encoder`, `quant_conv`), train the decoder side (`post_quant_conv`, `decoder`)."""
    vae.requires_grad_(False)
    for part in (vae.post_quant_conv, vae.decoder):
        if part is not None:
            part.requires_grad_(True)
    return vae


def copied_files(base: Path, skip: tuple[str, ...] = ("vae",)) -> list[Path]:
    """The files of the base folder that go into the new model, relative to it: every regular file except those
    of the `skip` folders (`vae/`: trained anew), `train/` and hidden entries at the top. `SpatialLockError` on
    a link or any other special file: nothing is followed out of the base folder, and nothing but plain files is
    copied."""
    files = []
    for root, dirs, names in os.walk(base):
        here = Path(root)
        if here == base:
            dirs[:] = [d for d in dirs if d not in (*skip, "train") and not d.startswith(".")]
            names = [n for n in names if not n.startswith(".")]
        for name in sorted([*dirs, *names]):
            mode = (here / name).lstat().st_mode
            if stat.S_ISLNK(mode):
                raise SpatialLockError(
                    f"base: {here / name} is a link; links are not followed out of the model folder (copy the "
                    "model with its files, e.g. `cp -rL`, and give the copy)"
                )
            if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                raise SpatialLockError(f"base: {here / name} is not a regular file")
        files += [(here / name).relative_to(base) for name in sorted(names)]
    return files


def copy_files(base: Path, out: Path, skip: tuple[str, ...] = ("vae",)) -> None:
    """Copy the base's `copied_files` (but `skip`) into `out` (each through a temporary file, never through a link)."""
    for relative in copied_files(base, skip):
        target = out / relative
        for parent in reversed(target.relative_to(out).parents[:-1]):
            if (out / parent).is_symlink():
                raise SpatialLockError(f"out: {out / parent} is a link; not written through")
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(base / relative, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as source, atomic_output(target, "wb") as copy:
            shutil.copyfileobj(source, copy)


def write_copy(base: Path, out: Path, parts: dict[str, nn.Module]) -> None:
    """A new model folder `out`: `base`'s `copied_files` with `parts` (subfolder -> model) saved in place of its
    own, put together in a hidden folder beside `out` and renamed to it, so that `out` is never half-written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-") as staging:
        staging = Path(staging)
        copy_files(base, staging, skip=tuple(parts))
        for name, model in parts.items():
            atomic_save_pretrained(model, staging / name)
        staging.rename(out)


def train_decoder(config: DecoderTrainConfig) -> LoopResult:
    """Train the decoder of `config.base`'s autoencoder; writes the base with the new decoder at `config.out`."""
    base = Path(config.base)
    whole = (base / "model_index.json").is_file() and (base / "vae" / "config.json").is_file()
    source = base / "vae" if whole else autoencoder_folder(base)
    if source is None:
        raise SpatialLockError(
            f"base: {base} is neither a model folder with vae/ and model_index.json nor an autoencoder (a folder "
            "with the config.json of an AutoencoderKL, or a `train base --vae-only` run)"
        )
    if Path(config.out).resolve() in (base.resolve(), source.resolve()):
        raise SpatialLockError("out: must be another folder than the base (the base is copied, not changed)")
    if whole:
        copied_files(base)  # refuse links and special files before any work
    run = start_training(config, (STAGE,), config.loop.resume, config.mixed_precision)
    accelerator, out = run.accelerator, run.out
    vae = from_pretrained_safetensors(AutoencoderKL, source, "base", torch_dtype=torch.float32)
    vae = trainable_decoder(vae)
    dataset = run.layout_data(config.resolution, config.loop.seed)
    run.record_config()

    def losses(models: dict, batch: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
        pixels = batch["pixel_values"].to(accelerator.device)
        decoded = models["decoder"](pixels, generator).float()
        l1, mse = F.l1_loss(decoded, pixels), F.mse_loss(decoded, pixels)
        return {"loss": l1 + mse, "l1": l1, "mse": mse}

    result = train_loop(
        accelerator=accelerator, stage=STAGE, folder=run.folder, models={"decoder": _Decoding(vae)}, dataset=dataset,
        collate_fn=collate_layouts, compute_losses=losses, config=config.loop,
    )  # fmt: skip
    if not result.interrupted and accelerator.is_main_process:
        if whole:
            copy_files(base, out)  # the rest of the model folder, as it is
        atomic_save_pretrained(vae, out / "vae")
    accelerator.wait_for_everyone()
    return result
