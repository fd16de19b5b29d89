"""The batch ledger: every batch and every generation in one SQLite file (through sqlite-utils), and the
API tokens revoked before they expire (``webapp.revocation`` says what a revocation means).

One row of ``generations`` per spreadsheet row, keyed ``<batch_id>:<row_number>``. Resume = run the rows
whose status is not ``done``; the image file is written (temp name, fsync, rename) before the row is
committed ``done``, so no finished row lacks its file.

Several processes may share the file (web app, CLI, Celery workers). The connection uses WAL (readers
never block the writer), ``synchronous=FULL`` (a committed row survives power loss), a busy timeout, and
every write runs in ``BEGIN IMMEDIATE`` inside a retry loop, so "database is locked" never reaches a user.
Claiming a row is one conditional UPDATE in a write transaction: only one process gets a queued row.

Seeds go up to 2**64-1, past SQLite's signed 64-bit INTEGER, so they are stored as TEXT and exposed as
int. The schema is versioned in ``migrations``; the file opens as is in ``sqlite-utils`` and Datasette.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from engine.errors import BadQuery, BatchError, BatchExists, BatchMismatch, StoreError

if TYPE_CHECKING:
    from sqlite_utils import Database

log = logging.getLogger(__name__)

__all__ = ["BATCH_ID_PATTERN", "BatchLedger", "check_batch_id", "Generation", "ROW_STATUSES", "FINAL_STATUSES", "MIGRATIONS", "row_key"]

ROW_STATUSES = ("queued", "running", "done", "failed", "timed_out", "skipped", "cancelled")
FAILURE_STATUSES = ("failed", "timed_out", "skipped", "cancelled")
FINAL_STATUSES = ("done",) + FAILURE_STATUSES
BATCH_STATUSES = ("created", "running", "finished", "cancelled", "failed")

T = TypeVar("T")
# Batch ids name folders under the outputs: letters, digits, '-', '_' and '.', never a leading dot.
BATCH_ID_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}")
# Names a batch folder cannot take because the web app's file routes use them beside the batch folders
# (/files/zip/<batch> is a batch's zip; /files/<batch>/<image> its images).
RESERVED_BATCH_IDS = frozenset({"zip"})


def _sql_offset(offset: int) -> int:
    """A list offset SQLite can take: beyond any ledger's size it finds nothing, never an integer overflow."""
    return min(max(int(offset), 0), 2**62)


def _time_bound(value: str, field: str) -> str:
    """A search bound as the ledger writes its times, so that comparing the text compares the times:
    ``YYYY-MM-DD`` stays a day; a date and time (``T`` or a space between, any UTC offset, none meaning
    UTC) becomes UTC with milliseconds, like :func:`_now`. Anything else is a :class:`BadQuery` naming the
    field: compared as text it would match nothing, or everything, without a word."""
    text = str(value).strip()
    try:
        if len(text) == 10:
            return date.fromisoformat(text).isoformat()
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise BadQuery(f"{field} must be a date (YYYY-MM-DD) or an ISO date and time "
                       f"(e.g. 2025-01-31T14:00:00+08:00), not {text[:40]!r}", field=field) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds")


def check_batch_id(batch_id: Any) -> str:
    """``batch_id`` when it may name a batch (and so a folder under the outputs); BatchError otherwise."""
    if not isinstance(batch_id, str) or not BATCH_ID_PATTERN.fullmatch(batch_id):
        raise BatchError(
            f"batch id {str(batch_id)[:80]!r} is not allowed: use 1-64 letters, digits, '-', '_' or '.' "
            "(not starting with '.')",
            batch_id=str(batch_id)[:80],
        )
    if batch_id.lower() in RESERVED_BATCH_IDS:
        raise BatchError(f"batch id {batch_id!r} is reserved: choose another name", batch_id=batch_id)
    return batch_id

# Record keys (ctx.record) stored in their own columns; any other key goes to the ``extra`` JSON.
_RECORD_COLUMNS = {
    "prompt": "prompt", "negative_prompt": "negative_prompt", "steps": "steps", "cfg": "cfg",
    "sampler": "sampler", "scheduler": "scheduler", "denoise": "denoise", "width": "width", "height": "height",
    "model_name": "model_name", "model_hash": "model_hash", "precision": "precision",
}
_JSON_COLUMNS = ("row_values", "loras", "workflow", "images", "extra")
# When a generation happened, as history sorts and filters it: finished, else queued. Written the same in
# the index on it (migration 6) and in every query, so that SQLite uses the index.
_WHEN = "coalesce(finished_at, queued_at)"
# The full-text index of what history searches (migration 7), and the shortest text it can look up: it
# indexes each three characters in a row, so a shorter text is searched by reading the rows themselves.
_TEXT_INDEX = "generations_text"
_TEXT_INDEX_MIN_CHARS = 3
# The longest start of a search text the index looks up (the LIKE still checks the whole text).
_TEXT_INDEX_LOOKUP_CHARS = 1000
# A long text is looked up by this many of its pieces at most: the rows holding them all hold it, but for few
_TEXT_INDEX_MAX_PIECES = 32
# The oldest SQLite that builds every migration: FTS5's trigram tokenizer (migration 7) came with 3.34.
_SQLITE_NEEDED = "3.34"
# A text in more generations than this is searched by reading the newest rows until a page is full (see
# BatchLedger._in_many_rows): a word that common is usually found among the newest rows within a few pages.
_TEXT_INDEX_MANY_ROWS = 5000

# Each migration: (version, name, statements). Applied in order inside one write transaction each.
MIGRATIONS: tuple[tuple[int, str, tuple[str, ...]], ...] = (
    (
        1,
        "batches and generations",
        (
            """CREATE TABLE batches (
                id TEXT PRIMARY KEY,
                template_name TEXT NOT NULL,
                template_hash TEXT NOT NULL,
                sheet_name TEXT,
                sheet_hash TEXT NOT NULL,
                batch_seed TEXT NOT NULL,
                options TEXT NOT NULL DEFAULT '{}',
                user TEXT,
                status TEXT NOT NULL DEFAULT 'created',
                created_at TEXT NOT NULL,
                started_at TEXT,
                finished_at TEXT,
                row_count INTEGER NOT NULL DEFAULT 0,
                done_count INTEGER NOT NULL DEFAULT 0,
                failed_count INTEGER NOT NULL DEFAULT 0,
                timed_out_count INTEGER NOT NULL DEFAULT 0,
                skipped_count INTEGER NOT NULL DEFAULT 0,
                cancelled_count INTEGER NOT NULL DEFAULT 0
            )""",
            """CREATE TABLE generations (
                id INTEGER PRIMARY KEY,
                row_key TEXT NOT NULL UNIQUE,
                batch_id TEXT NOT NULL REFERENCES batches(id),
                row_number INTEGER NOT NULL,
                row_values TEXT NOT NULL DEFAULT '{}',
                prompt TEXT,
                negative_prompt TEXT,
                seed TEXT,
                steps INTEGER,
                cfg REAL,
                sampler TEXT,
                scheduler TEXT,
                denoise REAL,
                width INTEGER,
                height INTEGER,
                model_name TEXT,
                model_hash TEXT,
                precision TEXT,
                loras TEXT,
                template_name TEXT,
                template_hash TEXT,
                workflow TEXT,
                status TEXT NOT NULL DEFAULT 'queued',
                error TEXT,
                attempts INTEGER NOT NULL DEFAULT 0,
                worker TEXT,
                queued_at TEXT,
                started_at TEXT,
                finished_at TEXT,
                duration_s REAL,
                sampler_s REAL,
                image_path TEXT,
                image_sha256 TEXT,
                images TEXT,
                user TEXT,
                prompt_id TEXT,
                extra TEXT
            )""",
            "CREATE INDEX idx_generations_batch_status ON generations (batch_id, status, row_number)",
            "CREATE INDEX idx_generations_finished ON generations (finished_at)",
            "CREATE INDEX idx_batches_created ON batches (created_at)",
        ),
    ),
    (
        2,
        "revoked API tokens",
        (
            """CREATE TABLE revoked_tokens (
                jti TEXT PRIMARY KEY,
                subject TEXT NOT NULL,
                expires_at TEXT NOT NULL,
                revoked_at TEXT NOT NULL,
                revoked_by TEXT NOT NULL
            )""",
            """CREATE TABLE token_cutoffs (
                subject TEXT PRIMARY KEY,
                not_before TEXT NOT NULL,
                revoked_at TEXT NOT NULL,
                revoked_by TEXT NOT NULL
            )""",
        ),
    ),
    (
        3,
        "batches hidden from history",
        (
            # ComfyUI's "delete history" hides a prompt from /history; the ledger keeps every row (an audit
            # log is never thinned by a client), and records who hid what, when.
            """CREATE TABLE hidden_history (
                batch_id TEXT PRIMARY KEY REFERENCES batches(id),
                hidden_at TEXT NOT NULL,
                hidden_by TEXT
            )""",
        ),
    ),
    (
        4,
        "rows that began, and crashes while running",
        (
            # A claim takes a row; it *begins* when its first node runs. Only a row that had begun when its
            # process died counts a crash: rows claimed in advance, cancelled or released never do.
            "ALTER TABLE generations ADD COLUMN began_at TEXT",
            "ALTER TABLE generations ADD COLUMN crashes INTEGER NOT NULL DEFAULT 0",
        ),
    ),
    (
        5,
        "idempotency keys",
        (
            # A client's Idempotency-Key per user (engine.idempotency): the request it came with (a hash),
            # the batch id reserved for that request before it ran, and once answered, the answer retries
            # get. ``claimant`` (host:pid) is the process answering it now; NULL when none is.
            """CREATE TABLE idempotency_keys (
                user TEXT NOT NULL,
                key TEXT NOT NULL,
                request_hash TEXT NOT NULL,
                batch_id TEXT NOT NULL,
                status INTEGER,
                answer TEXT,
                claimant TEXT,
                claimed_at TEXT,
                created_at TEXT NOT NULL,
                expires_at TEXT NOT NULL,
                PRIMARY KEY (user, key)
            )""",
            "CREATE INDEX idx_idempotency_keys_expires ON idempotency_keys (expires_at)",
        ),
    ),
    (
        6,
        "indexes for a ledger of many batches",
        (
            # History lists generations newest first by this very expression (see search): without an index
            # on it every page, the first included, read and sorted the whole table (seconds after a year).
            f"CREATE INDEX idx_generations_when ON generations ({_WHEN} DESC, row_key)",
            # The same by status (a History filter), and the rows left running (shutdown, dead workers).
            f"CREATE INDEX idx_generations_status_when ON generations (status, {_WHEN} DESC, row_key)",
            # The batch a command run again continues is looked up by its inputs, among every batch.
            "CREATE INDEX idx_batches_inputs ON batches (sheet_hash, template_hash)",
        ),
    ),
    (
        7,
        "text index for history search",
        (
            # History search finds a text anywhere inside the prompt, the negative prompt or the cells. LIKE
            # has no index, so a text found nowhere read every generation (over a second after a year). A
            # trigram index finds the rows holding each three-character piece of a text, case-insensitively;
            # search still applies its LIKE to them, so results stay the same. External content: the text
            # lives once, in generations, and the triggers keep the index in step. detail=none keeps only
            # which rows hold a piece, not where (a fifth of the size): the LIKE does the rest.
            f"CREATE VIRTUAL TABLE {_TEXT_INDEX} USING fts5(prompt, negative_prompt, row_values, "
            "content='generations', content_rowid='id', tokenize='trigram', detail='none')",
            f"INSERT INTO {_TEXT_INDEX} ({_TEXT_INDEX}) VALUES ('rebuild')",  # the rows an older release wrote
            f"""CREATE TRIGGER generations_text_insert AFTER INSERT ON generations BEGIN
                INSERT INTO {_TEXT_INDEX} (rowid, prompt, negative_prompt, row_values)
                VALUES (new.id, new.prompt, new.negative_prompt, new.row_values);
            END""",
            f"""CREATE TRIGGER generations_text_delete AFTER DELETE ON generations BEGIN
                INSERT INTO {_TEXT_INDEX} ({_TEXT_INDEX}, rowid, prompt, negative_prompt, row_values)
                VALUES ('delete', old.id, old.prompt, old.negative_prompt, old.row_values);
            END""",
            f"""CREATE TRIGGER generations_text_update AFTER UPDATE OF prompt, negative_prompt, row_values
                ON generations WHEN old.prompt IS NOT new.prompt OR old.negative_prompt IS NOT new.negative_prompt
                    OR old.row_values IS NOT new.row_values BEGIN
                INSERT INTO {_TEXT_INDEX} ({_TEXT_INDEX}, rowid, prompt, negative_prompt, row_values)
                VALUES ('delete', old.id, old.prompt, old.negative_prompt, old.row_values);
                INSERT INTO {_TEXT_INDEX} (rowid, prompt, negative_prompt, row_values)
                VALUES (new.id, new.prompt, new.negative_prompt, new.row_values);
            END""",
        ),
    ),
    (
        8,
        "the image size each row expects",
        (
            # What a row's image file will take (engine.storage.row_image_bytes; 0: its workflow names no
            # size), recorded with the row: the storage probe run before a batch's rows takes the largest of
            # the rows left, instead of reading and encoding every row's workflow again (10,000 rows: a
            # second). NULL: recorded by an older release, or its workflow changed since.
            "ALTER TABLE generations ADD COLUMN image_bytes INTEGER",
        ),
    ),
)


def row_key(batch_id: str, row_number: int) -> str:
    return f"{batch_id}:{int(row_number)}"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@dataclass
class Generation:
    """One ledger row (one spreadsheet row of one batch). ``seed`` is an exact int (stored as TEXT)."""

    row_key: str
    batch_id: str
    row_number: int
    status: str
    row_values: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    prompt: str | None = None
    negative_prompt: str | None = None
    steps: int | None = None
    cfg: float | None = None
    sampler: str | None = None
    scheduler: str | None = None
    denoise: float | None = None
    width: int | None = None
    height: int | None = None
    model_name: str | None = None
    model_hash: str | None = None
    precision: str | None = None
    loras: list[Any] | None = None
    template_name: str | None = None
    template_hash: str | None = None
    workflow: dict[str, Any] | None = None
    error: str | None = None
    attempts: int = 0  # times the row began running
    crashes: int = 0  # times its process died while it was running
    worker: str | None = None
    queued_at: str | None = None
    started_at: str | None = None  # when it was claimed
    began_at: str | None = None  # when its first node ran, in the current claim
    finished_at: str | None = None
    duration_s: float | None = None
    sampler_s: float | None = None
    image_path: str | None = None
    image_sha256: str | None = None
    images: list[dict[str, Any]] | None = None
    user: str | None = None
    prompt_id: str | None = None
    extra: dict[str, Any] | None = None
    image_bytes: int | None = None  # what its image is expected to take (engine.storage.row_image_bytes)
    id: int | None = None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> "Generation":
        data = dict(row)
        for name in _JSON_COLUMNS:
            if data.get(name) is not None:
                data[name] = json.loads(data[name])
        if data.get("seed") is not None:
            data["seed"] = int(data["seed"])
        data["row_values"] = data.get("row_values") or {}
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class BatchLedger:
    """The SQLite ledger of batches and generations. Safe to share between threads and processes."""

    def __init__(self, path: str | Path, busy_timeout_s: float = 30.0, retry_for_s: float = 120.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.busy_timeout_s = busy_timeout_s
        self.retry_for_s = retry_for_s
        self._lock = threading.RLock()
        self._files: tuple[Any, ...] | None = None  # what the connection has open (see _follow_files)
        self._open()

    def _open(self) -> None:
        # Autocommit mode: transactions are explicit BEGIN IMMEDIATE ... COMMIT (see _write).
        try:
            conn = sqlite3.connect(str(self.path), timeout=self.busy_timeout_s, isolation_level=None,
                                   check_same_thread=False)
        except sqlite3.Error as exc:  # a folder in its place, no permission
            raise StoreError(f"the ledger {self.path} cannot be opened: {exc}", path=str(self.path)) from exc
        from sqlite_utils import (
            Database,  # imported here: it pulls in pandas when installed (slow)
        )

        self.db: Database = Database(conn)
        self._files = None
        self._retry(self._configure)
        self._retry(self._migrate)
        self._files = self._file_identities()

    # -- plumbing -----------------------------------------------------------------------------------

    @property
    def conn(self) -> sqlite3.Connection:
        return self.db.conn

    def close(self) -> None:
        with self._lock:
            self.conn.close()

    def checkpoint(self) -> None:
        """Copy what the write-ahead log holds into the ledger file itself (without waiting for readers), so
        that the file alone is complete: a copy of it, or a log deleted by mistake, loses nothing."""
        try:
            self._retry(lambda: self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall())
        except StoreError as exc:  # the log stays, and SQLite checkpoints it later: worth a word, no more
            log.warning("%s", exc.message)

    def _file_identities(self) -> tuple[Any, ...]:
        """(device, inode) of the ledger file and of its -wal and -shm files, None for one that is missing."""
        identities = []
        for name in (self.path, *(self.path.with_name(self.path.name + suffix) for suffix in ("-wal", "-shm"))):
            try:
                found = os.stat(name)
            except OSError:
                identities.append(None)
            else:
                identities.append((found.st_dev, found.st_ino))
        return tuple(identities)

    def _follow_files(self) -> None:
        """Notice the ledger's files deleted or replaced behind an open connection, and recover.

        SQLite keeps using the files it opened: a write-ahead log deleted by hand (or a ledger file moved
        away) would silently take every later commit with it, and other processes, opening the files now at
        the path, would see another ledger. So: a deleted -wal or -shm is copied into the ledger file first
        (this connection still has them open); a deleted ledger file is written back from this connection;
        a ledger file replaced by another (a backup put back) is used from now on. Then the ledger is opened
        again at its path, as every other process opens it."""
        if self._files is None:
            return
        now = self._file_identities()
        if now == self._files:
            return
        database, wal, shm = now
        if database is None:
            log.error("the ledger %s was deleted while in use; writing it back from the open connection",
                      self.path)
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self.conn.execute("VACUUM INTO ?", (str(self.path),))
        elif database != self._files[0]:
            log.error("the ledger %s was replaced by another file while in use; using that file from now on "
                      "(what this process wrote to the old one since is not in it)", self.path)
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # empties the old log: none of it is the new file's
        else:
            lost = [f"{self.path.name}{suffix}" for suffix, was, is_now
                    in (("-wal", self._files[1], wal), ("-shm", self._files[2], shm)) if was != is_now]
            log.error("the ledger's write-ahead %s %s deleted or replaced while in use; what %s held is kept in %s",
                      " and ".join(lost), "was" if len(lost) == 1 else "were", "it" if len(lost) == 1 else "they",
                      self.path)
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # from the files this connection still has open
        self.conn.close()
        self._open()

    def __enter__(self) -> "BatchLedger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _configure(self) -> None:
        self.conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
        mode = self.conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreError(f"the ledger {self.path} cannot use WAL journaling (got '{mode}')", path=str(self.path))
        self.conn.execute("PRAGMA synchronous = FULL")
        self.conn.execute("PRAGMA foreign_keys = ON")

    def _retry(self, operation: Callable[[], T]) -> T:
        """Run ``operation``, retrying while SQLite says the database is locked or busy."""
        deadline = time.monotonic() + self.retry_for_s
        delay = 0.01
        while True:
            try:
                with self._lock:
                    self._follow_files()
                    return operation()
            except sqlite3.OperationalError as exc:
                if not _is_lock_contention(exc):
                    problem, unwritable = self._storage_problem(exc)
                    sqlite_error = getattr(exc, "sqlite_errorname", None)
                    if unwritable:  # the disk's, not the request's: the web app waits for it (engine.storage)
                        raise StoreError(problem, path=str(self.path), sqlite_error=sqlite_error,
                                         code="ledger_unwritable") from exc
                    raise StoreError(problem, path=str(self.path), sqlite_error=sqlite_error) from exc
                if time.monotonic() > deadline:
                    raise StoreError(
                        f"the ledger {self.path} stayed locked for {self.retry_for_s:.0f} s; another process "
                        "holds a long write", path=str(self.path),
                    ) from exc
                time.sleep(delay * (1 + random.random()))
                delay = min(delay * 2, 0.5)
            except sqlite3.DatabaseError as exc:  # not a database, or a damaged one: never retried
                raise StoreError(
                    f"the ledger {self.path} is damaged or not a SQLite database ({exc}); restore it from a "
                    "backup or move it away to start a new one (the images in the outputs folder are kept)",
                    path=str(self.path),
                ) from exc

    def _storage_problem(self, exc: sqlite3.Error) -> tuple[str, bool]:
        """What an error of SQLite's means for whoever runs the app, and whether it is the disk's (code
        ``ledger_unwritable``): a full disk, or files this user may not write (in WAL mode SQLite writes
        ledger.db-wal and -shm beside the ledger, so its folder too)."""
        code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
        path = Path(os.path.abspath(self.path))  # a service's working folder is nobody's guess
        if code == sqlite3.SQLITE_FULL:
            return (f"the ledger {path} cannot be written: the disk holding it is full ({exc}); free space "
                    "there, then resume (finished rows and their images are kept)"), True
        if code in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM):
            return (f"the ledger {path} cannot be written ({exc}): this user needs write access to the file "
                    f"and to its folder {path.parent} (SQLite keeps {path.name}-wal and {path.name}-shm beside "
                    "it), on a disk that is not mounted read-only"), True
        return f"the ledger {self.path}: {exc}", False

    def _write(self, operation: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``operation`` in one ``BEGIN IMMEDIATE`` transaction (retried whole when locked)."""

        def transaction() -> T:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                result = operation(self.conn)
                self.conn.execute("COMMIT")
            except BaseException:
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
                raise
            return result

        return self._retry(transaction)

    def _read(self, sql: str, params: Iterable[Any] | Mapping[str, Any] = ()) -> list[dict[str, Any]]:
        def query() -> list[dict[str, Any]]:
            cursor = self.conn.execute(sql, params)
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, row)) for row in cursor.fetchall()]

        return self._retry(query)

    def _migrate(self) -> None:
        def apply(conn: sqlite3.Connection) -> None:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
                "applied_at TEXT NOT NULL)"
            )
            applied = {row[0] for row in conn.execute("SELECT version FROM migrations")}
            known = {version for version, _, _ in MIGRATIONS}
            newer = sorted(applied - known)
            if newer:
                raise StoreError(
                    f"the ledger {self.path} has schema version {newer[-1]}, newer than this program knows "
                    f"({max(known)}); upgrade the program", path=str(self.path), version=newer[-1],
                )
            for version, name, statements in MIGRATIONS:
                if version in applied:
                    continue
                if applied:  # said before, not after: building the text index of a year's ledger takes seconds
                    log.info("upgrading the ledger %s to schema version %d (%s)", self.path, version, name)
                try:
                    for statement in statements:
                        conn.execute(statement)
                except sqlite3.OperationalError as exc:
                    if _is_lock_contention(exc) or self._storage_problem(exc)[1]:
                        raise  # retried, or said as the disk's problem (a full disk, a read-only file): _retry
                    # Rolled back whole: the ledger stays as the older release left it, every row in it. The
                    # usual cause is an SQLite too old for what the migration builds (the text index of
                    # migration 7 needs FTS5's trigram tokenizer, SQLite 3.34), so its version is named.
                    raise StoreError(
                        f"the ledger {self.path} could not be upgraded to schema version {version} ({name}): "
                        f"{exc}. Nothing in it was changed. This Python's SQLite is {sqlite3.sqlite_version}; "
                        f"the ledger needs SQLite {_SQLITE_NEEDED} or newer, built with FTS5",
                        code="ledger_upgrade_failed", path=str(self.path), version=version, name=name,
                        detail=str(exc), sqlite_version=sqlite3.sqlite_version, needed=_SQLITE_NEEDED,
                    ) from exc
                conn.execute("INSERT INTO migrations (version, name, applied_at) VALUES (?, ?, ?)",
                             (version, name, _now()))
            # A real write at every open: SQLite opens a file it may not write read-only without a word,
            # and the first batch would be the one to find out.
            conn.execute(f"PRAGMA user_version = {max(known)}")

        self._write(apply)

    # -- revoked API tokens ---------------------------------------------------------------------------

    def revoke_token(self, jti: str, subject: str, expires_at: str, revoked_by: str) -> None:
        """Record token ``jti`` as revoked; rows of tokens that have expired anyway are dropped meanwhile."""

        def record(conn: sqlite3.Connection) -> None:
            now = _now()
            conn.execute(
                "INSERT OR REPLACE INTO revoked_tokens (jti, subject, expires_at, revoked_at, revoked_by) "
                "VALUES (?, ?, ?, ?, ?)", (jti, subject, expires_at, now, revoked_by),
            )
            conn.execute("DELETE FROM revoked_tokens WHERE expires_at < ?", (now,))

        self._write(record)

    def set_token_cutoff(self, subject: str, not_before: str, revoked_by: str) -> None:
        """Record that ``subject``'s tokens issued before ``not_before`` are revoked."""
        self._write(lambda conn: conn.execute(
            "INSERT OR REPLACE INTO token_cutoffs (subject, not_before, revoked_at, revoked_by) VALUES (?, ?, ?, ?)",
            (subject, not_before, _now(), revoked_by),
        ))

    def token_revocation(self, jti: str, subject: str) -> tuple[bool, str | None]:
        """(whether token ``jti`` is revoked, ``subject``'s cutoff or None): one lookup per request."""
        revoked = bool(jti) and bool(self._read("SELECT 1 AS x FROM revoked_tokens WHERE jti = ?", [jti]))
        cutoff = self._read("SELECT not_before FROM token_cutoffs WHERE subject = ?", [subject])
        return revoked, cutoff[0]["not_before"] if cutoff else None

    def token_revocations(self) -> dict[str, list[dict[str, Any]]]:
        """Every revoked token and user cutoff."""
        return {
            "tokens": self._read("SELECT * FROM revoked_tokens ORDER BY revoked_at"),
            "users": self._read("SELECT * FROM token_cutoffs ORDER BY subject"),
        }

    # -- idempotency keys ------------------------------------------------------------------------------

    def claim_idempotency_key(
        self, user: str, key: str, request_hash: str, batch_id: str, claimant: str, ttl_s: float,
        claim_is_gone: Callable[[str | None, str | None], bool],
    ) -> dict[str, Any]:
        """Take ``user``'s ``key`` for a request, in one write transaction. Returns ``{"outcome", ...}``:

        - ``claimed`` (with ``batch_id``): the caller answers the request. A new key records
          ``request_hash`` and ``batch_id``; a key whose earlier request was left unanswered (its claimant is
          gone: ``claim_is_gone(claimant, claimed_at)``) keeps the batch id reserved then.
        - ``answered`` (with ``status``, ``answer``, ``batch_id``): the key's request was answered before.
        - ``reused``: the key came with another request (``request_hash`` differs).
        - ``in_use``: a live claimant answers the key's request now.

        Keys past their ``expires_at`` (``ttl_s`` after they were first used) are dropped meanwhile.
        """

        def claim(conn: sqlite3.Connection) -> dict[str, Any]:
            now = datetime.now(timezone.utc)
            stamp = now.isoformat(timespec="milliseconds")
            conn.execute("DELETE FROM idempotency_keys WHERE expires_at <= ?", (stamp,))
            found = conn.execute(
                "SELECT request_hash, batch_id, status, answer, claimant, claimed_at FROM idempotency_keys "
                "WHERE user = ? AND key = ?", (user, key),
            ).fetchone()
            if found is None:
                expires = (now + timedelta(seconds=ttl_s)).isoformat(timespec="milliseconds")
                conn.execute(
                    "INSERT INTO idempotency_keys (user, key, request_hash, batch_id, claimant, claimed_at, "
                    "created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (user, key, request_hash, batch_id, claimant, stamp, stamp, expires),
                )
                return {"outcome": "claimed", "batch_id": batch_id}
            known_hash, known_batch, status, answer, holder, held_since = found
            if known_hash != request_hash:
                return {"outcome": "reused"}
            if answer is not None:
                return {"outcome": "answered", "batch_id": known_batch, "status": status, "answer": json.loads(answer)}
            if not claim_is_gone(holder, held_since):
                return {"outcome": "in_use"}
            conn.execute("UPDATE idempotency_keys SET claimant = ?, claimed_at = ? WHERE user = ? AND key = ?",
                         (claimant, stamp, user, key))
            return {"outcome": "claimed", "batch_id": known_batch}

        return self._write(claim)

    def answer_idempotency_key(self, user: str, key: str, claimant: str, status: int, answer: Any) -> None:
        """Keep the answer to the request of ``user``'s ``key`` (claimed by ``claimant``) for its retries."""
        text = json.dumps(answer, ensure_ascii=False, default=str)
        self._write(lambda conn: conn.execute(
            "UPDATE idempotency_keys SET status = ?, answer = ?, claimant = NULL, claimed_at = NULL "
            "WHERE user = ? AND key = ? AND claimant = ? AND answer IS NULL", (status, text, user, key, claimant)))

    def release_idempotency_key(self, user: str, key: str, claimant: str) -> None:
        """The request of ``user``'s ``key`` was refused or failed: nothing is kept to answer its retries.
        A key whose request made no batch is forgotten (it may come again, with another request too); one
        whose batch exists keeps its request and batch id, so that a retry resumes that batch."""

        def release(conn: sqlite3.Connection) -> None:
            conn.execute(
                "DELETE FROM idempotency_keys WHERE user = ? AND key = ? AND claimant = ? AND answer IS NULL "
                "AND NOT EXISTS (SELECT 1 FROM batches WHERE batches.id = idempotency_keys.batch_id)",
                (user, key, claimant))
            conn.execute(
                "UPDATE idempotency_keys SET claimant = NULL, claimed_at = NULL "
                "WHERE user = ? AND key = ? AND claimant = ? AND answer IS NULL", (user, key, claimant))

        self._write(release)

    def schema_version(self) -> int:
        rows = self._read("SELECT max(version) AS v FROM migrations")
        return int(rows[0]["v"] or 0)

    # -- batches ------------------------------------------------------------------------------------

    def create_batch(
        self,
        template_name: str,
        template_hash: str,
        sheet_hash: str,
        batch_seed: int,
        sheet_name: str | None = None,
        options: Mapping[str, Any] | None = None,
        user: str | None = None,
        batch_id: str | None = None,
    ) -> str:
        """Record a new batch and return its id (a new uuid4 hex unless ``batch_id`` is given)."""
        batch_id = check_batch_id(batch_id or uuid.uuid4().hex)  # it names a folder under the outputs

        def insert(conn: sqlite3.Connection) -> None:
            exists = conn.execute("SELECT 1 FROM batches WHERE id = ?", (batch_id,)).fetchone()
            if exists:
                raise BatchExists(f"batch '{batch_id}' already exists; resume it instead", code="batch_exists",
                                  batch_id=batch_id)
            conn.execute(
                "INSERT INTO batches (id, template_name, template_hash, sheet_name, sheet_hash, batch_seed, "
                "options, user, status, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'created', ?)",
                (batch_id, template_name, template_hash, sheet_name, sheet_hash, str(int(batch_seed)),
                 json.dumps(dict(options or {}), ensure_ascii=False), user, _now()),
            )

        self._write(insert)
        return batch_id

    def get_batch(self, batch_id: str) -> dict[str, Any] | None:
        rows = self._read("SELECT * FROM batches WHERE id = ?", (batch_id,))
        return _batch_dict(rows[0]) if rows else None

    def _require_batch(self, batch_id: str) -> dict[str, Any]:
        batch = self.get_batch(batch_id)
        if batch is None:
            raise BatchError(f"no batch '{batch_id}' in the ledger", batch_id=batch_id, code="batch_not_found")
        return batch

    def set_batch_status(self, batch_id: str, status: str) -> None:
        """Move a batch to ``status`` (created, running, finished, cancelled, failed), stamping times."""
        if status not in BATCH_STATUSES:
            raise StoreError(f"unknown batch status '{status}'; supported: {', '.join(BATCH_STATUSES)}")
        self._require_batch(batch_id)
        now = _now()

        def update(conn: sqlite3.Connection) -> None:
            if status == "running":
                conn.execute("UPDATE batches SET status = ?, started_at = coalesce(started_at, ?), "
                             "finished_at = NULL WHERE id = ?", (status, now, batch_id))
            elif status == "created":
                conn.execute("UPDATE batches SET status = ? WHERE id = ?", (status, batch_id))
            else:
                conn.execute("UPDATE batches SET status = ?, finished_at = ? WHERE id = ?", (status, now, batch_id))

        self._write(update)

    def ensure_same_inputs(
        self, batch_id: str, template_hash: str, sheet_hash: str, template_name: str | None = None
    ) -> None:
        """Refuse to resume ``batch_id`` with a different template or spreadsheet (BatchMismatch)."""
        batch = self._require_batch(batch_id)
        changed: dict[str, str] = {}  # what changed ("template", "sheet"): how, in words
        if template_name is not None and template_name != batch["template_name"]:
            changed["template"] = f"it was made with the template '{batch['template_name']}', not '{template_name}'"
        elif batch["template_hash"] != template_hash:
            changed["template"] = (f"the template '{batch['template_name']}' changed (was "
                                   f"{batch['template_hash'][:12]}, now {template_hash[:12]})")
        if batch["sheet_hash"] != sheet_hash:
            changed["sheet"] = f"the spreadsheet changed (was {batch['sheet_hash'][:12]}, now {sheet_hash[:12]})"
        if changed:
            raise BatchMismatch(
                f"batch '{batch_id}' cannot resume: {'; '.join(changed.values())}. Its finished rows were made "
                "from the original inputs; start a new batch for the changed ones", code="batch_inputs_changed",
                batch_id=batch_id, changed="+".join(changed), expected_template_hash=batch["template_hash"],
                expected_sheet_hash=batch["sheet_hash"], template_hash=template_hash, sheet_hash=sheet_hash,
            )

    def list_batches(self, limit: int = 50, offset: int = 0, user: str | None = None) -> list[dict[str, Any]]:
        """Batches, newest first."""
        where, params = ("WHERE user = ?", [user]) if user is not None else ("", [])
        rows = self._read(f"SELECT * FROM batches {where} ORDER BY created_at DESC, id LIMIT ? OFFSET ?",
                          [*params, int(limit), _sql_offset(offset)])
        return [_batch_dict(r) for r in rows]

    def batches_of_inputs(self, template_hash: str, sheet_hash: str) -> list[dict[str, Any]]:
        """Every batch made from this template and sheet (or workflow and prompts), newest first, however
        many other batches came after it."""
        rows = self._read("SELECT * FROM batches WHERE sheet_hash = ? AND template_hash = ? "
                          "ORDER BY created_at DESC, id", (sheet_hash, template_hash))
        return [_batch_dict(r) for r in rows]

    def batches_with_rows_to_run(self) -> list[dict[str, Any]]:
        """Batches that still have rows ``queued``, ``running`` or ``cancelled``, newest first, however old
        they are (a few among thousands: each batch is one lookup in the index of its rows' statuses)."""
        rows = self._read(
            "SELECT * FROM batches WHERE EXISTS (SELECT 1 FROM generations WHERE generations.batch_id = batches.id "
            "AND generations.status IN ('queued', 'running', 'cancelled')) ORDER BY created_at DESC, id", ())
        return [_batch_dict(r) for r in rows]

    def abandoned_batch_ids(self) -> list[str]:
        """Ids of batches still ``created`` or ``running`` that have rows ``queued`` or ``running``, oldest
        first: what a process that died left to do."""
        rows = self._read(
            "SELECT id FROM batches WHERE status IN ('created', 'running') AND EXISTS (SELECT 1 FROM generations "
            "WHERE generations.batch_id = batches.id AND generations.status IN ('queued', 'running')) "
            "ORDER BY created_at, id", (),
        )
        return [row["id"] for row in rows]

    def ended_batches(
        self, template_name: str, limit: int | None = None, include_hidden: bool = False
    ) -> list[dict[str, Any]]:
        """Batches of ``template_name`` that have ended: no row waits or runs, and at least one row ran, or
        the batch began and was cancelled after a full disk stopped it (a batch taken off the queue before
        it started never ran). Most recently ended first, at most
        ``limit``; batches hidden from history are left out unless ``include_hidden``."""
        hidden = "" if include_hidden else "AND b.id NOT IN (SELECT batch_id FROM hidden_history)"
        sql = f"""
            SELECT b.*, max(g.finished_at) AS ended_at FROM batches b JOIN generations g ON g.batch_id = b.id
            WHERE b.template_name = ? {hidden}
            GROUP BY b.id
            HAVING sum(g.status IN ('queued', 'running')) = 0
               AND sum(g.status IN ('done', 'failed', 'timed_out')
                       OR (g.status = 'cancelled' AND coalesce(g.started_at, b.started_at) IS NOT NULL)) > 0
            ORDER BY ended_at DESC, b.id DESC
        """
        params: list[Any] = [template_name]
        if limit is not None:
            sql += " LIMIT ?"
            params.append(int(limit))
        return [_batch_dict({k: v for k, v in r.items() if k != "ended_at"}) for r in self._read(sql, params)]

    def hide_from_history(self, batch_ids: Iterable[str], hidden_by: str | None = None) -> int:
        """Hide batches from history listings (their ledger rows stay); returns how many were newly hidden."""
        ids = list(dict.fromkeys(batch_ids))

        def insert(conn: sqlite3.Connection) -> int:
            before = conn.total_changes
            conn.executemany(
                "INSERT OR IGNORE INTO hidden_history (batch_id, hidden_at, hidden_by) "
                "SELECT id, ?, ? FROM batches WHERE id = ?", [(_now(), hidden_by, b) for b in ids],
            )
            return conn.total_changes - before

        return self._write(insert) if ids else 0

    def hidden_from_history(self, batch_id: str) -> bool:
        return bool(self._read("SELECT 1 FROM hidden_history WHERE batch_id = ?", (batch_id,)))

    def batch_summary(self, batch_id: str) -> dict[str, Any]:
        """The batch with counts per row status (every status present, zero when none) and ``total``."""
        batch = self._require_batch(batch_id)
        counts = self.row_counts(batch_id)
        return {**batch, "counts": counts, "total": sum(counts.values())}

    def row_counts(self, batch_id: str) -> dict[str, int]:
        """How many rows of the batch have each status (every status present, zero when none), counted in
        the index: a progress poll of a batch of thousands of rows reads none of them."""
        counts = {status: 0 for status in ROW_STATUSES}
        for row in self._read("SELECT status, count(*) AS n FROM generations WHERE batch_id = ? GROUP BY status",
                              (batch_id,)):
            counts[row["status"]] = row["n"]
        return counts

    # -- rows ---------------------------------------------------------------------------------------

    def add_rows(self, batch_id: str, rows: Iterable[Mapping[str, Any]]) -> int:
        """Add rows to a batch; rows already present (same ``row_number``) are left untouched.

        Each row: ``row_number`` (required), ``values`` (the original cells), ``seed`` (recorded now so a
        retry reproduces it), optional ``status`` (``queued``, or ``skipped`` with ``error`` for an invalid
        row, and ``problems``, its RowProblems as dicts, kept in ``extra``), ``workflow``, ``prompt``,
        ``image_bytes`` (what its image will take, see :meth:`pending_image_bytes`).
        Returns how many rows were new.
        """
        batch = self._require_batch(batch_id)
        now = _now()
        records = []
        for row in rows:
            status = row.get("status", "queued")
            if status not in ("queued", "skipped"):
                raise StoreError(f"a new row is queued or skipped, not '{status}'")
            seed = row.get("seed")
            problems = row.get("problems") if status == "skipped" else None
            extra = json.dumps({"problems": list(problems)}, ensure_ascii=False, default=str) if problems else None
            records.append((
                row_key(batch_id, row["row_number"]), batch_id, int(row["row_number"]),
                json.dumps(dict(row.get("values") or {}), ensure_ascii=False),
                None if seed is None else str(int(seed)),
                batch["template_name"], batch["template_hash"],
                None if row.get("workflow") is None else json.dumps(row["workflow"], ensure_ascii=False),
                row.get("prompt"), status, row.get("error"), now, batch["user"],
                now if status == "skipped" else None, extra, row.get("image_bytes"),
            ))

        def insert(conn: sqlite3.Connection) -> int:
            # The rows inserted, not ignored: the cursor's count leaves out what triggers wrote (the text
            # index), which the connection's total_changes would add
            added = conn.executemany(
                "INSERT OR IGNORE INTO generations (row_key, batch_id, row_number, row_values, seed, template_name, "
                "template_hash, workflow, prompt, status, error, queued_at, user, finished_at, extra, image_bytes) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                records,
            ).rowcount
            _refresh_counts(conn, batch_id)
            return added

        return self._write(insert)

    def _claim(self, where: str, params: list[Any], worker: str | None) -> Generation | None:
        now = _now()

        def claim(conn: sqlite3.Connection) -> str | None:
            found = conn.execute(
                f"SELECT row_key FROM generations WHERE {where} AND status = 'queued' ORDER BY row_number LIMIT 1",
                params,
            ).fetchone()
            if found is None:
                return None
            cursor = conn.execute(
                "UPDATE generations SET status = 'running', worker = ?, started_at = ?, began_at = NULL, "
                "finished_at = NULL WHERE row_key = ? AND status = 'queued'",
                (worker, now, found[0]),
            )
            return found[0] if cursor.rowcount == 1 else None

        key = self._write(claim)
        return None if key is None else self.get_generation(key)

    def claim_next(self, batch_id: str, worker: str | None = None) -> Generation | None:
        """Atomically take the lowest-numbered queued row of the batch (now ``running``); None when none."""
        return self._claim("batch_id = ?", [batch_id], worker)

    def claim_row(self, key: str, worker: str | None = None) -> Generation | None:
        """Atomically take one queued row by key; None when it is not queued (someone else has it)."""
        return self._claim("row_key = ?", [key], worker)

    def claim_queued_rows(self, batch_id: str, worker: str | None = None) -> list[Generation]:
        """Atomically take every queued row of the batch (now ``running``), in row order; rows another
        process holds are not queued and stay its own.

        One transaction for all of them: claimed one by one, each commit waits for the disk (the ledger
        syncs every commit), and a batch of 10,000 rows spent most of a minute claiming before its first
        row could start."""
        now = _now()

        def claim(conn: sqlite3.Connection) -> list[str]:
            keys = [key for (key,) in conn.execute(
                "SELECT row_key FROM generations WHERE batch_id = ? AND status = 'queued'", (batch_id,))]
            conn.execute(
                "UPDATE generations SET status = 'running', worker = ?, started_at = ?, began_at = NULL, "
                "finished_at = NULL WHERE batch_id = ? AND status = 'queued'",
                (worker, now, batch_id),
            )
            return keys

        claimed = set(self._write(claim))
        return [row for row in self.rows(batch_id, "running") if row.row_key in claimed] if claimed else []

    def mark_began(self, key: str) -> None:
        """The claimed row's first node runs now: one more attempt, and a crash from here on counts."""
        self._write(lambda conn: conn.execute(
            "UPDATE generations SET began_at = ?, attempts = attempts + 1 "
            "WHERE row_key = ? AND status = 'running' AND began_at IS NULL", (_now(), key)))

    def mark_running(
        self, key: str, workflow: Mapping[str, Any] | None = None, prompt_id: str | None = None,
        worker: str | None = None,
    ) -> None:
        """Record the rendered workflow / prompt id of a claimed (running) row."""

        def update(conn: sqlite3.Connection) -> None:
            cursor = conn.execute(
                # A new workflow may make another image: its recorded size is no longer known
                "UPDATE generations SET workflow = coalesce(?1, workflow), prompt_id = coalesce(?2, prompt_id), "
                "worker = coalesce(?3, worker), image_bytes = CASE WHEN ?1 IS NULL THEN image_bytes END "
                "WHERE row_key = ?4 AND status = 'running'",
                (None if workflow is None else json.dumps(workflow, ensure_ascii=False), prompt_id, worker, key),
            )
            if cursor.rowcount != 1:
                raise StoreError(f"row {key} is not running (claim it first)", row_key=key)

        self._write(update)

    def complete_row(
        self,
        key: str,
        record: Mapping[str, Any],
        image_path: str | Path,
        image_sha256: str,
        images: list[Mapping[str, Any]] | None = None,
        duration_s: float | None = None,
        sampler_s: float | None = None,
        workflow: Mapping[str, Any] | None = None,
        worker: str | None = None,
    ) -> None:
        """Commit a finished row: status ``done`` with its record and image. Call after the file is renamed
        into place. A row already ``done`` is refused (no row ever gets two images). ``worker`` names the
        machine that ran the row when it is not the claimant (a Celery worker); None keeps the claimant."""
        columns: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for name, value in record.items():
            if name in _RECORD_COLUMNS:
                columns[_RECORD_COLUMNS[name]] = value
            elif name == "seed":
                columns["seed"] = None if value is None else str(int(value))
            elif name == "loras":
                columns["loras"] = json.dumps(value, ensure_ascii=False, default=str)
            else:
                extra[name] = value
        columns.update(
            status="done", error=None, finished_at=_now(), image_path=str(image_path), image_sha256=image_sha256,
            images=json.dumps(list(images or [{"path": str(image_path), "sha256": image_sha256}]),
                              ensure_ascii=False, default=str),
            duration_s=duration_s, sampler_s=sampler_s,
            extra=json.dumps(extra, ensure_ascii=False, default=str) if extra else None,
        )
        if workflow is not None:
            columns["workflow"] = json.dumps(workflow, ensure_ascii=False)
        if worker is not None:
            columns["worker"] = worker
        assignments = ", ".join(f"{name} = ?" for name in columns)

        def update(conn: sqlite3.Connection) -> None:
            current = conn.execute("SELECT status, batch_id FROM generations WHERE row_key = ?", (key,)).fetchone()
            if current is None:
                raise StoreError(f"no row {key} in the ledger", row_key=key)
            if current[0] == "done":
                raise StoreError(f"row {key} is already done; it is never generated twice", row_key=key)
            conn.execute(f"UPDATE generations SET {assignments} WHERE row_key = ?", [*columns.values(), key])
            _refresh_counts(conn, current[1])

        self._write(update)

    def fail_row(
        self, key: str, status: str, error: str, duration_s: float | None = None, worker: str | None = None,
        failure: Mapping[str, Any] | None = None,
    ) -> None:
        """End a row without an image: ``failed``, ``timed_out``, ``skipped`` or ``cancelled``, with why.
        ``worker`` as for :meth:`complete_row`; ``failure`` (where and how it failed: node, exception type,
        ...) is kept in the row's ``extra`` as ``{"failure": ...}``."""
        extra = json.dumps({"failure": dict(failure)}, ensure_ascii=False, default=str) if failure else None
        if status not in FAILURE_STATUSES:
            raise StoreError(f"fail_row takes one of {', '.join(FAILURE_STATUSES)}, not '{status}'")

        def update(conn: sqlite3.Connection) -> None:
            current = conn.execute("SELECT status, batch_id FROM generations WHERE row_key = ?", (key,)).fetchone()
            if current is None:
                raise StoreError(f"no row {key} in the ledger", row_key=key)
            if current[0] == "done":
                raise StoreError(f"row {key} is done; it cannot become {status}", row_key=key)
            conn.execute(
                "UPDATE generations SET status = ?, error = ?, finished_at = ?, duration_s = coalesce(?, duration_s), "
                "worker = coalesce(?, worker), extra = ? WHERE row_key = ?",
                (status, error, _now(), duration_s, worker, extra, key),
            )
            _refresh_counts(conn, current[1])

        self._write(update)

    def cancel_rows(self, errors: Mapping[str, str]) -> set[str]:
        """Cancel many claimed rows in one write (row key -> why); returns the keys cancelled. A row that is
        done by now stays done. As :meth:`fail_row` for each, with the batch recounted once."""
        now = _now()

        def update(conn: sqlite3.Connection) -> set[str]:
            batches, cancelled = set(), set()
            for chunk, marks in _in_lists(list(errors)):
                for key, batch_id in conn.execute(
                        f"SELECT row_key, batch_id FROM generations WHERE row_key IN ({marks}) AND status != 'done'",
                        chunk):
                    cancelled.add(key)
                    batches.add(batch_id)
            conn.executemany("UPDATE generations SET status = 'cancelled', error = ?, finished_at = ? WHERE row_key = ?",
                             [(errors[key], now, key) for key in cancelled])
            for batch_id in batches:
                _refresh_counts(conn, batch_id)
            return cancelled

        return self._write(update)

    def requeue(self, batch_id: str, statuses: Iterable[str] = ("failed", "timed_out", "cancelled")) -> int:
        """Put rows of the given statuses back to ``queued`` (attempts kept). Never touches ``done`` rows."""
        statuses = [s for s in statuses]
        bad = [s for s in statuses if s not in FAILURE_STATUSES + ("running",)]
        if bad:
            raise StoreError(f"cannot requeue rows that are {', '.join(bad)}")
        if not statuses:
            return 0
        marks = ", ".join("?" for _ in statuses)

        def update(conn: sqlite3.Connection) -> int:
            cursor = conn.execute(
                f"UPDATE generations SET status = 'queued', error = NULL, worker = NULL, finished_at = NULL "
                f"WHERE batch_id = ? AND status IN ({marks})", [batch_id, *statuses],
            )
            _refresh_counts(conn, batch_id)
            return cursor.rowcount

        return self._write(update)

    def cancel_batch(self, batch_id: str, reason: str = "cancelled by the user") -> int:
        """Cancel the queued rows of a batch (finished rows stay) and mark the batch cancelled."""
        self._require_batch(batch_id)
        now = _now()

        def update(conn: sqlite3.Connection) -> int:
            cursor = conn.execute(
                "UPDATE generations SET status = 'cancelled', error = ?, finished_at = ? "
                "WHERE batch_id = ? AND status = 'queued'", (reason, now, batch_id),
            )
            conn.execute("UPDATE batches SET status = 'cancelled', finished_at = ? WHERE id = ?", (now, batch_id))
            _refresh_counts(conn, batch_id)
            return cursor.rowcount

        return self._write(update)

    def reset_stale_running(
        self, batch_id: str | None = None, worker: str | None = None, max_attempts: int | None = None,
        crashed: bool = True,
    ) -> int:
        """Rows left ``running`` go back to ``queued`` (attempts kept).

        Call it only when no live process works on those rows (at start-up, or with the dead ``worker``).
        ``crashed``: their process died, so each row that had begun counts a crash; False when a live process
        gives its claims back (a full disk, shutting down). With ``max_attempts``, a row whose process died
        that many times while running it is failed instead: a row that kills every worker does not loop
        forever, while rows that only waited their turn are never blamed. Returns how many were requeued.
        """
        where = ["status = 'running'"]
        params: list[Any] = []
        if batch_id is not None:
            where.append("batch_id = ?")
            params.append(batch_id)
        if worker is not None:
            where.append("worker = ?")
            params.append(worker)
        condition = " AND ".join(where)
        now = _now()

        def update(conn: sqlite3.Connection) -> int:
            batches = [r[0] for r in conn.execute(f"SELECT DISTINCT batch_id FROM generations WHERE {condition}",
                                                  params)]
            if crashed:
                conn.execute(f"UPDATE generations SET crashes = crashes + 1 WHERE {condition} AND began_at IS NOT NULL",
                             params)
            if max_attempts is not None:
                conn.execute(
                    f"UPDATE generations SET status = 'failed', finished_at = ?, error = 'abandoned: its process "
                    f"died while running it ' || crashes || ' time(s)' WHERE {condition} AND crashes >= ?",
                    [now, *params, int(max_attempts)],
                )
            cursor = conn.execute(
                f"UPDATE generations SET status = 'queued', worker = NULL, started_at = NULL, began_at = NULL "
                f"WHERE {condition}", params,
            )
            for bid in batches:
                _refresh_counts(conn, bid)
            return cursor.rowcount

        return self._write(update)

    # -- reading rows -------------------------------------------------------------------------------

    def get_generation(self, key: str) -> Generation | None:
        rows = self._read("SELECT * FROM generations WHERE row_key = ?", (key,))
        return Generation.from_row(rows[0]) if rows else None

    def first_rows(self, batch_ids: Iterable[str]) -> dict[str, Generation]:
        """The first row of each of ``batch_ids`` that has rows, by batch id, read together (a ComfyUI prompt
        is a batch of one row: its history is read this way, thousands at once)."""
        found: dict[str, Generation] = {}
        for chunk, marks in _in_lists(list(dict.fromkeys(batch_ids))):
            sql = f"SELECT * FROM generations WHERE batch_id IN ({marks}) ORDER BY batch_id, row_number"
            for row in self._read(sql, chunk):
                if row["batch_id"] not in found:
                    found[row["batch_id"]] = Generation.from_row(row)
        return found

    def rows(
        self, batch_id: str, status: str | Iterable[str] | None = None, *, limit: int | None = None,
        offset: int = 0,
    ) -> list[Generation]:
        """The batch's rows in row order, optionally only those with ``status`` (one or several).

        ``limit`` / ``offset``: one page of them (:meth:`latest_images` reads the newest images)."""
        sql = "SELECT * FROM generations WHERE batch_id = ?"
        params: list[Any] = [batch_id]
        if status is not None:
            wanted = [status] if isinstance(status, str) else list(status)
            unknown = [s for s in wanted if s not in ROW_STATUSES]
            if unknown:
                raise StoreError(f"unknown status {', '.join(unknown)}; supported: {', '.join(ROW_STATUSES)}")
            sql += f" AND status IN ({', '.join('?' for _ in wanted)})"
            params += wanted
        sql += " ORDER BY row_number"
        if limit is not None:
            sql += " LIMIT ? OFFSET ?"
            params += [max(0, int(limit)), max(0, int(offset))]
        elif offset:
            sql += " LIMIT -1 OFFSET ?"
            params.append(max(0, int(offset)))
        return [Generation.from_row(r) for r in self._read(sql, params)]

    def latest_images(self, batch_id: str, limit: int) -> tuple[int, list[Generation]]:
        """(how many rows of the batch are done with an image, the last ``limit`` of them in row order):
        what a progress page shows, read without loading the batch's other rows."""
        done = "batch_id = ? AND status = 'done' AND coalesce(image_path, '') != ''"
        count = self._read(f"SELECT count(*) AS n FROM generations WHERE {done}", (batch_id,))[0]["n"]
        rows = self._read(f"SELECT * FROM generations WHERE {done} ORDER BY row_number DESC LIMIT ?",
                          (batch_id, max(int(limit), 0)))
        return count, [Generation.from_row(r) for r in reversed(rows)]

    def pending_image_bytes(self, batch_id: str) -> int | None:
        """The largest image size recorded (``image_bytes`` of :meth:`add_rows`) among the batch's rows not
        ``done``, 0 when none names one; None when one of them has none recorded (an older release wrote it),
        so that only the rows themselves can say. Read without loading the rows."""
        found = self._read("SELECT max(image_bytes) AS largest, count(*) - count(image_bytes) AS unknown "
                           "FROM generations WHERE batch_id = ? AND status != 'done'", (batch_id,))[0]
        return None if found["unknown"] else int(found["largest"] or 0)

    def pending_rows(self, batch_id: str) -> list[Generation]:
        """Rows not ``done`` (what a resume still has to deal with), in row order."""
        return self.rows(batch_id, [s for s in ROW_STATUSES if s != "done"])

    def search(
        self,
        text: str | None = None,
        batch_id: str | None = None,
        status: str | None = None,
        date_from: str | None = None,
        date_to: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> list[Generation]:
        """Generations whose prompt, negative prompt or row values contain ``text`` (case-insensitive for
        the letters A-Z, as SQL's LIKE), filtered by batch, status and date (ISO dates or times, compared
        with the finished time, else the queued time; ``date_to`` is inclusive of that whole day). Newest first."""
        if text and not _is_utf8(text):
            return []  # a lone surrogate (half of an emoji a script cut in two): no stored text can hold it
        where: list[str] = []
        params: list[Any] = []
        pieces = _text_index_query(text or "")
        by_text_index = bool(pieces) and not batch_id and not self._in_many_rows(pieces)
        if by_text_index:
            # The rows holding every piece of the text, from the trigram index: a superset of those LIKE
            # finds (the index folds the case of every letter and ignores where the pieces are); the LIKE
            # below keeps the result what it always was.
            where.append(f"id IN (SELECT rowid FROM {_TEXT_INDEX} WHERE {_TEXT_INDEX} MATCH ?)")
            params.append(pieces)
        if text:
            pattern = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            where.append("(prompt LIKE ? ESCAPE '\\' OR negative_prompt LIKE ? ESCAPE '\\' "
                         "OR row_values LIKE ? ESCAPE '\\')")
            params += [pattern, pattern, pattern]
        if batch_id:
            where.append("batch_id = ?")
            params.append(batch_id)
        if status:
            if status not in ROW_STATUSES:
                raise BadQuery(f"unknown status {status!r}; supported: {', '.join(ROW_STATUSES)}",
                               field="status", status=status)
            where.append("status = ?")
            params.append(status)
        when = _WHEN
        if date_from:
            where.append(f"{when} >= ?")
            params.append(_time_bound(date_from, "date_from"))
        if date_to:
            bound = _time_bound(date_to, "date_to")
            where.append(f"{when} < ?")
            params.append(bound + ("\uffff" if len(bound) == 10 else ""))  # a day: all of it
        clause = ("WHERE " + " AND ".join(where)) if where else ""
        # One batch's rows are few: read them by batch, whatever else is asked. SQLite would otherwise walk
        # the time index of every generation to skip sorting them (seconds for a status or a day).
        if batch_id:
            source = "generations INDEXED BY idx_generations_batch_status"
        elif by_text_index:
            # Newest first along the time index, each row kept when its id is among the text index's: no
            # sort, and no row read that lacks a piece of the text. Left to itself, SQLite fetches every matching
            # row and sorts them all.
            source = f"generations INDEXED BY {'idx_generations_status_when' if status else 'idx_generations_when'}"
        else:
            source = "generations"
        rows = self._read(
            f"SELECT * FROM {source} {clause} ORDER BY {when} DESC, row_key LIMIT ? OFFSET ?",
            [*params, int(limit), _sql_offset(offset)],
        )
        return [Generation.from_row(r) for r in rows]

    def _in_many_rows(self, pieces: str) -> bool:
        """Whether the text index finds ``pieces`` in more than :data:`_TEXT_INDEX_MANY_ROWS` generations,
        counting no further. A text that common is found within the first few pages of newest rows by
        reading them; handing each of its rows from the index would cost more than that."""
        sql = (f"SELECT count(*) AS n FROM (SELECT rowid FROM {_TEXT_INDEX} WHERE {_TEXT_INDEX} MATCH ? "
               "LIMIT ?)")
        return self._read(sql, (pieces, _TEXT_INDEX_MANY_ROWS + 1))[0]["n"] > _TEXT_INDEX_MANY_ROWS


def _is_lock_contention(exc: sqlite3.OperationalError) -> bool:
    """Whether SQLite refused because another connection holds the ledger (worth retrying)."""
    message = str(exc).lower()
    return "locked" in message or "busy" in message


def _is_utf8(text: str) -> bool:
    """Whether ``text`` can be written as UTF-8, as SQLite takes every text (a lone surrogate cannot)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _text_index_query(text: str) -> str:
    """The text index's query for the rows holding ``text``: each of its three-character pieces, quoted (the
    text is never query syntax), all required; at most :data:`_TEXT_INDEX_MAX_PIECES` of them, spread over the
    text, which finds the same rows or a few more (search's LIKE drops those). Empty for a text shorter than three
    characters, which the index cannot look up. Only the text before a NUL character counts: SQLite reads LIKE's
    pattern up to it, so the rows found need not hold what follows, and FTS5 takes a NUL for the end of the query.
    Of a pasted page of text only the start is looked up: a row holding the whole text holds its start, and
    cutting every piece out of megabytes would take seconds."""
    text = text.split("\x00", 1)[0][:_TEXT_INDEX_LOOKUP_CHARS]
    pieces = list(dict.fromkeys(text[i:i + 3] for i in range(len(text) - _TEXT_INDEX_MIN_CHARS + 1)))
    pieces = pieces[::-(-len(pieces) // _TEXT_INDEX_MAX_PIECES) or 1]  # every n-th, n rounded up
    return " AND ".join('"' + piece.replace('"', '""') + '"' for piece in pieces)


def _batch_dict(row: Mapping[str, Any]) -> dict[str, Any]:
    data = dict(row)
    data["options"] = json.loads(data.get("options") or "{}")
    data["batch_seed"] = int(data["batch_seed"])
    return data


def _in_lists(values: list[str], size: int = 500) -> Iterator[tuple[list[str], str]]:
    """``values`` in pieces of at most ``size``, each with its ``?, ?, ...`` for one ``IN (...)``: SQLite
    bounds the variables of a statement."""
    for start in range(0, len(values), size):
        chunk = values[start:start + size]
        yield chunk, ", ".join("?" for _ in chunk)


def _refresh_counts(conn: sqlite3.Connection, batch_id: str) -> None:
    """Keep the per-status counts on ``batches`` current (for Datasette and listings)."""
    conn.execute(
        """UPDATE batches SET
            row_count = (SELECT count(*) FROM generations WHERE batch_id = :b),
            done_count = (SELECT count(*) FROM generations WHERE batch_id = :b AND status = 'done'),
            failed_count = (SELECT count(*) FROM generations WHERE batch_id = :b AND status = 'failed'),
            timed_out_count = (SELECT count(*) FROM generations WHERE batch_id = :b AND status = 'timed_out'),
            skipped_count = (SELECT count(*) FROM generations WHERE batch_id = :b AND status = 'skipped'),
            cancelled_count = (SELECT count(*) FROM generations WHERE batch_id = :b AND status = 'cancelled')
        WHERE id = :b""",
        {"b": batch_id},
    )
