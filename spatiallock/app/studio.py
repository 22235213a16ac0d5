"""What the page works with, apart from Gradio: the canvas as a layout and back, a request's sampling options (from
the options table), and the `Studio` that holds the server's one model and detector."""

from __future__ import annotations

import logging
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from spatiallock.errors import SpatialLockError
from spatiallock.layout import MAX_OBJECTS, Layout, check_box, check_label, parse_layout, read_layouts

CANVAS_SIDE = 512  # the empty canvas, in pixels; boxes are stored normalised by the canvas (or picture) size
CANVAS_GREY = 236
MAX_IMAGES = 8
OWN_SCHEDULER = "model's own"
LOG = logging.getLogger(__name__)


def empty_canvas() -> dict:
    """The annotator's value for a new layout: a blank square picture and no boxes."""
    return {"image": np.full((CANVAS_SIDE, CANVAS_SIDE, 3), CANVAS_GREY, dtype=np.uint8), "boxes": []}


def canvas_size(canvas: dict | None) -> tuple[int, int]:
    """(width, height) of the canvas picture; `SpatialLockError` when there is none."""
    image = None if canvas is None else canvas.get("image")
    if image is None:
        raise SpatialLockError("the canvas is empty: press 'Empty canvas' or upload a picture, then draw boxes")
    if isinstance(image, Image.Image):
        return image.size
    height, width = np.asarray(image).shape[:2]
    return int(width), int(height)


def layout_from_canvas(caption: str | None, canvas: dict | None) -> Layout:
    """The layout the page shows: the caption and the canvas's boxes (pixels) normalised by the picture size.
    `SpatialLockError` names the box ("box 2: empty label") for a page, as `parse_layout` names the field of a
    file."""
    width, height = canvas_size(canvas)
    boxes = list(reversed(canvas.get("boxes") or []))  # the annotator puts the newest box first
    if not boxes:
        raise SpatialLockError("no boxes: draw at least one box on the canvas and give it a label")
    if len(boxes) > MAX_OBJECTS:
        raise SpatialLockError(f"{len(boxes)} boxes, at most {MAX_OBJECTS} objects are supported")
    objects = []
    for n, box in enumerate(boxes, start=1):
        xyxy = [box["xmin"] / width, box["ymin"] / height, box["xmax"] / width, box["ymax"] / height]
        xyxy = [round(min(max(v, 0.0), 1.0), 4) for v in xyxy]  # a box dragged past the edge ends at it
        label = check_label(box.get("label") or "", f"box {n}")
        objects.append({"label": label, "box": list(check_box(xyxy, f"box {n} ({label})"))})
    if not (caption or "").strip():
        raise SpatialLockError("caption: empty; describe the scene, e.g. 'a red circle left of a blue square'")
    return parse_layout({"caption": caption, "objects": objects}, "layout")


def canvas_from_layout(layout: Layout, canvas: dict | None = None) -> dict:
    """The annotator's value showing `layout` on the canvas's picture (a new empty canvas when there is none)."""
    from spatiallock.data.draw import label_colour

    if canvas is None or canvas.get("image") is None:
        canvas = empty_canvas()
    width, height = canvas_size(canvas)
    boxes = [
        {
            "xmin": round(x0 * width),
            "ymin": round(y0 * height),
            "xmax": round(x1 * width),
            "ymax": round(y1 * height),
            "label": label,
            "color": label_colour(label),
        }  # fmt: skip
        for label, (x0, y0, x1, y1) in zip(layout.labels, layout.boxes)
    ]
    return {"image": canvas["image"], "boxes": boxes[::-1]}  # newest first, as the annotator keeps them


def read_layout_file(path: str | Path) -> tuple[Layout, str]:
    """The first layout of a layout JSON file (or COCO file), and a note for the page (other layouts, unknown
    keys) or ""."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layouts = read_layouts(path)
    notes = [str(w.message) for w in caught]
    if len(layouts) > 1:
        notes.insert(0, f"the file holds {len(layouts)} layouts; the first is shown")
    return layouts[0], "; ".join(notes)


def default(name: str):
    """The default of a sampling option (`spatiallock.sampling.options.OPTIONS`), the page's too."""
    from spatiallock.sampling.options import BY_NAME

    return BY_NAME[name].default


# the sampling options the page offers, by the options table's names (the rest keep their defaults)
PAGE_OPTIONS = ("seed", "steps", "guidance", "scheduler", "grounding_steps", "layout_guidance_steps")
PAGE_OPTIONS += ("layout_guidance_scale", "init_from_layout")


@dataclass
class Request:
    """What the page asks for besides the layout: the number of images and the sampling options."""

    images: int = 1
    seed: int = field(default_factory=lambda: default("seed"))
    steps: int = field(default_factory=lambda: default("steps"))
    guidance: float = field(default_factory=lambda: default("guidance"))
    scheduler: str = OWN_SCHEDULER
    grounding_steps: float | None = None  # None: the adapter's own
    layout_guidance_steps: int = field(default_factory=lambda: default("layout_guidance_steps"))
    layout_guidance_scale: float = field(default_factory=lambda: default("layout_guidance_scale"))
    init_from_layout: bool = field(default_factory=lambda: default("init_from_layout"))
    draw_layout: bool = True
    detect: bool = False

    def options(self):
        """The `SamplingOptions` of this request, checked; messages name the page's fields."""
        from spatiallock.sampling import SamplingOptions

        if self.images is None or float(self.images) != int(self.images):
            raise SpatialLockError(f"images: a whole number, got {self.images}")
        if not 1 <= self.images <= MAX_IMAGES:
            raise SpatialLockError(f"images: from 1 to {MAX_IMAGES}, got {self.images}")
        values = {name: getattr(self, name) for name in PAGE_OPTIONS}
        values["scheduler"] = None if self.scheduler == OWN_SCHEDULER else self.scheduler
        for name in ("seed", "steps", "layout_guidance_steps"):  # the page's number fields send floats
            if values[name] is None or float(values[name]) != int(values[name]):
                raise SpatialLockError(f"{name.replace('_', ' ')}: a whole number, got {values[name]}")
            values[name] = int(values[name])
        for name in ("guidance", "grounding_steps", "layout_guidance_scale"):
            values[name] = None if values[name] is None else float(values[name])
        options = SamplingOptions(**values)
        try:
            options.check()
        except SpatialLockError as err:  # "--steps: ..." -> "steps: ...": the page has no options
            raise SpatialLockError(str(err).removeprefix("--").replace("-", " ", 2)) from None
        return options


class Studio:
    """The model and detector of one server, loaded once and shared by every page; `generate` samples one
    request at a time (the pipeline's scheduler keeps state between steps)."""

    def __init__(self, model: str = "default", adapter: str | None = None, detector: str | None = "default"):
        from spatiallock.evaluation.detector import Detector
        from spatiallock.pipelines.protocol import DIFFUSION
        from spatiallock.sampling import run as sampling
        from spatiallock.shipped import resolve_detector, resolve_model

        self.model_path = resolve_model(model)
        self.pipe = sampling.load_pipeline(model, adapter)
        if self.pipe.kind != DIFFUSION:
            raise SpatialLockError(f"--model: {model} is a layout GAN (LAMA); the page samples diffusion models")
        self.own_scheduler = self.pipe.scheduler
        self.schedulers: dict[str, object] = {}
        self.detector = None
        if detector not in (None, "none"):
            self.detector = Detector.from_pretrained(resolve_detector(detector)).to(self.pipe.device)
        self.lock = threading.Lock()

    def _use_scheduler(self, name: str | None) -> None:
        from spatiallock.pipelines.loading import sampling_scheduler

        if name is None:
            scheduler = self.own_scheduler
        else:
            if name not in self.schedulers:
                self.schedulers[name] = sampling_scheduler(self.model_path, name)
            scheduler = self.schedulers[name]
        self.pipe.register_modules(scheduler=scheduler)

    def generate(self, layout: Layout, request: Request, on_step=None):
        """Yield (image, the requested boxes drawn on it, its per-object records) for each image, as it is made.
        Image k is the one `spatiallock generate --n K` writes as sample k with the same options.

        `on_step(done, total)` is told after every denoising step."""
        from spatiallock.sampling import run as sampling

        options = request.options()
        with self.lock:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # captions or labels cut to the encoder's length: still sampled
                options.check_for(self.pipe, [layout])
            self._use_scheduler(options.scheduler)
            total = request.images * options.steps
            for k in range(request.images):

                def step_end(pipe, i, t, tensors, k=k):
                    if on_step is not None:
                        on_step(k * options.steps + min(i + 1, options.steps), total)
                    return tensors

                image = self.pipe(
                    layouts=[layout], generator=[sampling.image_generator(options.seed, 0, k)],
                    callback_on_step_end=step_end, **options.pipeline_kwargs(self.pipe.kind),
                ).images[0]  # fmt: skip
                yield image, *self.annotate(image, layout, request)

    def annotate(self, image: Image.Image, layout: Layout, request: Request) -> tuple[Image.Image, list[dict]]:
        """The picture the page shows (requested boxes, and the detector's dashed when asked for) and one record
        per requested object (its IoU with the best detection of its class when the detector knows the label)."""
        from spatiallock.data.draw import draw_boxes
        from spatiallock.evaluation.scoring import SCORE_THRESHOLD, score_images

        shown = draw_boxes(image, layout.labels, layout.boxes) if request.draw_layout else image
        records = [
            {"label": label, "box": list(box), "iou": None, "score": None}
            for label, box in zip(layout.labels, layout.boxes)
        ]
        if not request.detect or self.detector is None:
            return shown, records
        known = [n for n, label in enumerate(layout.labels) if label in self.detector.names]
        if known:
            labels, boxes = tuple(layout.labels[n] for n in known), tuple(layout.boxes[n] for n in known)
            _, objects, _ = score_images(self.detector, [image], [Layout(layout.caption, labels, boxes)])
            for n, found in zip(known, objects):
                records[n].update(iou=found["iou"], score=found["score"])
        found = self.detector.detect([image], score_threshold=SCORE_THRESHOLD)[0]
        if len(found["names"]):
            shown = draw_boxes(shown, found["names"], found["boxes"].tolist(), found["scores"].tolist(), dashed=True)
        return shown, records


def result_rows(records: list[dict], image: int, known: bool) -> list[list]:
    """Rows of the page's table: image, label, box, IoU and detector score ("-" when not measured)."""
    rows = []
    for record in records:
        iou = "-" if record["iou"] is None else f"{record['iou']:.2f}"
        if known and record["iou"] is None:
            iou = "- (not a detector class)"
        score = "-" if record["score"] is None else f"{record['score']:.2f}"
        rows.append([image, record["label"], ", ".join(f"{v:.3f}" for v in record["box"]), iou, score])
    return rows


def message(text: str, error: bool = False) -> str:
    """Markdown of the page's status line."""
    return f"**Error:** {text}" if error else text
