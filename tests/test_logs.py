import asyncio
import contextvars
import io
import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from engine.errors import EngineError
from engine.logs import bind_context, configure_logging, current_log_context, log_context


@pytest.fixture
def capture():
    """configure_logging into a buffer on a private logger; returns (logger, read_lines)."""
    logger = logging.getLogger("test_logs.private")
    logger.propagate = False
    stream = io.StringIO()

    def setup(fmt="json", level="DEBUG"):
        configure_logging(fmt, level, stream=stream, logger=logger)
        return logger

    def lines():
        return [line for line in stream.getvalue().splitlines() if line]

    yield setup, lines
    for handler in [h for h in logger.handlers if type(h) is logging.StreamHandler]:
        logger.removeHandler(handler)


def test_json_lines_parse_and_carry_context(capture):
    setup, lines = capture
    log = setup("json")
    with log_context(batch_id="b-1", user="alice"):
        with log_context(row=3, prompt_id="p-9"):
            log.info("row %d done", 3, extra={"seconds": 4.25, "path": Path("out/a.png")})
        log.warning("after the row")
    log.info("outside")
    first, second, third = (json.loads(line) for line in lines())
    assert first["message"] == "row 3 done" and first["level"] == "INFO" and first["logger"] == log.name
    assert first["ts"].endswith("Z")
    assert {k: first[k] for k in ("batch_id", "row", "prompt_id", "user")} == {
        "batch_id": "b-1", "row": 3, "prompt_id": "p-9", "user": "alice"}
    assert first["seconds"] == 4.25 and first["path"] == str(Path("out/a.png"))
    assert second["batch_id"] == "b-1" and "row" not in second
    assert "batch_id" not in third
    assert current_log_context() == {}


def test_json_exception_and_extra_override(capture):
    setup, lines = capture
    log = setup("json")
    with log_context(row=1):
        try:
            raise ValueError("bad pixel")
        except ValueError:
            log.exception("row failed", extra={"row": 2})
    entry = json.loads(lines()[0])
    assert entry["row"] == 2  # an explicit extra= wins over the context
    assert "ValueError: bad pixel" in entry["exc"]
    assert entry["level"] == "ERROR"


def test_context_reaches_worker_threads(capture):
    setup, lines = capture
    log = setup("json")

    def work(n):
        log.info("work %d", n)

    with log_context(batch_id="b-2", user="bob"):
        with ThreadPoolExecutor(max_workers=2) as pool:
            list(pool.map(bind_context(work), range(4)))
        thread = threading.Thread(target=contextvars.copy_context().run, args=(work, 99))
        thread.start()
        thread.join()
    unbound = threading.Thread(target=work, args=(-1,))  # a plain thread starts with no context
    unbound.start()
    unbound.join()
    entries = [json.loads(line) for line in lines()]
    bound = [e for e in entries if e["message"] != "work -1"]
    assert len(bound) == 5 and all(e["batch_id"] == "b-2" and e["user"] == "bob" for e in bound)
    assert "batch_id" not in next(e for e in entries if e["message"] == "work -1")


def test_threads_keep_their_own_context(capture):
    setup, lines = capture
    log = setup("json")
    barrier = threading.Barrier(2)

    def row(n):
        with log_context(row=n):
            barrier.wait()  # both threads are inside their blocks at the same time
            log.info("row %d", n)

    threads = [threading.Thread(target=row, args=(n,)) for n in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    entries = [json.loads(line) for line in lines()]
    assert sorted((e["message"], e["row"]) for e in entries) == [("row 1", 1), ("row 2", 2)]


def test_context_follows_asyncio_tasks(capture):
    setup, lines = capture
    log = setup("json")

    async def handle(prompt_id):
        with log_context(prompt_id=prompt_id):
            await asyncio.sleep(0)
            log.info("queued")

    async def main():
        await asyncio.gather(handle("p-1"), handle("p-2"))

    asyncio.run(main())
    assert sorted(json.loads(line)["prompt_id"] for line in lines()) == ["p-1", "p-2"]


def test_console_format_is_readable(capture):
    setup, lines = capture
    log = setup("console", "INFO")
    with log_context(batch_id="b-3", row=7):
        log.info("saved", extra={"seconds": 1.5})
        log.debug("hidden below INFO")
    (line,) = lines()
    assert " INFO  test_logs.private  saved  batch_id=b-3 row=7 seconds=1.5" in line


def test_reconfigure_replaces_handler_and_rejects_unknown(capture):
    setup, lines = capture
    log = setup("json")
    setup("json")
    assert len([h for h in log.handlers if type(h) is logging.StreamHandler]) == 1
    log.info("once")
    assert len(lines()) == 1
    with pytest.raises(EngineError, match="supported: console, json"):
        configure_logging("xml", logger=log)
    with pytest.raises(EngineError, match="unknown log level"):
        configure_logging("json", "LOUD", logger=log)


def test_tokens_never_reach_the_log_whoever_logs_them(capture):
    setup, lines = capture
    logger = setup("json")
    jwt_text = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLXBhcnQ"
    # uvicorn's WebSocket handshake line, with the query string a browser client must use
    logger.info('%s - "WebSocket %s" [accepted]', "127.0.0.1:5000", f"/ws?clientId=abc&token={jwt_text}")
    logger.info("header was Authorization: Bearer %s", "abc.def.ghi")
    logger.info("a bare token %s in a message", jwt_text)
    logger.info("nothing secret: tokens=3 of 77")
    logger.info("the API asks for bearer tokens, the page does not")
    logger.info("Authorization: Bearer %s", "abcdefghijklmnopqrst")
    messages = [json.loads(line)["message"] for line in lines()]
    assert all("c2lnbmF0dXJl" not in m and "abc.def.ghi" not in m for m in messages)
    assert messages[0] == '127.0.0.1:5000 - "WebSocket /ws?clientId=abc&token=[redacted]" [accepted]'
    assert messages[1] == "header was Authorization: Bearer [redacted]"
    assert messages[3] == "nothing secret: tokens=3 of 77"
    assert messages[4] == "the API asks for bearer tokens, the page does not"
    assert messages[5] == "Authorization: Bearer [redacted]"


def test_model_library_warnings_come_out_in_the_configured_format():
    from engine.runtime import import_model_libraries

    root = logging.getLogger()
    stream = io.StringIO()
    handler = configure_logging("json", "INFO", stream=stream)
    try:
        import_model_libraries()
        from transformers.utils import logging as transformers_logging

        transformers_logging.get_logger("transformers.tokenization_utils_base").warning(
            "Token indices sequence length is longer than the specified maximum sequence length")
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.get_logger("diffusers.pipelines").warning("a diffusers warning")
    finally:
        root.removeHandler(handler)
    records = [json.loads(line) for line in stream.getvalue().splitlines() if line]  # every line is JSON
    assert [r["logger"] for r in records] == ["transformers.tokenization_utils_base", "diffusers.pipelines"]
