"""The trainable part of SpatialLock, as one diffusers model: grounding tokens, the injected attention blocks,
the PoG perception head and the loss weights. The frozen base U-Net is passed in, never owned or saved.

Variants (the paper's Table 2 plus the baseline):
- `spatiallock`: Grounding-Attention in two blocks + PoG with Enh-Fusion
- `poi`: Grounding-Attention only
- `poi-pog`: Grounding-Attention + PoG without Enh-Fusion
- `gligen`: GLIGEN-style gated self-attention in every transformer block, no PoG
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from spatiallock.errors import SpatialLockError
from spatiallock.models.grounding import (
    MAX_OBJECTS,
    GatedSelfAttention,
    GroundingAttention,
    GroundingTokenizer,
    GroundingTokens,
)
from spatiallock.models.injection import (
    PRESETS,
    attach_fusers,
    count_parameters,
    detach_fusers,
    first_blocks_of,
    grounding_kwargs,
    plain_dims,
    plain_resnets,
    resolve_positions,
    transformer_blocks,
)
from spatiallock.models.injection import block_dims as dims_of
from spatiallock.models.perception import (
    PERCEPTION_INPUTS,
    DownBlockTap,
    LossWeighting,
    PerceptionHead,
    predicted_clean,
    rendered_features,
)

# variant -> (attention kind, perception head, Enh-Fusion)
VARIANTS = {
    "spatiallock": ("grounding", True, True),
    "poi": ("grounding", False, False),
    "poi-pog": ("grounding", True, False),
    "gligen": ("gated-self", False, False),
}


# the adapter config's `feed_forward`: in every block, in none, or at the finest level only
FEED_FORWARD = (True, False, "finest")
# a placement of every transformer block (the GLIGEN baseline's)
EVERY = "every"
# the config keys that make an adapter's recipe, apart from the base it is sized for (`SpatialLockAdapter.like`)
RECIPE = (
    "variant", "fourier_freqs", "hidden_dim", "max_objects", "query_positions", "box_attention", "feed_forward",
    "attention_width", "loss_weighting", "loss_weights", "enh_grid", "enh_layers", "enh_heads", "anchor_scale",
    "grounding_steps", "ground_unconditional", "perception_input", "first_blocks", "ground_plain_levels",
)  # fmt: skip


def placement_of(blocks: Sequence[str], unet: nn.Module) -> str | list[str]:
    """The placement that gives `blocks` on `unet`: `every`, the preset naming exactly them, else the attention
    modules that hold them."""
    if list(blocks) == [name for name, _ in transformer_blocks(unet)]:
        return EVERY
    for preset in PRESETS:
        try:
            if [name for name, _ in transformer_blocks(unet, resolve_positions(unet, preset))] == list(blocks):
                return preset
        except SpatialLockError:
            continue
    return list(dict.fromkeys(name.rsplit(".transformer_blocks.", 1)[0] for name in blocks))


def narrowed(head_size: int, share: float) -> int:
    """The head size of an attention `share` as wide as one with heads of `head_size` (at least 1)."""
    return max(1, round(head_size * share))


@dataclass
class AdapterOutput:
    """U-Net prediction with grounding; the perception losses and the training loss when asked for."""

    sample: torch.Tensor
    perception_losses: dict[str, torch.Tensor] | None = None
    loss: torch.Tensor | None = None
    losses: dict[str, torch.Tensor] | None = None


class SpatialLockAdapter(ModelMixin, ConfigMixin):
    """Everything SpatialLock trains; attach it to a frozen `UNet2DConditionModel` with `attach(unet)`.

    Build one for a given base with `SpatialLockAdapter.from_unet(unet, variant=...)`; the config records
    the blocks and widths it was built for, so `attach` can refuse a base it does not fit.

    Args:
        variant: one of `VARIANTS`.
        phrase_dim: size of the text encoder's pooled phrase embedding.
        context_dim: the base U-Net's cross-attention dimension (grounding token size).
        blocks: transformer block names (`...attentions.i.transformer_blocks.j`) that get an attention block.
        block_dims: (width, heads, head size) of each block.
        num_classes: object categories for the perception head.
        feature_channels: channels of each U-Net down block (perception input).
        loss_weighting: `learned` (uncertainty weighting) or `fixed` with `loss_weights` (diffusion, perception).
        query_positions: add each visual token's cell position (Fourier) to its Grounding-Attention query; an
            option beyond the paper, for bases whose features carry little absolute position.
        box_attention: each visual token attends only to the objects whose boxes cover it (and the null token);
            an option beyond the paper: placement is given to the attention instead of learned by it.
        feed_forward: which Grounding-Attention blocks keep the paper's gated feed-forward after their attention:
            True (all, the paper's), False (none: lean blocks, their gated attention alone) or `finest` (only the
            blocks at the finest latent level, the narrowest ones). On Stable Diffusion v1 the feed-forward holds
            six of every seven of a block's parameters, and the wide inner blocks hold most of them.
        attention_width: the inner width of each block's attention as a share of the block's width (heads kept,
            each head narrower): 1.0 is the paper's, 0.5 halves every head.
        positions: the placement `blocks` came from (a preset, attention module names, or `every` transformer
            block), so that the same recipe can be built on another base (`like`); None where not recorded.
        grounding_steps: the share of the sampling steps, from the first, that this adapter grounds when a caller
            does not say (GLIGEN's scheduled sampling: the layout is settled in the first, noisiest steps; after
            them the base runs alone, at its own speed). 1.0, every step, unless the adapter was trained or
            shipped with another share.
        first_blocks: with it, the placement keeps only the first `first_blocks` transformer blocks of each
            attention module it names (SDXL stacks up to ten in one module); None: every block of them.
        ground_unconditional: whether classifier-free guidance's unconditional rows go through this adapter with
            null grounding (True) or are the plain base's (False: the adapter runs on the conditional rows alone,
            at half the cost), when a caller does not say.
        class_names: the names of the perception head's classes, in the order of its class indices (the
            training data's categories): what candidate selection scores a layout's labels by. None where not
            recorded.
        ground_plain_levels: also ground the plain levels finer than every level with attention (a U-Net that
            spares attention at its finest latent level, for speed): a Grounding-Attention block on the output of
            each of their resnets (`plain_resnets`), with box attention when `box_attention`. An option beyond the
            paper: there the objects' outlines are drawn, and without it that level sees the layout only through the
            coarser levels' features. Its blocks keep the feed-forward unless `feed_forward` is False.
        plain_blocks, plain_block_dims: the resnets so grounded and (width, heads, head size) of their blocks.
        perception_input: what the PoG head reads (`PERCEPTION_INPUTS`): `grounded`, the paper's, the down-block
            features of the grounded U-Net call on the noisy latents (which also carry the requested layout, so
            the head can find the objects asked for whether or not they are drawn), or `rendered`, the
            down-block features of the U-Net without grounding on the clean latents implied by the adapter's
            prediction (only what was drawn). Training and sampling (selection, perception guidance) both read it.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        variant: str = "spatiallock",
        phrase_dim: int = 768,
        context_dim: int = 768,
        blocks: Sequence[str] = (),
        block_dims: Sequence[Sequence[int]] = (),
        num_classes: int = 80,
        feature_channels: Sequence[int] = (),
        fpn_channels: int = 256,
        enh_grid: int = 8,
        enh_layers: int = 2,
        enh_heads: int = 8,
        anchor_scale: float = 6.0,
        loss_weighting: str = "learned",
        loss_weights: Sequence[float] = (1.0, 1.0),
        fourier_freqs: int = 8,
        hidden_dim: int = 512,
        max_objects: int = MAX_OBJECTS,
        query_positions: bool = False,
        box_attention: bool = False,
        feed_forward: bool | str = True,
        attention_width: float = 1.0,
        positions: str | Sequence[str] | None = None,
        grounding_steps: float = 1.0,
        ground_unconditional: bool = True,
        class_names: Sequence[str] | None = None,
        perception_input: str = "grounded",
        first_blocks: int | None = None,
        ground_plain_levels: bool = False,
        plain_blocks: Sequence[str] = (),
        plain_block_dims: Sequence[Sequence[int]] = (),
    ):
        super().__init__()
        if perception_input not in PERCEPTION_INPUTS:
            raise SpatialLockError(
                f"perception input: one of {', '.join(PERCEPTION_INPUTS)}, got {perception_input!r}"
            )
        if variant not in VARIANTS:
            raise SpatialLockError(f"variant: {variant!r} is not one of {', '.join(VARIANTS)}")
        if len(blocks) != len(block_dims) or not blocks:
            raise SpatialLockError("adapter config: `blocks` and `block_dims` must be non-empty and of equal length")
        attention, perception, enh_fusion = VARIANTS[variant]
        lean = (
            ("query positions", query_positions),
            ("box attention", box_attention),
            ("feed-forward", feed_forward is not True),
            ("attention width", attention_width != 1.0),
            ("ground plain levels", ground_plain_levels),
        )
        for name, wanted in lean:
            if wanted and attention != "grounding":
                raise SpatialLockError(f"{name}: only for Grounding-Attention variants, not {variant!r}")
        if len(plain_blocks) != len(plain_block_dims) or bool(plain_blocks) != bool(ground_plain_levels):
            raise SpatialLockError(
                "adapter config: `plain_blocks` and `plain_block_dims` of equal length, non-empty exactly when "
                "`ground_plain_levels`"
            )
        if class_names is not None and len(class_names) != num_classes:
            raise SpatialLockError(f"class names: {len(class_names)} names for {num_classes} classes")
        if feed_forward not in FEED_FORWARD:
            raise SpatialLockError(f"feed-forward: True, False or 'finest', got {feed_forward!r}")
        if not 0 <= grounding_steps <= 1:  # nan fails too
            raise SpatialLockError(f"grounding steps: a share of the sampling steps in [0, 1], got {grounding_steps}")
        if not 0 < attention_width <= 1:
            raise SpatialLockError(f"attention width: a share of the block's width in (0, 1], got {attention_width}")
        self.tokenizer = GroundingTokenizer(phrase_dim, context_dim, fourier_freqs, hidden_dim, max_objects)
        if attention == "grounding":
            finest = min(width for width, *_ in block_dims)  # the narrowest blocks sit at the finest latent level
            self.fusers = nn.ModuleList(
                GroundingAttention(
                    width, context_dim, heads, narrowed(head, attention_width), query_positions, box_attention,
                    feed_forward is True or feed_forward == "finest" and width == finest,
                )
                for width, heads, head in block_dims
            )  # fmt: skip
        else:
            self.fusers = nn.ModuleList(
                GatedSelfAttention(width, context_dim, heads, head) for width, heads, head in block_dims
            )
        self.plain_fusers = nn.ModuleList(
            GroundingAttention(
                width, context_dim, heads, narrowed(head, attention_width), query_positions, box_attention,
                feed_forward is not False,
            )
            for width, heads, head in plain_block_dims
        )  # fmt: skip
        self.perception = None
        if perception:
            self.perception = PerceptionHead(
                feature_channels, num_classes, fpn_channels, enh_fusion, enh_grid, enh_layers, enh_heads, anchor_scale
            )
        if perception:
            self.weighting = LossWeighting(["diffusion", "perception"], loss_weighting, loss_weights)
        else:  # a single loss needs no weighting
            self.weighting = LossWeighting(["diffusion"], "fixed", [1.0])

    @classmethod
    def from_unet(
        cls,
        unet: nn.Module,
        variant: str = "spatiallock",
        positions: str | Sequence[str] | None = None,
        phrase_dim: int = 768,
        num_classes: int = 80,
        **kwargs,
    ) -> SpatialLockAdapter:
        """A fresh adapter (gates at zero) sized for `unet`.

        `positions`: a preset or attention module names (see `resolve_positions`); None means the paper's
        default for SpatialLock variants and every transformer block for `gligen`. The perception head's
        `fpn_channels` default to the U-Net's first-stage width, at most 256.
        """
        if variant not in VARIANTS:
            raise SpatialLockError(f"variant: {variant!r} is not one of {', '.join(VARIANTS)}")
        # the PoG pyramid is as wide as the U-Net's first stage, at most the paper's 256 (SD v1: 256)
        kwargs.setdefault("fpn_channels", min(256, unet.config.block_out_channels[0]))
        if positions in (None, EVERY) and variant == "gligen" or positions == EVERY:
            chosen, positions = transformer_blocks(unet), EVERY
        else:
            positions = positions or "default"
            chosen = transformer_blocks(unet, resolve_positions(unet, positions))
            if not isinstance(positions, str) or positions not in PRESETS:
                positions = resolve_positions(unet, positions)
        chosen = first_blocks_of(chosen, kwargs.get("first_blocks"))
        plain = plain_resnets(unet) if kwargs.get("ground_plain_levels") else []
        if kwargs.get("ground_plain_levels") and not plain:
            raise SpatialLockError(
                "ground plain levels: this U-Net has no level without attention finer than its levels with attention"
            )
        return cls(
            variant=variant,
            phrase_dim=phrase_dim,
            context_dim=unet.config.cross_attention_dim,
            blocks=[name for name, _ in chosen],
            block_dims=[list(dims_of(block)) for _, block in chosen],
            num_classes=num_classes,
            feature_channels=[block.resnets[-1].out_channels for block in unet.down_blocks],
            positions=positions,
            plain_blocks=[name for name, _ in plain],
            plain_block_dims=[list(plain_dims(resnet)) for _, resnet in plain],
            **kwargs,
        )

    @classmethod
    def like(
        cls,
        config: dict,
        unet: nn.Module,
        phrase_dim: int,
        num_classes: int,
        built_for: nn.Module | None = None,
    ) -> SpatialLockAdapter:
        """A fresh adapter for `unet` built by the recipe of another adapter's `config` (its variant, options and
        placement), whatever base that one was sized for: what the same training command would build on `unet`.

        The placement is the one `config` records; an adapter saved before placements were recorded needs the
        U-Net it was built for (`built_for`): the preset naming exactly its blocks there, else their modules.
        """
        recipe = {key: config[key] for key in RECIPE if key in config}
        positions = config.get("positions")
        if positions is None:
            if built_for is None:
                raise SpatialLockError(
                    "adapter config: it does not record its placement (`positions`); give the model folder it "
                    "belongs to, with its unet/"
                )
            positions = placement_of(config["blocks"], built_for)
        return cls.from_unet(unet, recipe.pop("variant"), positions, phrase_dim, num_classes, **recipe)

    # ---- attaching to a base -------------------------------------------------------------------------------

    def check_fits(self, unet: nn.Module) -> None:
        """Raise `SpatialLockError` naming the first mismatch between this adapter and `unet`."""
        if unet.config.cross_attention_dim != self.config.context_dim:
            raise SpatialLockError(
                f"adapter does not fit the base: cross_attention_dim is {unet.config.cross_attention_dim}, "
                f"the adapter was built for {self.config.context_dim}"
            )
        found = dict(transformer_blocks(unet))
        for name, dims in zip(self.config.blocks, self.config.block_dims):
            if name not in found:
                raise SpatialLockError(f"adapter does not fit the base: it has no transformer block {name}")
            if list(dims_of(found[name])) != list(dims):
                raise SpatialLockError(
                    f"adapter does not fit the base: block {name} has (width, heads, head size) "
                    f"{list(dims_of(found[name]))}, the adapter was built for {list(dims)}"
                )
        resnets = dict(plain_resnets(unet))
        for name, dims in zip(self.config.plain_blocks, self.config.plain_block_dims):
            if name not in resnets:
                raise SpatialLockError(f"adapter does not fit the base: it has no plain-level resnet {name}")
            if list(plain_dims(resnets[name])) != list(dims):
                raise SpatialLockError(
                    f"adapter does not fit the base: plain-level resnet {name} gives (width, heads, head size) "
                    f"{list(plain_dims(resnets[name]))}, the adapter was built for {list(dims)}"
                )
        if self.perception is not None:
            channels = [block.resnets[-1].out_channels for block in unet.down_blocks]
            if channels != list(self.config.feature_channels):
                raise SpatialLockError(
                    f"adapter does not fit the base: down-block channels are {channels}, "
                    f"the adapter was built for {list(self.config.feature_channels)}"
                )

    def attach(self, unet: nn.Module) -> SpatialLockAdapter:
        """Insert this adapter's blocks into `unet` (checked first); returns the adapter."""
        self.check_fits(unet)
        detach_fusers(unet)
        plain = dict(zip(self.config.plain_blocks, self.plain_fusers))
        attach_fusers(unet, dict(zip(self.config.blocks, self.fusers)), plain)
        return self

    @staticmethod
    def detach(unet: nn.Module) -> nn.Module:
        """Remove any adapter from `unet`; it computes exactly what the plain base computes."""
        detach_fusers(unet)
        return unet

    # ---- running -------------------------------------------------------------------------------------------

    def encode_grounding(
        self, phrase_embeds: torch.Tensor, boxes: torch.Tensor, masks: torch.Tensor, latent_size: tuple[int, int]
    ) -> GroundingTokens:
        """The grounding of a batch of layouts for U-Net inputs of `latent_size` (h, w), with a cache: computed
        once, it serves every U-Net call on those layouts (a whole sampling call), and what each block derives
        from the layout alone (keys, box geometry, attention bias) is computed at the first call only.

        Args:
            phrase_embeds: (B, N, phrase_dim); boxes: (B, N, 4) normalised xyxy; masks: (B, N) grounding slots
                (all zero for a dropped layout, or the unconditional branch).
        """
        objs = self.tokenizer(phrase_embeds, boxes, masks)
        return objs._replace(grid=tuple(int(n) for n in latent_size), cache={})

    def forward(
        self,
        unet: nn.Module,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        phrase_embeds: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        target: torch.Tensor | None = None,
        object_masks: torch.Tensor | None = None,
        grounding: GroundingTokens | None = None,
        perception_rows: torch.Tensor | None = None,
        scheduler=None,
        added_cond_kwargs: dict | None = None,
    ) -> AdapterOutput:
        """Run the attached `unet` with grounding; optionally the perception and training losses.

        Args:
            phrase_embeds: (B, N, phrase_dim); boxes: (B, N, 4) normalised xyxy; masks: (B, N) grounding slots
                (all zero for a dropped layout). Training passes these: the grounding is computed here, inside
                the adapter's graph.
            grounding: instead of them, `encode_grounding`'s output, reused across the calls of a sampling loop.
            labels: (B, N) class indices: the perception head is trained against `boxes` with them.
            target: the diffusion target; with it `loss` holds the weighted total and `losses` its parts.
            object_masks: (B, N) objects present in the image for the perception loss (default: `masks`).
            perception_rows: (B,) bool, the images the perception loss is computed on (default: all); with none,
                the loss is a zero that still reaches the head's parameters.
            scheduler: the noise scheduler `sample` was noised with: needed by a head whose input is `rendered`.
            added_cond_kwargs: the base's extra U-Net inputs (SDXL: `text_embeds`, `time_ids`), None for SD v1.
        """
        # 1. grounding tokens (and, through their cache, each block's keys and attention bias)
        if grounding is None:
            if phrase_embeds is None or boxes is None or masks is None:
                raise ValueError("give phrase_embeds, boxes and masks, or grounding")
            grounding = self.encode_grounding(phrase_embeds, boxes, masks, sample.shape[-2:])
        elif tuple(sample.shape[-2:]) != grounding.grid:
            raise ValueError(f"grounding was encoded for {grounding.grid} latents, got {tuple(sample.shape[-2:])}")
        if getattr(unet, "is_gradient_checkpointing", False) and torch.is_grad_enabled():
            if len(self.plain_fusers):  # its hooks would recompute with whatever call came last
                raise SpatialLockError("gradient checkpointing: not with an adapter that grounds plain levels")
            grounding = grounding._replace(cache=None)  # a recomputed block must save what its first pass saved
        kwargs = grounding_kwargs(grounding)
        # 2. the U-Net, with its down-block features tapped when the perception loss is wanted
        perceive = labels is not None and self.perception is not None
        if perceive and boxes is None:
            raise ValueError("the perception loss needs the boxes its labels belong to")
        rendered = perceive and self.config.perception_input == "rendered"
        if rendered and scheduler is None:
            raise ValueError("a head that reads the rendered latents needs the noise scheduler")
        noisy = sample
        with DownBlockTap(unet.down_blocks if perceive and not rendered else []) as tap:
            sample = unet(
                sample,
                timestep,
                encoder_hidden_states,
                cross_attention_kwargs=kwargs,
                encoder_attention_mask=encoder_attention_mask,
                added_cond_kwargs=added_cond_kwargs,
            ).sample
        # 3. PoG: detection losses against the image's own boxes
        perception = None
        if perceive:
            object_masks = masks if object_masks is None else object_masks
            features, targets = tap.features, (boxes, labels.clamp(min=0), object_masks)
            rows = slice(None) if perception_rows is None else perception_rows.to(boxes.device).bool()
            if perception_rows is not None:
                features, targets = [f[rows] for f in features], tuple(x[rows] for x in targets)
            if rendered and len(targets[0]):  # what the prediction implies was drawn, seen without the layout
                steps = timestep.expand(len(noisy)) if timestep.dim() == 0 else timestep
                clean = predicted_clean(
                    scheduler.alphas_cumprod, noisy[rows], steps[rows], sample[rows],
                    scheduler.config.prediction_type,
                )  # fmt: skip
                mask = None if encoder_attention_mask is None else encoder_attention_mask[rows]
                added = None if added_cond_kwargs is None else {k: v[rows] for k, v in added_cond_kwargs.items()}
                features = rendered_features(unet, clean, encoder_hidden_states[rows], mask, added)
            if len(targets[0]):
                perception = self.perception.loss(features, *targets)
            else:  # no image this step: a zero loss, the graph still through every head parameter
                zero = sum(p.sum() for p in self.perception.parameters()) * 0.0
                perception = {"classification": zero, "bbox_regression": zero}
        output = AdapterOutput(sample, perception)
        if target is not None:
            output.losses = {"diffusion": F.mse_loss(sample.float(), target.float())}
            if perception is not None:
                output.losses["perception"] = sum(perception.values())
            output.loss = self.total_loss(output.losses["diffusion"], perception)
        return output

    def total_loss(self, diffusion_loss: torch.Tensor, perception_losses: dict[str, torch.Tensor] | None = None):
        """Diffusion loss combined with the summed perception losses by the loss weighting."""
        losses = {"diffusion": diffusion_loss}
        if "perception" in self.weighting.names:
            if perception_losses is None:
                raise ValueError("this variant trains with a perception loss: pass `labels` to forward")
            losses["perception"] = sum(perception_losses.values())
        return self.weighting(losses)

    def parameter_counts(self) -> dict[str, int]:
        """Trainable parameters per part (works on the meta device)."""
        counts = {
            "grounding_tokens": count_parameters(self.tokenizer),
            "attention_blocks": count_parameters(self.fusers) + count_parameters(self.plain_fusers),
            "perception": count_parameters(self.perception) if self.perception is not None else 0,
            "loss_weights": count_parameters(self.weighting),
        }
        counts["total"] = sum(counts.values())
        return counts
