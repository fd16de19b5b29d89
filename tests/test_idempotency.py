"""Idempotency keys in the ledger (engine.idempotency): a retried request gets its first answer, another
request under the same key is refused, keys survive restarts and expire, and a request whose process died
before answering runs again under the batch id it reserved."""

import os
import socket
import subprocess
import sys
import time

import pytest

from engine.errors import IdempotencyKeyInUse, IdempotencyKeyReused, RequestInvalid
from engine.idempotency import IN_USE_RETRY_AFTER_S, IdempotencyKeys, check_idempotency_key, request_fingerprint
from engine.store import BatchLedger

HERE = f"{socket.gethostname()}:{os.getpid()}"
ASKED = request_fingerprint("POST /api/batches", {"template": "product_shot", "rows": [{"product_name": "mug"}]})
OTHER = request_fingerprint("POST /api/batches", {"template": "product_shot", "rows": [{"product_name": "cup"}]})
ANSWER = {"batch_id": "b-first", "resumed": False, "queued_rows": 1, "started": True,
          "report": {"rows": [{"values": {"seed": 2**64 - 1}}]}}


@pytest.fixture
def ledger(tmp_path):
    with BatchLedger(tmp_path / "ledger.db") as opened:
        yield opened


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    return int(finished.stdout)


def test_a_retry_gets_the_first_answer_and_the_same_batch_id(ledger):
    keys = IdempotencyKeys(ledger, HERE)
    first = keys.begin("alice", "key-1", ASKED, "b-first")
    assert not first.answered and first.batch_id == "b-first"
    keys.finish(first, ANSWER)
    retry = keys.begin("alice", "key-1", ASKED, "b-another-new-id")
    assert retry.answered and retry.status == 200 and retry.answer == ANSWER and retry.batch_id == "b-first"


def test_the_same_key_with_another_request_is_refused_and_keys_are_per_user(ledger):
    keys = IdempotencyKeys(ledger, HERE)
    keys.finish(keys.begin("alice", "key-1", ASKED, "b-first"), ANSWER)
    with pytest.raises(IdempotencyKeyReused) as refused:
        keys.begin("alice", "key-1", OTHER, "b-second")
    assert refused.value.code == "idempotency_key_reused" and refused.value.details["key"] == "key-1"
    bobs = keys.begin("bob", "key-1", OTHER, "b-bobs")  # another user's key of the same name is another key
    assert not bobs.answered and bobs.batch_id == "b-bobs"


def test_a_key_whose_first_request_is_still_answered_is_in_use(ledger):
    keys = IdempotencyKeys(ledger, HERE)
    keys.begin("alice", "key-1", ASKED, "b-first")
    with pytest.raises(IdempotencyKeyInUse) as busy:
        keys.begin("alice", "key-1", ASKED, "b-second")
    assert busy.value.code == "idempotency_key_in_use"
    # another live process on this host answering it: in use too
    elsewhere = IdempotencyKeys(ledger, f"{socket.gethostname()}:1")
    with pytest.raises(IdempotencyKeyInUse):
        elsewhere.begin("alice", "key-1", ASKED, "b-third")


def test_a_key_in_use_is_answered_409_with_when_to_try_again(ledger):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from webapp.api import install_error_handlers

    keys = IdempotencyKeys(ledger, HERE)
    keys.begin("alice", "key-1", ASKED, "b-first")
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/again")
    def again():
        keys.begin("alice", "key-1", ASKED, "b-second")

    answer = TestClient(app).post("/again")
    assert answer.status_code == 409
    assert answer.json()["error"]["code"] == "idempotency_key_in_use"
    assert answer.headers["Retry-After"] == str(IN_USE_RETRY_AFTER_S)


def test_keys_survive_a_restart(tmp_path):
    path = tmp_path / "ledger.db"
    with BatchLedger(path) as before:
        keys = IdempotencyKeys(before, HERE)
        keys.finish(keys.begin("alice", "key-1", ASKED, "b-first"), ANSWER)
    with BatchLedger(path) as after:
        retry = IdempotencyKeys(after, HERE).begin("alice", "key-1", ASKED, "b-other")
    assert retry.answered and retry.answer == ANSWER


def test_a_request_whose_process_died_runs_again_under_the_batch_id_it_reserved(ledger):
    died = IdempotencyKeys(ledger, f"{socket.gethostname()}:{dead_pid()}")
    died.begin("alice", "key-1", ASKED, "b-reserved")  # ... and its process was killed before answering
    retry = IdempotencyKeys(ledger, HERE).begin("alice", "key-1", ASKED, "b-new")
    assert not retry.answered and retry.batch_id == "b-reserved"


def test_a_refused_request_keeps_nothing_unless_it_made_its_batch(ledger):
    keys = IdempotencyKeys(ledger, HERE)
    keys.abandon(keys.begin("alice", "key-1", ASKED, "b-never-made"))  # e.g. a bad row: 400
    again = keys.begin("alice", "key-1", OTHER, "b-corrected")  # the key is free, for a corrected request too
    assert not again.answered and again.batch_id == "b-corrected"

    made = keys.begin("alice", "key-2", ASKED, "b-made")
    ledger.create_batch("product_shot", "t" * 64, "s" * 64, batch_seed=1, batch_id="b-made", user="alice")
    keys.abandon(made)  # failed after its batch was recorded: a retry resumes that batch, never makes another
    retry = keys.begin("alice", "key-2", ASKED, "b-new")
    assert not retry.answered and retry.batch_id == "b-made"
    with pytest.raises(IdempotencyKeyReused):
        keys.begin("alice", "key-2", OTHER, "b-other")


def test_keys_expire(ledger):
    keys = IdempotencyKeys(ledger, HERE, ttl_s=0.05)
    keys.finish(keys.begin("alice", "key-1", ASKED, "b-first"), ANSWER)
    time.sleep(0.1)
    fresh = keys.begin("alice", "key-1", OTHER, "b-second")
    assert not fresh.answered and fresh.batch_id == "b-second"
    assert ledger.conn.execute("SELECT count(*) FROM idempotency_keys").fetchone()[0] == 1


@pytest.mark.parametrize("header, key", [
    ("8e03978e-40d5-43e8-bc93-6894a57f9324", "8e03978e-40d5-43e8-bc93-6894a57f9324"),
    ('"8e03978e-40d5-43e8-bc93-6894a57f9324"', "8e03978e-40d5-43e8-bc93-6894a57f9324"),  # the draft's sf-string
    ("order 42", "order 42"),
])
def test_key_headers_as_the_draft_writes_them_or_unquoted(header, key):
    assert check_idempotency_key(header) == key


@pytest.mark.parametrize("header", ["", '""', "   ", "k" * 256, "ключ"])
def test_bad_key_headers_are_refused_naming_the_header(header):
    with pytest.raises(RequestInvalid) as refused:
        check_idempotency_key(header)
    assert refused.value.problems[0]["field"] == "Idempotency-Key"
    assert refused.value.problems[0]["location"] == "header"


def test_fingerprints_ignore_key_order_and_tell_requests_apart():
    assert request_fingerprint("POST /api/batches", {"a": 1, "b": [1, 2]}) == \
        request_fingerprint("POST /api/batches", {"b": [1, 2], "a": 1})
    assert request_fingerprint("POST /api/batches", {"a": 1}) != request_fingerprint("POST /api/generate", {"a": 1})
