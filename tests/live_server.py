"""A real uvicorn server on a free localhost port, in a thread, for tests that need a socket (WebSockets,
bodies sent slowly, clients that speak plain HTTP)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def live_server(app: Any, startup_timeout_s: float = 30.0, **options: Any) -> Iterator[str]:
    """Serve ``app`` (lifespan included) on 127.0.0.1 at a port the OS picks; yields ``http://host:port``.

    ``options`` go to uvicorn's config as ``serve`` passes them (e.g. ``webapp.server.uvicorn_options``)."""
    import uvicorn

    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on", **options)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="live-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    host, port = server.servers[0].sockets[0].getsockname()[:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
