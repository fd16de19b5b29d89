"""Idempotency keys for the requests that make a batch: a client that retries one (its answer lost to a
timeout or a dropped connection) gets the first answer again, not a second batch.

The semantics of the IETF's Idempotency-Key header (draft-ietf-httpapi-idempotency-key-header):

- the same key with the same request from the same user: the first request's answer, not a second run;
- the same key with another request: refused (:class:`IdempotencyKeyReused`);
- the same key while its first request is still being answered: refused (:class:`IdempotencyKeyInUse`);
  retry once it has been;
- keys are per user, and forgotten :data:`IDEMPOTENCY_TTL_S` after their first use.

Only answered requests are kept for retries: a refused one (a bad row, a rate limit) keeps nothing, so
its retry runs again. Keys live in the ledger (``idempotency_keys``) and survive restarts. The batch id a
keyed request makes is reserved with the key before anything runs: if the process answering it dies
before its answer was kept, a retry runs again under that id, which resumes the batch if it was made.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from engine.errors import IdempotencyKeyInUse, IdempotencyKeyReused, RequestInvalid

__all__ = ["IDEMPOTENCY_HEADER", "IDEMPOTENCY_TTL_S", "IdempotencyKeys", "KeyedRequest", "check_idempotency_key",
           "request_fingerprint"]

IDEMPOTENCY_HEADER = "Idempotency-Key"
IDEMPOTENCY_TTL_S = 24 * 3600
MAX_KEY_LENGTH = 255
# How long a request another host answers may take before its claim on a key counts as abandoned (a
# claimant on this host is asked whether its process still runs).
REMOTE_CLAIM_S = 15 * 60
# What a client told "in use" is asked to wait (Retry-After) before it tries the key again: most requests
# that make a batch are answered within seconds; one that waits for its image (/api/generate) asks again.
IN_USE_RETRY_AFTER_S = 2
# The HTTP status a kept answer is given again with: only answered requests are kept (a refused one keeps
# nothing), and every route that takes a key answers 200.
ANSWERED_STATUS = 200


def check_idempotency_key(value: str) -> str:
    """The key of an :data:`IDEMPOTENCY_HEADER` header: a structured-field string (``"8e03978e-..."``, as the
    draft writes it) or the same text unquoted, 1 to :data:`MAX_KEY_LENGTH` printable ASCII characters.
    RequestInvalid (naming the header) otherwise."""
    text = value.strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = text[1:-1].replace('\\"', '"').replace("\\\\", "\\")
    why = None
    if not text.strip():
        why = "is empty"
    elif len(text) > MAX_KEY_LENGTH:
        why = f"is {len(text)} characters long; the limit is {MAX_KEY_LENGTH}"
    elif not all(" " <= ch <= "~" for ch in text):
        why = "may hold only printable ASCII characters (a UUID is usual)"
    if why is not None:
        raise RequestInvalid(f"the {IDEMPOTENCY_HEADER} header {why}",
                             [{"field": IDEMPOTENCY_HEADER, "location": "header", "message": why}])
    return text


def request_fingerprint(route: str, request: Mapping[str, Any]) -> str:
    """A hash of what a request asks for (its route and its parsed fields, files as their sha256), the
    same for a retry however its client encodes it (key order, multipart boundaries)."""
    canonical = json.dumps({"route": route, "request": request}, sort_keys=True, ensure_ascii=False,
                           separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class KeyedRequest:
    """A request under an idempotency key: the batch id it makes, and for a retry of an answered request,
    the answer (``answer`` with its HTTP ``status``) to give again."""

    user: str
    key: str
    batch_id: str
    claimant: str
    status: int | None = None
    answer: Any = None

    @property
    def answered(self) -> bool:
        return self.status is not None


class IdempotencyKeys:
    """Idempotency keys kept in a :class:`engine.store.BatchLedger`. ``claimant``: who answers requests here
    (``host:pid``, as rows are claimed)."""

    def __init__(self, ledger: Any, claimant: str, ttl_s: float = IDEMPOTENCY_TTL_S) -> None:
        self.ledger = ledger
        self.claimant = claimant
        self.ttl_s = ttl_s

    def begin(self, user: str, key: str, fingerprint: str, batch_id: str) -> KeyedRequest:
        """Take ``key`` for the request whose :func:`request_fingerprint` is ``fingerprint``; ``batch_id`` is
        the batch id it makes (the client's, or a new one) unless the key reserved one before. An answered
        key comes back with its answer. Raises IdempotencyKeyReused / IdempotencyKeyInUse."""
        found = self.ledger.claim_idempotency_key(user, key, fingerprint, batch_id, self.claimant, self.ttl_s,
                                                  self._claim_is_gone)
        outcome = found["outcome"]
        if outcome == "reused":
            raise IdempotencyKeyReused(
                f"the Idempotency-Key {key[:80]!r} came before with another request; a key names one request "
                "(use a new key for a new one)", key=key[:80], code="idempotency_key_reused")
        if outcome == "in_use":
            raise IdempotencyKeyInUse(
                f"the request of Idempotency-Key {key[:80]!r} is still being answered; retry in a moment",
                key=key[:80], code="idempotency_key_in_use", retry_after_s=IN_USE_RETRY_AFTER_S)
        if outcome == "answered":
            return KeyedRequest(user, key, found["batch_id"], self.claimant, found["status"], found["answer"])
        return KeyedRequest(user, key, found["batch_id"], self.claimant)

    def finish(self, request: KeyedRequest, answer: Any) -> None:
        """Keep ``answer`` for the retries of ``request``."""
        self.ledger.answer_idempotency_key(request.user, request.key, request.claimant, ANSWERED_STATUS, answer)

    def abandon(self, request: KeyedRequest) -> None:
        """``request`` was refused or failed: keep nothing for its retries (they run again)."""
        self.ledger.release_idempotency_key(request.user, request.key, request.claimant)

    def _claim_is_gone(self, claimant: str | None, claimed_at: str | None) -> bool:
        """Whether nobody answers a key's request any more: no claimant, a claimant process on this host that
        has ended (or whose pid a later process took), or one on another host past :data:`REMOTE_CLAIM_S`.
        This process's own claim is a request it answers now."""
        from engine.batch import claimant_gone

        if not claimant:
            return True
        if claimant == self.claimant:
            return False
        return claimant_gone(claimant, claimed_at, timedelta(seconds=REMOTE_CLAIM_S))
