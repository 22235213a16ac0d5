"""The layout editor in the browser: draw boxes on a canvas, name them, write a caption, generate (Gradio).

    spatiallock app --model default --detector default     # then open http://127.0.0.1:7860

The model (and the detector) is loaded once per server and shared by every visitor; Gradio's queue runs one
generation at a time, so two people generating at once both get their images, one after the other. Gradio and
the box-drawing component (`gradio-image-annotation`) are imported only when a page is built: install them
with `pip install -e ".[app]"`. What the page turns into a layout is checked as a layout file is, and every
problem is a message on the page, never a traceback.
"""

from spatiallock.app.page import build_app, serve, uploaded, web_app
from spatiallock.app.studio import Request, Studio, canvas_from_layout, layout_from_canvas, read_layout_file

__all__ = [
    "Request", "Studio", "build_app", "canvas_from_layout", "layout_from_canvas", "read_layout_file", "serve",
    "uploaded", "web_app",
]  # fmt: skip
