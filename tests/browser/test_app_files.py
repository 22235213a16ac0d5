"""The page's HTTP API against a client that names files of the server: a `FileData` path outside the upload
folder is refused before it is opened or copied, and nothing outside the served folders comes back. Plain HTTP
on 127.0.0.1 to the server that `app_url` runs (no browser)."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SECRET = "private-4f1c9e"


def call(url: str, api: str, data: list) -> str:
    """POST an event to /gradio_api/call/API and return the whole event stream of its result."""
    body = json.dumps({"data": data}).encode()
    request = urllib.request.Request(
        f"{url}gradio_api/call/{api}", data=body, headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        event = json.load(response)["event_id"]
    with urllib.request.urlopen(f"{url}gradio_api/call/{api}/{event}", timeout=300) as response:
        return response.read().decode()


def fetch(url: str, path: str) -> tuple[int, str]:
    """Status and text of GET /gradio_api/file=PATH."""
    try:
        with urllib.request.urlopen(f"{url}gradio_api/file={urllib.parse.quote(path)}", timeout=60) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as err:
        return err.code, ""


def file_data(path: Path | str, name: str) -> dict:
    return {"path": str(path), "orig_name": name, "meta": {"_type": "gradio.FileData"}}


@pytest.fixture
def secret(tmp_path):
    """A file of the server's machine that no client uploaded, under a name no other test uses."""
    path = tmp_path / f"secret-{tmp_path.name}.txt"
    path.write_text(SECRET + "\n")
    return path


def generate_request(picture: dict) -> list:
    """The inputs of the page's generate event: canvas (a picture named by path), caption and the options."""
    canvas = {"image": picture, "boxes": [], "orientation": 0}
    return [canvas, "a", 1, 0, 2, 5, "model's own", 1, 0, 20, False, True, False]


def copies(folder: Path, name: str) -> list[Path]:
    """Files called `name` anywhere under the server's upload folder and cache."""
    return [path for path in folder.rglob(name) if path.is_file()]


def test_generate_refuses_a_canvas_path_outside_the_upload_folder(app_url, app_files, secret):
    reply = call(app_url, "generate", generate_request(file_data(secret, "x.png")))
    assert reply.startswith("event: error"), reply
    assert not copies(app_files, secret.name), "the server copied a file the client named into its cache"
    assert SECRET not in reply
    status, text = fetch(app_url, str(secret))
    assert status != 200 and SECRET not in text, "the file was served by path"


def test_load_refuses_a_json_path_outside_the_upload_folder(app_url, app_files, tmp_path):
    layout = tmp_path / f"layout-{tmp_path.name}.json"
    caption = "a private caption 7d2e"
    layout.write_text(json.dumps({"caption": caption, "objects": [{"label": "red circle", "box": [0, 0, 1, 1]}]}))
    reply = call(app_url, "load", [file_data(layout, "layout.json"), None])
    assert reply.startswith("event: error"), reply
    assert caption not in reply, "the server read a layout file the client named"
    assert not copies(app_files, layout.name)


@pytest.mark.parametrize("path", ["/etc/passwd", str(ROOT / "pyproject.toml")])
def test_server_files_are_neither_copied_nor_served(app_url, app_files, path):
    before = set(copies(app_files, Path(path).name))
    reply = call(app_url, "generate", generate_request(file_data(path, "x.png")))
    assert reply.startswith("event: error"), reply
    assert set(copies(app_files, Path(path).name)) == before, f"{path} was copied into the server's cache"
    status, text = fetch(app_url, path)
    assert status != 200, f"{path} served directly: {text[:80]}"


def test_the_server_still_answers_after_refusals(app_url):
    with urllib.request.urlopen(app_url, timeout=60) as response:
        assert response.status == 200


def test_uploaded_means_inside_the_upload_folder(tmp_path, monkeypatch):
    from spatiallock.app import uploaded

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "uploads"))
    assert uploaded(tmp_path / "uploads" / ("0" * 64) / "layout.json")
    assert not uploaded(tmp_path / "layout.json")
    assert not uploaded(tmp_path / "uploads" / ".." / "layout.json")
    assert not uploaded("/etc/passwd")


def test_one_layout_file_per_visitor_however_often_the_layout_changes(open_page, app_temp):
    """Every canvas or caption change rewrites the visitor's one layout file (it wrote a new one each time)."""

    def layout_files() -> list[Path]:
        return sorted(app_temp.glob("spatiallock-app-*/*/layout.json"))

    before = set(layout_files())
    page = open_page()
    page.get_by_role("button", name="two_shapes").click()  # boxes on the canvas: a layout ready to download
    page.wait_for_timeout(1500)
    caption = page.locator("#caption textarea")
    for n in range(12):
        caption.fill(f"a red circle, version {n}")
        caption.press("Tab")
    page.wait_for_timeout(1500)
    mine = set(layout_files()) - before
    assert len(mine) == 1, sorted(mine)
    assert "version 11" in mine.pop().read_text()  # the file holds the latest layout
    page.close()
