"""The app where it is deployed: behind a reverse proxy, as a Hugging Face Space (``SPACE_ID``), restarted.

Real uvicorn servers on localhost ports, started with the options ``serve`` uses
(:func:`webapp.server.uvicorn_options`); the test client plays the proxy by sending X-Forwarded-* headers.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from engine.settings import load_settings
from live_server import live_server
from webapp.auth import add_user, users_entry
from webapp.server import SESSION_COOKIE, create_app, uvicorn_options

ROOT = Path(__file__).resolve().parents[1]
SPACE = {"SPACE_ID": "team/batch-studio"}


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from engine.runtime import Engine

    return Engine(load_settings({"data_dir": str(tmp_path_factory.mktemp("engine"))}, environ={}))


@pytest.fixture
def users_file(tmp_path):
    path = tmp_path / "users.json"
    add_user(path, "alice", "alice-pass", "admin")
    add_user(path, "bob", "bob-pass", "user")
    return path


def make_settings(tmp_path, **overrides):
    values = {"data_dir": str(tmp_path / "data"), "templates_dir": str(ROOT / "templates"), **overrides}
    return load_settings(values, environ={})


def set_cookie_of(answer: httpx.Response) -> str:
    return next(v for k, v in answer.headers.multi_items() if k == "set-cookie" and v.startswith(SESSION_COOKIE))


def sign_in(url: str, headers: dict[str, str] | None = None, password: str = "bob-pass") -> httpx.Response:
    with httpx.Client(base_url=url, timeout=30) as browser:
        return browser.post("/login", data={"username": "bob", "password": password}, headers=headers or {})


# ------------------------------------------------------------------------------ cookies behind HTTPS proxies


def test_on_a_space_the_session_cookie_works_in_huggingfaces_cross_site_frame(tmp_path, engine, users_file, monkeypatch):
    monkeypatch.setenv("SPACE_ID", SPACE["SPACE_ID"])
    settings = make_settings(tmp_path, users_file=str(users_file))
    app, _ = create_app(settings, engine)
    # HF's proxy speaks plain http to the container, from its private network.
    with live_server(app, **uvicorn_options(settings, SPACE)) as url:
        answer = sign_in(url)
        assert answer.status_code == 303
        cookie = set_cookie_of(answer).lower()
        assert "samesite=none" in cookie and "secure" in cookie and "httponly" in cookie
        with httpx.Client(base_url=url, timeout=30, cookies={SESSION_COOKIE: answer.cookies[SESSION_COOKIE]}) as b:
            gone = b.get("/logout")  # deleting it must use the same attributes, or the frame keeps it
        assert "samesite=none" in set_cookie_of(gone).lower() and "secure" in set_cookie_of(gone).lower()


def test_behind_a_trusted_proxy_https_makes_the_cookie_secure_and_an_untrusted_peer_cannot_claim_it(
    tmp_path, engine, users_file
):
    trusted = make_settings(tmp_path, users_file=str(users_file), forwarded_allow_ips="127.0.0.1")
    app, _ = create_app(trusted, engine)
    with live_server(app, **uvicorn_options(trusted, {})) as url:
        cookie = set_cookie_of(sign_in(url, {"X-Forwarded-Proto": "https"})).lower()
        assert "secure" in cookie and "samesite=lax" in cookie
        assert "secure" not in set_cookie_of(sign_in(url)).lower()  # plain http through the proxy

    untrusted = make_settings(tmp_path, users_file=str(users_file), forwarded_allow_ips="10.9.9.9")
    app, _ = create_app(untrusted, engine)
    with live_server(app, **uvicorn_options(untrusted, {})) as url:
        assert "secure" not in set_cookie_of(sign_in(url, {"X-Forwarded-Proto": "https"})).lower()


def test_proxy_trust_defaults():
    workstation = load_settings({}, environ={})
    assert "forwarded_allow_ips" not in uvicorn_options(workstation, {})  # uvicorn's default: loopback only
    space = uvicorn_options(load_settings({}, environ=SPACE), SPACE)
    assert "10.0.0.0/8" in space["forwarded_allow_ips"] and "*" not in space["forwarded_allow_ips"]
    nginx = load_settings({}, environ={"SD35_FORWARDED_ALLOW_IPS": "192.168.1.10"})
    assert uvicorn_options(nginx, SPACE)["forwarded_allow_ips"] == "192.168.1.10"  # the setting wins


def test_a_gradio_space_listens_where_gradio_is_told():
    """A Gradio Space tells the app where to listen as Gradio's launch() reads it; the app's own settings win."""
    gradio_space = {**SPACE, "SYSTEM": "spaces", "GRADIO_SERVER_NAME": "0.0.0.0", "GRADIO_SERVER_PORT": "7861"}
    settings = load_settings({}, environ=gradio_space)
    assert (settings.host, settings.port) == ("0.0.0.0", 7861)
    assert load_settings({}, environ={**gradio_space, "SD35_PORT": "9000"}).port == 9000
    assert load_settings({"port": 9001}, environ=gradio_space).port == 9001


def test_a_space_without_persistent_storage_warns_that_its_data_goes_with_the_container(
    tmp_path, engine, monkeypatch, caplog
):
    if Path("/data").is_dir():
        pytest.skip("this machine has a /data folder: it looks like a Space with persistent storage")
    monkeypatch.setenv("SPACE_ID", SPACE["SPACE_ID"])
    monkeypatch.delenv("SD35_USERS", raising=False)
    settings = make_settings(tmp_path)
    with caplog.at_level(logging.WARNING, logger="webapp.server"):
        create_app(settings, engine)
    warning = next(r.getMessage() for r in caplog.records if "persistent storage" in r.getMessage())
    assert str(Path(settings.data_dir).resolve()) in warning and "lost when it restarts" in warning


# ----------------------------------------------------------------------- rate limits per client, not per proxy


def attempts(url: str, path: str, forwarded_for: str, count: int) -> list[str]:
    """Wrong-password attempts: "refused" (a wrong password) or "limited" (429) each."""
    with httpx.Client(base_url=url, timeout=30, headers={"X-Forwarded-For": forwarded_for}) as client:
        body = {"username": "bob", "password": "guess"}
        answers = [client.post(path, data=body) if path == "/login" else client.post(path, json=body)
                   for _ in range(count)]
    return ["limited" if a.status_code == 429 else "refused" if a.status_code in (400, 401) else str(a.status_code)
            for a in answers]


@contextlib.contextmanager
def sign_in_limited_app(tmp_path, engine, users_file, trusted_proxy: str):
    """The app, served, allowing two sign-in attempts per client and believing proxy headers from
    ``trusted_proxy`` only; yields its URL."""
    settings = make_settings(tmp_path, users_file=str(users_file), forwarded_allow_ips=trusted_proxy,
                             route_rate_limits="POST /login=2,POST /api/token=2")
    app, _ = create_app(settings, engine)
    with live_server(app, **uvicorn_options(settings, {})) as url:
        yield url


@pytest.mark.parametrize("path", ["/login", "/api/token"])
def test_clients_behind_a_trusted_proxy_have_their_own_sign_in_limits(tmp_path, engine, users_file, path):
    with sign_in_limited_app(tmp_path, engine, users_file, trusted_proxy="127.0.0.1") as url:
        assert attempts(url, path, "203.0.113.1", 3) == ["refused", "refused", "limited"]
        assert attempts(url, path, "203.0.113.2", 1) == ["refused"]  # another client: its own bucket


@pytest.mark.parametrize("path", ["/login", "/api/token"])
def test_an_untrusted_peer_cannot_pick_its_bucket_with_x_forwarded_for(tmp_path, engine, users_file, path):
    with sign_in_limited_app(tmp_path, engine, users_file, trusted_proxy="10.9.9.9") as url:
        assert attempts(url, path, "203.0.113.1", 2) == ["refused", "refused"]
        assert attempts(url, path, "203.0.113.2", 1) == ["limited"]  # same peer, whatever it writes


def test_on_a_space_a_client_cannot_escape_its_limit_by_writing_x_forwarded_for_itself(
    tmp_path, engine, users_file, monkeypatch
):
    monkeypatch.setenv("SPACE_ID", SPACE["SPACE_ID"])
    settings = make_settings(tmp_path, users_file=str(users_file), route_rate_limits="POST /api/token=2")
    app, _ = create_app(settings, engine)
    with live_server(app, **uvicorn_options(settings, SPACE)) as url:
        # The proxy appends the address it saw (203.0.113.9) to whatever the client sent.
        assert attempts(url, "/api/token", "198.51.100.1, 203.0.113.9", 2) == ["refused", "refused"]
        assert attempts(url, "/api/token", "198.51.100.2, 203.0.113.9", 1) == ["limited"]
        assert attempts(url, "/api/token", "203.0.113.10", 1) == ["refused"]


# ------------------------------------------------------------------- a Space configured as the README says


def test_a_space_with_users_and_no_key_issues_api_tokens_and_keeps_sessions_across_restarts(
    tmp_path, engine, monkeypatch, caplog
):
    monkeypatch.setenv("SPACE_ID", SPACE["SPACE_ID"])
    monkeypatch.setenv("SD35_USERS", users_entry("alice", "alice-pass", "admin"))
    monkeypatch.delenv("SD35_JWT_SECRET", raising=False)
    settings = make_settings(tmp_path)
    key_file = Path(settings.data_dir) / "token-signing-key"
    with caplog.at_level(logging.INFO, logger="webapp.server"):
        app, _ = create_app(settings, engine)
    assert [r for r in caplog.records if "generated a token signing key" in r.getMessage()]
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    with live_server(app, **uvicorn_options(settings, SPACE)) as url, httpx.Client(base_url=url, timeout=30) as c:
        answer = c.post("/api/token", json={"username": "alice", "password": "alice-pass"})
        assert answer.status_code == 200, answer.text
        token = answer.json()["access_token"]
        assert c.get("/metrics", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        assert c.get("/metrics").status_code == 401
        session = c.post("/login", data={"username": "alice", "password": "alice-pass"}).cookies[SESSION_COOKIE]

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="webapp.server"):
        restarted, _ = create_app(settings, engine)  # a restart, or the Space waking up
    assert [r for r in caplog.records if "token signing key read from" in r.getMessage()]
    with live_server(restarted, **uvicorn_options(settings, SPACE)) as url:
        with httpx.Client(base_url=url, timeout=30, cookies={SESSION_COOKIE: session}) as browser:
            assert browser.get("/", follow_redirects=False).status_code == 200  # still signed in
        with httpx.Client(base_url=url, timeout=30, headers={"Authorization": f"Bearer {token}"}) as client:
            assert client.get("/api/templates").status_code == 200


def test_a_workstation_without_users_makes_no_key_and_its_api_stays_open(tmp_path, engine, monkeypatch):
    monkeypatch.delenv("SPACE_ID", raising=False)
    monkeypatch.delenv("SD35_USERS", raising=False)
    settings = make_settings(tmp_path)
    app, _ = create_app(settings, engine)
    with live_server(app, **uvicorn_options(settings, {})) as url, httpx.Client(base_url=url, timeout=30) as c:
        assert c.get("/api/templates").status_code == 200
        assert c.post("/api/token", json={"username": "a", "password": "b"}).status_code == 400
    assert not (Path(settings.data_dir) / "token-signing-key").exists()


def test_processes_starting_together_share_one_stored_key(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from webapp.auth import stored_signing_key

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: stored_signing_key(tmp_path), range(16)))
    assert len({key for _, key, _ in results}) == 1 and sum(created for *_, created in results) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["token-signing-key"]  # no temporary files left behind


# ----------------------------------------------------------------------------- a token key but no users


@pytest.mark.parametrize("where", ["space", "proxy"])
def test_a_public_app_with_a_token_key_and_no_users_warns_that_its_page_is_open(
    tmp_path, engine, monkeypatch, caplog, where
):
    if where == "space":
        monkeypatch.setenv("SPACE_ID", SPACE["SPACE_ID"])
        settings = make_settings(tmp_path, jwt_secret="s" * 48)
    else:
        monkeypatch.delenv("SPACE_ID", raising=False)
        settings = make_settings(tmp_path, jwt_secret="s" * 48, forwarded_allow_ips="127.0.0.1")
    monkeypatch.delenv("SD35_USERS", raising=False)
    with caplog.at_level(logging.WARNING, logger="webapp.server"):
        app, _ = create_app(settings, engine)
    warnings = [r.getMessage() for r in caplog.records if "no users" in r.getMessage() and "/gradio_api" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    # What the warning says is what happens: the API asks for a token, the page and Gradio's API do not.
    with live_server(app, **uvicorn_options(settings, SPACE if where == "space" else {})) as url:
        with httpx.Client(base_url=url, timeout=30) as visitor:
            assert visitor.get("/api/templates").status_code == 401
            assert visitor.get("/", follow_redirects=False).status_code == 200
            assert visitor.get("/gradio_api/info").status_code == 200


def test_a_token_key_without_users_on_localhost_says_nothing(tmp_path, engine, monkeypatch, caplog):
    monkeypatch.delenv("SPACE_ID", raising=False)
    monkeypatch.delenv("SD35_USERS", raising=False)
    with caplog.at_level(logging.WARNING, logger="webapp.server"):
        create_app(make_settings(tmp_path, jwt_secret="s" * 48), engine)
    assert not [r for r in caplog.records if "/gradio_api" in r.getMessage()]


# -------------------------------------------------------------------- visitors of a public Space without users


def test_each_browser_on_a_public_space_gets_its_own_visitor_cookie_which_is_no_api_token(
    tmp_path, engine, monkeypatch
):
    from webapp.server import VisitorIdentity

    monkeypatch.setenv("SPACE_ID", SPACE["SPACE_ID"])
    monkeypatch.delenv("SD35_USERS", raising=False)
    settings = make_settings(tmp_path, jwt_secret="v" * 48)  # API tokens and visitor cookies share the key
    app, _ = create_app(settings, engine)
    with live_server(app, **uvicorn_options(settings, SPACE)) as url:
        names = []
        for _ in range(2):
            with httpx.Client(base_url=url, timeout=30) as browser:
                page = browser.get("/")
                cookie = next(v for k, v in page.headers.multi_items()
                              if k == "set-cookie" and v.startswith(VisitorIdentity.COOKIE))
                assert "samesite=none" in cookie.lower() and "secure" in cookie.lower()
                value = page.cookies[VisitorIdentity.COOKIE]
                names.append(VisitorIdentity.from_settings(settings).name_in({VisitorIdentity.COOKIE: value}))
                again = browser.get("/", cookies={VisitorIdentity.COOKIE: value})
                assert VisitorIdentity.COOKIE not in again.cookies  # kept, not replaced
                refused = browser.get("/api/templates", headers={"Authorization": f"Bearer {value}"})
                assert refused.status_code == 401 and refused.json()["error"]["details"]["reason"] == "bad_audience"
        assert all(n and n.startswith("visitor-") for n in names) and names[0] != names[1]


# ------------------------------------------------------------------- `python app.py serve` under a supervisor


@contextlib.contextmanager
def served(tmp_path: Path, *args: str) -> Iterator[tuple[subprocess.Popen, str]]:
    """``python app.py serve`` as a supervisor starts it: its own process, a free port; yields it and its URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = open(tmp_path / f"serve-{port}.log", "w")
    process = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "serve", "--port", str(port), *args],
                               cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, (tmp_path / f"serve-{port}.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the server did not start"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/api/healthz", timeout=2).status_code == 200:
                    break
            time.sleep(0.3)
        yield process, url
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()


def stopped_within(process: subprocess.Popen, seconds: float) -> bool:
    try:
        process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        return False
    return True


def ledger_rows(db: Path) -> list[tuple[int, str, int]]:
    import sqlite3

    with contextlib.closing(sqlite3.connect(db)) as conn:
        return conn.execute("SELECT row_number, status, crashes FROM generations ORDER BY row_number").fetchall()


def test_a_stop_does_not_wait_for_the_pages_still_open(tmp_path):
    """An open page keeps Gradio's heartbeat stream open for as long as the tab lives: systemd, docker stop
    or a Space restart must not wait for every browser to close (until a SIGKILL, which counts the rows
    being sampled as crashes)."""
    with served(tmp_path, "--data-dir", "d") as (process, url):
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as tab:
            tab.sendall(f"GET /gradio_api/heartbeat/tab1 HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            received = b""
            while b"ALIVE" not in received:  # the stream is open: the page is live
                chunk = tab.recv(4096)
                assert chunk, received
                received += chunk
            process.send_signal(signal.SIGTERM)
            assert stopped_within(process, 60), "SIGTERM waited for the open page"


def test_a_hangup_stops_the_server_cleanly_and_its_rows_resume(tmp_path):
    """SIGHUP (the terminal or SSH session that started the server closed) stops it as SIGTERM does: the
    rows it had claimed go back to the queue, none blamed for a crash, ready for the next start to resume."""
    rows = [{"product_name": f"item {n}", "width": 256, "height": 256, "steps": 40} for n in range(6)]
    with served(tmp_path, "--data-dir", "d", "--max-gpu-batch", "1") as (process, url):
        answer = httpx.post(url + "/api/batches", json={"template": "product_shot", "rows": rows, "batch_id": "hup"},
                            timeout=60)
        assert answer.status_code == 200, answer.text
        deadline = time.monotonic() + 120
        while not [r for r in ledger_rows(tmp_path / "d" / "ledger.db") if r[1] == "running"]:
            assert time.monotonic() < deadline, "no row started"
            time.sleep(0.2)
        process.send_signal(signal.SIGHUP)
        assert stopped_within(process, 60)
        assert process.returncode != -signal.SIGHUP  # not killed by the signal: it shut down
    rows_left = ledger_rows(tmp_path / "d" / "ledger.db")
    assert {status for _, status, _ in rows_left} <= {"done", "queued"}, rows_left
    assert all(crashes == 0 for *_, crashes in rows_left)


def test_a_stop_ends_the_running_batch_before_giving_its_rows_back(tmp_path):
    """SIGTERM with a row being sampled: the batch stops between sampler steps before the server gives its
    rows back, so no row is written by a process that gave it back (a second server on the same data
    folder may claim it at once). The row in flight ends up done once with its file, or waiting to run."""
    import sqlite3

    rows = [{"product_name": f"item {n}", "width": 512, "height": 512, "steps": 60} for n in range(6)]
    with served(tmp_path, "--data-dir", "d", "--max-gpu-batch", "1") as (process, url):
        answer = httpx.post(url + "/api/batches", json={"template": "product_shot", "rows": rows, "batch_id": "term"},
                            timeout=60)
        assert answer.status_code == 200, answer.text
        deadline = time.monotonic() + 120
        in_flight: list[int] = []
        while not in_flight:  # a row whose sampler has begun
            assert time.monotonic() < deadline, "no row started"
            with contextlib.closing(sqlite3.connect(tmp_path / "d" / "ledger.db")) as conn:
                in_flight = [n for (n,) in conn.execute(
                    "SELECT row_number FROM generations WHERE status = 'running' AND began_at IS NOT NULL")]
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        assert stopped_within(process, 60)
        log = (tmp_path / f"serve-{url.rsplit(':', 1)[1]}.log").read_text()

    with contextlib.closing(sqlite3.connect(tmp_path / "d" / "ledger.db")) as conn:
        ledger = {n: (status, path, crashes) for n, status, path, crashes in conn.execute(
            "SELECT row_number, status, image_path, crashes FROM generations")}
    assert {status for status, _, _ in ledger.values()} <= {"done", "queued"}, ledger
    assert all(crashes == 0 for *_, crashes in ledger.values())
    done_files = sorted(Path(path).name for status, path, _ in ledger.values() if status == "done")
    assert sorted(p.name for p in (tmp_path / "d" / "outputs" / "term").iterdir()) == done_files  # one each, no more
    row = ledger[in_flight[0]]
    assert row[0] == "queued" or (row[0] == "done" and Path(row[1]).is_file()), row
    assert "stopping batch term between sampler steps" in log and "batch term stopped" in log, log[-3000:]
    assert "did not stop within" not in log


def test_an_open_page_fills_no_log_with_its_polling(tmp_path):
    """An open page polls every second (its progress timer: a queue join and its event stream): two access
    lines a second per tab, about 170,000 a day each, idle, burying what the log is read for. Requests people
    and scripts make are still logged, and so is a page request the server refused."""
    with served(tmp_path, "--data-dir", "d") as (process, url):
        with httpx.Client(base_url=url, timeout=60) as tab:
            config = tab.get("/config").json()
            on_load = next(d["id"] for d in config["dependencies"] if d.get("api_name") == "show_interrupted")
            for tick in range(5):
                joined = tab.post("/gradio_api/queue/join", json={
                    "fn_index": on_load, "data": [], "session_hash": "tab1", "trigger_id": None, "event_data": None})
                assert joined.status_code == 200, joined.text
                with tab.stream("GET", "/gradio_api/queue/data?session_hash=tab1") as events:
                    assert any("process_completed" in line for line in events.iter_lines())
            assert tab.post("/gradio_api/queue/join", json={"fn_index": on_load}).status_code >= 400
            assert tab.get("/api/templates").status_code == 200
        process.send_signal(signal.SIGTERM)
        assert stopped_within(process, 60)
        log = (tmp_path / f"serve-{url.rsplit(':', 1)[1]}.log").read_text()
    access = [line for line in log.splitlines() if "uvicorn.access" in line]
    assert len([line for line in access if "/gradio_api/queue/" in line]) == 1, access  # the refused join
    assert len([line for line in access if "GET /api/templates" in line]) == 1, access
