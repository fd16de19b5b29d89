"""Structured logging: JSON lines for services, a readable console format for workstations, and context.

The engine logs through the standard ``logging`` module; whoever runs it decides the format once::

    configure_logging("json", "INFO")        # one JSON object per line on stderr
    log = logging.getLogger("engine.batch")
    with log_context(batch_id="b1", user="alice"):
        with log_context(row=3):
            log.info("row done", extra={"seconds": 4.2})
    # {"ts": "...", "level": "INFO", "logger": "engine.batch", "message": "row done",
    #  "batch_id": "b1", "user": "alice", "row": 3, "seconds": 4.2}

The context lives in a :class:`contextvars.ContextVar`, so it follows asyncio tasks on its own and is
private to each thread. A worker thread sees the caller's context when started through
``contextvars.copy_context().run`` or a function wrapped with :func:`bind_context`.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timezone
from types import MappingProxyType
from typing import IO, Any, TypeVar

from engine.errors import EngineError

__all__ = [
    "CONTEXT_FIELDS",
    "LIBRARY_LOGGERS",
    "LOG_FORMATS",
    "ConsoleFormatter",
    "ContextFilter",
    "JsonFormatter",
    "SecretFilter",
    "adopt_library_loggers",
    "bind_context",
    "configure_logging",
    "current_log_context",
    "log_context",
]

LOG_FORMATS = ("console", "json")
# Fields that identify the work a line is about; shown first and always under these names.
CONTEXT_FIELDS = ("batch_id", "row", "prompt_id", "user")

# A ContextVar is the one sanctioned process-wide object here: its value is per thread and per task,
# and it is never mutated in place (log_context sets a new mapping and resets it on exit).
_CONTEXT: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar(
    "sd35_log_context", default=MappingProxyType({})
)

# Attributes every LogRecord has; anything else on a record came from ``extra=`` or the context.
# uvicorn adds ``color_message`` (its message with terminal colour codes) to every record: not a field.
_RECORD_ATTRIBUTES = frozenset(
    vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None)).keys()
) | {"message", "asctime", "log_context", "taskName", "color_message"}

_HANDLER_MARK = "_sd35_configured"
T = TypeVar("T")


@contextmanager
def log_context(**fields: Any) -> Iterator[Mapping[str, Any]]:
    """Add ``fields`` to every log line inside the block (nested blocks add to the outer ones)."""
    merged = MappingProxyType({**_CONTEXT.get(), **fields})
    token = _CONTEXT.set(merged)
    try:
        yield merged
    finally:
        _CONTEXT.reset(token)


def current_log_context() -> dict[str, Any]:
    """A copy of the fields in effect here."""
    return dict(_CONTEXT.get())


def bind_context(function: Callable[..., T]) -> Callable[..., T]:
    """Wrap ``function`` so it runs in a copy of the caller's context wherever it is called.

    Use it for work handed to threads (``executor.submit(bind_context(run_row), row)``): plain threads
    and ``ThreadPoolExecutor`` start from an empty context. Each call gets its own copy, so the wrapper
    may run in several threads at once.
    """
    captured = contextvars.copy_context()

    def run_in_context(*args: Any, **kwargs: Any) -> T:
        return captured.copy().run(function, *args, **kwargs)

    run_in_context.__name__ = getattr(function, "__name__", "run_in_context")
    run_in_context.__doc__ = function.__doc__
    return run_in_context


class ContextFilter(logging.Filter):
    """Stamps the current log context onto each record, in the thread that logs it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "log_context"):
            record.log_context = dict(_CONTEXT.get())
        return True


class SecretFilter(logging.Filter):
    """Blanks bearer tokens out of every message before it is written, whoever logged it.

    A WebSocket client may only pass its token in the query string (``/ws?token=...``: browsers cannot set
    headers there), and uvicorn logs every handshake's path; a token in a log file is a credential anyone
    who reads logs can use.
    """

    PATTERNS = (
        (re.compile(r"([?&](?:access_)?token=)[^&\s\"']+", re.IGNORECASE), r"\1[redacted]"),
        # Token-shaped words only (a digit or punctuation in them, or 16 characters long): "bearer tokens" in a
        # sentence is left as it is.
        (re.compile(r"(bearer\s+)(?=[A-Za-z]*[0-9._~+/=-]|[A-Za-z]{16})[A-Za-z0-9._~+/=-]+", re.IGNORECASE),
         r"\1[redacted]"),
        (re.compile(r"eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*"), "[redacted token]"),  # any JWT
    )

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "token=" in message.lower() or "bearer" in message.lower() or "eyJ" in message:
            for pattern, replacement in self.PATTERNS:
                message = pattern.sub(replacement, message)
            record.msg, record.args = message, None
        return True


# Libraries that give their loggers handlers of their own and stop propagation, so their records would skip
# our handler: plain-text lines in a JSON log.
LIBRARY_LOGGERS = ("transformers", "diffusers")


def adopt_library_loggers() -> None:
    """Send the model libraries' records through the root logger's handler, in the configured format.

    Call it after importing them (their logging modules add their handlers at import time).
    """
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    """Context fields, then ``extra=`` fields (which win on a clash)."""
    context = getattr(record, "log_context", None)
    fields = dict(context) if context is not None else dict(_CONTEXT.get())
    for key, value in vars(record).items():
        if key not in _RECORD_ATTRIBUTES and not key.startswith("_"):
            fields[key] = value
    return fields


def _timestamp(record: logging.LogRecord) -> str:
    moment = datetime.fromtimestamp(record.created, timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, the context ids, extras, and exc if any."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = _fields(record)
        for name in CONTEXT_FIELDS:  # the ids first, in a fixed order, for people reading raw lines
            if name in fields:
                entry[name] = fields.pop(name)
        for key, value in fields.items():
            entry.setdefault(key, value)
        if record.exc_info:
            entry["exc"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        if record.stack_info:
            entry["stack"] = record.stack_info
        # default=str: a Path or datetime in extra= must not turn a log call into an exception
        return json.dumps(entry, ensure_ascii=False, default=str)


class ConsoleFormatter(logging.Formatter):
    """``12:04:05.123 INFO  engine.batch  row done  batch_id=b1 row=3 seconds=4.2``"""

    def format(self, record: logging.LogRecord) -> str:
        moment = datetime.fromtimestamp(record.created).strftime("%H:%M:%S")
        head = f"{moment}.{int(record.msecs):03d} {record.levelname:<5} {record.name}  {record.getMessage()}"
        fields = _fields(record)
        ordered = [name for name in CONTEXT_FIELDS if name in fields] + [
            name for name in fields if name not in CONTEXT_FIELDS
        ]
        if ordered:
            head += "  " + " ".join(f"{name}={fields[name]}" for name in ordered)
        if record.exc_info:
            head += "\n" + "".join(traceback.format_exception(*record.exc_info)).rstrip()
        if record.stack_info:
            head += "\n" + record.stack_info
        return head


def configure_logging(
    format: str = "console",
    level: int | str = "INFO",
    *,
    stream: IO[str] | None = None,
    logger: logging.Logger | None = None,
) -> logging.Handler:
    """Send ``logger``'s records (the root logger by default) to ``stream`` (stderr) in ``format``.

    Calling it again replaces the handler it installed before instead of adding a second one. Returns the
    handler so a caller (or a test) can remove it.
    """
    if format not in LOG_FORMATS:
        raise EngineError(f"unknown log format '{format}'; supported: {', '.join(LOG_FORMATS)}", format=format)
    if isinstance(level, str):
        resolved = logging.getLevelName(level.upper())
        if not isinstance(resolved, int):
            raise EngineError(
                f"unknown log level '{level}'; supported: DEBUG, INFO, WARNING, ERROR, CRITICAL", level=level
            )
        level = resolved
    target = logger if logger is not None else logging.getLogger()
    for old in [h for h in target.handlers if getattr(h, _HANDLER_MARK, False)]:
        target.removeHandler(old)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    setattr(handler, _HANDLER_MARK, True)
    handler.setFormatter(JsonFormatter() if format == "json" else ConsoleFormatter())
    handler.addFilter(ContextFilter())
    handler.addFilter(SecretFilter())
    target.addHandler(handler)
    target.setLevel(level)
    if target is logging.getLogger():
        logging.captureWarnings(True)  # library warnings become records in the same format, not raw stderr
    return handler
