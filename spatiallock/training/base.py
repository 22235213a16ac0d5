"""`spatiallock train base`: the small text-to-image base of the synthetic domain, trained on captions only.

Two stages, both resumable: (1) a small `AutoencoderKL` on the images (L1 + MSE + a light KL term), after
which its latent scaling factor is measured; (2) a `UNet2DConditionModel` on the frozen autoencoder's latents,
conditioned on the frozen all-MiniLM-L6-v2 caption states. The result is a diffusers-layout folder.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.embeddings import Timesteps
from diffusers.training_utils import compute_snr
from torch import nn

from spatiallock.base.folders import (
    CAPTION_TOKENS,
    UNET_WIDTHS,
    BaseModel,
    autoencoder_folder,
    save_small_base,
    small_scheduler,
    small_unet_config,
    small_vae_config,
)
from spatiallock.base.latents import autoencoder_factor
from spatiallock.base.text import encode_captions, load_minilm
from spatiallock.checkpoint import (
    atomic_save_pretrained,
    checkpoint_step,
    from_pretrained_safetensors,
    list_checkpoints,
)
from spatiallock.data.coco import collate_layouts
from spatiallock.errors import SpatialLockError
from spatiallock.training.common import drop, latents_of, noisy_inputs, start_training
from spatiallock.training.loop import LoopConfig, LoopResult, train_loop


@dataclass
class BaseTrainConfig:
    """Everything `train base` needs; written to `<out>/train/config.json`."""

    data: str
    out: str
    resolution: int = 64
    caption_dropout: float = 0.1
    kl_weight: float = 1e-6
    flip_prob: float = 0.5
    init_from: str | None = None  # an existing base folder: its autoencoder is kept, its U-Net trained further
    vae_from: str | None = None  # a trained autoencoder (a folder, or a base folder's vae/): a new U-Net on it
    mixed_precision: str = "no"  # "bf16": autocast (fast on CPUs with AMX or AVX-512 BF16, and on GPUs)
    snr_gamma: float | None = None  # Min-SNR-gamma loss weighting (Hang et al. 2023); None: plain MSE
    latent_channels: int = 4
    latent_size: int | None = None  # None: resolution / 4
    vae_widths: tuple[int, ...] | None = None  # one per autoencoder level; None: `VAE_WIDTHS`
    vae_layers: int = 1
    vae_only: bool = False  # stop once the autoencoder is trained (its folder: <out>/vae)
    unet_widths: tuple[int, ...] = UNET_WIDTHS
    unet_plain_levels: int = 0  # finest U-Net levels without attention
    latent_patch: int = 1  # each p x p patch of the latent one U-Net cell (`base.latents`)
    unet_warm_start: str | None = None  # a base whose U-Net tensors of the same name and shape start the new U-Net
    vae: LoopConfig = field(default_factory=lambda: LoopConfig(max_steps=1500, batch_size=16, learning_rate=1e-3))
    unet: LoopConfig = field(default_factory=lambda: LoopConfig(max_steps=5000, batch_size=32, learning_rate=3e-4))
    split: str = "train"


class _Reconstruction(nn.Module):
    """Autoencoder training forward in one module call (so that DDP sees it): (reconstruction, KL)."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, pixels: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(pixels).latent_dist
        return self.vae.decode(posterior.sample(generator=generator)).sample, posterior.kl().mean()


@torch.no_grad()
def measure_scaling_factor(vae: AutoencoderKL, dataset, device, images: int = 256) -> float:
    """1 / std of the posterior means over the first `images` images, so latents have unit variance."""
    means = []
    for start in range(0, min(images, len(dataset)), 32):
        pixels = torch.stack([dataset[i]["pixel_values"] for i in range(start, min(start + 32, len(dataset)))])
        means.append(vae.encode(pixels.to(device)).latent_dist.mean)
    return float(1.0 / torch.cat(means).std())


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample loss weights of Min-SNR-gamma: min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v-prediction.

    They cap the weight of the nearly clean steps, whose gradients conflict with the noisy ones'; on the same
    budget training converges faster (Hang et al., "Efficient Diffusion Training via Min-SNR Weighting").
    """
    snr = compute_snr(scheduler, timesteps)
    weights = snr.clamp(max=gamma)
    return weights / (snr + 1) if scheduler.config.prediction_type == "v_prediction" else weights / snr


def finer_levels(widths: Sequence[int], source_widths: Sequence[int]) -> int:
    """How many finest levels a U-Net of `widths` has in front of one of `source_widths`: k when its widths are
    k more at the fine end and then the source's (64, 64, 128, 192 on 64, 128, 192: 1), else 0."""
    added = len(widths) - len(source_widths)
    return added if added > 0 and tuple(widths[added:]) == tuple(source_widths) else 0


def warm_start_unet(unet: UNet2DConditionModel, weights: dict[str, torch.Tensor], finer: int = 0) -> tuple[int, int]:
    """Copy into `unet` every tensor of `weights` with the same name and shape; (taken, left fresh). A U-Net on
    another latent shape keeps its own input and output layers and takes the blocks. `finer`: the new U-Net has
    that many finest levels more (`finer_levels`), so the source's down block i is its down block i + finer (the
    up blocks run coarse to fine and keep their numbers); those new levels start fresh."""

    def renamed(name: str) -> str:
        match = re.match(r"down_blocks\.(\d+)\.", name)
        return f"down_blocks.{int(match.group(1)) + finer}.{name[match.end() :]}" if match and finer else name

    own = unet.state_dict()
    weights = {**weights, **_time_input_fitted(unet, weights)}
    taken = {renamed(k): v for k, v in weights.items()}
    taken = {k: v for k, v in taken.items() if k in own and own[k].shape == v.shape}
    if not taken:
        raise SpatialLockError("unet warm start: no tensor of its U-Net fits this one (other widths or levels?)")
    with torch.no_grad():
        for name, value in taken.items():
            own[name].copy_(value)
    return len(taken), len(own) - len(taken)


TIME_RIDGE = 1e-3  # the fit's ridge: the sinusoids of the lowest frequencies are nearly collinear over 1,000 steps


def fit_time_input(
    weight: torch.Tensor, width: int, flip_sin_to_cos: bool = True, freq_shift: float = 0
) -> torch.Tensor:
    """A time embedding's first layer for `width` sinusoidal timestep features that gives, over the 1,000 training
    timesteps, nearly the output of `weight` (out x its own width) on its own features: a ridge regression (an
    exact least-squares fit leans on nearly collinear low-frequency features with weights of millions, which
    overflow fp16 and cannot be stored as shipped)."""
    steps = torch.arange(1000, dtype=torch.float32)

    def features(count: int) -> torch.Tensor:
        return Timesteps(count, flip_sin_to_cos, freq_shift)(steps).double()

    ours = features(width)
    target = features(weight.shape[1]) @ weight.double().T
    gram = ours.T @ ours + TIME_RIDGE * torch.eye(width, dtype=torch.float64)
    return torch.linalg.solve(gram, ours.T @ target).T.to(weight.dtype)


def _time_input_fitted(unet: UNet2DConditionModel, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The time embedding's first layer for a U-Net whose sinusoidal timestep features are fewer than the source's
    (they are as many as its first width), fitted to the source layer (`fit_time_input`), so that the blocks taken
    get nearly the time input they were trained on. Empty when the layer fits as it is, or does not fit at all."""
    name = "time_embedding.linear_1.weight"
    own, source = unet.state_dict().get(name), weights.get(name)
    if own is None or source is None or own.shape == source.shape or own.shape[0] != source.shape[0]:
        return {}
    config = unet.config
    return {name: fit_time_input(source, own.shape[1], config.flip_sin_to_cos, config.freq_shift)}


def _autoencoder_goes_on(config: BaseTrainConfig, folder: Path) -> bool:
    """Whether a resumed run trains its finished autoencoder further: --resume with more --vae-steps than its
    newest checkpoint, the autoencoder its own (not --init-from's or --vae-from's), and no U-Net step taken on
    its latents yet."""
    if not config.vae.resume or config.init_from is not None or config.vae_from is not None:
        return False
    autoencoder = list_checkpoints(folder / "checkpoints" / "vae")
    if not autoencoder or list_checkpoints(folder / "checkpoints" / "unet"):
        return False
    return checkpoint_step(autoencoder[-1]) < config.vae.max_steps


def train_base(config: BaseTrainConfig) -> LoopResult:
    """Train the small base as configured; writes the model folder at `config.out` when done."""
    if config.resolution % 16:
        raise SpatialLockError(f"resolution: must be a multiple of 16, got {config.resolution}")
    vae_config = small_vae_config(
        config.resolution, config.latent_channels, config.latent_size, config.vae_widths, config.vae_layers
    )  # raises on sizes that do not fit, before anything is written
    latent_cells = config.latent_size or config.resolution // 4
    small_unet_config(latent_cells, widths=config.unet_widths, plain_levels=config.unet_plain_levels,
                      patch=config.latent_patch)  # fmt: skip
    if config.init_from is not None and not (Path(config.init_from) / "unet" / "config.json").is_file():
        raise SpatialLockError(f"init from: {config.init_from} is not a base folder (no unet/config.json)")
    if config.init_from is not None and config.vae_from is not None:
        raise SpatialLockError("vae from: not with init from, which brings its own autoencoder")
    if config.init_from is not None and config.unet_warm_start is not None:
        raise SpatialLockError("unet warm start: not with init from, which brings its whole U-Net")
    run = start_training(config, ("vae", "unet"), config.vae.resume or config.unet.resume, config.mixed_precision)
    accelerator, folder = run.accelerator, run.folder
    device = accelerator.device
    text_encoder, tokenizer = load_minilm()
    text_encoder.to(device)
    dataset = run.layout_data(config.resolution, config.vae.seed, random_caption=True)
    vae_dir = folder / "vae"
    init_unet = init_vae = None
    if config.init_from is not None:  # loaded before anything is written: a folder that does not load writes nothing
        # fp32 weights whatever the folder holds (the shipped base is fp16)
        init_unet = from_pretrained_safetensors(
            UNet2DConditionModel, config.init_from, "init from", subfolder="unet", torch_dtype=torch.float32
        )
        if not (vae_dir / "config.json").is_file():
            init_vae = from_pretrained_safetensors(
                AutoencoderKL, config.init_from, "init from", subfolder="vae", torch_dtype=torch.float32
            )
    warm = None
    if config.unet_warm_start is not None:  # read before anything is written, like init from
        source = from_pretrained_safetensors(
            UNet2DConditionModel,
            config.unet_warm_start,
            "unet warm start",
            subfolder="unet",
            torch_dtype=torch.float32,
        )
        warm = (source.state_dict(), finer_levels(config.unet_widths, source.config.block_out_channels))
        del source
    if config.vae_from is not None and not (vae_dir / "config.json").is_file():
        source = autoencoder_folder(config.vae_from) or Path(config.vae_from)  # else: the load names what is wrong
        init_vae = from_pretrained_safetensors(AutoencoderKL, source, "vae from", torch_dtype=torch.float32)
    run.record_config()

    # 1. the autoencoder, unless a finished one is already there or `init_from` gives one
    if init_vae is not None and accelerator.is_main_process:
        atomic_save_pretrained(init_vae, vae_dir)
    accelerator.wait_for_everyone()
    vae_result = None
    if (vae_dir / "config.json").is_file() and not _autoencoder_goes_on(config, folder):
        vae = from_pretrained_safetensors(AutoencoderKL, vae_dir, "trained autoencoder")
    else:
        torch.manual_seed(config.vae.seed)
        vae = AutoencoderKL(**vae_config)

        def vae_losses(models: dict, batch: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
            pixels = batch["pixel_values"].to(device)
            decoded, kl = models["vae"](pixels, generator)
            l1, mse = F.l1_loss(decoded, pixels), F.mse_loss(decoded, pixels)
            return {"loss": l1 + mse + config.kl_weight * kl, "l1": l1, "mse": mse, "kl": kl}

        result = train_loop(
            accelerator=accelerator, stage="vae", folder=folder, models={"vae": _Reconstruction(vae)}, dataset=dataset,
            collate_fn=collate_layouts, compute_losses=vae_losses, config=config.vae,
        )  # fmt: skip
        if result.interrupted:
            return result
        vae_result = result
        vae.eval()
        vae.register_to_config(scaling_factor=measure_scaling_factor(vae, dataset, device))
        if accelerator.is_main_process:
            atomic_save_pretrained(vae, vae_dir)
        accelerator.wait_for_everyone()
    if config.vae_only:
        if accelerator.is_main_process:
            atomic_save_pretrained(vae, Path(config.out) / "vae")
        accelerator.wait_for_everyone()
        done = LoopResult(step=config.vae.max_steps, interrupted=False, last_losses={}, models={"vae": vae})
        return vae_result or done
    vae.requires_grad_(False).eval().to(device)

    # 2. the U-Net on frozen latents and caption states
    torch.manual_seed(config.unet.seed)
    latent_size = config.resolution // autoencoder_factor(vae)
    if init_unet is not None:
        unet = init_unet
    else:
        unet_config = small_unet_config(
            latent_size,
            text_encoder.config.hidden_size,
            vae.config.latent_channels,
            config.unet_widths,
            config.unet_plain_levels,
            config.latent_patch,
        )
        unet = UNet2DConditionModel(**unet_config)
        if warm is not None:  # a checkpoint of --resume replaces these
            taken, fresh = warm_start_unet(unet, *warm)
            shifted = f", its blocks {warm[1]} level(s) coarser here" if warm[1] else ""
            print(f"unet warm start {config.unet_warm_start}: {taken} tensors taken, {fresh} start fresh{shifted}")
    scheduler = small_scheduler()
    base = BaseModel(unet, vae, text_encoder, tokenizer, scheduler, CAPTION_TOKENS)

    def unet_losses(models: dict, batch: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
        latents = latents_of(base, batch["pixel_values"].to(device), generator).float()  # fp32 under autocast too
        captions, _ = drop(batch["captions"], config.caption_dropout, generator, "")
        states, mask = encode_captions(text_encoder, tokenizer, captions, CAPTION_TOKENS)
        noisy, steps, target = noisy_inputs(scheduler, latents, generator)
        prediction = models["unet"](noisy, steps, states, encoder_attention_mask=mask).sample
        if config.snr_gamma is None:
            return {"loss": F.mse_loss(prediction.float(), target.float())}
        per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        return {"loss": (min_snr_weights(scheduler, steps, config.snr_gamma) * per_sample).mean()}

    result = train_loop(
        accelerator=accelerator, stage="unet", folder=folder, models={"unet": unet}, dataset=dataset,
        collate_fn=collate_layouts, compute_losses=unet_losses, config=config.unet,
    )  # fmt: skip
    if not result.interrupted and accelerator.is_main_process:
        save_small_base(run.out, accelerator.unwrap_model(unet), vae, scheduler, tokenizer)
    accelerator.wait_for_everyone()
    return result
