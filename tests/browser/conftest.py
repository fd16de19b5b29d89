"""A real app for the browser tests: uvicorn in a thread on a free localhost port, a temporary data
folder, a users file with an admin and a user, the demo model, and Debian's chromium via Playwright."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "test-artifacts" / "screenshots"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run",
                 # A page of one loopback site (localhost) framing the app on another (127.0.0.1) stands in
                 # for huggingface.co framing a Space; Chromium's local-network checks would refuse the frame.
                 "--disable-features=LocalNetworkAccessChecks"]
USERS = {"alice": ("alice-pass", "admin"), "bob": ("bob-pass", "user")}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def app_server(tmp_path_factory):
    """``(base_url, services)`` of the running web app."""
    from engine.settings import load_settings
    from webapp.auth import UserStore, add_user
    from webapp.server import create_app

    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    folder = tmp_path_factory.mktemp("webapp")
    users_file = folder / "users.json"
    for name, (password, role) in USERS.items():
        add_user(users_file, name, password, role)
    port = _free_port()
    settings = load_settings(
        {"data_dir": str(folder / "data"), "templates_dir": str(ROOT / "templates"), "users_file": str(users_file),
         "port": port},
        environ={},
    )
    app, services = create_app(settings, users=UserStore.from_file(users_file))
    with _serving(app, port):
        yield f"http://127.0.0.1:{port}", services


@pytest.fixture(scope="module")
def space_server(tmp_path_factory):
    """``(base_url, services)`` of the app as a public Hugging Face Space without users (``SPACE_ID`` set
    while it is built): everyone uses it without signing in."""
    import os

    from engine.settings import load_settings
    from webapp.auth import UserStore
    from webapp.server import create_app

    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    folder = tmp_path_factory.mktemp("space")
    port = _free_port()
    settings = load_settings({"data_dir": str(folder / "data"), "templates_dir": str(ROOT / "templates"),
                              "port": port}, environ={})
    before = os.environ.get("SPACE_ID")
    os.environ["SPACE_ID"] = "team/batch-studio"
    try:
        app, services = create_app(settings, users=UserStore([]))
    finally:
        if before is None:
            os.environ.pop("SPACE_ID")
        else:
            os.environ["SPACE_ID"] = before
    with _serving(app, port):
        yield f"http://127.0.0.1:{port}", services


@pytest.fixture(scope="module")  # Playwright's sync API holds an event loop: let it go before other tests
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def new_page(browser):
    """Pages in fresh contexts (own cookies), English unless a locale is given; closed after the test."""
    contexts = []

    def make(locale: str = "en-US"):
        context = browser.new_context(locale=locale, viewport={"width": 1400, "height": 1000}, accept_downloads=True)
        context.set_default_timeout(30_000)
        contexts.append(context)
        return context.new_page()

    yield make
    for context in contexts:
        context.close()


@pytest.fixture
def screenshot():
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)

    def take(page, name: str) -> None:
        page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)

    return take


@contextlib.contextmanager
def _serving(app, port: int):
    """``app`` served by uvicorn on a thread, from started to stopped."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="webapp", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the web app did not start")
        time.sleep(0.1)
    try:
        yield
    finally:
        server.should_exit = True
        thread.join(timeout=10)
