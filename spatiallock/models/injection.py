"""Place grounding blocks into named transformer blocks of any diffusers `UNet2DConditionModel`.

The mechanism is diffusers' own GLIGEN slot: every `BasicTransformerBlock` calls `self.fuser(hidden, objs)`
between self-attention and cross-attention when `cross_attention_kwargs={"gligen": {...}}` is given, and the
U-Net first passes those kwargs through `self.position_net`. Attaching sets, on the frozen base:
- `position_net`: a pass-through (grounding tokens are computed by the adapter beforehand);
- `fuser`: the adapter's block in the chosen transformer blocks, an identity in all the others.
These references are plain attributes, not registered sub-modules: the base's `state_dict` and
`parameters()` stay the base's own, so the frozen base is never re-saved with an adapter inside it.

Levels without attention (a U-Net whose finest latent level is plain, for speed) have no such slot. There a block
grounds the output of a resnet through a forward hook, and the grounding tokens reach it through the same
`position_net` call: it keeps the call's tokens until the U-Net's next call (a call without grounding clears them).
"""

from __future__ import annotations

from collections.abc import Sequence

from diffusers.models.attention import BasicTransformerBlock
from torch import nn

from spatiallock.errors import SpatialLockError

PRESETS = ("default", "all", "down", "up", "inner")


class _PassThrough(nn.Module):
    """The U-Net's `position_net`: the adapter's tokens unchanged; with `keep`, also kept for the plain levels'
    hooks (`objs`) until the U-Net's next call."""

    def __init__(self, keep: bool = False):
        super().__init__()
        self.keep, self.objs = keep, None

    def forward(self, objs):
        if self.keep:
            self.objs = objs
        return objs


def _ground_map(fuser: nn.Module, slot: _PassThrough, features):
    """`fuser` applied to a (B, C, H, W) feature map as H * W visual tokens, when this U-Net call has grounding."""
    if slot.objs is None:
        return features
    b, c, h, w = features.shape
    tokens = fuser(features.flatten(2).transpose(1, 2), slot.objs)
    return tokens.transpose(1, 2).reshape(b, c, h, w)


class _SkipFuser(nn.Module):
    def forward(self, hidden_states, objs):
        return hidden_states


def attention_stages(unet: nn.Module) -> dict[str, list[str]]:
    """Names of the attention modules (`Transformer2DModel`) per U-Net stage, in forward order.

    Returns a dict with keys "down", "mid", "up", each a list of stages, each a list of names such as
    "down_blocks.2.attentions.1".
    """
    stages: dict[str, list[list[str]]] = {"down": [], "mid": [], "up": []}
    for kind, blocks in (("down", unet.down_blocks), ("mid", [unet.mid_block]), ("up", unet.up_blocks)):
        for i, block in enumerate(blocks):
            attentions = getattr(block, "attentions", None) if block is not None else None
            if not attentions:
                continue
            prefix = "mid_block" if kind == "mid" else f"{kind}_blocks.{i}"
            stages[kind].append([f"{prefix}.attentions.{j}" for j in range(len(attentions))])
    return stages


def attention_names(unet: nn.Module) -> list[str]:
    """All attention module names a placement may use, in forward order."""
    stages = attention_stages(unet)
    return [name for kind in ("down", "mid", "up") for stage in stages[kind] for name in stage]


def resolve_positions(unet: nn.Module, positions: str | Sequence[str] = "default") -> list[str]:
    """Turn a preset or a list of attention module names into a checked list of names.

    Presets (the paper's Table 3): `default`, the last block of the last down-sampling stage with attention
    and the first block of the first up-sampling stage with attention; `all`, every block of the down and up
    stages; `down`, every down-stage block; `up`, every up-stage block; `inner`, all blocks of the two
    innermost down and up stages. A comma-separated string of names is accepted too, and a name may be a
    level (`down_blocks.2`, `mid_block`, `up_blocks.0`): every attention module of it.
    """
    stages = attention_stages(unet)
    down, up = stages["down"], stages["up"]
    if isinstance(positions, str):
        if positions in PRESETS:
            if not down or not up:
                raise SpatialLockError("positions: this U-Net has no down or no up stage with attention")
            flat = lambda groups: [name for stage in groups for name in stage]  # noqa: E731
            return {
                "default": [down[-1][-1], up[0][0]],
                "all": flat(down) + flat(up),
                "down": flat(down),
                "up": flat(up),
                "inner": flat(down[-2:]) + flat(up[:2]),
            }[positions]
        positions = [p.strip() for p in positions.split(",") if p.strip()]
    valid = attention_names(unet)
    positions = [name for p in positions for name in ([p] if p in valid else _level(valid, p))]
    unknown = [p for p in positions if p not in valid]
    if unknown or not positions:
        raise SpatialLockError(
            f"positions: {', '.join(unknown) or '(empty)'} names no attention block; "
            f"valid: {', '.join(valid)} or a preset: {', '.join(PRESETS)}"
        )
    return list(dict.fromkeys(positions))


def _level(names: Sequence[str], level: str) -> list[str]:
    """The attention modules of `names` inside the U-Net level `level` (e.g. `down_blocks.2`); [level] when none."""
    inside = [name for name in names if name.startswith(level + ".attentions.")]
    return inside or [level]


def plain_resnets(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """The resnets of the U-Net's plain levels finer than every level with attention (the leading down blocks
    without attention, the trailing up blocks without attention), in forward order: where a U-Net that spares
    attention at its finest latent level decides the objects' outlines. Stable Diffusion has none."""

    def plain(block) -> bool:
        return not getattr(block, "attentions", None)

    found = []
    for i, block in enumerate(unet.down_blocks):
        if not plain(block):
            break
        found += [(f"down_blocks.{i}.resnets.{j}", r) for j, r in enumerate(block.resnets)]
    trailing = []
    for i in range(len(unet.up_blocks) - 1, -1, -1):
        if not plain(unet.up_blocks[i]):
            break
        trailing = [(f"up_blocks.{i}.resnets.{j}", r) for j, r in enumerate(unet.up_blocks[i].resnets)] + trailing
    if len(found) + len(trailing) == sum(len(b.resnets) for b in [*unet.down_blocks, *unet.up_blocks]):
        return []  # no attention at all: no level is finer than one with attention
    return found + trailing


def plain_dims(resnet: nn.Module) -> tuple[int, int, int]:
    """(width, heads, head size) of a block grounding `resnet`'s output: heads of at most 64 channels."""
    width = resnet.out_channels
    heads = max(1, width // 64)
    return width, heads, width // heads


def transformer_blocks(unet: nn.Module, positions: Sequence[str] | None = None) -> list[tuple[str, nn.Module]]:
    """The `BasicTransformerBlock`s inside the given attention modules (all of them when None), in order."""
    found = []
    for name, module in unet.named_modules():
        if not isinstance(module, BasicTransformerBlock):
            continue
        if positions is None or any(name.startswith(p + ".") for p in positions):
            found.append((name, module))
    return found


def first_blocks_of(blocks: list[tuple[str, nn.Module]], count: int | None) -> list[tuple[str, nn.Module]]:
    """Of `blocks`, those among the first `count` transformer blocks of their attention module (all when None):
    SDXL stacks up to ten blocks in one module at its coarse levels, and the first of each often suffice."""
    if count is None:
        return blocks
    if count < 1:
        raise SpatialLockError(f"first blocks: at least 1 transformer block of each attention module, got {count}")
    return [(name, block) for name, block in blocks if int(name.rsplit(".", 1)[1]) < count]


def block_dims(block: nn.Module) -> tuple[int, int, int]:
    """(width, heads, head size) of a transformer block's self-attention."""
    attn = block.attn1
    return attn.query_dim, attn.heads, attn.inner_dim // attn.heads


def freeze(module: nn.Module) -> nn.Module:
    """Stop gradients to every parameter of `module` (the base model) and put it in eval mode."""
    module.requires_grad_(False)
    return module.eval()


def attach_fusers(unet: nn.Module, fusers: dict[str, nn.Module], plain: dict[str, nn.Module] | None = None) -> None:
    """Put `fusers[name]` into the transformer block `name`; every other block gets an identity. `plain[name]`
    grounds the output of the plain level's resnet `name` (`plain_resnets`)."""
    if "position_net" in unet._modules or any("fuser" in b._modules for _, b in transformer_blocks(unet)):
        raise SpatialLockError("base: this U-Net already has GLIGEN layers of its own; attach to a plain base")
    blocks, resnets = dict(transformer_blocks(unet)), dict(plain_resnets(unet))
    missing = [name for name in fusers if name not in blocks] + [name for name in plain or {} if name not in resnets]
    if missing:
        raise SpatialLockError(f"adapter: the base has no transformer block or plain resnet {', '.join(missing)}")
    skip, slot = _SkipFuser(), _PassThrough(keep=bool(plain))
    for name, block in blocks.items():
        object.__setattr__(block, "fuser", fusers.get(name, skip))
    object.__setattr__(unet, "position_net", slot)
    # hooks only for an adapter with plain-level blocks: every other U-Net call runs as before
    hooks = [unet.register_forward_pre_hook(lambda module, args: setattr(slot, "objs", None))] if plain else []
    for name, fuser in (plain or {}).items():
        hooks.append(resnets[name].register_forward_hook(lambda m, a, out, f=fuser: _ground_map(f, slot, out)))
    object.__setattr__(unet, "_grounding_hooks", hooks)


def detach_fusers(unet: nn.Module) -> None:
    """Undo `attach_fusers`: the base is as it was."""
    for _, block in transformer_blocks(unet):
        block.__dict__.pop("fuser", None)
    unet.__dict__.pop("position_net", None)
    for hook in unet.__dict__.pop("_grounding_hooks", []):
        hook.remove()


def grounding_kwargs(objs, cross_attention_kwargs: dict | None = None) -> dict:
    """Cross-attention kwargs that carry grounding tokens to the attached blocks."""
    kwargs = dict(cross_attention_kwargs or {})
    kwargs["gligen"] = {"objs": objs}
    return kwargs


def count_parameters(module: nn.Module) -> int:
    """Number of scalar parameters (works on the meta device)."""
    return sum(p.numel() for p in module.parameters())
