"""Layout fidelity of generated images, scored by a detector against the layouts they were asked for.

- `ap`, `ap50`, `ap75`: COCO box AP (pycocotools) of the detections against the requested boxes (the
  "YOLO score" of LAMA / seed 003, with the project's own detector for the synthetic domain). By default every
  detection the detector keeps (from its config's threshold, 0.05) counts, ranked by score; with a
  `score_threshold` T only those scoring at least T count, for AP and mIoU alike (T = 0.25 is the authors' of
  LAMA: darknet's default confidence);
- `miou`: per requested object, the best IoU with a detection of its class (scoring at least
  `score_threshold`), 0 when there is none, averaged over all requested objects;
- `miou_any`: the same with a detection of any class: where objects land, whether or not the detector can
  name them (when it is far above `miou`, the objects are placed but not drawn well enough to be recognised);
- `fd`: the Frechet distance between generated and real images of the domain in the detector's feature space
  (torchmetrics' Frechet distance with the detector as feature extractor). It is not FID and is never called so;
- `fid`: FID through torchmetrics, only when Inception weights are given as a local file.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torchvision.ops import box_iou

from spatiallock.data.draw import draw_boxes, grid
from spatiallock.errors import SpatialLockError, first_line
from spatiallock.evaluation.detector import Detector, coco_ap, to_coco_results, to_image_tensors
from spatiallock.layout import Layout, quoted
from spatiallock.sampling import SamplingOptions, sample

# Object sizes at this domain's scale, by the box's side (the square root of its area) over the image's: small
# under 1/8 (under 8 px at 64 px, under two cells of a 16x16 latent), medium 1/8 to 1/4, large from 1/4. COCO's
# pixel buckets (32 and 96 px) are sized for 640 px photos and leave "large" empty at 64 px.
SIZE_BUCKETS = {"small": (0.0, 1 / 8), "medium": (1 / 8, 1 / 4), "large": (1 / 4, math.inf)}
SCORE_THRESHOLD = 0.3  # detections below it do not count for miou (AP uses them all, ranked by score)
AUTHORS_THRESHOLD = 0.25  # LAMA's YOLO score keeps detections from darknet's default confidence


class DetectorFeatures(nn.Module):
    """The detector's pooled pyramid features as a torchmetrics feature extractor (images in [0, 1])."""

    def __init__(self, detector: Detector):
        super().__init__()
        self.detector = detector
        self.num_features = detector.feature_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.detector.features(images).to(torch.float64)


def category_ids(detector: Detector, layouts: Sequence[Layout]) -> dict[str, int]:
    """Label -> the detector's category id; `SpatialLockError` naming the first label it does not know."""
    ids = {c["name"]: c["id"] for c in detector.config.categories}
    for i, layout in enumerate(layouts):
        for j, label in enumerate(layout.labels):
            if label not in ids:
                known, where = ", ".join(sorted(ids)), f"layouts[{i}].objects[{j}].label"
                raise SpatialLockError(f"{where}: {quoted(label)} is not a category of the detector (known: {known})")
    return ids


def score_images(
    detector: Detector,
    images: Sequence[Image.Image],
    layouts: Sequence[Layout],
    score_threshold: float | None = None,
    by_size: bool = False,
) -> tuple[dict, list[dict], list[dict]]:
    """Detect on `images` (one per layout) and score against the layouts.

    `score_threshold`: None for this project's protocol (AP from every detection the detector keeps, mIoU from
    those scoring `SCORE_THRESHOLD`); a number T keeps only detections scoring at least T for both (the
    authors' of LAMA: `AUTHORS_THRESHOLD`). `by_size`: also "ap_<size>", "miou_<size>" and "objects_<size>" for
    each of `SIZE_BUCKETS` (None where no requested object has that size; the images must share one size). Returns
    ({"ap", "ap50", "ap75", "miou", "miou_any", ...}, per-object records (with their "size"), the detections
    counted).
    """
    if len(images) != len(layouts):
        raise ValueError(f"{len(images)} images for {len(layouts)} layouts")
    ids = category_ids(detector, layouts)
    detections = detector.detect(list(images), score_threshold=score_threshold)  # None: the detector's own
    miou_threshold = SCORE_THRESHOLD if score_threshold is None else score_threshold
    sizes = [image.size for image in images]
    instances = {"images": [], "annotations": [], "categories": detector.config.categories}
    objects = []
    for n, (layout, found, (width, height)) in enumerate(zip(layouts, detections, sizes)):
        instances["images"].append({"id": n + 1, "width": width, "height": height})
        sure = found["scores"] >= miou_threshold
        for label, box in zip(layout.labels, layout.boxes):
            x0, y0, x1, y1 = box
            bbox = [x0 * width, y0 * height, (x1 - x0) * width, (y1 - y0) * height]
            instances["annotations"].append({"image_id": n + 1, "category_id": ids[label], "bbox": bbox})
            ious = box_iou(torch.tensor([box], dtype=torch.float32), found["boxes"].float().reshape(-1, 4))[0]
            same = sure & (found["labels"] == ids[label])
            iou, score = 0.0, None
            if same.any():
                best = int(torch.where(same, ious, -1.0).argmax())
                iou, score = float(ious[best]), float(found["scores"][best])
            iou_any = float(ious[sure].max()) if sure.any() else 0.0
            objects.append(
                {
                    "image": n,
                    "label": label,
                    "box": list(box),
                    "size": size_of(box),
                    "iou": round(iou, 4),
                    "score": score,
                    "iou_any": round(iou_any, 4),
                }
            )
    results = to_coco_results(detections, [n + 1 for n in range(len(images))], sizes)
    ranges = area_ranges(sizes) if by_size else None
    empty = {"ap": 0.0, "ap50": 0.0, "ap75": 0.0, **{f"ap_{name}": None for name in ranges or {}}}
    scores = coco_ap(instances, results, ranges) if instances["annotations"] else empty
    for key, field in (("miou", "iou"), ("miou_any", "iou_any")):
        scores[key] = sum(o[field] for o in objects) / len(objects) if objects else 0.0
    if by_size:
        for name in SIZE_BUCKETS:
            ious = [o["iou"] for o in objects if o["size"] == name]
            scores[f"miou_{name}"] = sum(ious) / len(ious) if ious else None
            scores[f"objects_{name}"] = len(ious)
    return scores, objects, detections


def size_of(box: Sequence[float]) -> str:
    """The `SIZE_BUCKETS` name of a normalised (x0, y0, x1, y1) box."""
    side = math.sqrt(max(box[2] - box[0], 0.0) * max(box[3] - box[1], 0.0))
    return next(name for name, (low, high) in SIZE_BUCKETS.items() if low <= side < high)


def area_ranges(sizes: Sequence[tuple[int, int]]) -> dict[str, tuple[float, float]]:
    """`SIZE_BUCKETS` as COCOeval area ranges in square pixels, for images that all have one of `sizes`."""
    if len(set(sizes)) > 1:
        raise ValueError(f"scoring by size needs images of one size, got {sorted(set(sizes))[:3]}")
    width, height = sizes[0]
    return {
        name: (low**2 * width * height, min(high**2 * width * height, 1e10))
        for name, (low, high) in SIZE_BUCKETS.items()
    }


def frechet_distance(
    generated: Sequence[Image.Image], real: Sequence[Image.Image], feature: nn.Module | int = 2048, **options
) -> float:
    """torchmetrics' Frechet distance between two image sets in the space of `feature` (a module or Inception)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=feature, normalize=True, **options)
    for images, is_real in ((real, True), (generated, False)):
        for start in range(0, len(images), 64):
            batch = torch.stack(to_image_tensors(list(images[start : start + 64])))
            metric.update(batch, real=is_real)
    return float(metric.compute())


def inception_fid(generated: Sequence[Image.Image], real: Sequence[Image.Image], weights: str | Path) -> float:
    """FID with Inception weights read from a local file (torchmetrics + torch-fidelity)."""
    weights = Path(weights)
    if not weights.is_file():
        raise SpatialLockError(f"--fid-weights: {weights} not found")
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        raise SpatialLockError("--fid-weights: FID needs torch-fidelity (pip install 'spatiallock[fid]')") from None
    resize = [image.resize((299, 299), Image.Resampling.BICUBIC) for image in generated]
    reference = [image.resize((299, 299), Image.Resampling.BICUBIC) for image in real]
    return frechet_distance(resize, reference, 2048, feature_extractor_weights_path=str(weights))


def load_real_images(paths: Sequence[Path]) -> list[Image.Image]:
    """The real images of a data set, through the one image reader (`files.read_rgb`, with its pixel limit)."""
    from spatiallock.files import read_rgb

    images = []
    for path in paths:
        try:
            images.append(read_rgb(path))
        except (OSError, ValueError) as err:
            raise SpatialLockError(f"{path}: cannot read image ({first_line(err)})") from None
    return images


def real_image_paths(layouts_file: str | Path, layouts: Sequence[Layout]) -> list[Path] | None:
    """The real images behind layouts read from `<root>/instances_<split>.json` (in `<root>/<split>/`), if there."""
    path = Path(layouts_file)
    if not path.name.startswith("instances_"):
        return None
    split = path.stem[len("instances_") :]
    roots = [path.parent / split, path.parent.parent / split]
    for root in roots:
        files = [root / (layout.meta.get("file_name") or "") for layout in layouts]
        if root.is_dir() and all(f.is_file() for f in files):
            return files
    return None


def layout_picture(
    layouts: Sequence[Layout], images: Sequence[Image.Image], detections: Sequence[dict], count: int = 8
) -> Image.Image:
    """Rows of (requested layout, generated image with its confident detections) pairs."""
    cells = []
    for layout, image, found in list(zip(layouts, images, detections))[:count]:
        canvas = Image.new("RGB", image.size, (200, 200, 200))
        cells.append(draw_boxes(canvas, layout.labels, layout.boxes, dashed=True))
        keep = found["scores"] >= SCORE_THRESHOLD
        scores = found["scores"][keep].tolist()
        names = [name for name, k in zip(found["names"], keep.tolist()) if k]
        cells.append(draw_boxes(image, names, found["boxes"][keep].tolist(), scores=scores))
    return grid(cells, columns=4 if len(cells) >= 4 else len(cells))


def evaluate_pipeline(
    pipe,
    detector: Detector,
    layouts: Sequence[Layout],
    options: SamplingOptions | None = None,
    per_layout: int = 1,
    real_images: Sequence[Image.Image] | None = None,
    fid_weights: str | Path | None = None,
    progress=None,
    score_threshold: float | None = None,
) -> tuple[dict, list[Image.Image], list[Layout], list[dict], list[dict]]:
    """Generate (with every option of `options`), detect and score (`score_images`'s `score_threshold`).

    Returns (report, images, their layouts, per-object records, detections)."""
    category_ids(detector, layouts)  # unknown labels fail before any sampling
    images, asked, seconds = sample(pipe, layouts, options or SamplingOptions(), per_layout, progress)
    scores, objects, detections = score_images(detector, images, asked, score_threshold)
    report = {**{k: round(v, 4) for k, v in scores.items()}, "seconds_per_image": round(seconds, 4)}
    report["score_threshold"] = score_threshold
    report.update(pipe.extra_scores(layouts, (options or SamplingOptions()).seed, per_layout))  # LAMA: mask entropy
    report["fd"] = None
    if real_images:
        report["fd"] = round(frechet_distance(images, real_images, DetectorFeatures(detector)), 4)
    if fid_weights is not None:
        if not real_images:
            raise SpatialLockError("--fid-weights: FID needs real images of the domain (--real)")
        report["fid"] = round(inception_fid(images, real_images, fid_weights), 4)
    return report, images, asked, objects, detections
