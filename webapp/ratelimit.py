"""Request rate limits per (user, route) and upload size limits.

:class:`RateLimiter` is a token bucket per key: a key may burst up to its per-minute limit, then earns one
request back every ``60 / limit`` seconds. It is thread-safe and keeps at most ``max_keys`` buckets.

:class:`UploadLimit` refuses a body by its declared ``Content-Length`` before reading anything, and counts
bytes while reading so an undeclared or lying body stops at the first chunk past the limit.
:class:`UploadLimitMiddleware` applies it to every HTTP request of an ASGI app (FastAPI, Starlette, Gradio's
server) without importing any framework::

    limiter = RateLimiter(settings.rate_limit_per_minute, overrides=parse_route_limits("POST /prompt=10"))
    decision = limiter.check(user_name, "POST /prompt")
    if not decision.allowed:
        ...  # answer 429 with decision.headers()  (Retry-After, X-RateLimit-*)
    app = UploadLimitMiddleware(app, UploadLimit.from_megabytes(settings.max_upload_mb))
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import IO, Any

from engine.errors import AccessDenied, EngineError

__all__ = [
    "Decision",
    "RateLimiter",
    "UploadLimit",
    "UploadLimitMiddleware",
    "parse_route_limits",
]

WINDOW_S = 60.0
DEFAULT_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class Decision:
    """The answer to one request: allowed or not, how long to wait, how many remain right now."""

    allowed: bool
    retry_after_s: float
    remaining: int
    limit: int

    def headers(self) -> dict[str, str]:
        """HTTP headers for the response (``Retry-After`` in whole seconds, rounded up, only when refused)."""
        headers = {"X-RateLimit-Limit": str(self.limit), "X-RateLimit-Remaining": str(self.remaining)}
        if not self.allowed:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after_s)))
        return headers


class _Bucket:
    __slots__ = ("tokens", "updated")

    def __init__(self, tokens: float, updated: float) -> None:
        self.tokens = tokens
        self.updated = updated


def _check_limit(limit: Any, what: str) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise EngineError(f"{what} must be a whole number of requests per minute >= 1, got {limit!r}", limit=limit)
    return limit


class RateLimiter:
    """Token buckets keyed by (user, route); ``overrides`` maps a route to its own per-minute limit.

    ``clock`` returns seconds (monotonic); tests pass a fake one. Buckets idle for a full window are full
    again, so dropping them loses nothing; past ``max_keys`` the least recently used bucket is dropped too.
    """

    def __init__(
        self,
        limit_per_minute: int,
        clock: Callable[[], float] = time.monotonic,
        *,
        overrides: Mapping[str, int] | None = None,
        max_keys: int = 10_000,
    ) -> None:
        self.limit_per_minute = _check_limit(limit_per_minute, "rate limit")
        self.overrides = {route: _check_limit(v, f"rate limit of {route}") for route, v in (overrides or {}).items()}
        if max_keys < 1:
            raise EngineError(f"max_keys must be >= 1, got {max_keys}", max_keys=max_keys)
        self.max_keys = max_keys
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: OrderedDict[tuple[str, str], _Bucket] = OrderedDict()  # least recently used first

    def __len__(self) -> int:
        return len(self._buckets)

    def limit_for(self, route: str) -> int:
        return self.overrides.get(route, self.limit_per_minute)

    def check(self, user: str, route: str, cost: int = 1) -> Decision:
        """Spend ``cost`` requests of ``user`` on ``route`` if available; never blocks."""
        limit = self.limit_for(route)
        if cost > limit:
            raise EngineError(f"a request costing {cost} can never fit a limit of {limit}/min", route=route)
        rate = limit / WINDOW_S  # tokens earned per second
        key = (user, route)
        with self._lock:
            now = self._clock()
            self._evict_idle(now)
            bucket = self._buckets.get(key)
            if bucket is None:
                while len(self._buckets) >= self.max_keys:
                    self._buckets.popitem(last=False)  # lossy: that key starts again with a full bucket
                bucket = self._buckets[key] = _Bucket(float(limit), now)
            else:
                bucket.tokens = min(float(limit), bucket.tokens + (now - bucket.updated) * rate)
                bucket.updated = now
                self._buckets.move_to_end(key)
            if bucket.tokens >= cost:
                bucket.tokens -= cost
                return Decision(True, 0.0, int(bucket.tokens), limit)
            return Decision(False, (cost - bucket.tokens) / rate, int(bucket.tokens), limit)

    def _evict_idle(self, now: float) -> None:
        # Least recently used first: stop at the first bucket touched within the window (the rest are newer).
        while self._buckets:
            key, bucket = next(iter(self._buckets.items()))
            if now - bucket.updated < WINDOW_S:
                break
            del self._buckets[key]


def parse_route_limits(text: str) -> dict[str, int]:
    """``"POST /prompt=10, /api/batches=5"`` -> ``{"POST /prompt": 10, "/api/batches": 5}``."""
    limits: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        route, sep, value = item.rpartition("=")
        if not sep or not route.strip() or not value.strip().isdigit():
            raise EngineError(f"route limit {item!r} is not ROUTE=REQUESTS_PER_MINUTE", item=item)
        limits[route.strip()] = _check_limit(int(value), f"rate limit of {route.strip()}")
    return limits


class UploadLimit:
    """Refuses request bodies larger than ``max_bytes`` with AccessDenied(status=413), reading no further."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 1:
            raise EngineError(f"upload limit must be >= 1 byte, got {max_bytes}", max_bytes=max_bytes)
        self.max_bytes = max_bytes

    @classmethod
    def from_megabytes(cls, megabytes: float) -> UploadLimit:
        return cls(int(megabytes * 1024 * 1024))

    def too_large(self, size: int, declared: bool) -> AccessDenied:
        """The 413 refusal of a body of ``size`` bytes (``declared``: by its Content-Length, else counted)."""
        how = "declares" if declared else "exceeds"
        return AccessDenied(
            f"upload {how} {size} bytes; the limit is {self.max_bytes} bytes ({self.max_bytes / 2**20:.1f} MiB)",
            status=413,
            reason="too_large",
            max_bytes=self.max_bytes,
        )

    def check_content_length(self, value: str | bytes | int | None) -> int | None:
        """Refuse a declared length over the limit; returns the length, or None when none was declared."""
        if value is None:
            return None
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        try:
            length = int(value)
        except ValueError:
            length = -1
        if length < 0:
            raise AccessDenied(f"invalid Content-Length {value!r}", status=400, reason="bad_content_length")
        if length > self.max_bytes:
            raise self.too_large(length, declared=True)
        return length

    def iter_chunks(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        """Pass chunks through, raising as soon as their running total passes the limit."""
        total = 0
        for chunk in chunks:
            total += len(chunk)
            if total > self.max_bytes:
                raise self.too_large(total, declared=False)
            yield chunk

    def read(self, stream: IO[bytes], chunk_size: int = DEFAULT_CHUNK) -> bytes:
        """Read a binary stream whole, but never more than one chunk past the limit."""
        return b"".join(self.iter_chunks(_stream_chunks(stream, chunk_size)))

    def copy(self, stream: IO[bytes], destination: IO[bytes], chunk_size: int = DEFAULT_CHUNK) -> int:
        """Copy a stream into ``destination`` in chunks; returns the bytes copied."""
        copied = 0
        for chunk in self.iter_chunks(_stream_chunks(stream, chunk_size)):
            destination.write(chunk)
            copied += len(chunk)
        return copied


def _stream_chunks(stream: IO[bytes], chunk_size: int) -> Iterator[bytes]:
    while chunk := stream.read(chunk_size):
        yield chunk


class UploadLimitMiddleware:
    """ASGI middleware: every HTTP request body is held to ``limit`` (Content-Length first, then counted).

    Once a body passes the limit, reading it raises AccessDenied(413) inside the app and the client gets
    a JSON 413 from here, whatever the app made of the error (FastAPI turns body-parsing errors into 400s).
    Wrap it inside :class:`webapp.metrics.HttpMetricsMiddleware` so the 413s are counted too.
    """

    def __init__(self, app: Callable[..., Any], limit: UploadLimit) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        try:
            self.limit.check_content_length(headers.get(b"content-length"))
        except AccessDenied as exc:
            await _send_refusal(send, exc)
            return

        received = 0
        exceeded: AccessDenied | None = None
        response_started = False

        async def limited_receive() -> dict[str, Any]:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit.max_bytes:
                    exceeded = self.limit.too_large(received, declared=False)
                    raise exceeded
            return message

        async def guarded_send(message: dict[str, Any]) -> None:
            nonlocal response_started
            if exceeded is not None:  # the app's answer to a refused body is replaced by the 413
                if not response_started:
                    response_started = True
                    await _send_refusal(send, exceeded)
                return
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if exceeded is None:
                raise
            if not response_started:
                await _send_refusal(send, exceeded)


async def _send_refusal(send: Callable[..., Any], error: AccessDenied) -> None:
    body = json.dumps({"error": error.to_dict()}).encode("utf-8")
    await send(
        {
            "type": "http.response.start",
            "status": error.status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
