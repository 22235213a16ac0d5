"""The detectors of the synthetic domain: small torchvision detection models trained from scratch, and COCO AP.

    detector = Detector.from_pretrained("models/detector")
    found = detector.detect([image])  # [{"boxes": (n, 4) xyxy in [0, 1], "scores", "labels", "names"}]
    vectors = detector.features(images)  # (N, detector.feature_dim), for a Frechet distance in its feature space
    print(evaluate_detector(detector, "data/shapes", "val"))  # {"ap": ..., "ap50": ..., "ap75": ...}

Architecture: a residual conv backbone (GroupNorm, no pretrained weights) with outputs at strides 4, 8 and 16,
torchvision's `FeaturePyramidNetwork` on them and one of torchvision's detection models on the pyramid, its
heads and losses as torchvision builds them (`DetectorConfig.arch`): `fcos` (the shipped detector), `retinanet`,
`fasterrcnn` (RPN + RoIAlign box head) or `ssd`. Images are resized to `image_size` (their longer side; 64 for
the synthetic domain, i.e. native) by the model's own transform; detections come back in the coordinates of the
image given, normalised by its width and height.

A detector folder holds `config.json` (architecture, thresholds, categories) and `model.safetensors`.
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import os
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator, DefaultBoxGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.ssd import SSD, SSDHead
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign

from spatiallock.checkpoint import read_model_folder, write_model_folder
from spatiallock.errors import SpatialLockError

ImageInput = Sequence[Image.Image] | Sequence[torch.Tensor] | torch.Tensor
ARCHS = ("fcos", "retinanet", "fasterrcnn", "ssd")
BACKGROUND_CLASS = frozenset({"fasterrcnn", "ssd"})  # models whose label 0 is the background


@dataclass
class DetectorConfig:
    """Architecture, post-processing and categories of a detector; `config.json` of its folder.

    channels: widths of the stem (stride 1) and of the stages at strides 2, 4, 8, 16; the last three feed the
        feature pyramid.
    arch: the torchvision detection model on the pyramid, one of `ARCHS`.
    object_scales: per pyramid level s_k, the object size it is for. FCOS: its anchor size in pixels
        (regression targets are divided by it and level k takes locations whose farthest box side is within
        [4 s_k, 8 s_k), level 0 from 0, the last without upper bound). RetinaNet: anchors of 4 s_k times
        2^0, 2^(1/3), 2^(2/3), aspect ratios 1/2, 1, 2. Faster R-CNN's RPN: anchors of 4 s_k, ratios 1/2, 1, 2.
        SSD: default boxes of 4 s_k (and the geometric mean with the next level's), ratios 1/2, 1, 2.
    head_convs: FCOS's head depth (RetinaNet's and SSD's heads are torchvision's as they are).
    categories: [{"id": COCO id, "name": ...}], in the order of the model's contiguous labels 0..K-1.
    """

    categories: list[dict] = field(default_factory=list)
    arch: str = "fcos"
    image_size: int = 64
    channels: tuple[int, ...] = (32, 48, 64, 96, 128)
    fpn_channels: int = 64
    head_convs: int = 2
    groups: int = 8
    object_scales: tuple[float, ...] = (2.0, 4.0, 8.0)
    center_sampling_radius: float = 1.5
    score_threshold: float = 0.05
    nms_threshold: float = 0.6
    max_detections: int = 100

    def __post_init__(self):
        self.channels, self.object_scales = tuple(self.channels), tuple(self.object_scales)
        if self.arch not in ARCHS:
            raise SpatialLockError(f"detector config: arch must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        if len(self.channels) != 5 or len(self.object_scales) != 3:
            raise SpatialLockError("detector config: channels needs 5 widths and object_scales 3 sizes")
        if not self.categories:
            raise SpatialLockError("detector config: no categories")
        ids = [c["id"] for c in self.categories]
        if len(set(ids)) != len(ids):
            raise SpatialLockError(f"detector config: repeated category ids {ids}")

    @classmethod
    def from_dict(cls, values: dict) -> DetectorConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def _conv(cin: int, cout: int, stride: int, groups: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.GroupNorm(min(groups, cout), cout), nn.ReLU(inplace=True)
    )


class _Residual(nn.Module):
    """Two 3x3 convolutions with a skip connection."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.conv1 = _conv(channels, channels, 1, groups)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.norm2 = nn.GroupNorm(min(groups, channels), channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.norm2(self.conv2(self.conv1(x))))


class SmallBackbone(nn.Module):
    """Stem at stride 1, then four stages (strided conv + residual block) at strides 2, 4, 8, 16, and an FPN on
    the last three. Returns the pyramid as an OrderedDict "0", "1", "2" of `out_channels` each."""

    def __init__(self, channels: Sequence[int], fpn_channels: int, groups: int):
        super().__init__()
        self.stem = _conv(3, channels[0], 1, groups)
        self.stages = nn.ModuleList(
            nn.Sequential(_conv(channels[i], channels[i + 1], 2, groups), _Residual(channels[i + 1], groups))
            for i in range(4)
        )
        self.fpn = FeaturePyramidNetwork(list(channels[2:]), fpn_channels)
        self.out_channels = fpn_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        x = self.stem(x)
        levels = OrderedDict()
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i >= 1:
                levels[str(i - 1)] = x
        return self.fpn(levels)


def to_image_tensors(images: ImageInput) -> list[torch.Tensor]:
    """Images as a list of float (3, H, W) tensors in [0, 1].

    Accepts PIL images, uint8 tensors (0..255), float tensors in [0, 1], each (3, H, W) or batched (N, 3, H, W).
    """
    if isinstance(images, torch.Tensor):
        if images.dim() == 3:
            images = images[None]
        if images.dim() != 4:
            raise SpatialLockError(f"images: expected a (N, 3, H, W) tensor, got shape {tuple(images.shape)}")
        images = list(images)
    out = []
    for image in images:
        if isinstance(image, Image.Image):
            array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
            image = torch.from_numpy(array).permute(2, 0, 1)
        elif not isinstance(image, torch.Tensor):
            raise SpatialLockError(f"images: expected PIL images or tensors, got {type(image).__name__}")
        elif image.dtype == torch.uint8:
            image = image.float() / 255.0
        else:
            image = image.float()
            low, high = float(image.min()), float(image.max())
            if low < -1e-3 or high > 1 + 1e-3:
                raise SpatialLockError(
                    f"images: float tensors must lie in [0, 1], got values in [{low:.3f}, {high:.3f}]"
                    " (for [-1, 1] pixels pass (x + 1) / 2)"
                )
        if image.dim() != 3 or image.shape[0] != 3:
            raise SpatialLockError(f"images: expected 3 channels first, got shape {tuple(image.shape)}")
        out.append(image)
    return out


def build_model(config: DetectorConfig) -> nn.Module:
    """The torchvision detection model of `config.arch` on a fresh `SmallBackbone` (see `DetectorConfig`)."""
    backbone = SmallBackbone(config.channels, config.fpn_channels, config.groups)
    classes, channels, levels = len(config.categories), config.fpn_channels, len(config.object_scales)
    norm = functools.partial(nn.GroupNorm, min(config.groups, channels))  # torchvision's default is 32 groups
    post = dict(score_thresh=config.score_threshold, nms_thresh=config.nms_threshold,
                detections_per_img=config.max_detections)  # fmt: skip
    pixels = dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    sizes = dict(min_size=config.image_size, max_size=config.image_size, **pixels)
    if config.arch == "fcos":
        anchors = AnchorGenerator(tuple((s,) for s in config.object_scales), ((1.0,),) * levels)
        head = FCOSHead(channels, 1, classes, config.head_convs)
        for conv in (head.classification_head.conv, head.regression_head.conv):
            for i, layer in enumerate(conv):
                if isinstance(layer, nn.GroupNorm):
                    conv[i] = norm(channels)
        return FCOS(backbone, classes, anchor_generator=anchors, head=head,
                    center_sampling_radius=config.center_sampling_radius, **sizes, **post)  # fmt: skip
    ratios = ((0.5, 1.0, 2.0),) * levels
    if config.arch == "retinanet":
        octaves = (1.0, 2 ** (1 / 3), 2 ** (2 / 3))
        anchors = AnchorGenerator(tuple(tuple(4 * s * o for o in octaves) for s in config.object_scales), ratios)
        head = RetinaNetHead(channels, anchors.num_anchors_per_location()[0], classes, norm_layer=norm)
        return RetinaNet(backbone, classes, anchor_generator=anchors, head=head, **sizes, **post)
    if config.arch == "fasterrcnn":
        anchors = AnchorGenerator(tuple((4 * s,) for s in config.object_scales), ratios)
        pool = MultiScaleRoIAlign([str(k) for k in range(levels)], output_size=7, sampling_ratio=2)
        hidden = 4 * channels
        return FasterRCNN(
            backbone, None, rpn_anchor_generator=anchors, box_roi_pool=pool,
            box_head=TwoMLPHead(channels * 7 * 7, hidden), box_predictor=FastRCNNPredictor(hidden, classes + 1),
            rpn_pre_nms_top_n_train=1000, rpn_post_nms_top_n_train=500, rpn_pre_nms_top_n_test=500,
            rpn_post_nms_top_n_test=300, box_batch_size_per_image=128, box_score_thresh=config.score_threshold,
            box_nms_thresh=config.nms_threshold, box_detections_per_img=config.max_detections, **sizes,
        )  # fmt: skip
    # ssd: default boxes of 4 s_k relative to the image, the last level's next scale twice its own
    scales = [min(1.0, 4 * s / config.image_size) for s in config.object_scales]
    boxes = DefaultBoxGenerator([[2]] * levels, scales=[*scales, min(1.0, 2 * scales[-1])])
    head = SSDHead([channels] * levels, boxes.num_anchors_per_location(), classes + 1)
    return SSD(backbone, boxes, (config.image_size, config.image_size), classes + 1, head=head, **pixels,
               score_thresh=config.score_threshold, nms_thresh=config.nms_threshold,
               detections_per_img=config.max_detections)  # fmt: skip


class Detector(nn.Module):
    """A torchvision detection model on `SmallBackbone` (`build_model`), with the category mapping and folder
    I/O of the project.

    `forward(images, targets)` is the model's: in training mode, images are float (3, H, W) in [0, 1] and targets
    dicts with "boxes" (n, 4) xyxy in pixels and "labels" contiguous 0..K-1 (shifted here to the model's own
    labels); it returns the loss dict.
    """

    def __init__(self, config: DetectorConfig):
        super().__init__()
        self.config = config
        self.model = build_model(config)
        # contiguous category k is the model's label k + offset (Faster R-CNN and SSD keep 0 for the background)
        self.label_offset = 1 if config.arch in BACKGROUND_CLASS else 0
        ids = [c["id"] for c in config.categories]
        self.register_buffer("_label_ids", torch.tensor(ids, dtype=torch.long), persistent=False)
        self.category_index: dict[int, int] = {cid: i for i, cid in enumerate(ids)}
        self.names: list[str] = [c["name"] for c in config.categories]

    @property
    def feature_dim(self) -> int:
        """Length of the vectors `features` returns: pooled pyramid levels, concatenated."""
        return self.config.fpn_channels * len(self.config.object_scales)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, images: list[torch.Tensor], targets: list[dict] | None = None):
        if targets is not None and self.label_offset:
            targets = [{**t, "labels": t["labels"] + self.label_offset} for t in targets]
        return self.model(images, targets)

    @contextlib.contextmanager
    def _evaluating(self):
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.train(was_training)

    def detect(self, images: ImageInput, score_threshold: float | None = None, batch_size: int = 64) -> list[dict]:
        """Detections per image: "boxes" (n, 4) float xyxy normalised by the image's width and height,
        "scores" (n,), "labels" (n,) COCO category ids, "names" list of n category names; best score first.

        `score_threshold`: drop detections below it (default: the config's, 0.05, suited to AP).
        """
        tensors = to_image_tensors(images)
        threshold = self.config.score_threshold if score_threshold is None else score_threshold
        results = []
        with self._evaluating():
            for start in range(0, len(tensors), batch_size):
                chunk = [t.to(self.device) for t in tensors[start : start + batch_size]]
                for image, found in zip(chunk, self.model(chunk)):
                    keep = found["scores"] >= threshold
                    height, width = image.shape[-2:]
                    scale = torch.tensor([width, height, width, height], dtype=torch.float32, device=self.device)
                    boxes = (found["boxes"][keep] / scale).clamp(0.0, 1.0)
                    labels = found["labels"][keep] - self.label_offset
                    results.append(
                        {
                            "boxes": boxes.cpu(),
                            "scores": found["scores"][keep].cpu(),
                            "labels": self._label_ids[labels].cpu(),
                            "names": [self.names[i] for i in labels.tolist()],
                        }
                    )
        return results

    def features(self, images: ImageInput, batch_size: int = 64) -> torch.Tensor:
        """(N, feature_dim) float: each pyramid level averaged over space, levels concatenated."""
        tensors = to_image_tensors(images)
        vectors = []
        with self._evaluating():
            for start in range(0, len(tensors), batch_size):
                chunk = [t.to(self.device) for t in tensors[start : start + batch_size]]
                batch, _ = self.model.transform(chunk)
                levels = self.model.backbone(batch.tensors)
                vectors.append(torch.cat([level.mean(dim=(2, 3)) for level in levels.values()], dim=1).cpu())
        if not vectors:
            return torch.zeros(0, self.feature_dim)
        return torch.cat(vectors)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write `config.json` and `model.safetensors` to `folder` (`atomic_save_pretrained` does it atomically)."""
        write_model_folder(folder, self.state_dict(), asdict(self.config))

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, device: str | torch.device = "cpu") -> Detector:
        """The detector saved in `folder`, in eval mode."""
        return read_model_folder(folder, "detector", lambda values: cls(DetectorConfig.from_dict(values))).to(device)


# ---- COCO scoring ------------------------------------------------------------------------------------------------


def to_coco_results(detections: list[dict], image_ids: Sequence[int], sizes: Sequence[tuple[int, int]]) -> list[dict]:
    """`detect` output as COCO result entries: bbox [x, y, w, h] in pixels of `sizes` (width, height) per image,
    which should be the sizes recorded in the instances file (not necessarily those of the images given)."""
    results = []
    for found, image_id, (width, height) in zip(detections, image_ids, sizes, strict=True):
        boxes = found["boxes"].double() * torch.tensor([width, height, width, height], dtype=torch.float64)
        for box, score, label in zip(boxes.tolist(), found["scores"].tolist(), found["labels"].tolist()):
            x0, y0, x1, y1 = box
            results.append(
                {"image_id": int(image_id), "category_id": int(label), "bbox": [x0, y0, x1 - x0, y1 - y0],
                 "score": float(score)}
            )  # fmt: skip
    return results


def coco_ap(
    instances: dict, results: list[dict], area_ranges: dict[str, tuple[float, float]] | None = None
) -> dict[str, float | None]:
    """COCO bbox AP (IoU 0.5:0.95), AP50 and AP75 of `results` against a COCO instances dict, via pycocotools.

    Every image of `instances` counts, found or not. Annotations may lack "id", "area" and "iscrowd" (filled in
    from the box). No result at all scores 0. Raises if the instances hold no object.

    `area_ranges`: up to three named object-area ranges in square pixels, {"small": (0, 64), ...}, in place of
    COCO's (whose buckets are sized for photos of 640 px); adds "ap_<name>" for each, None where no requested
    object falls in that range.
    """
    ranges = dict(area_ranges or {})
    if len(ranges) > 3:
        raise ValueError(f"area_ranges: at most 3 ranges (COCOeval summarises 3), got {len(ranges)}")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    annotations = []
    for i, ann in enumerate(instances.get("annotations", [])):
        w, h = ann["bbox"][2], ann["bbox"][3]
        annotations.append({"area": w * h, "iscrowd": 0, **ann, "id": i + 1})
    if not annotations:
        raise SpatialLockError("scoring: the ground truth holds no object")
    sized = {}
    for name, (low, high) in ranges.items():
        inside = any(low <= a["area"] < high for a in annotations)
        sized[f"ap_{name}"] = 0.0 if inside else None
    if not results:
        return {"ap": 0.0, "ap50": 0.0, "ap75": 0.0, **sized}
    gt_data = {
        "images": [{k: im[k] for k in ("id", "width", "height") if k in im} for im in instances["images"]],
        "annotations": annotations,
        "categories": instances["categories"],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = gt_data
        gt.createIndex()
        dt = gt.loadRes([{**r, "bbox": [float(v) for v in r["bbox"]]} for r in results])
        evaluator = COCOeval(gt, dt, "bbox")
        if ranges:
            # COCOeval's summary reads the ranges by label: "small", "medium", "large" (in this order) after "all"
            slots = ["small", "medium", "large"][: len(ranges)]
            evaluator.params.areaRng = [[0, 1e10], *[list(r) for r in ranges.values()]]
            evaluator.params.areaRngLbl = ["all", *slots]
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = [float(v) for v in evaluator.stats[:6]]
    # -1 means "nothing to score" (only when no category has an object, excluded above); report it as 0
    scores = {k: (v if v >= 0 and math.isfinite(v) else 0.0) for k, v in zip(("ap", "ap50", "ap75"), stats)}
    for key, value in zip(sized, stats[3:]):
        # -1 here: no requested object of that size
        sized[key] = value if value >= 0 and math.isfinite(value) and sized[key] is not None else None
    return {**scores, **sized}


def evaluate_detector(detector: Detector, data_dir: str | os.PathLike, split: str = "val", batch_size: int = 64):
    """COCO AP, AP50, AP75 of `detector` on the real images of a split (the ceiling for generated images).

    Returns {"ap", "ap50", "ap75"} in [0, 1].
    """
    from spatiallock.data.coco import split_files
    from spatiallock.data.cocofile import read_coco_json, scorable_instances
    from spatiallock.files import read_rgb

    instances_file, _, image_root = split_files(data_dir, split)
    instances, skipped = scorable_instances(read_coco_json(instances_file, "instances"))
    if skipped:
        summary = ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in skipped.items())
        warnings.warn(f"{instances_file}: left out of the scoring: {summary}", stacklevel=2)
    images = instances["images"]
    results = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        pictures = []
        for entry in chunk:
            path = image_root / entry["file_name"]
            try:
                pictures.append(read_rgb(path))
            except (OSError, ValueError) as err:
                raise SpatialLockError(f"{path}: cannot read image ({err})") from None
        found = detector.detect(pictures, batch_size=batch_size)
        sizes = [(e["width"], e["height"]) for e in chunk]
        results += to_coco_results(found, [e["id"] for e in chunk], sizes)
    return coco_ap(instances, results)
