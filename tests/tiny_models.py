"""Tiny bases written to disk in code, for tests that load a base from a folder (training, generation).

- `make_tiny_sd(folder)`: a Stable-Diffusion-format folder (`StableDiffusionPipeline.save_pretrained`): a tiny
  `CLIPTextModel` with a hand-made BPE vocabulary that covers the synthetic domain's captions, a tiny
  `AutoencoderKL` (32 px <-> 16x16x4, factor 2), a tiny `UNet2DConditionModel` and SD v1's PNDM scheduler.
- `make_tiny_small_base(folder)`: the project's small-base format (`base.folders.save_small_base`) with a tiny
  U-Net and autoencoder; its text encoder is the real all-MiniLM-L6-v2, loaded offline from its package.

All weights are random but seeded: the same call writes the same tensors.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import torch

from spatiallock.data.captions import BACKGROUND_WORDS, INTROS, NUMBER_WORDS, RELATION_WORDS
from spatiallock.data.shapes import COLOURS, SHAPES

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


def make_tiny_small_base(folder: str | Path, seed: int = 0) -> Path:
    """Write the project's small-base format with a tiny U-Net (cross-attention 384, for all-MiniLM-L6-v2) and a
    tiny autoencoder; native resolution 32 px."""
    from spatiallock.base.folders import save_small_base, small_scheduler
    from spatiallock.base.text import load_minilm

    torch.manual_seed(seed)
    _, tokenizer = load_minilm()
    return save_small_base(folder, tiny_unet(cross_attention_dim=384), tiny_vae(), small_scheduler(), tokenizer)
