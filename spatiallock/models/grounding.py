"""PoI: grounding tokens (one per object) and the gated Grounding-Attention block.

Grounding token = MLP(concat(phrase embedding, Fourier(box))). Empty object slots take learnable null
embeddings (zero-initialised) and are masked out of the attention, so padding never changes the output. One
null token (the MLP of the null embeddings) always stays in Grounding-Attention's keys: it is where a visual
token that lies in no box attends ("no object here"). Without it the softmax over a single object would give
every visual token the same value, and the block could not say where that object is.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from diffusers.models.attention import FeedForward, GatedSelfAttentionDense
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import get_fourier_embeds_from_boundingbox
from torch import nn

from spatiallock.errors import SpatialLockError
from spatiallock.geometry import box_coverage, level_grid
from spatiallock.layout import MAX_OBJECTS

# names of the zero-initialised gate parameters (Grounding-Attention and the GLIGEN baseline)
GATES = ("gate_attn", "gate_ff", "alpha_attn", "alpha_dense")


class GroundingTokens(NamedTuple):
    """What the U-Net's transformer blocks receive: one token per object slot and which slots are real.

    `cache`, when a dict, keeps what depends on the layout alone (box geometry per latent level, each block's
    keys and attention bias), computed at the first U-Net call and reused by every later one: a sampling call
    encodes its layouts once and passes the same `GroundingTokens` to every step.
    """

    tokens: torch.Tensor  # (B, N, context_dim)
    mask: torch.Tensor  # (B, N), 1.0 for a real object, 0.0 for an empty slot
    null: torch.Tensor  # (1, 1, context_dim), the null token: "no object here"
    boxes: torch.Tensor | None = None  # (B, N, 4) normalised xyxy, for box attention
    grid: tuple[int, int] | None = None  # (height, width) of the U-Net's input latent, for box attention
    cache: dict | None = None
    rows: slice | None = None  # the U-Net batch's rows this grounding is for; the rest pass every block unchanged

    def select(self, rows: slice | torch.Tensor) -> GroundingTokens:
        """The same grounding for a subset of the batch's rows (a cache of its own)."""
        boxes = None if self.boxes is None else self.boxes[rows]
        cache = None if self.cache is None else {}
        return self._replace(tokens=self.tokens[rows], mask=self.mask[rows], boxes=boxes, cache=cache, rows=None)

    def cached(self, key, compute):
        """`compute()`, kept under `key` when this grounding has a cache."""
        if self.cache is None:
            return compute()
        if key not in self.cache:
            self.cache[key] = compute()
        return self.cache[key]


def on_rows(block: nn.Module, hidden_states: torch.Tensor, objs: GroundingTokens) -> torch.Tensor:
    """`block` applied to the rows `objs.rows` of the batch only (the others unchanged): classifier-free guidance
    whose unconditional rows are the plain base's, at the cost of grounding the conditional rows alone."""
    out = hidden_states.clone()
    out[objs.rows] = block(hidden_states[objs.rows], objs._replace(rows=None))
    return out


class GroundingTokenizer(nn.Module):
    """Turns phrase embeddings and normalised xyxy boxes into grounding tokens.

    Args:
        phrase_dim: size of the text encoder's pooled phrase embedding.
        context_dim: size of the tokens (the U-Net's cross-attention dimension).
        fourier_freqs: Fourier frequencies per box coordinate (sin and cos each: 8 give 64 dims).
        hidden_dim: width of the MLP.
        max_objects: more object slots than this is an error, never a silent cut.
    """

    def __init__(
        self,
        phrase_dim: int,
        context_dim: int,
        fourier_freqs: int = 8,
        hidden_dim: int = 512,
        max_objects: int = MAX_OBJECTS,
    ):
        super().__init__()
        self.fourier_freqs = fourier_freqs
        self.max_objects = max_objects
        position_dim = fourier_freqs * 2 * 4
        self.mlp = nn.Sequential(
            nn.Linear(phrase_dim + position_dim, hidden_dim),
            nn.SiLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.SiLU(),
            nn.Linear(hidden_dim, context_dim),
        )
        self.null_phrase = nn.Parameter(torch.zeros(phrase_dim))
        self.null_position = nn.Parameter(torch.zeros(position_dim))

    def forward(self, phrase_embeds: torch.Tensor, boxes: torch.Tensor, masks: torch.Tensor) -> GroundingTokens:
        """phrase_embeds (B, N, phrase_dim), boxes (B, N, 4) xyxy in [0, 1], masks (B, N) -> GroundingTokens."""
        if boxes.shape[1] > self.max_objects:
            raise SpatialLockError(
                f"objects: {boxes.shape[1]} object slots given, at most {self.max_objects} are supported"
            )
        masks = masks.to(phrase_embeds.dtype)
        m = masks.unsqueeze(-1)
        position = get_fourier_embeds_from_boundingbox(self.fourier_freqs, boxes.to(phrase_embeds.dtype))
        # Empty slots take the null embeddings whatever their phrase or box holds.
        phrase = phrase_embeds * m + (1 - m) * self.null_phrase.to(phrase_embeds.dtype)
        position = position * m + (1 - m) * self.null_position.to(phrase_embeds.dtype)
        tokens = self.mlp(torch.cat([phrase, position], dim=-1))
        # computed in a batch of B rows like the tokens: a one-row matmul takes another kernel path, whose last bits
        # differ between a fresh and a reloaded adapter
        null = torch.cat([self.null_phrase, self.null_position]).to(phrase_embeds.dtype)
        null = self.mlp(null.expand(tokens.shape[0], 1, -1))[:1]
        return GroundingTokens(tokens, masks, null, boxes)


def slot_attention_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, N) slot mask -> (B, 1, 1 + N) additive attention bias over [null token, slots]: the null token always
    visible, empty slots hidden (a sample without any object attends to the null token alone)."""
    bias = torch.zeros(mask.shape[0], 1 + mask.shape[1], dtype=dtype, device=mask.device)
    bias[:, 1:].masked_fill_(mask < 0.5, torch.finfo(dtype).min)
    return bias.unsqueeze(1)


FOURIER_FREQS = 8


SHAPE_FREQS = 4  # Fourier frequencies per axis of a visual token's place inside a box
SHAPE_RANK = 16  # width of the learned (place in the box) x (object) attention term


def box_relative_positions(boxes: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
    """(B, N, 4) normalised xyxy boxes -> (B, rows * columns, N, 4 * SHAPE_FREQS): where each grid cell's centre
    lies inside each box (0 to 1 across it along x and along y), as sin and cos of pi * k * that for k = 1..F."""
    xs = (torch.arange(columns, device=boxes.device, dtype=boxes.dtype) + 0.5) / columns
    ys = (torch.arange(rows, device=boxes.device, dtype=boxes.dtype) + 0.5) / rows
    b = boxes[:, None, :, :]  # (B, 1, N, 4)
    u = (xs[:, None] - b[..., 0]) / (b[..., 2] - b[..., 0]).clamp(min=1e-4)  # (B, columns, N)
    v = (ys[:, None] - b[..., 1]) / (b[..., 3] - b[..., 1]).clamp(min=1e-4)  # (B, rows, N)
    uv = torch.stack(torch.broadcast_tensors(u[:, None], v[:, :, None]), dim=-1)  # (B, rows, columns, N, 2)
    angles = math.pi * uv[..., None] * torch.arange(1, SHAPE_FREQS + 1, device=boxes.device, dtype=boxes.dtype)
    features = torch.cat([angles.sin(), angles.cos()], dim=-1)  # (B, rows, columns, N, 2, 2F)
    return features.reshape(boxes.shape[0], rows * columns, boxes.shape[1], 4 * SHAPE_FREQS)


class BoxGeometry(NamedTuple):
    """The layout on one latent level, for box attention (fp32, shared by every block of that level)."""

    coverage: torch.Tensor  # (B, HW, N): share of each cell inside each real object's box (0 for empty slots)
    places: torch.Tensor  # (B, HW, N, 4 * SHAPE_FREQS): where each cell lies inside each box


def box_geometry(objs: GroundingTokens, tokens: int) -> BoxGeometry:
    """The `BoxGeometry` of the level with `tokens` visual tokens (once per level when `objs` has a cache)."""

    def compute() -> BoxGeometry:
        if objs.boxes is None or objs.grid is None:
            raise SpatialLockError("box attention: the grounding tokens carry no boxes or latent size")
        rows, columns = level_grid(tokens, objs.grid)
        boxes = objs.boxes.float()
        coverage = box_coverage(boxes, rows, columns) * (objs.mask[:, None, :] > 0.5)
        return BoxGeometry(coverage, box_relative_positions(boxes, rows, columns))

    return objs.cached(("box-geometry", tokens), compute)


def box_attention_bias(coverage: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, HW, N) coverage -> (B, HW, 1 + N) additive bias over [null token, slots] for box attention: log of the
    share of the visual token's cell inside each object's box, so a visual token attends only to the objects whose
    boxes cover it (and to the null token, always visible); empty slots stay hidden."""
    low = torch.finfo(dtype).min
    slots = torch.where(coverage > 0, coverage.clamp(min=1e-6).log(), torch.full_like(coverage, low))
    return torch.cat([torch.zeros_like(slots[..., :1]), slots], dim=-1).to(dtype)


def cell_embedding(tokens: int, like: torch.Tensor) -> torch.Tensor:
    """(1, HW, 64) Fourier embedding of each cell of a square grid of `tokens` cells, as a normalised xyxy box
    (the same embedding as the objects' boxes)."""
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise SpatialLockError(f"query positions: need a square token grid, got {tokens} tokens")
    edges = torch.arange(side + 1, device=like.device, dtype=like.dtype) / side
    y0, x0 = torch.meshgrid(edges[:-1], edges[:-1], indexing="ij")
    cells = torch.stack([x0, y0, x0 + 1 / side, y0 + 1 / side], dim=-1).reshape(1, tokens, 4)
    return get_fourier_embeds_from_boundingbox(FOURIER_FREQS, cells)


class GroundingAttention(nn.Module):
    """Gated cross-attention (visual tokens query the grounding tokens) plus a gated feed-forward.

    Both branches are scaled by tanh(gate) with gates initialised to zero, so a fresh block is the identity.
    The call signature matches diffusers' GLIGEN `fuser` slot of `BasicTransformerBlock`.

    `box_attention` (not in the paper): each visual token attends only to the objects whose boxes cover its cell,
    weighted by how much of the cell they cover (`box_attention_bias`), and to the null token. Where an object
    is then is given, not learned; what the block learns is what to write there. A learned term, zero at
    first, adds to each (visual token, object) logit a product of where the token lies inside the object's box
    and the object's token: the block can trace an object's outline (a circle leaves its box's corners to the
    null token) rather than fill its box.
    """

    def __init__(
        self,
        query_dim: int,
        context_dim: int,
        heads: int,
        dim_head: int,
        query_positions: bool = False,
        box_attention: bool = False,
        feed_forward: bool = True,
    ):
        super().__init__()
        self.box_attention = box_attention
        self.heads = heads
        # optional (not in the paper): the Fourier embedding of each visual token's own cell added to its query,
        # so that "this cell lies in that box" is a dot product away even where the U-Net's features carry little
        # absolute position (small U-Nets, very noisy latents); zero-initialised
        self.query_position = None
        if query_positions:
            self.query_position = nn.Linear(FOURIER_FREQS * 2 * 4, query_dim)
            nn.init.zeros_(self.query_position.weight)
            nn.init.zeros_(self.query_position.bias)
        if box_attention:
            self.shape_place = nn.Linear(4 * SHAPE_FREQS, SHAPE_RANK, bias=False)
            self.shape_object = nn.Linear(context_dim, SHAPE_RANK, bias=False)
            nn.init.zeros_(self.shape_object.weight)
        self.norm1 = nn.LayerNorm(query_dim)
        self.attn = Attention(query_dim=query_dim, cross_attention_dim=context_dim, heads=heads, dim_head=dim_head)
        self.gate_attn = nn.Parameter(torch.tensor(0.0))
        # the gated feed-forward (the paper's block); a lean block goes without it (`feed_forward=False`)
        self.norm2 = self.ff = self.gate_ff = None
        if feed_forward:
            self.norm2 = nn.LayerNorm(query_dim)
            self.ff = FeedForward(query_dim, activation_fn="geglu")
            self.gate_ff = nn.Parameter(torch.tensor(0.0))
        self.enabled = True

    def keys_and_bias(self, objs: GroundingTokens, tokens: int, dtype: torch.dtype):
        """This block's keys (B, 1 + N, D): the null token, then the grounding tokens; and its attention bias over
        them: (B, HW, 1 + N) with box attention, else (B, 1, 1 + N). They depend on the layout alone."""
        keys = torch.cat([objs.null.expand(objs.tokens.shape[0], 1, -1), objs.tokens], dim=1)
        if not self.box_attention:  # the same for every visual token
            return keys, slot_attention_bias(objs.mask, dtype)
        geometry = box_geometry(objs, tokens)
        bias = box_attention_bias(geometry.coverage, dtype)
        place = self.shape_place(geometry.places.to(self.shape_place.weight.dtype))  # (B, HW, N, R)
        shape = torch.einsum("bqnr,bnr->bqn", place, self.shape_object(objs.tokens))  # (B, HW, N)
        return keys, torch.cat([bias[..., :1], bias[..., 1:] + shape.to(bias.dtype)], dim=-1)

    def keys_values_and_bias(self, objs: GroundingTokens, tokens: int, dtype: torch.dtype):
        """`keys_and_bias` with the keys projected: per-head keys and values (B, heads, 1 + N, d) and the bias as
        (B, 1, HW or 1, 1 + N). All depend on the layout alone, so a sampling call computes them once per block."""
        keys, bias = self.keys_and_bias(objs, tokens, dtype)
        keys = keys.to(dtype)
        split = lambda x: x.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # noqa: E731
        return split(self.attn.to_k(keys)), split(self.attn.to_v(keys)), bias.unsqueeze(1)

    def forward(self, hidden_states: torch.Tensor, objs: GroundingTokens) -> torch.Tensor:
        if not self.enabled:
            return hidden_states
        if objs.rows is not None:
            return on_rows(self, hidden_states, objs)
        # 1. gated cross-attention: (B, HW, C) queries over (B, 1 + N, D) keys: the null token, always present,
        #    where a visual token outside every box can attend, and the grounding tokens. The keys' projections
        #    and the bias come from the call's cache; the same computation as diffusers' attention processor
        #    (scaled dot product, then `to_out`), without its per-call reshaping of the mask.
        tokens, dtype = hidden_states.shape[1], hidden_states.dtype
        key, value, bias = objs.cached(
            (id(self), tokens, dtype), lambda: self.keys_values_and_bias(objs, tokens, dtype)
        )
        queries = self.norm1(hidden_states)
        if self.query_position is not None:
            queries = queries + self.query_position(cell_embedding(tokens, queries))
        query = self.attn.to_q(queries).unflatten(-1, (self.heads, -1)).transpose(1, 2)
        attn = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, scale=self.attn.scale)
        attn = self.attn.to_out[0](attn.transpose(1, 2).flatten(2))
        hidden_states = hidden_states + self.gate_attn.tanh() * attn
        if self.ff is None:
            return hidden_states
        # 2. gated feed-forward
        return hidden_states + self.gate_ff.tanh() * self.ff(self.norm2(hidden_states))


class GatedSelfAttention(GatedSelfAttentionDense):
    """The GLIGEN baseline: gated self-attention over concat(visual tokens, grounding tokens), then a gated
    feed-forward (diffusers' layer and weights).

    One change from GLIGEN, which always pads to 30 slots and lets the null tokens take part: empty slots are
    hidden from the attention as in `GroundingAttention`, so that the output does not depend on how many
    slots a layout was padded to (training pads to 30, a sampling batch to its longest layout).
    """

    def forward(self, x: torch.Tensor, objs: GroundingTokens) -> torch.Tensor:
        if not self.enabled:
            return x
        if objs.rows is not None:
            return on_rows(self, x, objs)
        # 1. gated self-attention: (B, HW + N, C) tokens; every token may attend to all visual tokens and to
        #    the real objects' tokens only (a layout without objects: to the visual tokens alone)
        n_visual = x.shape[1]
        tokens = torch.cat([x, self.linear(objs.tokens)], dim=1)
        bias = torch.zeros(x.shape[0], 1, tokens.shape[1], dtype=x.dtype, device=x.device)
        bias[:, :, n_visual:].masked_fill_(objs.mask[:, None] < 0.5, torch.finfo(x.dtype).min)
        attn = self.attn(self.norm1(tokens), attention_mask=bias)[:, :n_visual]
        x = x + self.alpha_attn.tanh() * attn
        # 2. gated feed-forward
        return x + self.alpha_dense.tanh() * self.ff(self.norm2(x))
