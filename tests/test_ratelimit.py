import asyncio
import io
import json
import threading

import pytest

from engine.errors import AccessDenied, EngineError
from webapp.ratelimit import RateLimiter, UploadLimit, UploadLimitMiddleware, parse_route_limits


class FakeClock:
    """Seconds that only move when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_allows_limit_then_refuses_with_retry_after():
    clock = FakeClock()
    limiter = RateLimiter(6, clock=clock)
    decisions = [limiter.check("alice", "POST /prompt") for _ in range(6)]
    assert all(d.allowed for d in decisions)
    assert [d.remaining for d in decisions] == [5, 4, 3, 2, 1, 0]
    refused = limiter.check("alice", "POST /prompt")
    assert not refused.allowed
    assert refused.retry_after_s == pytest.approx(10.0)  # 6/min earns one request back every 10 s
    assert refused.headers() == {"X-RateLimit-Limit": "6", "X-RateLimit-Remaining": "0", "Retry-After": "10"}


def test_recovers_over_the_window():
    clock = FakeClock()
    limiter = RateLimiter(6, clock=clock)
    for _ in range(6):
        limiter.check("alice", "r")
    clock.advance(9.9)
    assert not limiter.check("alice", "r").allowed
    clock.advance(0.2)  # past the retry_after it was told
    assert limiter.check("alice", "r").allowed
    assert not limiter.check("alice", "r").allowed
    clock.advance(60)
    assert [limiter.check("alice", "r").allowed for _ in range(7)] == [True] * 6 + [False]


def test_keys_are_per_user_and_route_with_overrides():
    clock = FakeClock()
    limiter = RateLimiter(3, clock=clock, overrides={"POST /prompt": 1})
    assert limiter.check("alice", "POST /prompt").allowed
    assert not limiter.check("alice", "POST /prompt").allowed
    assert limiter.check("bob", "POST /prompt").allowed  # another user has their own bucket
    assert [limiter.check("alice", "GET /history").allowed for _ in range(4)] == [True] * 3 + [False]
    assert limiter.check("alice", "POST /prompt").limit == 1
    assert limiter.check("alice", "GET /queue").limit == 3


def test_memory_is_bounded():
    clock = FakeClock()
    limiter = RateLimiter(5, clock=clock, max_keys=100)
    for i in range(1000):
        limiter.check(f"user{i}", "r")
    assert len(limiter) == 100
    clock.advance(61)  # every bucket is full again: dropping them all loses nothing
    limiter.check("late", "r")
    assert len(limiter) == 1


def test_thread_safe_under_contention():
    limiter = RateLimiter(500)
    allowed = []

    def hammer():
        allowed.extend(limiter.check("alice", "r").allowed for _ in range(200))

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # 800 attempts within far less than a second: exactly the burst of 500 (plus a few earned meanwhile)
    assert 500 <= sum(allowed) <= 510


def test_invalid_limits_are_refused():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(EngineError):
            RateLimiter(bad)
    with pytest.raises(EngineError, match="rate limit of /x"):
        RateLimiter(5, overrides={"/x": 0})


def test_parse_route_limits():
    assert parse_route_limits("POST /prompt=10, /api/batches=5") == {"POST /prompt": 10, "/api/batches": 5}
    assert parse_route_limits("") == {}
    with pytest.raises(EngineError, match="ROUTE=REQUESTS_PER_MINUTE"):
        parse_route_limits("/prompt:10")


def test_route_rate_limits_setting_reaches_the_api_guard():
    from engine.settings import load_settings
    from webapp.auth import UserStore
    from webapp.server import api_guard

    settings = load_settings({"rate_limit_per_minute": 50},
                             environ={"SD35_ROUTE_RATE_LIMITS": "POST /prompt=10, POST /api/batches=5"})
    limiter = api_guard(settings, UserStore([])).limiter
    assert [limiter.limit_for(r) for r in ("POST /prompt", "POST /api/batches", "GET /queue")] == [10, 5, 50]
    with pytest.raises(EngineError, match="ROUTE=REQUESTS_PER_MINUTE"):
        api_guard(load_settings({"route_rate_limits": "POST /prompt"}, environ={}), UserStore([]))


# --- uploads -------------------------------------------------------------------------------------------------


class CountingStream(io.RawIOBase):
    """A large binary body that counts how many bytes were actually pulled from it."""

    def __init__(self, size: int) -> None:
        self.remaining = size
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        n = self.remaining if n < 0 else min(n, self.remaining)
        self.remaining -= n
        self.bytes_read += n
        return b"x" * n


def test_upload_limit_stops_early():
    limit = UploadLimit(10_000)
    stream = CountingStream(10_000_000)
    with pytest.raises(AccessDenied) as caught:
        limit.read(stream, chunk_size=4096)
    assert caught.value.status == 413
    assert stream.bytes_read <= 10_000 + 4096  # at most one chunk past the limit, never the whole body


def test_upload_within_limit_is_read_and_copied():
    limit = UploadLimit(10_000)
    assert limit.read(io.BytesIO(b"a" * 10_000), chunk_size=3000) == b"a" * 10_000
    sink = io.BytesIO()
    assert limit.copy(io.BytesIO(b"b" * 5000), sink, chunk_size=1024) == 5000
    assert sink.getvalue() == b"b" * 5000


def test_too_large_names_the_limit():
    refusal = UploadLimit(1024).too_large(2048, declared=True)
    assert refusal.status == 413 and refusal.details["reason"] == "too_large" and refusal.details["max_bytes"] == 1024
    assert "declares 2048 bytes; the limit is 1024 bytes" in refusal.message


def test_content_length_check():
    limit = UploadLimit.from_megabytes(1)
    assert limit.check_content_length(None) is None
    assert limit.check_content_length(b"1048576") == 1048576
    with pytest.raises(AccessDenied) as caught:
        limit.check_content_length("1048577")
    assert caught.value.status == 413 and "declares 1048577 bytes" in caught.value.message
    for bad in ("abc", "-5"):
        with pytest.raises(AccessDenied) as caught:
            limit.check_content_length(bad)
        assert caught.value.status == 400


def _run_asgi(app, headers, chunks):
    """Drive an ASGI app with a body in chunks; returns (status, body, chunks the app pulled)."""
    pulled = 0
    sent = []

    async def receive():
        nonlocal pulled
        index = pulled
        pulled += 1
        if index < len(chunks):
            return {"type": "http.request", "body": chunks[index], "more_body": index < len(chunks) - 1}
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/upload", "headers": headers}
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], body, pulled


async def _reading_app(scope, receive, send):
    """An app that reads the whole body before answering, as a form parser does."""
    total = 0
    while True:
        message = await receive()
        total += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": str(total).encode()})


def test_middleware_refuses_declared_length_without_reading():
    app = UploadLimitMiddleware(_reading_app, UploadLimit(1000))
    status, body, pulled = _run_asgi(app, [(b"content-length", b"5000")], [b"x" * 1000] * 5)
    assert status == 413 and pulled == 0
    assert json.loads(body)["error"]["details"]["reason"] == "too_large"


def test_middleware_stops_undeclared_body_at_the_limit():
    app = UploadLimitMiddleware(_reading_app, UploadLimit(2500))
    status, _, pulled = _run_asgi(app, [], [b"x" * 1000] * 100)  # chunked: no Content-Length
    assert status == 413 and pulled == 3  # the third chunk crossed 2500 bytes; 97 were never pulled


def test_middleware_passes_bodies_within_the_limit():
    app = UploadLimitMiddleware(_reading_app, UploadLimit(2500))
    assert _run_asgi(app, [(b"content-length", b"2000")], [b"x" * 1000] * 2)[:2] == (200, b"2000")


def test_middleware_answers_413_through_fastapi_multipart():
    from fastapi import FastAPI, UploadFile
    from fastapi.testclient import TestClient

    app = FastAPI()

    @app.post("/upload")
    async def upload(file: UploadFile):
        return {"size": len(await file.read())}

    client = TestClient(UploadLimitMiddleware(app, UploadLimit(50_000)))
    assert client.post("/upload", files={"file": ("a.csv", b"x" * 1000)}).json() == {"size": 1000}
    too_big = client.post("/upload", files={"file": ("a.csv", b"x" * 60_000)})
    assert too_big.status_code == 413

    def chunked_body():  # no Content-Length: only counting the bytes can stop it
        yield b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.csv\"\r\n\r\n"
        for _ in range(100):
            yield b"x" * 1000
        yield b"\r\n--b--\r\n"

    multipart = {"content-type": "multipart/form-data; boundary=b"}
    streamed = client.post("/upload", content=chunked_body(), headers=multipart)
    assert streamed.status_code == 413 and streamed.json()["error"]["details"]["reason"] == "too_large"
