"""Training-free layout control by cross-attention guidance (Chen et al. 2023, used with seed 002's initialisation).

During the first sampling steps the latents are moved down the gradient of a loss that asks each object's
label tokens to attend inside the object's box, in a few cross-attention layers of the U-Net:

    loss(object) = mean over layers, heads and label tokens of (1 - sum(attention in box) / sum(attention))^2

averaged over the image's objects. It needs neither training nor an adapter; with one, the adapter's U-Net
call is the one guided. Only the conditional branch (caption, and grounding when attached) is run for it.

Pieces: `label_positions` / `caption_targets` find each label's tokens in the caption (adding labels the
caption lacks, or refusing); `AttentionStore` keeps the attention probabilities of chosen layers while open;
`layout_loss` is the loss above; `LayoutGuidance` ties them to the pipeline's sampling loop.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from diffusers.models.attention_processor import Attention
from torch import nn

from spatiallock.errors import SpatialLockError
from spatiallock.geometry import box_coverage, level_grid
from spatiallock.layout import Layout, quoted
from spatiallock.models.injection import attention_stages
from spatiallock.pipelines.extensions.base import Extension

logger = logging.getLogger(__name__)

MISSING_LABELS = ("add", "error")


# ---- which tokens belong to which object ---------------------------------------------------------------------


def _find(sequence: list[int], part: list[int]) -> list[int]:
    """Start positions of `part` inside `sequence`."""
    n = len(part)
    return [i for i in range(len(sequence) - n + 1) if n and sequence[i : i + n] == part]


def caption_token_ids(tokenizer, caption: str, max_length: int) -> list[int]:
    """The caption's token ids as the text encoder sees them (special tokens included, truncated, unpadded)."""
    max_length = min(max_length, tokenizer.model_max_length)
    return tokenizer(caption, max_length=max_length, truncation=True).input_ids


def plural(label: str) -> str:
    """The label with its last word in the plural ("red circle" -> "red circles", "box" -> "boxes")."""
    return label + ("es" if label.endswith(("s", "x", "z", "ch", "sh")) else "s")


def label_positions(tokenizer, caption: str, label: str, max_length: int) -> list[list[int]]:
    """Every occurrence of `label`'s token ids (or of its plural's: "two red squares") in the tokenized caption,
    each as its token positions, in caption order.

    Works for CLIP's BPE and BERT's WordPiece alike: both tokenize a word the same way inside a caption as alone
    (both lowercase; punctuation is split off), so the label's ids form a subsequence of the caption's.
    """
    ids = caption_token_ids(tokenizer, caption, max_length)
    found = {}
    for form in (label, plural(label)):
        part = tokenizer(form, add_special_tokens=False).input_ids
        for start in _find(ids, part):
            found.setdefault(start, list(range(start, start + len(part))))
    return [found[start] for start in sorted(found)]


def _with_label(caption: str, label: str) -> str:
    article = "an" if label[:1].lower() in "aeiou" else "a"
    caption = caption.strip().rstrip(".")
    return f"{caption}, {article} {label}" if caption else f"{article} {label}"


def caption_targets(
    layouts: Sequence[Layout], tokenizer, max_length: int, missing: str = "add"
) -> tuple[list[Layout], list[list[list[int]]]]:
    """Layouts whose captions name every label, and each object's token positions in its caption.

    A label that does not occur in the caption (nor in the plural) is appended to it (", a green triangle") and
    reported by a warning, or, with `missing="error"`, refused with a `SpatialLockError` naming it. A label that
    cannot be appended within `max_length` tokens is reported by a warning and its objects get no tokens
    (no guidance). The n-th object of a
    label takes the n-th occurrence of the label when the caption has as many, else all of them.

    Returns the layouts (captions completed) and positions[b][n] = token positions of object n of layout b.
    """
    if missing not in MISSING_LABELS:
        raise SpatialLockError(f"missing_labels: one of {', '.join(MISSING_LABELS)}, got {missing!r}")
    completed, positions = [], []
    for b, layout in enumerate(layouts):
        caption = layout.caption
        for label in dict.fromkeys(layout.labels):
            if label_positions(tokenizer, caption, label, max_length):
                continue
            if missing == "error":
                raise SpatialLockError(
                    f"layouts[{b}]: label {quoted(label)} does not occur in the caption {quoted(caption)} "
                    f"(within its first {max_length} tokens); name it in the caption or let it be added"
                )
            longer = _with_label(caption, label)
            if not label_positions(tokenizer, longer, label, max_length):
                logger.warning(
                    "layout guidance: label %r is not in layouts[%d]'s caption and cannot be added within its %d "
                    "tokens: its objects get no attention guidance",
                    label, b, max_length,
                )  # fmt: skip
                continue
            caption = longer
            logger.warning("layout guidance: label %r is not in the caption; added: %r", label, caption)
        if caption != layout.caption:
            layout = replace(layout, caption=caption)
        found = {label: label_positions(tokenizer, caption, label, max_length) for label in set(layout.labels)}
        seen: dict[str, int] = {}
        objects = []
        for label in layout.labels:
            k, occurrences = seen.get(label, 0), found[label]
            seen[label] = k + 1
            if layout.labels.count(label) <= len(occurrences):
                objects.append(occurrences[k])
            else:
                objects.append(sorted({p for occurrence in occurrences for p in occurrence}))
        completed.append(layout)
        positions.append(objects)
    return completed, positions


# ---- which layers, and their attention ---------------------------------------------------------------------


def cross_attention_names(unet: nn.Module) -> list[str]:
    """Names of the U-Net's cross-attention modules (`...transformer_blocks.<k>.attn2`), in forward order."""
    modules = unet.named_modules()
    return [name for name, module in modules if isinstance(module, Attention) and module.is_cross_attention]


def guidance_layers(unet: nn.Module, layers: str | Sequence[str] | None = None) -> list[str]:
    """The cross-attention modules to guide: by default those of the mid block and of the first up-sampling stage
    with attention (Chen et al.'s choice; SD v1.x: 8x8 and 16x16 maps). A U-Net without mid-block attention uses
    the first up stage alone; one without attention in either, its last down stage.

    `layers`: names (or a comma-separated string) of attention modules or of blocks holding them, e.g.
    "mid_block" or "up_blocks.1.attentions.0"; each selects every cross-attention module inside it.
    """
    available = cross_attention_names(unet)
    if layers is None:
        stages = attention_stages(unet)
        chosen = stages["mid"][:1] + stages["up"][:1] or stages["down"][-1:]
        layers = [name for stage in chosen for name in stage]
        if not layers:
            raise SpatialLockError("layout guidance: this U-Net has no cross-attention to guide")
    elif isinstance(layers, str):
        layers = [name.strip() for name in layers.split(",") if name.strip()]
    selected: list[str] = []
    for layer in layers:
        inside = [name for name in available if name == layer or name.startswith(layer.rstrip(".") + ".")]
        if not inside:
            examples = ", ".join(sorted({name.rsplit(".transformer_blocks", 1)[0] for name in available})[:6])
            raise SpatialLockError(
                f"layout guidance layers: {layer!r} holds no cross-attention module of this U-Net (try {examples})"
            )
        selected += [name for name in inside if name not in selected]
    return selected


class _StoringProcessor:
    """Wraps an attention processor: the output is the wrapped one's; the attention probabilities are computed
    again as diffusers' `AttnProcessor` does (SDPA processors do not expose them) and kept in `maps[name]`."""

    def __init__(self, wrapped, maps: dict[str, torch.Tensor], name: str):
        self.wrapped, self.maps, self.name = wrapped, maps, name

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        output = self.wrapped(attn, hidden_states, encoder_hidden_states, attention_mask, temb=temb)
        context = encoder_hidden_states
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        batch, tokens = context.shape[:2]
        mask = attn.prepare_attention_mask(attention_mask, tokens, batch)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(context))
        probs = attn.get_attention_scores(query, key, mask)  # (B * heads, HW, L)
        self.maps[self.name] = probs.unflatten(0, (batch, attn.heads))  # (B, heads, HW, L)
        return output


class AttentionStore:
    """While open (`with`), the named cross-attention modules keep their attention probabilities in `maps`
    (name -> (B, heads, HW, L)); on exit their own processors are back in place."""

    def __init__(self, unet: nn.Module, names: Sequence[str]):
        self.modules = {name: unet.get_submodule(name) for name in names}
        self.maps: dict[str, torch.Tensor] = {}
        self._saved: dict[str, object] = {}

    def __enter__(self) -> AttentionStore:
        for name, module in self.modules.items():
            self._saved[name] = module.processor
            module.set_processor(_StoringProcessor(module.processor, self.maps, name))
        return self

    def __exit__(self, *exc) -> None:
        for name, module in self.modules.items():
            module.set_processor(self._saved[name])
        self._saved.clear()


# ---- the loss ------------------------------------------------------------------------------------------------


def layout_loss(
    maps: Sequence[torch.Tensor],
    positions: Sequence[Sequence[Sequence[int]]],
    boxes: Sequence[Sequence[Sequence[float]]],
    latent_size: tuple[int, int],
) -> torch.Tensor:
    """Per-image guidance loss (B,): for each object, (1 - attention in box / all attention)^2, averaged over
    heads and the object's tokens, then over layers and objects (0 for an image without objects).

    Args:
        maps: per layer, attention probabilities (B, heads, HW, L).
        positions: positions[b][n], the caption token positions of object n of image b.
        boxes: boxes[b][n], its normalised xyxy box.
        latent_size: (h, w) of the latents the maps come from.
    """
    batch = maps[0].shape[0]
    losses = []
    for b in range(batch):
        per_object = []
        for tokens, box in zip(positions[b], boxes[b]):
            if not tokens:  # a label the caption could not hold: not guided
                continue
            per_layer = []
            for attention in maps:
                attention = attention[b, :, :, list(tokens)].float()  # (heads, HW, T)
                rows, columns = level_grid(attention.shape[1], latent_size)
                mask = box_coverage(torch.tensor([[box]], device=attention.device), rows, columns).flatten()
                inside = (attention * mask[:, None]).sum(1) / attention.sum(1).clamp(min=1e-12)  # (heads, T)
                per_layer.append(((1 - inside) ** 2).mean())
            per_object.append(torch.stack(per_layer).mean())
        losses.append(torch.stack(per_object).mean() if per_object else maps[0].new_zeros((), dtype=torch.float32))
    return torch.stack(losses)


# ---- in the sampling loop ------------------------------------------------------------------------------------


@dataclass
class LayoutGuidance:
    """Cross-attention guidance for one batch of layouts.

    `steps`: guided sampling steps, from the first; `scale`: step size of the first, decaying linearly to
    scale / steps at the last guided step (so guidance fades out rather than stopping abruptly);
    `iterations`: gradient updates per guided step; `layers`: cross-attention module names.
    """

    positions: list[list[list[int]]]
    boxes: list[list[tuple[float, float, float, float]]]
    layers: list[str]
    steps: int
    scale: float = 20.0
    iterations: int = 3

    def step_size(self, step: int) -> float:
        return self.scale * (1.0 - step / self.steps)

    def loss(self, pipe, latents, t, states, caption_mask, grounding, added=None) -> torch.Tensor:
        """Per-image loss (B,) of one conditional U-Net call on `latents` (the graph kept for a gradient)."""
        with AttentionStore(pipe.unet, self.layers) as store:
            pipe.predict(pipe.scheduler.scale_model_input(latents, t), t, states, caption_mask, grounding, added)
        return layout_loss([store.maps[name] for name in self.layers], self.positions, self.boxes, latents.shape[-2:])

    def repeated(self, times: int) -> LayoutGuidance:
        """The same guidance for a batch with each image repeated `times` times in a row (candidates)."""
        positions = [p for p in self.positions for _ in range(times)]
        return replace(self, positions=positions, boxes=[b for b in self.boxes for _ in range(times)])

    def update(self, pipe, latents, t, step: int, states, caption_mask=None, grounding=None, added=None):
        """The latents after `iterations` gradient steps on the loss; `states` etc. are the conditional branch's
        (`added`: the base's extra U-Net inputs of those rows, SDXL's)."""
        size = self.step_size(step)
        if not any(tokens for image in self.positions for tokens in image):  # no object with tokens: nothing to do
            return latents
        for _ in range(self.iterations):
            with torch.enable_grad():
                x = latents.detach().requires_grad_(True)
                loss = self.loss(pipe, x, t, states, caption_mask, grounding, added).sum()  # images move independently
                (grad,) = torch.autograd.grad(loss, x)
            latents = (x - size * grad).detach()
        return latents


def make_layout_guidance(
    pipe,
    layouts: Sequence[Layout],
    steps: int,
    scale: float,
    iterations: int,
    layers: str | Sequence[str] | None = None,
    missing_labels: str = "add",
) -> tuple[LayoutGuidance, list[Layout]]:
    """Check the options, find the label tokens and layers; returns the guidance and the layouts with their
    completed captions (those the pipeline must encode)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise SpatialLockError(f"layout_guidance_steps: a whole number of steps, 0 or more, got {steps!r}")
    if not (isinstance(iterations, int) and iterations >= 1):
        raise SpatialLockError(f"layout_guidance_iterations: at least 1, got {iterations!r}")
    if not (math.isfinite(scale) and scale >= 0):
        raise SpatialLockError(f"layout_guidance_scale: a step size, 0 or more, got {scale!r}")
    layouts, positions = caption_targets(layouts, pipe.tokenizer, pipe.caption_tokens, missing_labels)
    boxes = [list(layout.boxes) for layout in layouts]
    guidance = LayoutGuidance(positions, boxes, guidance_layers(pipe.unet, layers), steps, scale, iterations)
    return guidance, layouts


class LayoutGuidanceExtension(Extension):
    """Cross-attention layout guidance in the sampling loop: for the first `layout_guidance_steps` steps the latents
    follow the gradient of `layout_loss` (`LayoutGuidance.update`) before the U-Net call, on the conditional rows.
    It completes captions that lack a label first (`missing_labels`), so the completed captions are encoded."""

    arguments = {
        "layout_guidance_steps": 0, "layout_guidance_scale": 20.0, "layout_guidance_iterations": 3,
        "layout_guidance_layers": None, "missing_labels": "add",
    }  # fmt: skip

    def __init__(self, values: dict):
        self.values = values
        self.guidance: LayoutGuidance | None = None
        self.per_rows: dict[int, LayoutGuidance] = {}

    @classmethod
    def from_call(cls, pipe, values, layouts):
        return cls({name: values[name] for name in cls.arguments}) if values["layout_guidance_steps"] else None

    @classmethod
    def check_options(cls, pipe, options, layouts) -> None:
        if options.layout_guidance_steps:
            guidance_layers(pipe.unet, options.layout_guidance_layers)
            if options.missing_labels == "error":
                caption_targets(layouts, pipe.tokenizer, pipe.caption_tokens, "error")

    def prepare(self, pipe, call) -> None:
        v = self.values
        self.guidance, call.layouts = make_layout_guidance(
            pipe, call.layouts, v["layout_guidance_steps"], v["layout_guidance_scale"],
            v["layout_guidance_iterations"], v["layout_guidance_layers"], v["missing_labels"],
        )  # fmt: skip
        call.rows = list(call.layouts)

    def before_step(self, pipe, call, i: int, t) -> None:
        if i >= self.guidance.steps:
            return
        times = len(call.rows) // len(call.layouts)  # several rows per image until an extension keeps one
        if times not in self.per_rows:
            self.per_rows[times] = self.guidance if times == 1 else self.guidance.repeated(times)
        c = call.conditioning
        guidance = self.per_rows[times]
        call.latents = guidance.update(
            pipe, call.latents, t, i, c.cond_states, c.cond_mask, call.grounding_at(i), c.cond_added
        )
