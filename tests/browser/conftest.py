"""Browser tests of `spatiallock app`: the page served on localhost by the real command, driven by Playwright in
headless Chromium (Debian's `chromium`; Playwright's own browser download is not needed).

Run with `make test-browser`, which installs what they need. SPATIALLOCK_CHROMIUM names another Chromium binary.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STARTUP_SECONDS = float(os.environ.get("SPATIALLOCK_APP_STARTUP", "900"))  # a busy CI machine loads slowly


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def app_files(tmp_path_factory) -> Path:
    """The server's upload folder and file cache (GRADIO_TEMP_DIR), a folder of this test session's own."""
    return tmp_path_factory.mktemp("gradio")


@pytest.fixture(scope="session")
def app_temp(tmp_path_factory) -> Path:
    """The server's temporary folder (TMPDIR): where the page keeps the layout files it offers for download."""
    return tmp_path_factory.mktemp("server-tmp")


@pytest.fixture(scope="session")
def app_url(tmp_path_factory, app_files, app_temp):
    """`spatiallock app` with the shipped model and detector, served on a free localhost port for the session."""
    port = _free_port()
    log = tmp_path_factory.mktemp("app") / "server.log"
    command = [sys.executable, "-m", "spatiallock.cli", "app", "--port", str(port), "--examples", "examples"]
    env = {
        "OMP_NUM_THREADS": "1",
        **os.environ,
        "GRADIO_ANALYTICS_ENABLED": "False",
        "GRADIO_TEMP_DIR": str(app_files),
        "TMPDIR": str(app_temp),
    }
    with open(log, "wb") as stream:
        server = subprocess.Popen(command, cwd=ROOT, stdout=stream, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + STARTUP_SECONDS
    try:
        while True:
            if server.poll() is not None:
                pytest.fail(f"spatiallock app exited with {server.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"spatiallock app did not serve {url} within {STARTUP_SECONDS:.0f} s")
            time.sleep(1)
        yield url
        assert server.poll() is None, f"the server stopped during the tests:\n{log.read_text()[-3000:]}"
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


@pytest.fixture(scope="session")
def browser():
    """Headless Chromium under Playwright."""
    from playwright.sync_api import sync_playwright

    executable = os.environ.get("SPATIALLOCK_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        pytest.fail("no chromium found: `apt-get install -y chromium` (or `make test-browser`, which installs it)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture
def open_page(browser, app_url):
    """A function that opens the app in a new page (several per test: several people), closed after the test."""
    contexts = []

    def open_one():
        context = browser.new_context(viewport={"width": 1400, "height": 1100}, accept_downloads=True)
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(120_000)
        page.goto(app_url)
        page.locator("#canvas canvas").wait_for()
        return page

    yield open_one
    for context in contexts:
        context.close()
