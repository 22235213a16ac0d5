"""PoG: U-Net down-block features -> FPN -> Enh-Fusion -> RetinaNet heads -> focal + box loss.

Built from torchvision's detection parts: `FeaturePyramidNetwork`, `RetinaNetHead` (four 3x3 convs per subnet,
sigmoid focal loss, box-coded regression loss), `AnchorGenerator` and `Matcher`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import FeaturePyramidNetwork, batched_nms, box_iou

ASPECT_RATIOS = (0.5, 1.0, 2.0)  # 3 anchors per location


class DownBlockTap:
    """Context manager: forward hooks that collect each U-Net down block's feature before down-sampling.

    Usage: `with DownBlockTap(unet.down_blocks) as tap: unet(...)`, then `tap.features` holds one
    (B, C_i, H_i, W_i) tensor per down block, finest first.
    """

    def __init__(self, down_blocks: Sequence[nn.Module]):
        self.down_blocks = list(down_blocks)
        self.features: list[torch.Tensor] = []
        self._handles = []

    def _hook(self, module, args, output):
        # Down blocks return (hidden_states, output_states); the last state before the down-sampler is
        # the block's full-resolution feature.
        states = output[1]
        self.features.append(states[-2] if getattr(module, "downsamplers", None) is not None else states[-1])

    def __enter__(self) -> DownBlockTap:
        self.features = []
        self._handles = [block.register_forward_hook(self._hook) for block in self.down_blocks]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class DownBlocksDone(Exception):
    """Raised after the U-Net's last down block inside `down_path_only`."""


def _raise_done(module, args, output):
    raise DownBlocksDone


@contextlib.contextmanager
def down_path_only(down_blocks: Sequence[nn.Module]):
    """Inside it, a U-Net call raises `DownBlocksDone` after its last down block (catch it): the up path, which
    the PoG head does not read, never runs. Enter it after a `DownBlockTap`, whose hooks must run first."""
    handle = down_blocks[-1].register_forward_hook(_raise_done)
    try:
        yield
    finally:
        handle.remove()


# the PoG head's input: the features of the grounded U-Net call on the noisy latents (the paper's), or those of
# the U-Net without grounding on the clean latents the adapter's prediction implies (what it rendered)
PERCEPTION_INPUTS = ("grounded", "rendered")


def predicted_clean(alphas_cumprod: torch.Tensor, noisy, timesteps, prediction, prediction_type: str):
    """The clean latents x0 a U-Net's `prediction` at `timesteps` implies for `noisy` (epsilon or v)."""
    alpha = alphas_cumprod.to(noisy.device)[timesteps].to(noisy.dtype).view(-1, *([1] * (noisy.dim() - 1)))
    if prediction_type == "v_prediction":
        return alpha.sqrt() * noisy - (1 - alpha).sqrt() * prediction
    if prediction_type == "epsilon":
        return (noisy - (1 - alpha).sqrt() * prediction) / alpha.sqrt()
    raise ValueError(f"prediction type {prediction_type!r}: epsilon or v_prediction")


def rendered_features(
    unet: nn.Module, latents: torch.Tensor, states, attention_mask=None, added_cond_kwargs: dict | None = None
) -> list[torch.Tensor]:
    """What the PoG head reads when its input is `rendered`: the down-block features of `unet` on clean
    `latents` at timestep 0, without grounding (an attached adapter adds nothing to a call without it), so
    that the head can find only what the latents show, never the requested layout. Differentiable.
    `added_cond_kwargs`: the base's extra U-Net inputs (SDXL's pooled text and size ids), None for SD v1."""
    t = torch.zeros(len(latents), dtype=torch.long, device=latents.device)
    with DownBlockTap(unet.down_blocks) as tap, down_path_only(unet.down_blocks):
        try:
            unet(latents, t, states, encoder_attention_mask=attention_mask, added_cond_kwargs=added_cond_kwargs)
        except DownBlocksDone:
            pass
    return tap.features


class EnhFusion(nn.Module):
    """Transformer over the concatenated multi-scale tokens, added back to every pyramid level.

    Each level is average-pooled to a `grid` x `grid` map (the shorter sequence), all levels are concatenated
    with a learnable positional embedding and passed through a transformer encoder; each level's part is
    up-sampled back to the level's size and added to it through a zero-initialised projection.
    """

    def __init__(self, channels: int, num_levels: int, grid: int = 8, layers: int = 2, heads: int = 8):
        super().__init__()
        self.grid = grid
        self.pos_embed = nn.Parameter(torch.zeros(1, num_levels * grid * grid, channels))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        layer = nn.TransformerEncoderLayer(
            channels, heads, dim_feedforward=4 * channels, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.proj = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, levels: list[torch.Tensor]) -> list[torch.Tensor]:
        g = self.grid
        # (B, C, H_i, W_i) -> (B, g*g, C) per level -> (B, L*g*g, C)
        tokens = torch.cat([F.adaptive_avg_pool2d(f, g).flatten(2).transpose(1, 2) for f in levels], dim=1)
        fused = self.proj(self.encoder(tokens + self.pos_embed))
        out = []
        for i, f in enumerate(levels):
            part = fused[:, i * g * g : (i + 1) * g * g].transpose(1, 2).reshape(f.shape[0], -1, g, g)
            out.append(f + F.interpolate(part, size=f.shape[-2:], mode="bilinear", align_corners=False))
        return out


class PerceptionHead(nn.Module):
    """The PoG detector that reads the U-Net: FPN, optional Enh-Fusion, RetinaNet heads and their loss.

    Args:
        in_channels: channels of each tapped down-block feature, finest first.
        num_classes: object categories of the training data.
        channels: FPN width.
        enh_fusion: use Enh-Fusion (False gives the paper's "PoI + PoG" row).
        anchor_scale: anchor side in units of the level's stride (in latent pixels).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        channels: int = 256,
        enh_fusion: bool = True,
        enh_grid: int = 8,
        enh_layers: int = 2,
        enh_heads: int = 8,
        anchor_scale: float = 6.0,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.anchor_scale = anchor_scale
        self.fpn = FeaturePyramidNetwork(list(in_channels), channels)
        self.enh_fusion = (
            EnhFusion(channels, len(in_channels), enh_grid, enh_layers, enh_heads) if enh_fusion else None
        )
        self.head = RetinaNetHead(channels, len(ASPECT_RATIOS), num_classes)
        self.matcher = det_utils.Matcher(0.5, 0.4, allow_low_quality_matches=True)
        self._anchor_generators: dict[tuple, AnchorGenerator] = {}

    def pyramid(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Tapped U-Net features -> FPN levels (Enh-Fusion applied when on)."""
        levels = list(self.fpn({str(i): f for i, f in enumerate(features)}).values())
        return self.enh_fusion(levels) if self.enh_fusion is not None else levels

    def anchors(self, levels: list[torch.Tensor]) -> list[torch.Tensor]:
        """Anchors (one (sum HWA, 4) tensor per image) in the frame of the finest level, in its pixels."""
        height, width = levels[0].shape[-2:]
        strides = tuple(height // f.shape[-2] for f in levels)
        generator = self._anchor_generators.get(strides)
        if generator is None:
            sizes = tuple((self.anchor_scale * s,) for s in strides)
            generator = AnchorGenerator(sizes, (ASPECT_RATIOS,) * len(strides))
            self._anchor_generators[strides] = generator
        frame = ImageList(
            levels[0].new_empty(levels[0].shape[0], 0, height, width), [(height, width)] * len(levels[0])
        )
        return generator(frame, levels)

    def forward(self, features: list[torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        """Head outputs {"cls_logits": (B, HWA, K), "bbox_regression": (B, HWA, 4)} and anchors."""
        levels = self.pyramid(features)
        return self.head(levels), self.anchors(levels)

    def loss(
        self, features: list[torch.Tensor], boxes: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Focal classification loss and box regression loss against the image's own boxes.

        Args:
            boxes: (B, N, 4) normalised xyxy; labels: (B, N) class indices in [0, num_classes); masks: (B, N).
        """
        head_outputs, anchors = self(features)
        height, width = features[0].shape[-2:]
        scale = boxes.new_tensor([width, height, width, height])
        targets, matched_idxs = [], []
        for b, anchors_b in enumerate(anchors):
            keep = masks[b] > 0.5
            target = {"boxes": boxes[b, keep].float() * scale, "labels": labels[b, keep].long()}
            targets.append(target)
            if target["boxes"].numel() == 0:
                matched_idxs.append(torch.full((anchors_b.shape[0],), -1, dtype=torch.int64, device=boxes.device))
            else:
                matched_idxs.append(self.matcher(box_iou(target["boxes"], anchors_b)))
        head_outputs = {k: v.float() for k, v in head_outputs.items()}
        return self.head.compute_loss(targets, head_outputs, anchors, matched_idxs)

    @torch.no_grad()
    def detect(
        self, features: list[torch.Tensor], score_threshold: float = 0.3, iou_threshold: float = 0.5, top_k: int = 100
    ) -> list[dict[str, torch.Tensor]]:
        """Decoded detections per image: normalised xyxy "boxes", "scores", "labels"."""
        head_outputs, anchors = self(features)
        height, width = features[0].shape[-2:]
        scale = anchors[0].new_tensor([width, height, width, height])
        coder = self.head.regression_head.box_coder
        results = []
        for logits, deltas, anchors_b in zip(head_outputs["cls_logits"], head_outputs["bbox_regression"], anchors):
            scores = logits.float().sigmoid().flatten()
            keep = torch.where(scores > score_threshold)[0]
            keep = keep[scores[keep].topk(min(top_k * 10, keep.numel())).indices]
            anchor_idx, labels = keep // self.num_classes, keep % self.num_classes
            boxes = coder.decode_single(deltas[anchor_idx].float(), anchors_b[anchor_idx])
            boxes = (boxes / scale).clamp(0, 1)
            kept = batched_nms(boxes, scores[keep], labels, iou_threshold)[:top_k]
            results.append({"boxes": boxes[kept], "scores": scores[keep][kept], "labels": labels[kept]})
        return results


class LossWeighting(nn.Module):
    """Combine the diffusion and perception losses.

    `learned`: uncertainty weighting, sum_i exp(-s_i) L_i + s_i, with s_i learnable (initialised to 0), so no
    weight can collapse to zero for free. `fixed`: sum_i w_i L_i.
    """

    def __init__(self, names: Sequence[str], mode: str = "learned", weights: Sequence[float] | None = None):
        super().__init__()
        if mode not in ("learned", "fixed"):
            raise ValueError(f"loss weighting must be 'learned' or 'fixed', not {mode!r}")
        self.names = list(names)
        self.mode = mode
        fixed = list(weights) if weights is not None else [1.0] * len(self.names)
        if len(fixed) != len(self.names):
            raise ValueError(f"loss weights: {len(fixed)} given for {len(self.names)} losses ({self.names})")
        self.register_buffer("fixed_weights", torch.tensor(fixed, dtype=torch.float32), persistent=False)
        self.log_vars = nn.Parameter(torch.zeros(len(self.names))) if mode == "learned" else None

    def weights(self) -> dict[str, float]:
        """The effective weight of each loss (exp(-s_i) when learned)."""
        w = torch.exp(-self.log_vars.detach()) if self.log_vars is not None else self.fixed_weights
        return {name: float(v) for name, v in zip(self.names, w)}

    def forward(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        values = torch.stack([losses[name].float() for name in self.names])
        if self.log_vars is not None:
            return (torch.exp(-self.log_vars) * values + self.log_vars).sum()
        return (self.fixed_weights.to(values.device) * values).sum()
