"""Revoked API tokens: one token by its ``jti``, or every token of a user issued before a moment.

Bearer tokens are stateless, so a leaked one would stay valid until it expires. The revocation list
lives in the ledger's SQLite file (tables ``revoked_tokens`` and ``token_cutoffs``), so
``python app.py token revoke`` on the same host takes effect at once in a running server, and every
request checks it: one indexed lookup. Rows of tokens that have expired anyway are pruned on the way.
"""

from __future__ import annotations

import math
import sqlite3
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import sqlite_utils

from engine.errors import AccessDenied
from webapp.auth import Claims

REVOKED = "revoked_tokens"
CUTOFFS = "token_cutoffs"


class TokenRevocations:
    """The revocation list in the SQLite file at ``path`` (created on first use)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._local = threading.local()  # one connection per thread: sqlite3 connections are not shared

    def _db(self) -> sqlite_utils.Database:
        db = getattr(self._local, "db", None)
        if db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(self.path, timeout=10.0)
            connection.execute("PRAGMA journal_mode=WAL")
            db = sqlite_utils.Database(connection)
            if REVOKED not in db.table_names():
                db[REVOKED].create(
                    {"jti": str, "subject": str, "expires_at": str, "revoked_at": str, "revoked_by": str},
                    pk="jti", if_not_exists=True,
                )
            if CUTOFFS not in db.table_names():
                db[CUTOFFS].create(
                    {"subject": str, "not_before": str, "revoked_at": str, "revoked_by": str},
                    pk="subject", if_not_exists=True,
                )
            self._local.db = db
        return db

    def revoke(self, claims: Claims, revoked_by: str) -> None:
        """Refuse this one token from now on."""
        if not claims.jti:
            raise AccessDenied("the token has no jti claim, so it cannot be revoked alone; revoke its user",
                               status=400, reason="no_jti", user=claims.sub)
        db = self._db()
        with db.conn:
            db[REVOKED].upsert({
                "jti": claims.jti, "subject": claims.sub, "expires_at": claims.expires_at.isoformat(),
                "revoked_at": _now().isoformat(), "revoked_by": revoked_by,
            }, pk="jti")
            db.execute(f"DELETE FROM {REVOKED} WHERE expires_at < ?", [_now().isoformat()])

    def revoke_user(self, subject: str, revoked_by: str) -> datetime:
        """Refuse every token of ``subject`` issued up to now (tokens carry whole seconds: up to the next
        second); returns that moment. Tokens issued after it work again."""
        now = _now()
        cutoff = datetime.fromtimestamp(math.floor(now.timestamp()) + 1, timezone.utc)
        db = self._db()
        with db.conn:
            db[CUTOFFS].upsert({
                "subject": subject, "not_before": cutoff.isoformat(), "revoked_at": now.isoformat(),
                "revoked_by": revoked_by,
            }, pk="subject")
        return cutoff

    def check(self, claims: Claims) -> None:
        """AccessDenied(401, reason "revoked") when ``claims`` belong to a revoked token."""
        db = self._db()
        if claims.jti and db.execute(f"SELECT 1 FROM {REVOKED} WHERE jti = ?", [claims.jti]).fetchone():
            raise AccessDenied("this token has been revoked", status=401, reason="revoked", user=claims.sub)
        row = db.execute(f"SELECT not_before FROM {CUTOFFS} WHERE subject = ?", [claims.sub]).fetchone()
        if row and claims.issued_at < datetime.fromisoformat(row[0]):
            raise AccessDenied(
                f"tokens of {claims.sub!r} issued before {row[0]} have been revoked; get a new one",
                status=401, reason="revoked", user=claims.sub,
            )

    def entries(self) -> dict[str, list[dict[str, Any]]]:
        """Everything on the list, for ``token list-revoked`` and admins."""
        db = self._db()
        return {"tokens": list(db[REVOKED].rows), "users": list(db[CUTOFFS].rows)}


def _now() -> datetime:
    return datetime.now(timezone.utc)
