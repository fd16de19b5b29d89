"""Revoked API tokens: one token by its ``jti``, or every token of a user issued before a moment.

Bearer tokens are stateless, so a leaked one would stay valid until it expires. Revocations are rows of
the ledger (:class:`engine.store.BatchLedger`, tables ``revoked_tokens`` and ``token_cutoffs``), so
``python app.py token revoke`` on the same host takes effect at once in a running server, and every
request checks them: one indexed lookup.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from engine.errors import AccessDenied
from webapp.auth import Claims

if TYPE_CHECKING:
    from engine.store import BatchLedger


class TokenRevocations:
    """What revoking means for a token's claims, kept in ``ledger``."""

    def __init__(self, ledger: "BatchLedger") -> None:
        self.ledger = ledger

    def revoke(self, claims: Claims, revoked_by: str) -> None:
        """Refuse this one token from now on."""
        if not claims.jti:
            raise AccessDenied("the token has no jti claim, so it cannot be revoked alone; revoke its user",
                               status=400, reason="no_jti", user=claims.sub)
        self.ledger.revoke_token(claims.jti, claims.sub, claims.expires_at.isoformat(), revoked_by)

    def revoke_user(self, subject: str, revoked_by: str) -> datetime:
        """Refuse every token of ``subject`` issued up to now (tokens carry whole seconds: up to the next
        second); returns that moment. Tokens issued after it work again."""
        cutoff = datetime.fromtimestamp(math.floor(datetime.now(timezone.utc).timestamp()) + 1, timezone.utc)
        self.ledger.set_token_cutoff(subject, cutoff.isoformat(), revoked_by)
        return cutoff

    def check(self, claims: Claims) -> None:
        """AccessDenied(401, reason "revoked") when ``claims`` belong to a revoked token."""
        revoked, not_before = self.ledger.token_revocation(claims.jti, claims.sub)
        if revoked:
            raise AccessDenied("this token has been revoked", status=401, reason="revoked", user=claims.sub)
        if not_before and claims.issued_at < datetime.fromisoformat(not_before):
            raise AccessDenied(
                f"tokens of {claims.sub!r} issued before {not_before} have been revoked; get a new one",
                status=401, reason="revoked", user=claims.sub,
            )

    def entries(self) -> dict[str, list[dict[str, Any]]]:
        """Everything on the list, for admins."""
        return self.ledger.token_revocations()
