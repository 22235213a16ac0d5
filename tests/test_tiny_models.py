"""The tiny bases of helpers.py load like the real ones and read the synthetic captions."""

from __future__ import annotations

import re

from helpers import LATENT_SIZE, TEXT_DIM

from spatiallock.base.folders import load_base
from spatiallock.base.text import encode_captions, encode_phrases
from spatiallock.data.synth import SynthConfig, render_record


def test_tiny_sd_loads_as_stable_diffusion_and_reads_every_caption_word_as_one_token(tiny_sd):
    base = load_base(tiny_sd)
    assert type(base.text_encoder).__name__ == "CLIPTextModel" and not base.uses_caption_mask
    assert base.caption_tokens == 77 and base.unet.config.cross_attention_dim == TEXT_DIM
    assert base.unet.config.sample_size == LATENT_SIZE and base.scheduler.config.prediction_type == "epsilon"
    tokenizer = base.tokenizer
    captions = [text for i in range(40) for text in render_record(0, "train", i, SynthConfig(size=32))[1]["captions"]]
    for caption in captions:
        ids = tokenizer(caption).input_ids
        words = re.findall(r"[a-z]+|[^a-z ]", caption)  # CLIP splits punctuation off words
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        assert len(ids) == len(words) + 2, (caption, tokenizer.convert_ids_to_tokens(ids))
        assert tokenizer.unk_token_id not in ids[1:-1]  # no word fell back to the unknown token
    states, mask = encode_captions(base.text_encoder, tokenizer, captions[:3], base.caption_tokens)
    assert states.shape == (3, 77, TEXT_DIM) and mask.shape == (3, 77)
    assert encode_phrases(base.text_encoder, tokenizer, ["red circle", "blue squares"]).shape == (2, TEXT_DIM)


def test_tiny_small_base_loads_with_minilm(tiny_small_base):
    base = load_base(tiny_small_base)
    assert type(base.text_encoder).__name__ == "BertModel" and base.uses_caption_mask
    assert base.caption_tokens == 32 and base.unet.config.cross_attention_dim == 384
    assert base.scheduler.config.prediction_type == "v_prediction"
