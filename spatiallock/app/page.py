"""The Gradio page of `spatiallock app`, the ASGI app that serves it, and `serve`."""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

from spatiallock.app.studio import (
    MAX_IMAGES,
    OWN_SCHEDULER,
    Request,
    Studio,
    canvas_from_layout,
    default,
    empty_canvas,
    layout_from_canvas,
    message,
    read_layout_file,
    result_rows,
)  # fmt: skip
from spatiallock.errors import SpatialLockError, first_line
from spatiallock.files import write_text_atomic

LOG = logging.getLogger(__name__)


def build_app(studio: Studio, examples: str | Path | None = "examples"):
    """The Gradio page (a `gr.Blocks`) for `studio`; `examples`: a folder of layout files, one button each."""
    import gradio as gr
    from gradio_image_annotation import image_annotator

    from spatiallock.pipelines.loading import SCHEDULERS

    examples = sorted(Path(examples).glob("*.json")) if examples and Path(examples).is_dir() else []
    downloads = Path(tempfile.mkdtemp(prefix="spatiallock-app-"))  # one layout file per visitor, gone at shutdown
    atexit.register(shutil.rmtree, downloads, ignore_errors=True)

    def session_file(request) -> Path:
        """The one layout file of a visitor's session, rewritten at each change of the canvas or caption."""
        session = getattr(request, "session_hash", None) or "local"
        folder = downloads / hashlib.sha256(session.encode()).hexdigest()[:32]
        folder.mkdir(exist_ok=True)
        return folder / "layout.json"

    def forget(request):
        """A visitor left: their layout file goes."""
        shutil.rmtree(session_file(request).parent, ignore_errors=True)

    def describe(canvas, caption, request=None):
        """Layout JSON view, download button and a one-line check of what is on the canvas."""
        try:
            layout = layout_from_canvas(caption, canvas)
        except SpatialLockError as err:
            return "", gr.DownloadButton(value=None, interactive=False), f"Layout not ready: {err}."
        text = json.dumps(layout.to_json(), indent=1)
        path = session_file(request)
        write_text_atomic(path, text + "\n")
        objects = f"{len(layout)} object{'s' * (len(layout) != 1)}"
        return text, gr.DownloadButton(value=str(path), interactive=True), f"Layout ready: {objects}."

    # Gradio passes the visitor's request to a parameter annotated gr.Request (set here: this module's annotations
    # are strings, which Gradio cannot resolve for a name imported inside this function)
    forget.__annotations__ = describe.__annotations__ = {"request": gr.Request}

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
                    seed = gr.Number(default("seed"), precision=0, minimum=0, label="Seed")
                with gr.Row():
                    steps = gr.Slider(1, 100, value=default("steps"), step=1, label="Steps", elem_id="steps")
                    guidance = gr.Slider(
                        0.0, 15.0, value=default("guidance"), step=0.5, label="Guidance (classifier-free)"
                    )
                with gr.Accordion("More options", open=False):
                    scheduler = gr.Dropdown([OWN_SCHEDULER, *sorted(SCHEDULERS)], value=OWN_SCHEDULER, label="Sampler")
                    grounding = gr.Slider(
                        0.0,
                        1.0,
                        value=studio.pipe.default_grounding_steps,
                        step=0.05,
                        label="Share of steps that use the layout (the model's own by default)",
                    )
                    lg_steps = gr.Slider(
                        0,
                        50,
                        value=default("layout_guidance_steps"),
                        step=1,
                        label="Layout guidance steps (training-free)",
                    )
                    lg_scale = gr.Number(default("layout_guidance_scale"), minimum=0, label="Layout guidance scale")
                    init = gr.Checkbox(
                        default("init_from_layout"), label="Start from the layout rendered as a picture"
                    )
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
        # one event for every change of the layout, at most one reply in flight and the newest state sent last:
        # two events (one per component) could answer out of order and leave the check and the download button
        # on an older layout than the one on screen
        gr.on(
            [page.load, canvas.change, caption.change],
            describe,
            [canvas, caption],
            [view, download, check],
            queue=False,
            show_progress="hidden",
            trigger_mode="always_last",
        )
        new.click(lambda: (empty_canvas(), ""), None, [canvas, caption], queue=False)
        upload.upload(load, [upload, canvas], [canvas, caption, status], queue=False)
        for path, button in buttons.items() if examples else ():
            button.click(lambda canvas, path=path: load(path, canvas), canvas, [canvas, caption, status])
        page.unload(forget)
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
