"""`spatiallock app`: the layout editor in the browser (draw boxes, name them, generate)."""

from __future__ import annotations

import argparse

HELP = """\
Serve a page on which one draws boxes on an empty canvas (or on an uploaded picture), labels them, writes a
caption and generates images with MODEL, seeing them with the requested boxes drawn and, when asked, the
detector's boxes and each object's IoU. Layouts download as layout JSON and load back; the layout files of
EXAMPLES are one click away. The model is loaded once and shared; requests are queued.

Needs the app extra: pip install -e ".[app]"

examples:
  spatiallock app                                   # the shipped model, then open http://127.0.0.1:7860
  spatiallock app --model my-layout-model --detector none --host 0.0.0.0 --port 8080
"""


def check_port(host: str, port: int) -> None:
    """Refuse, in one line, an address this server could not listen on (a port in use, a host not of this
    machine)."""
    import socket

    from spatiallock.errors import SpatialLockError

    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server's own socket
            probe.bind((host, port))
    except OSError as err:
        raise SpatialLockError(f"--port {port}: cannot serve on {host}:{port}: {err.strerror}") from None


def run_app(args: argparse.Namespace) -> int:
    from spatiallock.app import serve
    from spatiallock.errors import SpatialLockError

    if not 0 <= args.port <= 65535:
        raise SpatialLockError(f"--port: from 0 to 65535, got {args.port}")
    check_port(args.host, args.port)  # before the model is loaded and the page announced
    serve(args.model, args.adapter, args.detector, args.host, args.port, args.examples)
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "app", help="the layout editor in the browser: draw boxes, name them, generate", description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--model", default="default", help="model folder, hub id or `default` (default: default)")
    parser.add_argument("--adapter", default=None, help="adapter folder to attach to --model, or `none`")
    parser.add_argument("--detector", default="default", help="detector folder, `default` (the shipped one) or `none`")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    parser.add_argument(
        "--examples", default="examples", metavar="DIR", help="layout files offered as examples (default: examples/)"
    )
    parser.set_defaults(func=run_app)
