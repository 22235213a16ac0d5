"""What the tests share, in one place (fixtures built from it live in conftest.py):

- tiny bases written to disk in code (`make_tiny_sd`, `make_tiny_small_base`) and their parts;
- inputs for the in-memory tiny U-Net of the `unet` fixture (`make_inputs`, `plain`, `grounded`);
- adapters (`adapter_for`, `box_adapter`, `open_gates`) and sampling on tiny bases (`LAYOUTS`, `sample`);
- the command line called in-process (`run_train_adapter`, `generate`, `error_line`);
- several processes under `accelerate launch` on CPU (`accelerate_launch`).

All weights are random but seeded: the same call builds the same tensors.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from spatiallock.cli import main
from spatiallock.data.captions import BACKGROUND_WORDS, INTROS, NUMBER_WORDS, RELATION_WORDS
from spatiallock.data.shapes import COLOURS, SHAPES
from spatiallock.layout import Layout
from spatiallock.models.adapter import SpatialLockAdapter
from spatiallock.models.grounding import GATES

# ---- tiny bases on disk ------------------------------------------------------------------------------------------
#
# - `make_tiny_sd(folder)`: a Stable-Diffusion-format folder (`StableDiffusionPipeline.save_pretrained`): a tiny
#   `CLIPTextModel` with a hand-made BPE vocabulary that covers the synthetic domain's captions, a tiny
#   `AutoencoderKL` (32 px <-> 16x16x4, factor 2), a tiny `UNet2DConditionModel` and SD v1's PNDM scheduler.
# - `make_tiny_sdxl(folder)`: an SDXL-format folder (`StableDiffusionXLPipeline.save_pretrained`): two tiny CLIP
#   encoders (the second with a projection), the tiny autoencoder, a tiny SDXL-layout U-Net, Euler.
# - `make_tiny_small_base(folder)`: the project's small-base format (`base.folders.save_small_base`) with a tiny
#   U-Net and autoencoder; its text encoder is the real all-MiniLM-L6-v2, loaded offline from its package.

RESOLUTION = 32  # native image side of both tiny bases (latent 16 x 16)
LATENT_SIZE = 16
TEXT_DIM = 32  # tiny CLIP hidden size = cross-attention dim = phrase embedding size
START, END = "<|startoftext|>", "<|endoftext|>"

# words of the caption templates (spatiallock/data/captions.py) not held in its word tables
TEMPLATE_WORDS = ("on", "against", "single", "shapes", "with", "and", "also", "plus", "its", "it", "left", "right")


def caption_words() -> list[str]:
    """Every word the synthetic captions and phrases use, sorted."""
    texts = [*NUMBER_WORDS, *INTROS, *TEMPLATE_WORDS, *COLOURS]
    texts += [w for options in BACKGROUND_WORDS.values() for w in options]
    texts += [w for options in RELATION_WORDS.values() for w in options]
    texts += [shape + suffix for shape in SHAPES for suffix in ("", "s")]
    return sorted({word for text in texts for word in re.findall(r"[a-z]+", text)})


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Byte-pair merges learned on `words` (each counted once) until every word is a single symbol.

    Applying them by rank, as CLIP's tokenizer does, turns each of these words into one token.
    """
    symbols = [tuple(word[:-1]) + (word[-1] + "</w>",) for word in words]
    merges: list[tuple[str, str]] = []
    while any(len(s) > 1 for s in symbols):
        counts: dict[tuple[str, str], int] = {}
        for s in symbols:
            for pair in zip(s, s[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        best = max(sorted(counts), key=lambda pair: counts[pair])  # most frequent, ties by order
        merges.append(best)
        joined = []
        for s in symbols:
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            joined.append(tuple(out))
        symbols = joined
    return merges


def write_clip_vocab(folder: Path) -> tuple[Path, Path]:
    """A BPE vocabulary in CLIP's format: every caption word is one token, any other word falls back to pieces.

    vocab.json holds every printable ASCII character with and without `</w>`, each merge's result and the two
    special tokens (last, as in CLIP); merges.txt the merges learned on the caption words.
    """
    folder.mkdir(parents=True, exist_ok=True)
    chars = [chr(c) for c in range(33, 127)]
    tokens = chars + [c + "</w>" for c in chars]
    merges = learn_merges(caption_words())
    tokens += [a + b for a, b in merges if a + b not in tokens] + [START, END]
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    vocab_file.write_text(json.dumps({token: i for i, token in enumerate(tokens)}))
    merges_file.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return vocab_file, merges_file


def tiny_clip_tokenizer(folder: Path):
    """`CLIPTokenizer` over the hand-made vocabulary, padding with `<|endoftext|>` to 77 tokens like SD's."""
    from transformers import CLIPTokenizer

    vocab_file, merges_file = write_clip_vocab(folder)
    return CLIPTokenizer(
        str(vocab_file), str(merges_file), unk_token=END, bos_token=START, eos_token=END, pad_token=END,
        model_max_length=77,
    )  # fmt: skip


def tiny_clip_text_model(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=32,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    return CLIPTextModel(config).eval()


def tiny_vae(norm_num_groups: int = 8):
    """32 px RGB <-> 16 x 16 x 4 latents."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], layers_per_block=1, latent_channels=4,
        norm_num_groups=norm_num_groups, sample_size=RESOLUTION,
    )  # fmt: skip


def tiny_unet(cross_attention_dim: int = TEXT_DIM):
    """SD's U-Net layout, tiny: attention at the finer level (down and up), none at the coarser one."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=4, out_channels=4, block_out_channels=[32, 64], layers_per_block=1,
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=8,
    )  # fmt: skip


def sd_scheduler():
    """SD v1's scheduler config (PNDM, epsilon prediction)."""
    from diffusers import PNDMScheduler

    return PNDMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1,
    )  # fmt: skip


def make_tiny_sd(folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny Stable Diffusion v1-format model folder (model_index.json, unet/, vae/, text_encoder/,
    tokenizer/, scheduler/) and return it. Native resolution 32 px; text width 32."""
    from diffusers import StableDiffusionPipeline

    folder = Path(folder)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as vocab:
        tokenizer = tiny_clip_tokenizer(Path(vocab))
    pipeline = StableDiffusionPipeline(
        vae=tiny_vae(), text_encoder=tiny_clip_text_model(tokenizer), tokenizer=tokenizer, unet=tiny_unet(),
        scheduler=sd_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipeline.save_pretrained(folder, safe_serialization=True)
    return folder


SDXL_TEXT_2 = 48  # the tiny second text encoder's width (SDXL's OpenCLIP ViT-bigG: 1280)
SDXL_PROJECTION = 24  # its pooled projection (SDXL: 1280)
SDXL_TIME_DIM = 8  # each size id's embedding (SDXL: 256)


def tiny_sdxl_unet():
    """SDXL's U-Net layout, tiny: no attention at the finest level, a deeper stack (2 blocks) at the coarser one,
    linear projections, the pooled text and six size ids added to the time embedding ("text_time")."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=4, out_channels=4, block_out_channels=[32, 64], layers_per_block=1,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
        transformer_layers_per_block=[1, 2], cross_attention_dim=TEXT_DIM + SDXL_TEXT_2, attention_head_dim=8,
        norm_num_groups=8, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_DIM,
        projection_class_embeddings_input_dim=SDXL_PROJECTION + 6 * SDXL_TIME_DIM,
    )  # fmt: skip


def make_tiny_sdxl(folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny SDXL-format model folder (`StableDiffusionXLPipeline.save_pretrained`: model_index.json, unet/,
    vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/) and return it. Native resolution 32
    px; caption states 32 + 48 wide; SDXL's Euler scheduler and autoencoder scaling factor."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    folder = Path(folder)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as vocab:
        tokenizer = tiny_clip_tokenizer(Path(vocab))
        tokenizer_2 = tiny_clip_tokenizer(Path(vocab) / "2")
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=SDXL_TEXT_2, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=SDXL_PROJECTION,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], layers_per_block=1, latent_channels=4,
        norm_num_groups=8, sample_size=RESOLUTION, scaling_factor=0.13025,
    )  # fmt: skip
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        steps_offset=1, timestep_spacing="leading",
    )  # fmt: skip
    pipeline = StableDiffusionXLPipeline(
        vae=vae, text_encoder=tiny_clip_text_model(tokenizer),
        text_encoder_2=CLIPTextModelWithProjection(config).eval(), tokenizer=tokenizer, tokenizer_2=tokenizer_2,
        unet=tiny_sdxl_unet(), scheduler=scheduler, force_zeros_for_empty_prompt=True, add_watermarker=False,
    )  # fmt: skip
    pipeline.save_pretrained(folder, safe_serialization=True)
    return folder


def make_tiny_small_base(folder: str | Path, seed: int = 0) -> Path:
    """Write the project's small-base format with a tiny U-Net (cross-attention 384, for all-MiniLM-L6-v2) and a
    tiny autoencoder; native resolution 32 px."""
    from spatiallock.base.folders import save_small_base, small_scheduler
    from spatiallock.base.text import load_minilm

    torch.manual_seed(seed)
    _, tokenizer = load_minilm()
    return save_small_base(folder, tiny_unet(cross_attention_dim=384), tiny_vae(), small_scheduler(), tokenizer)


# ---- the in-memory tiny U-Net (the `unet` fixture) ----------------------------------------------------------------

PHRASE_DIM = 24
NUM_CLASSES = 5


def make_inputs(batch: int = 2, slots: int = 4, objects: int = 2, seed: int = 0) -> dict:
    """Latents, timesteps, caption states and a layout with `objects` real objects in `slots` slots."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(batch, slots, 2, generator=g) * 0.5
    wh = 0.2 + torch.rand(batch, slots, 2, generator=g) * 0.3
    masks = torch.zeros(batch, slots)
    masks[:, :objects] = 1.0
    return {
        "sample": torch.randn(batch, 4, 8, 8, generator=g),
        "timestep": torch.tensor([10, 500][:batch] + [250] * max(0, batch - 2)),
        "encoder_hidden_states": torch.randn(batch, 6, 32, generator=g),
        "phrase_embeds": torch.randn(batch, slots, PHRASE_DIM, generator=g),
        "boxes": torch.cat([xy, xy + wh], dim=-1),
        "masks": masks,
        "labels": torch.randint(0, NUM_CLASSES, (batch, slots), generator=g),
    }


def plain(unet, x: dict) -> torch.Tensor:
    """The U-Net's prediction for `make_inputs`' latents and captions, without grounding."""
    return unet(x["sample"], x["timestep"], x["encoder_hidden_states"]).sample


def grounded(adapter, unet, x: dict) -> torch.Tensor:
    """The prediction of `unet` with `adapter` attached, grounded on `make_inputs`' layout."""
    keys = ("sample", "timestep", "encoder_hidden_states", "phrase_embeds", "boxes", "masks")
    return adapter(unet, **{k: x[k] for k in keys}).sample


# ---- adapters ----------------------------------------------------------------------------------------------------

SYNTH_CLASSES = 16  # the synthetic domain's categories: what `train adapter` sizes the PoG head for on it
# the 16 classes in the order the head numbers them, as an adapter's `class_names`
NAMES = ["red circle", "blue square", "green triangle"] + [f"class {k}" for k in range(13)]


def open_gates(adapter: SpatialLockAdapter, value: float) -> SpatialLockAdapter:
    """Set every gate of `adapter` to `value`. A fresh adapter's gates are zero (its blocks are the identity);
    open, the grounding acts on the U-Net's output."""
    with torch.no_grad():
        for name, parameter in adapter.named_parameters():
            if name.rsplit(".", 1)[-1] in GATES:
                parameter.fill_(value)
    return adapter


def adapter_for(
    base,
    variant: str = "spatiallock",
    positions: str | None = None,
    *,
    seed: int = 0,
    gates: float | None = None,
    shape: float | None = None,
    **options,
) -> SpatialLockAdapter:
    """A seeded adapter for `base`: a model folder (then sized as `train adapter` sizes it: its text encoder's
    width, the 16 synthetic classes; the same weights `train adapter --seed 0` starts from) or an in-memory
    U-Net (sized for `make_inputs`: PHRASE_DIM, NUM_CLASSES).

    `gates`: the value of every gate (None: closed, as a fresh adapter's); `shape`: the standard deviation the
    box-shape and query-position weights are drawn with (None: zero, as fresh), so that those parts act too.
    """
    if isinstance(base, (str, os.PathLike)):
        unet, width = _architecture(base)
        classes = SYNTH_CLASSES
    else:
        unet, width, classes = base, PHRASE_DIM, NUM_CLASSES
    torch.manual_seed(seed)
    adapter = SpatialLockAdapter.from_unet(unet, variant, positions, width, classes, **options)
    if gates is not None:
        open_gates(adapter, gates)
    if shape is not None:
        with torch.no_grad():
            for name, parameter in adapter.named_parameters():
                if "shape_object" in name or "query_position" in name:
                    parameter.normal_(0.0, shape)
    return adapter


_ARCHITECTURES: dict = {}


def _architecture(folder) -> tuple[torch.nn.Module, int]:
    """The U-Net and the phrase width of the base in `folder`, loaded once per session and folder version: an
    adapter reads only its sizes from them (`SpatialLockAdapter.from_unet` changes nothing)."""
    from spatiallock.base.folders import load_base
    from spatiallock.base.text import phrase_dim

    path = Path(folder).resolve()
    key = (path, *((path / part).stat().st_mtime_ns for part in ("model_index.json", "unet/config.json")))
    if key not in _ARCHITECTURES:
        base = load_base(path)
        _ARCHITECTURES[key] = (base.unet, phrase_dim(base.text_encoder))
    return _ARCHITECTURES[key]


def box_adapter(folder, seed: int = 0, **options) -> SpatialLockAdapter:
    """The shipped configuration (box attention in every down and up block) with open gates and non-zero shape
    terms, so that every part of it changes the output."""
    options = {"box_attention": True, **options}
    return adapter_for(folder, "spatiallock", "all", seed=seed, gates=0.7, shape=0.3, **options)


# ---- sampling on the tiny bases ----------------------------------------------------------------------------------

TWO = ((0.05, 0.3, 0.45, 0.7), (0.55, 0.3, 0.95, 0.7))
LAYOUTS = [
    Layout("a red circle left of a blue square", ("red circle", "blue square"), TWO),
    Layout("a green triangle", ("green triangle",), ((0.2, 0.1, 0.8, 0.6),)),
]
STEPS = 3


def sample(pipe, seed: int = 0, layouts=LAYOUTS, **kwargs) -> np.ndarray:
    """Images of `layouts` from `pipe`: STEPS steps, guidance 4, one generator seeded `seed`, as numpy."""
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(seed)
    options = {"num_inference_steps": STEPS, "guidance_scale": 4.0, "output_type": "np", **kwargs}
    return pipe(layouts=layouts, generator=generator, **options).images


def pog_pipeline(folder, **options):
    """A pipeline on the base in `folder` with a `box_adapter` whose PoG head names the 16 classes (`NAMES`):
    what candidate selection, perception guidance and insertion need."""
    from spatiallock.pipelines.diffusion import SpatialLockPipeline

    pipe = SpatialLockPipeline.from_pretrained(folder, adapter=box_adapter(folder, class_names=NAMES, **options))
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---- the command line, in this process ---------------------------------------------------------------------------


def error_line(stderr: str, alone: bool = False) -> str:
    """The one `spatiallock: error:` line of a refusal, and no traceback. `alone`: stderr holds nothing else
    (otherwise libraries' progress bars and warnings may stand around it)."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("spatiallock: error:")]
    assert len(lines) == 1, stderr
    if alone:
        assert stderr.strip() == lines[0], stderr
    return lines[0]


def run_train_adapter(base, data, out, *options: str) -> int:
    """`spatiallock train adapter` with batches of 2 and no progress bar."""
    args = ["train", "adapter", "--base", str(base), "--data", str(data), "--out", str(out)]
    return main([*args, "--batch-size", "2", "--no-progress", *options])


def generate(layout, model, out, *options: str) -> int:
    """`spatiallock generate` with 2 steps and no progress bar."""
    args = ["generate", "--layout", str(layout), "--model", str(model), "--out", str(out), "--steps", "2"]
    return main([*args, "--no-progress", *options])


# ---- several processes -------------------------------------------------------------------------------------------


def accelerate_launch(args: list[str], folder: Path, processes: int = 2, timeout: float = 300):
    """Run `accelerate launch` with `processes` CPU processes joined over gloo on `args` (a script and its
    arguments, or `-m module ...`); returns the finished `subprocess.CompletedProcess` (text output).

    `--multi_gpu` selects accelerate's torchrun launcher (`--cpu` alone starts one process without MPI); with no
    visible GPU the processes then join over gloo. Each process runs on one thread (a tiny model gains nothing
    from more, and two processes share a small machine), offline, without a user's accelerate config.
    """
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
        *args,
    ]  # fmt: skip
    env = {
        **os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(Path(folder) / "hf-home"),
    }  # fmt: skip
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def clean_estimate_at(pipe, steps: int, step: int, layouts=LAYOUTS, latents=None):
    """What sampling-time guidance starts from at step `step` of `steps`: (t, latents (2, 4, 8, 8) seeded 0 unless
    given, caption states, caption mask, grounding of `layouts`, the clean latents the grounded prediction implies)."""
    from spatiallock.pipelines.extensions.perception import predicted_clean

    pipe.scheduler.set_timesteps(steps)
    t = pipe.scheduler.timesteps[step]
    if latents is None:
        latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    states, mask = pipe.encode_prompts([layout.caption for layout in layouts])
    grounding = pipe.adapter.encode_grounding(*pipe.encode_layouts(layouts), (8, 8))
    model_input = pipe.scheduler.scale_model_input(latents, t)
    with torch.no_grad():
        clean = predicted_clean(pipe, model_input, t, pipe.predict(model_input, t, states, mask, grounding))
    return t, latents, states, mask, grounding, clean
