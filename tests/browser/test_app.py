"""The layout editor in a real browser: draw, label, generate with the shipped model, download and load layouts,
bad input shown on the page, two people at once.

The screenshot of the README (docs/app.png) is taken here: into the test's own temporary folder, unless
SPATIALLOCK_SCREENSHOTS names the folder (relative to the repository) to write it to, as `make screenshots` does
with `docs`. A test run leaves the tracked files as they were."""

from __future__ import annotations

import json
import os
import re
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FEW_STEPS = "4"


def screenshot_folder(tmp_path: Path) -> Path:
    """Where the page's screenshot goes: SPATIALLOCK_SCREENSHOTS (a folder of the repository) or `tmp_path`."""
    chosen = os.environ.get("SPATIALLOCK_SCREENSHOTS")
    return ROOT / chosen if chosen else tmp_path


def draw_box(page, box: tuple[float, float, float, float], label: str) -> None:
    """Drag a box over the canvas picture (box as fractions of it) and type its label in the dialog."""
    canvas = page.locator("#canvas canvas")
    frame = canvas.bounding_box()
    side = min(frame["width"], frame["height"])  # the square picture, centred in the canvas
    left, top = frame["x"] + (frame["width"] - side) / 2, frame["y"] + (frame["height"] - side) / 2
    x0, y0, x1, y1 = box
    page.mouse.move(left + x0 * side, top + y0 * side)
    page.mouse.down()
    page.mouse.move(left + x1 * side, top + y1 * side, steps=8)
    page.mouse.up()
    dialog = page.locator("#model-box-edit")
    dialog.get_by_label("Label", exact=True).fill(label)
    dialog.get_by_role("button", name="OK").click()


def set_number(page, elem_id: str, value: str) -> None:
    field = page.locator(f"#{elem_id} input[type=number]")
    field.fill(value)
    field.press("Enter")


def generate(page, images: str = "1") -> float:
    """Press Generate with 1 image at few steps; return the seconds until an image is on screen."""
    set_number(page, "images", images)
    set_number(page, "steps", FEW_STEPS)
    start = time.monotonic()
    page.locator("#generate").click()
    page.locator("#gallery img").first.wait_for(timeout=300_000)
    return time.monotonic() - start


def status(page):
    return page.locator("#status")


def layout_json(page) -> dict:
    page.get_by_text("Layout JSON", exact=True).click()
    text = page.locator("#layout-json .cm-content").inner_text()
    page.get_by_text("Layout JSON", exact=True).click()
    return json.loads(text)


def test_the_layout_check_is_one_event_whose_newest_state_answers_last(app_url):
    """Every change of the canvas or caption (and the page load) goes to one event that keeps at most one reply in
    flight and sends the newest state after it: with one event per component, two replies could arrive out of
    order and leave the check and the download button on an older layout than the one on screen."""
    with urllib.request.urlopen(app_url + "config", timeout=30) as response:
        config = json.load(response)
    ids = {c["props"].get("elem_id"): c["id"] for c in config["components"] if c.get("props", {}).get("elem_id")}
    layout = [d for d in config["dependencies"] if {ids["layout-check"], ids["download"]} <= set(d["outputs"])]
    assert len(layout) == 1, [d["targets"] for d in layout]
    (event,) = layout
    targets = {(target, name) for target, name in event["targets"]}
    assert {(ids["canvas"], "change"), (ids["caption"], "change")} <= targets, targets
    assert any(name == "load" for _, name in targets), targets
    assert event["trigger_mode"] == "always_last"


def test_draw_label_generate_and_round_trip(open_page, tmp_path):
    page = open_page()
    draw_box(page, (0.06, 0.30, 0.44, 0.68), "red circle")
    draw_box(page, (0.56, 0.30, 0.94, 0.68), "blue square")
    page.locator("#caption textarea").fill("a red circle to the left of a blue square")
    page.locator("#layout-check").get_by_text("Layout ready: 2 objects").wait_for()

    with page.expect_download() as download:
        page.locator("#download").click()
    saved = tmp_path / "layout.json"
    download.value.save_as(saved)
    layout = json.loads(saved.read_text())
    assert layout["caption"] == "a red circle to the left of a blue square"
    assert [o["label"] for o in layout["objects"]] == ["red circle", "blue square"]
    for got, asked in zip(layout["objects"], ((0.06, 0.30, 0.44, 0.68), (0.56, 0.30, 0.94, 0.68))):
        assert all(abs(g - a) < 0.02 for g, a in zip(got["box"], asked)), (got, asked)

    page.get_by_label("Detector's boxes and IoU").check()
    seconds = generate(page)
    print(f"first image on screen {seconds:.1f} s after pressing Generate ({FEW_STEPS} steps)")
    status(page).get_by_text(re.compile(r"1 image, [\d.]+ s each")).wait_for()
    assert page.locator("#gallery img").count() >= 1
    table = page.locator("#objects").inner_text()
    assert "red circle" in table and "blue square" in table
    assert len(re.findall(r"\b[01]\.\d\d\b", table)) >= 2, table  # an IoU per object (0.00 when not found)
    assert "Error" not in status(page).inner_text()
    shot = screenshot_folder(tmp_path) / "app.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes().startswith(b"\x89PNG")

    # the downloaded file loads back into an empty page as the same layout
    page.locator("#empty").click()
    page.locator("#layout-check").get_by_text("no boxes").wait_for()
    with page.expect_file_chooser() as chooser:
        page.locator("#load").click()
    chooser.value.set_files(str(saved))
    status(page).get_by_text("Loaded layout.json").wait_for()
    page.locator("#layout-check").get_by_text("Layout ready: 2 objects").wait_for()
    assert layout_json(page) == layout


def test_bad_layouts_show_a_message_and_the_page_keeps_working(open_page, tmp_path):
    page = open_page()
    page.locator("#caption textarea").fill("a red circle")
    page.locator("#generate").click()
    status(page).get_by_text("no boxes: draw at least one box").wait_for()

    draw_box(page, (0.2, 0.2, 0.6, 0.6), "")  # a box left without a label
    page.locator("#generate").click()
    status(page).get_by_text("box 1: empty label").wait_for()

    zero = tmp_path / "zero.json"
    zero.write_text(json.dumps({"caption": "x", "objects": [{"label": "red circle", "box": [0.2, 0.2, 0.2, 0.5]}]}))
    crowded = tmp_path / "crowded.json"
    objects = [{"label": "red circle", "box": [0.01 * i, 0.1, 0.01 * i + 0.05, 0.2]} for i in range(31)]
    crowded.write_text(json.dumps({"caption": "many circles", "objects": objects}))
    for path, expected in ((zero, "has zero area"), (crowded, "at most 30 are supported")):
        with page.expect_file_chooser() as chooser:
            page.locator("#load").click()
        chooser.value.set_files(str(path))
        status(page).get_by_text(expected).wait_for()
        assert "Traceback" not in page.content()

    page.get_by_role("button", name="two_shapes").click()  # the examples are one click away
    status(page).get_by_text("Loaded two_shapes.json").wait_for()
    generate(page)
    status(page).get_by_text(re.compile(r"1 image, [\d.]+ s each")).wait_for()


def test_two_people_generating_at_once_both_get_images(open_page):
    pages = [open_page(), open_page()]
    for page, example in zip(pages, ("two_shapes", "three_shapes")):
        page.get_by_role("button", name=example).click()
        status(page).get_by_text(f"Loaded {example}.json").wait_for()
        set_number(page, "images", "1")
        set_number(page, "steps", FEW_STEPS)
    for page in pages:
        page.locator("#generate").click()
    for page in pages:
        status(page).get_by_text(re.compile(r"1 image, [\d.]+ s each")).wait_for(timeout=300_000)
        assert page.locator("#gallery img").count() >= 1


@pytest.mark.parametrize("example", ["two_shapes", "three_shapes"])
def test_each_example_at_the_default_settings(open_page, example):
    """An example as a new user runs it: one click to load, Generate with every setting left as the page offers
    it. The seconds until the first image is on screen are printed (and written to SPATIALLOCK_APP_TIMES when
    set); the benchmark, not this test, judges them."""
    page = open_page()
    page.get_by_role("button", name=example).click()
    status(page).get_by_text(f"Loaded {example}.json").wait_for()
    images = int(page.locator("#images input[type=number]").input_value())
    start = time.monotonic()
    page.locator("#generate").click()
    page.locator("#gallery img").first.wait_for(timeout=300_000)
    seconds = time.monotonic() - start
    status(page).get_by_text(re.compile(rf"{images} images?, [\d.]+ s each")).wait_for(timeout=600_000)
    assert page.locator("#gallery img").count() >= 1
    assert "Error" not in status(page).inner_text()
    steps = page.locator("#steps input[type=number]").input_value()
    print(f"{example}: first image on screen {seconds:.1f} s after pressing Generate ({images} images, {steps} steps)")
    record = os.environ.get("SPATIALLOCK_APP_TIMES")
    if record:
        path = Path(record)
        times = json.loads(path.read_text()) if path.is_file() else {}
        measured = {"first_image_seconds": round(seconds, 2), "images": images, "steps": int(steps)}
        times.setdefault("examples", {})[example] = measured
        path.write_text(json.dumps(times, indent=1) + "\n")
