"""A data folder made by an older release, opened by this one: the ledger at each earlier schema version
(made by the same migration code, holding rows as that release wrote them) keeps its data, gets each
missing migration once, and every reader copes with the columns later migrations added (NULL or their
default in old rows). Two processes opening an old ledger at once migrate it once."""

from __future__ import annotations

import io
import json
import multiprocessing
import sqlite3
import zipfile
from pathlib import Path

import pytest

import engine.store
from engine.archive import write_batch_zip
from engine.errors import StoreError
from engine.store import MIGRATIONS, BatchLedger

OLD_VERSIONS = [version for version, _, _ in MIGRATIONS[:-1]]
DEAD_CLAIMANT = "elsewhere:1"  # a claimant on another host, long ago: its claim is stale


def ledger_at_version(path: Path, version: int, monkeypatch) -> None:
    """The ledger as the release whose newest migration was ``version`` made it, with the rows it wrote:
    a finished batch (one row done with its image, one skipped) and a batch its process was killed in
    (one row done, one running, one queued). Rows are written with the columns of that version only."""
    with monkeypatch.context() as patch:
        patch.setattr(engine.store, "MIGRATIONS", tuple(m for m in MIGRATIONS if m[0] <= version))
        with BatchLedger(path) as old:
            assert old.schema_version() == version
            for batch_id, statuses in (("finished", ("done", "skipped")), ("killed", ("done", "running", "queued"))):
                # create_batch writes the first schema's columns: the same in every release. Rows are written
                # as add_rows wrote them up to version 7 (version 8 added the image size it records).
                old.create_batch("product_shot", "t" * 64, f"sheet of {batch_id}".ljust(64, "."), batch_seed=2**64 - 1,
                                 sheet_name=f"{batch_id}.csv", options={"columns": ["product"]}, user="alice",
                                 batch_id=batch_id)
                old.conn.executemany(
                    "INSERT INTO generations (row_key, batch_id, row_number, row_values, seed, template_name, "
                    "template_hash, workflow, prompt, status, error, queued_at, user, finished_at) "
                    "VALUES (?, ?, ?, ?, ?, 'product_shot', ?, ?, ?, ?, ?, ?, 'alice', ?)",
                    [(f"{batch_id}:{n}", batch_id, n, json.dumps({"product": f"旧 item {n}"}, ensure_ascii=False),
                      str(n), "t" * 64, json.dumps({"1": {"class_type": "X", "inputs": {}}}), f"old item {n}",
                      "skipped" if status == "skipped" else "queued", "bad width" if status == "skipped" else None,
                      "2024-05-01T10:00:00.000+00:00", "2024-05-01T10:00:00.000+00:00" if status == "skipped" else None)
                     for n, status in enumerate(statuses, start=2)])
                engine.store._refresh_counts(old.conn, batch_id)
                for n, status in enumerate(statuses, start=2):
                    image = path.parent / "outputs" / batch_id / f"item_{n}.png"
                    if status == "done":
                        image.parent.mkdir(parents=True, exist_ok=True)
                        image.write_bytes(b"\x89PNG old image")
                        old.conn.execute(
                            "UPDATE generations SET status = 'done', attempts = 1, worker = ?, started_at = queued_at, "
                            "finished_at = queued_at, image_path = ?, image_sha256 = ?, images = ? WHERE row_key = ?",
                            (DEAD_CLAIMANT, str(image), None, json.dumps([{"path": str(image)}]), f"{batch_id}:{n}"))
                    elif status == "running":
                        old.conn.execute(
                            "UPDATE generations SET status = 'running', attempts = 1, worker = ?, "
                            "started_at = '2020-01-01T00:00:00.000+00:00' WHERE row_key = ?",
                            (DEAD_CLAIMANT, f"{batch_id}:{n}"))
            old.set_batch_status("killed", "running")


def migrations_applied(path: Path) -> list[int]:
    with sqlite3.connect(path) as conn:
        return [row[0] for row in conn.execute("SELECT version FROM migrations ORDER BY version")]


@pytest.mark.parametrize("version", OLD_VERSIONS)
def test_a_ledger_of_an_older_release_is_upgraded_once_and_its_rows_are_read_and_resumed(
        tmp_path, monkeypatch, version):
    path = tmp_path / "ledger.db"
    ledger_at_version(path, version, monkeypatch)
    BatchLedger(path).close()
    with BatchLedger(path) as ledger:
        assert migrations_applied(path) == [v for v, _, _ in MIGRATIONS]  # each once, after two opens
        assert ledger.schema_version() == MIGRATIONS[-1][0]

        # The old rows as every reader sees them: columns of later migrations are NULL or their default
        old = ledger.get_generation("killed:2")
        assert (old.status, old.seed, old.began_at, old.crashes, old.row_values) == ("done", 2, None, 0,
                                                                                     {"product": "旧 item 2"})
        assert [b["id"] for b in ledger.list_batches()] in (["killed", "finished"], ["finished", "killed"])
        assert {g.row_key for g in ledger.search(text="旧 item")} == {f"{b}:{n}" for b, rows in
                                                                    (("finished", 2), ("killed", 3))
                                                                    for n in range(2, 2 + rows)}
        assert [g.row_key for g in ledger.search(status="running")] == ["killed:3"]
        assert ledger.pending_image_bytes("killed") is None  # no image size recorded: only the rows can say
        assert ledger.batch_summary("killed")["counts"]["running"] == 1
        assert ledger.abandoned_batch_ids() == ["killed"]
        assert [b["id"] for b in ledger.batches_with_rows_to_run()] == ["killed"]
        assert [b["id"] for b in ledger.batches_of_inputs("t" * 64, "sheet of finished".ljust(64, "."))] == ["finished"]
        assert ledger.ended_batches("product_shot")[0]["id"] == "finished"

        # The zip of an old batch: its image and manifests
        out = io.BytesIO()
        summary = write_batch_zip(ledger, "finished", out)
        assert summary.problems == [] and summary.images == ["images/item_2.png"]
        manifest = json.loads(zipfile.ZipFile(out).read("manifest.json"))
        assert [row["status"] for row in manifest["rows"]] == ["done", "skipped"]

        # Resume: the killed process's claim goes back, and the rows left run once each
        assert ledger.reset_stale_running("killed", worker=DEAD_CLAIMANT, max_attempts=3) == 1
        assert ledger.get_generation("killed:3").crashes == 0  # it never said it began: no crash is blamed
        while (row := ledger.claim_next("killed", worker="new:1")) is not None:
            ledger.mark_began(row.row_key)
            ledger.complete_row(row.row_key, {"prompt": row.prompt, "seed": row.seed}, f"/out/{row.row_number}.png",
                                "0" * 64)
        assert ledger.batch_summary("killed")["counts"]["done"] == 3


def _open(path: str, start_together, results) -> None:
    try:
        start_together.wait(timeout=60)
        with BatchLedger(path) as ledger:
            results.put(("opened", ledger.schema_version(), len(ledger.search(limit=10))))
    except Exception as exc:  # reported to the test, which names it
        results.put(("error", repr(exc), 0))


def test_two_processes_opening_an_old_ledger_at_once_migrate_it_once(tmp_path, monkeypatch):
    """The web app and a CLI run started together on a data folder of the oldest release: one applies the
    migrations, the other waits for it and finds them applied; neither sees an error."""
    path = tmp_path / "ledger.db"
    ledger_at_version(path, MIGRATIONS[0][0], monkeypatch)
    context = multiprocessing.get_context("spawn")
    start_together, results = context.Event(), context.Queue()
    processes = [context.Process(target=_open, args=(str(path), start_together, results)) for _ in range(3)]
    for process in processes:
        process.start()
    start_together.set()
    for process in processes:
        process.join(timeout=120)
    seen = sorted(results.get(timeout=10) for _ in processes)
    assert seen == [("opened", MIGRATIONS[-1][0], 5)] * 3
    assert migrations_applied(path) == [v for v, _, _ in MIGRATIONS]


def test_a_migration_sqlite_refuses_leaves_the_older_ledger_whole_and_says_which_sqlite_is_needed(
        tmp_path, monkeypatch):
    # The text index of migration 7 cannot be built (here: a table of that name is already there, as an SQLite
    # without FTS5's trigram tokenizer would refuse it): the open is refused in words, and the ledger keeps
    # its schema and its rows for the release that can upgrade it.
    path = tmp_path / "ledger.db"
    ledger_at_version(path, 6, monkeypatch)
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE generations_text (x)")
    with pytest.raises(StoreError) as refused:
        BatchLedger(path)
    assert refused.value.code == "ledger_upgrade_failed"
    assert refused.value.details["version"] == 7 and refused.value.details["sqlite_version"] == sqlite3.sqlite_version
    assert "generations_text already exists" in str(refused.value) and "Nothing in it was changed" in str(refused.value)
    assert migrations_applied(path) == [v for v, _, _ in MIGRATIONS if v <= 6]
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT count(*) FROM generations").fetchone()[0] == 5


class LedgerOnAFullDisk(BatchLedger):
    """A ledger whose file may not grow by a page: SQLite's own SQLITE_FULL, as on a disk with no space left."""

    def _configure(self) -> None:
        super()._configure()
        pages = self.conn.execute("PRAGMA page_count").fetchone()[0]
        self.conn.execute(f"PRAGMA max_page_count = {pages}")


def test_a_full_disk_while_upgrading_the_ledger_is_said_as_a_full_disk_not_as_an_old_sqlite(tmp_path, monkeypatch):
    # Building the text index of a year's ledger writes tens of MB: a disk that fills up meanwhile is the
    # disk's problem (ledger_unwritable: free space, then go on), not an SQLite too old for the upgrade.
    path = tmp_path / "ledger.db"
    ledger_at_version(path, 6, monkeypatch)
    with pytest.raises(StoreError) as refused:
        LedgerOnAFullDisk(path)
    assert refused.value.code == "ledger_unwritable", refused.value
    assert "full" in str(refused.value) and "SQLite 3.34" not in str(refused.value)
    assert migrations_applied(path) == [v for v, _, _ in MIGRATIONS if v <= 6]
    with BatchLedger(path) as upgraded:  # space again: the upgrade goes through
        assert upgraded.schema_version() == MIGRATIONS[-1][0]


def test_an_upgrade_is_logged_before_it_runs_and_a_new_ledger_is_not_called_an_upgrade(tmp_path, monkeypatch, caplog):
    """Building the text index of a large ledger takes seconds once: the operator reads why in the log first. A
    ledger made fresh is no upgrade."""
    old = tmp_path / "old.db"
    ledger_at_version(old, 6, monkeypatch)
    with caplog.at_level("INFO", logger="engine.store"):
        BatchLedger(tmp_path / "new.db").close()
        assert not [r for r in caplog.records if "upgrading" in r.getMessage()]
        BatchLedger(old).close()
    said = [r.getMessage() for r in caplog.records if "upgrading" in r.getMessage()]
    assert said == [f"upgrading the ledger {old} to schema version {version} ({name})"
                    for version, name, _ in MIGRATIONS if version > 6]
