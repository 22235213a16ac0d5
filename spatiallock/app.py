"""The layout editor in the browser: draw boxes on a canvas, name them, write a caption, generate (Gradio).

    spatiallock app --model default --detector default     # then open http://127.0.0.1:7860

The model (and the detector) is loaded once per server and shared by every visitor; Gradio's queue runs one
generation at a time, so two people generating at once both get their images, one after the other. Gradio and
the box-drawing component (`gradio-image-annotation`) are imported only when a page is built: install them
with `pip install -e ".[app]"`. What the page turns into a layout is checked as a layout file is, and every
problem is a message on the page, never a traceback.
"""

from __future__ import annotations

import json
import logging
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from spatiallock.errors import SpatialLockError, first_line
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


@dataclass
class Request:
    """What the page asks for besides the layout: the number of images and the sampling options."""

    images: int = 1
    seed: int = 0
    steps: int = 25
    guidance: float = 5.0
    scheduler: str = OWN_SCHEDULER
    grounding_steps: float | None = None  # None: the adapter's own
    layout_guidance_steps: int = 0
    layout_guidance_scale: float = 20.0
    init_from_layout: bool = False
    draw_layout: bool = True
    detect: bool = False

    def options(self):
        """The `SamplingOptions` of this request, checked; messages name the page's fields."""
        from spatiallock.sampling.run import SamplingOptions

        for name in ("images", "seed", "steps", "layout_guidance_steps"):
            value = getattr(self, name)
            if value is None or float(value) != int(value):
                raise SpatialLockError(f"{name.replace('_', ' ')}: a whole number, got {value}")
        if not 1 <= self.images <= MAX_IMAGES:
            raise SpatialLockError(f"images: from 1 to {MAX_IMAGES}, got {self.images}")
        options = SamplingOptions(
            seed=int(self.seed), steps=int(self.steps), guidance=float(self.guidance),
            scheduler=None if self.scheduler == OWN_SCHEDULER else self.scheduler,
            grounding_steps=None if self.grounding_steps is None else float(self.grounding_steps),
            layout_guidance_steps=int(self.layout_guidance_steps),
            layout_guidance_scale=float(self.layout_guidance_scale), init_from_layout=bool(self.init_from_layout),
        )  # fmt: skip
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
        from spatiallock.sampling import run as sampling
        from spatiallock.shipped import resolve_detector, resolve_model

        self.model_path = resolve_model(model)
        self.pipe = sampling.load_pipeline(model, adapter)
        self.own_scheduler = self.pipe.scheduler
        self.schedulers: dict[str, object] = {}
        self.detector = None
        if detector not in (None, "none"):
            self.detector = Detector.from_pretrained(resolve_detector(detector)).to(self.pipe.device)
        self.lock = threading.Lock()

    def _use_scheduler(self, name: str | None) -> None:
        from spatiallock.pipelines.diffusion import sampling_scheduler

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
                    callback_on_step_end=step_end, **options.pipeline_kwargs(),
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


def build_app(studio: Studio, examples: str | Path | None = "examples"):
    """The Gradio page (a `gr.Blocks`) for `studio`; `examples`: a folder of layout files, one button each."""
    import gradio as gr
    from gradio_image_annotation import image_annotator

    from spatiallock.pipelines.diffusion import SCHEDULERS

    examples = sorted(Path(examples).glob("*.json")) if examples and Path(examples).is_dir() else []
    downloads = Path(tempfile.mkdtemp(prefix="spatiallock-app-"))

    def describe(canvas, caption):
        """Layout JSON view, download button and a one-line check of what is on the canvas."""
        try:
            layout = layout_from_canvas(caption, canvas)
        except SpatialLockError as err:
            return "", gr.DownloadButton(value=None, interactive=False), f"Layout not ready: {err}."
        text = json.dumps(layout.to_json(), indent=1)
        path = Path(tempfile.mkdtemp(dir=downloads)) / "layout.json"
        path.write_text(text + "\n", encoding="utf-8")
        objects = f"{len(layout)} object{'s' * (len(layout) != 1)}"
        return text, gr.DownloadButton(value=str(path), interactive=True), f"Layout ready: {objects}."

    def load(path, canvas):
        """Canvas, caption and status after reading a layout file."""
        if path is None:
            return gr.skip(), gr.skip(), gr.skip()
        if path not in examples and not uploaded(path):  # a second guard behind Gradio's own (`web_app`)
            return gr.skip(), gr.skip(), message(f"{Path(path).name}: not an uploaded file", error=True)
        try:
            layout, note = read_layout_file(path)
        except SpatialLockError as err:
            return gr.skip(), gr.skip(), message(f"{Path(path).name}: {err}", error=True)
        shown = f"Loaded {Path(path).name}" + (f" ({note})" if note else "") + "."
        return canvas_from_layout(layout, canvas), layout.caption, shown

    def generate(canvas, caption, *values, progress=gr.Progress()):
        request = Request(*values)
        gallery, rows = [], []
        try:
            layout = layout_from_canvas(caption, canvas)
            yield [], [], "Generating..."  # the images of a previous request go, so none is taken for new
            start = time.perf_counter()
            progress((0, 1), desc="generating")
            made = studio.generate(layout, request, lambda done, total: progress((done, total), desc="generating"))
            for k, (_, shown, records) in enumerate(made):
                gallery.append((shown, f"seed {request.seed}, image {k + 1}"))
                rows += result_rows(records, k + 1, request.detect and studio.detector is not None)
                seconds = time.perf_counter() - start
                text = f"Image {k + 1} of {request.images} ({seconds:.1f} s)."
                yield gallery, rows, text
            per_image = (time.perf_counter() - start) / max(len(gallery), 1)
            yield gallery, rows, f"{len(gallery)} image{'s' * (len(gallery) != 1)}, {per_image:.1f} s each."
        except SpatialLockError as err:
            yield gallery, rows, message(str(err), error=True)
        except Exception as err:  # a page shows one line; the traceback goes to the server's log
            LOG.exception("generation failed")
            yield gallery, rows, message(f"generation failed: {type(err).__name__}: {first_line(err)}", error=True)

    with gr.Blocks(title="SpatialLock", delete_cache=(3600, 3600)) as page:
        gr.Markdown(
            "## SpatialLock: draw a layout, generate\n"
            "Press **C** (or the box button) and drag on the canvas to draw a box, then type its label; write a "
            "caption that names the objects; press **Generate**. Upload a picture to draw on it instead."
        )
        with gr.Row():
            with gr.Column(scale=3):
                canvas = image_annotator(
                    value=empty_canvas(), label="Layout", image_type="numpy", sources=["upload"],
                    show_download_button=False, show_remove_button=True, box_min_size=2, elem_id="canvas",
                )  # fmt: skip
                caption = gr.Textbox(
                    label="Caption", placeholder="a red circle to the left of a blue square", elem_id="caption"
                )
                with gr.Row():
                    new = gr.Button("Empty canvas", size="sm", elem_id="empty")
                    upload = gr.UploadButton("Load layout JSON", file_types=[".json"], size="sm", elem_id="load")
                    download = gr.DownloadButton(
                        "Download layout JSON", interactive=False, size="sm", elem_id="download"
                    )
                if examples:
                    with gr.Row():
                        gr.Markdown("Examples:")
                        buttons = {path: gr.Button(path.stem, size="sm") for path in examples}
                check = gr.Markdown(elem_id="layout-check")
                with gr.Accordion("Layout JSON", open=False):
                    view = gr.Code(language="json", interactive=False, elem_id="layout-json")
            with gr.Column(scale=3):
                with gr.Row():
                    images = gr.Slider(1, MAX_IMAGES, value=4, step=1, label="Images", elem_id="images")
                    seed = gr.Number(0, precision=0, minimum=0, label="Seed")
                with gr.Row():
                    steps = gr.Slider(1, 100, value=25, step=1, label="Steps", elem_id="steps")
                    guidance = gr.Slider(0.0, 15.0, value=5.0, step=0.5, label="Guidance (classifier-free)")
                with gr.Accordion("More options", open=False):
                    scheduler = gr.Dropdown([OWN_SCHEDULER, *sorted(SCHEDULERS)], value=OWN_SCHEDULER, label="Sampler")
                    grounding = gr.Slider(
                        0.0,
                        1.0,
                        value=studio.pipe.default_grounding_steps,
                        step=0.05,
                        label="Share of steps that use the layout (the model's own by default)",
                    )
                    lg_steps = gr.Slider(0, 50, value=0, step=1, label="Layout guidance steps (training-free)")
                    lg_scale = gr.Number(20.0, minimum=0, label="Layout guidance scale")
                    init = gr.Checkbox(False, label="Start from the layout rendered as a picture")
                with gr.Row():
                    draw = gr.Checkbox(True, label="Draw the requested boxes")
                    detect = gr.Checkbox(
                        False, label="Detector's boxes and IoU", interactive=studio.detector is not None
                    )
                run = gr.Button("Generate", variant="primary", elem_id="generate")
                status = gr.Markdown(elem_id="status")
                gallery = gr.Gallery(label="Images", columns=2, height="auto", elem_id="gallery", format="png")
                table = gr.Dataframe(
                    headers=["image", "label", "box", "IoU", "detector score"],
                    label="Objects",
                    interactive=False,
                    elem_id="objects",
                )

        options = [images, seed, steps, guidance, scheduler, grounding, lg_steps, lg_scale, init, draw, detect]
        run.click(generate, [canvas, caption, *options], [gallery, table, status], concurrency_limit=1)
        for event in (canvas.change, caption.change):
            event(describe, [canvas, caption], [view, download, check], queue=False, show_progress="hidden")
        new.click(lambda: (empty_canvas(), ""), None, [canvas, caption], queue=False)
        upload.upload(load, [upload, canvas], [canvas, caption, status], queue=False)
        for path, button in buttons.items() if examples else ():
            button.click(lambda canvas, path=path: load(path, canvas), canvas, [canvas, caption, status])
        page.load(describe, [canvas, caption], [view, download, check], queue=False)
    return page.queue(default_concurrency_limit=None)


def web_app(page):
    """The ASGI app that serves `page` (a `gr.Blocks`) at /.

    Served by uvicorn directly: `launch` refuses to serve when its own first request is slow (a busy machine).
    Gradio checks that every file a client names (a `FileData` path: the canvas picture, the layout to load) lies
    in its upload folder, and refuses any other before opening or copying it, only for a page it has launched;
    this page is mounted instead, so it is marked as launched, and that check runs on every request."""
    import gradio as gr
    from fastapi import FastAPI

    app = gr.mount_gradio_app(FastAPI(), page, path="/")
    page.has_launched = True
    return app


def uploaded(path: str | Path) -> bool:
    """Whether `path` lies in Gradio's upload folder (where every file a client sends is put)."""
    from gradio.utils import get_upload_folder, is_in_or_equal

    return is_in_or_equal(Path(path).resolve(), Path(get_upload_folder()).resolve())


def serve(
    model: str = "default",
    adapter: str | None = None,
    detector: str | None = "default",
    host: str = "127.0.0.1",
    port: int = 7860,
    examples: str | Path | None = "examples",
) -> None:
    """Load the model once, build the page and serve it until interrupted."""
    try:
        import gradio  # noqa: F401
        import gradio_image_annotation  # noqa: F401
    except ImportError as err:
        raise SpatialLockError(f"app: needs {err.name}; install it with `pip install -e '.[app]'`") from None
    import uvicorn

    studio = Studio(model, adapter, detector)
    app = web_app(build_app(studio, examples))
    print(f"spatiallock app: model {model} loaded; open http://{host}:{port} (Ctrl+C stops)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
