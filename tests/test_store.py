"""The SQLite ledger: schema, migrations, row lifecycle, resume helpers, two real processes at once."""

import json
import multiprocessing
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from engine.errors import BatchError, BatchMismatch, StoreError
from engine.store import MIGRATIONS, BatchLedger, row_key

SEED_MAX = 2**64 - 1


@pytest.fixture
def ledger(tmp_path):
    with BatchLedger(tmp_path / "ledger.db") as opened:
        yield opened


def new_batch(ledger, rows=3, **kwargs):
    batch_id = ledger.create_batch("product_shot", "t" * 64, "s" * 64, batch_seed=SEED_MAX, sheet_name="rows.csv",
                                   options={"max_gpu_batch": 2}, user="alice", **kwargs)
    ledger.add_rows(batch_id, [
        {"row_number": n, "values": {"product_name": f"item {n}", "color": "red"}, "seed": SEED_MAX - n}
        for n in range(2, 2 + rows)
    ])
    return batch_id


RECORD = {"prompt": "a red item", "negative_prompt": "blurry", "seed": SEED_MAX, "steps": 28, "cfg": 4.5,
          "sampler": "euler", "scheduler": "sgm_uniform", "width": 1024, "height": 1024,
          "model_name": "sd35_demo_tiny", "model_hash": "abc", "precision": "fp8", "loras": [], "shift": 3.0}


def test_pragmas_and_schema(ledger):
    conn = ledger.conn
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 30_000
    tables = set(ledger.db.table_names())
    assert {"batches", "generations", "migrations"} <= tables
    columns = set(ledger.db["generations"].columns_dict)
    for name in ("row_key", "batch_id", "row_number", "row_values", "prompt", "negative_prompt", "seed", "steps",
                 "cfg", "sampler", "scheduler", "width", "height", "model_name", "model_hash", "precision", "loras",
                 "template_name", "template_hash", "workflow", "status", "error", "attempts", "worker",
                 "queued_at", "started_at", "finished_at", "duration_s", "sampler_s", "image_path", "image_sha256",
                 "user", "prompt_id"):
        assert name in columns, name
    assert ledger.db["generations"].columns_dict["seed"] is str
    assert ledger.schema_version() == MIGRATIONS[-1][0]


def test_migrations_apply_once_and_newer_schema_is_refused(tmp_path):
    path = tmp_path / "ledger.db"
    BatchLedger(path).close()
    BatchLedger(path).close()
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT count(*) FROM migrations").fetchone()[0] == len(MIGRATIONS)
    conn.execute("INSERT INTO migrations VALUES (999, 'future', 'x')")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="newer than this program"):
        BatchLedger(path)


def test_file_opens_with_the_sqlite_utils_cli(tmp_path):
    path = tmp_path / "ledger.db"
    with BatchLedger(path) as ledger:
        new_batch(ledger)
    out = subprocess.run([sys.executable, "-m", "sqlite_utils", "tables", str(path), "--counts"],
                         capture_output=True, text=True, check=True).stdout
    table_counts = {row["table"]: row["count"] for row in json.loads(out)}
    assert table_counts["generations"] == 3 and table_counts["batches"] == 1


def test_batch_and_rows_keep_seeds_exact(ledger):
    batch_id = new_batch(ledger)
    batch = ledger.get_batch(batch_id)
    assert batch["batch_seed"] == SEED_MAX and batch["options"] == {"max_gpu_batch": 2}
    rows = ledger.rows(batch_id)
    assert [r.row_key for r in rows] == [row_key(batch_id, n) for n in (2, 3, 4)]
    assert rows[0].seed == SEED_MAX - 2 and rows[0].row_values["product_name"] == "item 2"
    assert all(r.status == "queued" and r.template_hash == "t" * 64 and r.user == "alice" for r in rows)


def test_add_rows_is_idempotent_and_batch_ids_unique(ledger):
    batch_id = new_batch(ledger)
    assert ledger.add_rows(batch_id, [{"row_number": 2, "values": {"x": "changed"}}, {"row_number": 9}]) == 1
    assert ledger.get_generation(row_key(batch_id, 2)).row_values["product_name"] == "item 2"
    assert ledger.batch_summary(batch_id)["total"] == 4
    with pytest.raises(BatchError, match="already exists"):
        ledger.create_batch("p", "t", "s", 1, batch_id=batch_id)


def test_row_lifecycle_claim_complete_fail(ledger):
    batch_id = new_batch(ledger)
    first = ledger.claim_next(batch_id, worker="w1")
    assert first.row_number == 2 and first.status == "running" and first.attempts == 0 and first.worker == "w1"
    ledger.mark_began(first.row_key)
    ledger.mark_began(first.row_key)  # once per claim
    assert ledger.get_generation(first.row_key).attempts == 1
    ledger.mark_running(first.row_key, workflow={"1": {"class_type": "KSampler", "inputs": {}}}, prompt_id="p1")
    ledger.complete_row(first.row_key, RECORD, image_path="/out/a.png", image_sha256="f" * 64,
                        duration_s=1.5, sampler_s=1.2)
    done = ledger.get_generation(first.row_key)
    assert done.status == "done" and done.seed == SEED_MAX and done.steps == 28 and done.cfg == 4.5
    assert done.precision == "fp8" and done.loras == [] and done.extra == {"shift": 3.0}
    assert done.workflow["1"]["class_type"] == "KSampler" and done.prompt_id == "p1"
    assert done.image_path == "/out/a.png" and done.images == [{"path": "/out/a.png", "sha256": "f" * 64}]
    with pytest.raises(StoreError, match="already done"):
        ledger.complete_row(first.row_key, RECORD, image_path="/out/b.png", image_sha256="0" * 64)
    with pytest.raises(StoreError):
        ledger.fail_row(first.row_key, "failed", "late failure")

    second = ledger.claim_row(row_key(batch_id, 3), worker="w2")
    assert second.row_number == 3
    assert ledger.claim_row(row_key(batch_id, 3), worker="w3") is None  # already taken
    ledger.fail_row(second.row_key, "timed_out", "sampler ran past 600 s", duration_s=600)
    with pytest.raises(StoreError, match="not running"):
        ledger.mark_running(second.row_key)

    summary = ledger.batch_summary(batch_id)
    assert summary["counts"]["done"] == 1 and summary["counts"]["timed_out"] == 1 and summary["counts"]["queued"] == 1
    stored = ledger.get_batch(batch_id)
    assert (stored["row_count"], stored["done_count"], stored["timed_out_count"]) == (3, 1, 1)
    assert [r.row_number for r in ledger.pending_rows(batch_id)] == [3, 4]
    assert [r.row_number for r in ledger.rows(batch_id, status="done")] == [2]
    with pytest.raises(StoreError, match="fail_row takes"):
        ledger.fail_row(row_key(batch_id, 4), "done", "x")


def test_reset_stale_running_requeues_and_fails_only_rows_their_process_died_running(ledger):
    batch_id = new_batch(ledger, rows=2)
    crashed = ledger.claim_next(batch_id, worker="dead")
    waiting = ledger.claim_next(batch_id, worker="dead")  # claimed in advance, never began
    ledger.mark_began(crashed.row_key)
    assert ledger.reset_stale_running(batch_id) == 2
    again = ledger.get_generation(crashed.row_key)
    assert again.status == "queued" and (again.attempts, again.crashes) == (1, 1)
    for _ in range(2):
        for key in (crashed.row_key, waiting.row_key):
            ledger.claim_row(key, worker="dead")
        ledger.mark_began(crashed.row_key)
        ledger.reset_stale_running(worker="dead", max_attempts=3)
    row = ledger.get_generation(crashed.row_key)
    assert row.crashes == 3 and row.status == "failed" and "died while running it 3 time(s)" in row.error
    bystander = ledger.get_generation(waiting.row_key)
    assert bystander.status == "queued" and (bystander.attempts, bystander.crashes) == (0, 0)

    ledger.claim_row(waiting.row_key, worker="alive")
    ledger.mark_began(waiting.row_key)
    ledger.reset_stale_running(worker="alive", crashed=False)  # given back (a full disk, shutting down)
    assert ledger.get_generation(waiting.row_key).crashes == 0


def test_requeue_and_cancel(ledger):
    batch_id = new_batch(ledger, rows=3)
    key = ledger.claim_next(batch_id).row_key
    ledger.fail_row(key, "failed", "CUDA out of memory")
    assert ledger.requeue(batch_id) == 1
    assert ledger.get_generation(key).status == "queued" and ledger.get_generation(key).error is None
    done = ledger.claim_next(batch_id)
    ledger.complete_row(done.row_key, RECORD, "/x.png", "a" * 64)
    assert ledger.cancel_batch(batch_id) == 2
    summary = ledger.batch_summary(batch_id)
    assert summary["status"] == "cancelled" and summary["counts"]["done"] == 1 and summary["counts"]["cancelled"] == 2


def test_ensure_same_inputs(ledger):
    batch_id = new_batch(ledger)
    ledger.ensure_same_inputs(batch_id, "t" * 64, "s" * 64)
    with pytest.raises(BatchMismatch) as info:
        ledger.ensure_same_inputs(batch_id, "t" * 64, "x" * 64)
    assert "spreadsheet changed" in info.value.message and info.value.batch_id == batch_id
    assert info.value.code == "batch_inputs_changed" and info.value.details["changed"] == "sheet"
    with pytest.raises(BatchMismatch, match="template 'product_shot' changed") as info:
        ledger.ensure_same_inputs(batch_id, "u" * 64, "s" * 64)
    assert info.value.details["changed"] == "template"
    with pytest.raises(BatchMismatch) as info:
        ledger.ensure_same_inputs(batch_id, "t" * 64, "x" * 64, template_name="lifestyle")
    assert info.value.details["changed"] == "template+sheet"
    with pytest.raises(BatchError, match="no batch"):
        ledger.ensure_same_inputs("missing", "t", "s")


def test_search_and_listing(ledger):
    first = new_batch(ledger, rows=2)
    second = new_batch(ledger, rows=1)
    row = ledger.claim_next(first)
    ledger.complete_row(row.row_key, {**RECORD, "prompt": "100% cotton_shirt"}, "/a.png", "a" * 64)
    assert [g.row_key for g in ledger.search("cotton_shirt")] == [row.row_key]
    assert ledger.search("100%") and not ledger.search("100_")  # LIKE wildcards are literal
    assert len(ledger.search("item", batch_id=first)) == 2
    assert [g.row_key for g in ledger.search(status="done")] == [row.row_key]
    assert ledger.search(date_from="2000-01-01", date_to="2999-12-31", limit=10, offset=0)
    assert ledger.search(date_to="2000-01-01") == []
    assert len(ledger.search(limit=1, offset=1)) == 1
    assert {b["id"] for b in ledger.list_batches()} == {first, second}
    assert ledger.list_batches(user="bob") == []


def test_search_dates_compare_as_times_whatever_the_offset_and_bad_ones_are_named(ledger):
    from datetime import datetime, timedelta, timezone

    from engine.errors import BadQuery

    batch_id = new_batch(ledger, rows=1)
    row = ledger.claim_next(batch_id)
    ledger.complete_row(row.row_key, RECORD, "/a.png", "a" * 64)
    done_at = datetime.fromisoformat(ledger.get_generation(row.row_key).finished_at)
    china = timezone(timedelta(hours=8))  # the same instants written as a client east of UTC writes them
    before = (done_at - timedelta(minutes=1)).astimezone(china)
    after = (done_at + timedelta(minutes=1)).astimezone(china)
    for bound in (before.isoformat(), before.isoformat(sep=" ", timespec="seconds")):
        assert [g.row_key for g in ledger.search(date_from=bound)] == [row.row_key], bound
        assert ledger.search(date_to=bound) == [], bound
    assert ledger.search(date_from=after.isoformat()) == []
    assert [g.row_key for g in ledger.search(date_to=after.isoformat())] == [row.row_key]
    naive_utc = (done_at - timedelta(minutes=1)).replace(tzinfo=None).isoformat()  # no offset: UTC
    assert [g.row_key for g in ledger.search(date_from=naive_utc)] == [row.row_key]
    assert [g.row_key for g in ledger.search(date_to=done_at.date().isoformat())] == [row.row_key]  # the whole day
    for field, bad in (("date_from", "yesterday"), ("date_to", "tomorrow"), ("date_from", "2025-13-01")):
        with pytest.raises(BadQuery) as refused:
            ledger.search(**{field: bad})
        assert refused.value.details["field"] == field and bad in refused.value.message


def query_plans(ledger, call):
    """The query plan of every SELECT that ``call`` runs on the ledger, one list of plan lines each."""
    statements = []
    ledger.conn.set_trace_callback(statements.append)  # the SQL with its parameters, as SQLite ran it
    try:
        call()
    finally:
        ledger.conn.set_trace_callback(None)
    return [[line[3] for line in ledger.conn.execute("EXPLAIN QUERY PLAN " + sql)]
            for sql in statements if sql.lstrip().upper().startswith("SELECT")]


def reads_every_generation(plan):
    """Whether a plan reads the whole generations table, or sorts every row it found to pick a page."""
    return any(line == "SCAN generations" or line.startswith("USE TEMP B-TREE FOR ORDER BY") for line in plan)


@pytest.mark.parametrize("query", [
    {}, {"status": "failed"}, {"date_from": "2025-03-01", "date_to": "2025-03-01"}, {"date_from": "2025-03-01"},
    {"status": "done", "date_to": "2025-03-31"}, {"text": "red"}, {"offset": 400},
], ids=repr)
def test_history_pages_come_from_an_index_never_a_sort_of_every_generation(ledger, query):
    """A year of generations (hundreds of thousands): a History page sorted or scanned them all (seconds)."""
    new_batch(ledger, rows=3)
    plans = query_plans(ledger, lambda: ledger.search(limit=201, **query))
    assert plans and not any(reads_every_generation(plan) for plan in plans), plans


@pytest.mark.parametrize("query", [{}, {"status": "done"}, {"date_from": "2025-03-01"}, {"text": "red"}], ids=repr)
def test_a_batchs_history_is_read_through_that_batchs_rows(ledger, query):
    """With a batch, the time index would walk every generation to find that batch's few rows."""
    batch_id = new_batch(ledger, rows=3)
    plans = query_plans(ledger, lambda: ledger.search(batch_id=batch_id, **query))
    assert plans and all("idx_generations_batch_status (batch_id=?" in " ".join(plan) for plan in plans), plans


@pytest.mark.parametrize("query", [{"text": "zebra"}, {"text": "zebra", "status": "done"},
                                   {"text": "zebra", "date_from": "2025-03-01"}], ids=repr)
def test_a_text_search_finds_its_rows_through_the_text_index(ledger, query):
    """A text found nowhere read every generation of a year's ledger (LIKE has no index): over a second."""
    new_batch(ledger, rows=3)
    plans = query_plans(ledger, lambda: ledger.search(limit=201, **query))
    assert plans and any(line.startswith("SCAN generations_text VIRTUAL TABLE") for plan in plans for line in plan), plans
    assert not any(reads_every_generation(plan) for plan in plans), plans


@pytest.mark.parametrize("many_rows", [5000, 1], ids=["rare texts", "common texts"])
def test_text_search_through_the_index_finds_what_like_finds(ledger, monkeypatch, many_rows):
    """The index narrows the rows; what matches is still LIKE's substring, A-Z in any case, wildcards literal,
    and rows whose text changes (a finished row's prompt) are found by their new text only. A text in many
    rows is found by reading the newest rows, with the same result."""
    import engine.store

    monkeypatch.setattr(engine.store, "_TEXT_INDEX_MANY_ROWS", many_rows)
    batch_id = new_batch(ledger, rows=4)
    long = "a studio photograph of a folded linen shirt on a wooden table, morning light, " * 3
    texts = ['50% "Silk" scarf_blue', "红色夹克 Ärmel", "plain cotton shirt " + long, "ÄRMEL only"]
    for text in texts:
        row = ledger.claim_next(batch_id)
        ledger.complete_row(row.row_key, {**RECORD, "prompt": text, "negative_prompt": "blurry"}, "/a.png", "a" * 64)
    cases = {
        "silk": [0], '"silk"': [0], "50% ": [0], "scarf_blue": [0], "scarf%blue": [], "BLUE": [0], "yellow": [],
        "红色夹克": [1], "Ärmel": [1, 3], "ärmel": [], "COTTON SHIRT": [2], "item 3": [1], "a red item": [], "shirt cotton": [], long[5:200]: [2], long[5:200] + "!": [],
    }
    for text, expected in cases.items():
        like = ledger.conn.execute(
            "SELECT row_key FROM generations WHERE prompt LIKE ? OR negative_prompt LIKE ? OR row_values LIKE ?",
            ["%" + text + "%"] * 3).fetchall()
        found = {g.row_key for g in ledger.search(text)}
        assert found == {f"{batch_id}:{2 + n}" for n in expected}, text
        if "%" not in text and "_" not in text:
            assert found == {key for (key,) in like}, text


def test_a_long_text_is_looked_up_by_at_most_32_of_its_pieces():
    from engine.store import _text_index_query

    for length in (3, 34, 35, 60, 65, 200):
        text = "".join(chr(0x4E00 + n) for n in range(length))  # every three characters a different piece
        pieces = _text_index_query(text).split(" AND ")
        assert len(pieces) == length - 2 if length - 2 <= 32 else 16 < len(pieces) <= 32, length
        assert pieces[0] == f'"{text[:3]}"', length


def test_a_search_text_holding_a_nul_character_finds_what_like_finds(ledger):
    """A NUL in the search box (a pasted binary, a script's %00) was sent to the text index as query syntax,
    which ends at it: the search failed with "unterminated string" instead of answering."""
    batch_id = new_batch(ledger, rows=2)
    for prompt in ("a linen shirt", "a shirt of silk"):
        row = ledger.claim_next(batch_id)
        ledger.complete_row(row.row_key, {**RECORD, "prompt": prompt}, "/a.png", "a" * 64)
    for text in ("linen shirt\x00", "shirt\x00 of silk", "\x00silk", "lin\x00en"):
        like = ledger.conn.execute(
            "SELECT row_key FROM generations WHERE prompt LIKE ? OR negative_prompt LIKE ? OR row_values LIKE ?",
            ["%" + text + "%"] * 3).fetchall()
        assert {g.row_key for g in ledger.search(text)} == {key for (key,) in like}, text
    assert [g.prompt for g in ledger.search("linen shirt\x00")] == ["a linen shirt"]


def test_a_pasted_text_longer_than_the_index_looks_up_finds_the_rows_holding_all_of_it(ledger):
    """Only the start of a very long search text is looked up in the text index; the rows found must still be
    exactly those holding the whole text."""
    from engine.store import _TEXT_INDEX_LOOKUP_CHARS

    start = "".join(f"word{n} " for n in range(_TEXT_INDEX_LOOKUP_CHARS))  # longer than the lookup
    batch_id = new_batch(ledger, rows=2)
    for prompt in (start + "ending one", start + "ending two"):
        row = ledger.claim_next(batch_id)
        ledger.complete_row(row.row_key, {**RECORD, "prompt": prompt}, "/a.png", "a" * 64)
    assert [g.prompt for g in ledger.search(start + "ending two")] == [start + "ending two"]
    assert len(ledger.search(start)) == 2 and ledger.search(start + "ending three") == []


def test_rows_left_running_are_found_without_reading_every_generation(ledger):
    """At shutdown the app gives its claims back; after a year that read the whole table."""
    new_batch(ledger, rows=3)
    plans = query_plans(ledger, lambda: ledger.reset_stale_running(worker="host:1", crashed=False))
    lines = [line for plan in plans for line in plan if "generations" in line]
    assert lines and all(line.startswith("SEARCH generations USING") for line in lines), plans


def test_history_pages_at_equal_times_neither_repeat_nor_skip_a_row(ledger):
    """Skipped rows of a batch share one time (and API bursts share milliseconds): pages must still cut
    the results in one order, whatever the page size."""
    batches = [new_batch(ledger, rows=9) for _ in range(3)]
    ledger.conn.execute("UPDATE generations SET finished_at = '2025-05-05T10:00:00.000+00:00' "
                        "WHERE row_number % 2 = 0")  # ties across batches, between finished and queued rows
    everything = [g.row_key for g in ledger.search(limit=1000)]
    assert len(everything) == 27 == len(set(everything))
    for size in (1, 2, 5, 7, 26, 27):
        paged = [g.row_key for offset in range(0, 30, size) for g in ledger.search(limit=size, offset=offset)]
        assert paged == everything, size
    for batch_id in batches:  # the same through the batch's own index
        one = [g.row_key for g in ledger.search(batch_id=batch_id, limit=1000)]
        assert [g.row_key for offset in range(0, 9, 4) for g in ledger.search(batch_id=batch_id, limit=4,
                                                                              offset=offset)] == one
        assert one == [key for key in everything if key.startswith(batch_id + ":")]


def _claim_worker(path, batch_id, worker, start_together, results):
    claimed, errors = [], []
    try:
        ledger = BatchLedger(path)
        start_together.wait(timeout=60)
        while (row := ledger.claim_next(batch_id, worker=worker)) is not None:
            claimed.append(row.row_number)
            time.sleep(0.002)  # the "generation", outside any transaction, as in a real worker
            ledger.complete_row(row.row_key, RECORD, f"/out/{row.row_number}.png", "0" * 64)
        ledger.close()
    except Exception as exc:  # reported to the parent; the test asserts there is none
        errors.append(repr(exc))
    results.put((worker, claimed, errors))


def test_two_processes_never_double_claim_nor_see_locked(tmp_path):
    path = tmp_path / "ledger.db"
    with BatchLedger(path) as ledger:
        batch_id = new_batch(ledger, rows=120)
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    start_together = context.Barrier(2)
    workers = [context.Process(target=_claim_worker, args=(str(path), batch_id, f"w{i}", start_together, results))
               for i in range(2)]
    for process in workers:
        process.start()
    outcomes = [results.get(timeout=120) for _ in workers]
    for process in workers:
        process.join(timeout=30)
    assert all(not errors for _, _, errors in outcomes), outcomes
    claimed = [n for _, rows, _ in outcomes for n in rows]
    assert sorted(claimed) == list(range(2, 122))  # every row exactly once
    assert all(rows for _, rows, _ in outcomes)  # both processes really took part
    with BatchLedger(path) as ledger:
        assert ledger.batch_summary(batch_id)["counts"]["done"] == 120


def test_a_long_foreign_write_lock_is_waited_out_not_reported(tmp_path):
    path = tmp_path / "ledger.db"
    ledger = BatchLedger(path, busy_timeout_s=0.02)  # tiny busy timeout: the retry loop must do the waiting
    batch_id = new_batch(ledger, rows=1)
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    releaser = threading.Timer(0.5, lambda: other.execute("COMMIT"))
    releaser.start()
    start = time.perf_counter()
    row = ledger.claim_next(batch_id, worker="w")
    assert row is not None and time.perf_counter() - start >= 0.4
    releaser.join()
    other.close()
    ledger.close()


@pytest.mark.parametrize("damage", ["random bytes", "truncated", "a folder"])
def test_a_damaged_ledger_is_one_clear_error_naming_the_file(tmp_path, damage):
    path = tmp_path / "ledger.db"
    if damage == "random bytes":
        path.write_bytes(bytes(range(256)) * 4)
    elif damage == "truncated":
        with BatchLedger(path) as ledger:
            ledger.create_batch("p", "t", "s", 1, batch_id="b1")
            ledger.add_rows("b1", [{"row_number": n, "values": {"x": "y" * 500}} for n in range(2, 200)])
            ledger.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        path.write_bytes(path.read_bytes()[:5000])
    else:
        path.mkdir()

    with pytest.raises(StoreError) as refused:
        BatchLedger(path).rows("b1")

    assert str(path) in refused.value.message


# ----------------------------------------------------------------- the ledger's files changed behind its back


def sidecars(path):
    return [path.with_name(path.name + suffix) for suffix in ("-wal", "-shm")]


def row_numbers(path, batch_id):
    with BatchLedger(path) as fresh:  # another process's view: the files now at the path
        return [row.row_number for row in fresh.rows(batch_id)]


def test_a_write_ahead_log_deleted_in_use_loses_nothing(tmp_path, caplog):
    """An operator "cleaning up" ledger.db-wal and -shm while the app runs: until SQLite checkpoints, they
    hold every recent commit (the schema too, for a new ledger); later commits would go to the deleted file."""
    path = tmp_path / "ledger.db"
    with BatchLedger(path) as ledger:
        batch_id = new_batch(ledger, rows=2)
        for file in sidecars(path):
            file.unlink()
        ledger.add_rows(batch_id, [{"row_number": 9}])
        assert row_numbers(path, batch_id) == [2, 3, 9]
        assert "ledger.db-wal and ledger.db-shm were deleted" in caplog.text
        ledger.add_rows(batch_id, [{"row_number": 10}])  # and it goes on at the path, as other processes do
        assert row_numbers(path, batch_id) == [2, 3, 9, 10]


def test_a_ledger_file_deleted_in_use_is_written_back(tmp_path, caplog):
    path = tmp_path / "ledger.db"
    with BatchLedger(path) as ledger:
        batch_id = new_batch(ledger, rows=2)
        for file in [path, *sidecars(path)]:
            file.unlink()
        ledger.add_rows(batch_id, [{"row_number": 9}])
        assert row_numbers(path, batch_id) == [2, 3, 9]
        assert f"the ledger {path} was deleted while in use" in caplog.text


def test_a_ledger_file_replaced_in_use_is_the_one_used_from_then_on(tmp_path, caplog):
    """A backup put back while the app runs is what every process reads from then on: this one too."""
    path = tmp_path / "ledger.db"
    with BatchLedger(path) as ledger:
        batch_id = new_batch(ledger, rows=2)
        ledger.conn.execute("VACUUM INTO ?", (str(tmp_path / "backup.db"),))
        ledger.add_rows(batch_id, [{"row_number": 8}])  # after the backup: not in it
        (tmp_path / "backup.db").replace(path)
        ledger.add_rows(batch_id, [{"row_number": 9}])
        assert row_numbers(path, batch_id) == [2, 3, 9]
        assert [row.row_number for row in ledger.rows(batch_id)] == [2, 3, 9]
        assert "was replaced by another file while in use" in caplog.text


def test_a_ledger_file_this_user_cannot_write_is_refused_when_it_is_opened(tmp_path, as_ordinary_user):
    """SQLite opens a file it may not write read-only without a word: a server would start, and every
    batch fail. The ledger says so when it is opened, naming the file."""
    path = tmp_path / "ledger.db"
    BatchLedger(path).close()
    path.chmod(0o444)
    opening = "import sys; from engine.store import BatchLedger; BatchLedger(sys.argv[1])"
    result = subprocess.run([*as_ordinary_user, sys.executable, "-c", opening, str(path)],
                            cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and f"the ledger {path} cannot be written" in result.stderr, result.stderr[-2000:]


def test_a_search_text_holding_half_an_emoji_finds_nothing_instead_of_failing(ledger):
    """A lone surrogate (a script that cut an emoji in two, sent through JSON's \\ud83d) cannot be in any
    stored text, and SQLite cannot take it: the search answers no rows, not an encoding error."""
    batch_id = new_batch(ledger, rows=1)
    row = ledger.claim_next(batch_id)
    ledger.complete_row(row.row_key, {**RECORD, "prompt": "a red mug 😀"}, "/a.png", "a" * 64)
    assert ledger.search("red mug \ud83d") == [] and ledger.search("\ud83d") == []
    assert [g.prompt for g in ledger.search("red mug 😀")] == ["a red mug 😀"]
