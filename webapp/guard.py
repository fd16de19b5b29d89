"""Who may call the HTTP routes, how often: one object shared by the JSON API and the ComfyUI routes.

With no users and no token key configured the server is a workstation tool bound to localhost and every
request acts as the local user. Once either is configured, every API request needs a bearer token
(``python app.py token create``), rate limits apply per user and route, and admin-only actions need the
admin role. (The page and ``/files`` follow the users, not the key: with a key alone they stay open.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from engine.errors import AccessDenied
from webapp.auth import ADMIN, USER, Claims, TokenIssuer, UserStore, authorize, parse_bearer
from webapp.ratelimit import RateLimiter
from webapp.revocation import TokenRevocations

LOCAL_USER = "local"


@dataclass(frozen=True)
class Caller:
    """The principal behind one request."""

    name: str
    role: str

    @property
    def is_admin(self) -> bool:
        return self.role == ADMIN


class ApiGuard:
    """Identifies callers (bearer tokens, minus revoked ones), checks roles, and applies the per-user,
    per-route rate limits."""

    def __init__(
        self, users: UserStore, tokens: TokenIssuer | None, limiter: RateLimiter,
        revocations: TokenRevocations | None = None,
    ) -> None:
        self.users = users
        self.tokens = tokens
        self.limiter = limiter
        self.revocations = revocations
        # Who an unauthenticated caller is when no auth is configured: the workstation's owner (admin) on
        # localhost; an ordinary user where the app is public without users (a Space), so that nobody who
        # merely reaches it may switch models or upload templates.
        self.anonymous_role = ADMIN

    @property
    def auth_required(self) -> bool:
        return self.tokens is not None or self.users.configured

    def identify(self, authorization: str | None, query_token: str | None = None) -> Caller:
        """The caller named by a bearer token, or the local user when no auth is configured.

        The token comes from the ``Authorization`` header; ``query_token`` (``?token=``) is for the WebSocket
        handshake only, where browsers cannot set headers; HTTP routes never pass it, because access logs
        record query strings.

        With users configured, the token's user must still exist (401 ``unknown_user`` otherwise) and acts
        with the role the users store gives them now, not the one written into the token. With only a
        signing key (API-only deployments) the token's name and role are all there is.
        """
        if not self.auth_required:
            return Caller(LOCAL_USER, self.anonymous_role)
        if self.tokens is None:
            raise AccessDenied(
                "API access needs a token, and no token signing key is configured (set SD35_JWT_SECRET)",
                status=401,
                reason="no_token_key",
            )
        token = query_token if (query_token and not authorization) else parse_bearer(authorization)
        claims: Claims = self.tokens.verify(token)
        if self.revocations is not None:
            self.revocations.check(claims)
        if not self.users.configured:
            return Caller(claims.sub, claims.role)
        user = self.users.get(claims.sub)
        if user is None:
            raise AccessDenied(
                f"the token's user {claims.sub!r} no longer exists", status=401, reason="unknown_user", user=claims.sub
            )
        claims.check_credential(user)
        return Caller(user.name, user.role)

    def admit(self, caller: Caller, route: str, role: str = USER, action: str | None = None) -> dict[str, str]:
        """Role check then rate limit; returns the rate-limit headers to add to the response."""
        authorize(caller, role, action)
        return self._spend(caller.name, route)

    def admit_address(self, address: str, route: str) -> dict[str, str]:
        """Rate limit per client address, for routes that check a password (each try costs a scrypt hash,
        and guessing must stay slow); returns the rate-limit headers, or raises :class:`RateLimited`."""
        return self._spend(f"address:{address}", route)

    def _spend(self, key: str, route: str) -> dict[str, str]:
        decision = self.limiter.check(key, route)
        if not decision.allowed:
            raise RateLimited(decision.retry_after_s, decision.headers())
        return decision.headers()


class RateLimited(AccessDenied):
    """429: over the rate limit. ``headers`` (Retry-After, X-RateLimit-*) go on the response."""

    def __init__(self, retry_after_s: float, headers: dict[str, str]) -> None:
        wait_s = max(1, math.ceil(retry_after_s))
        super().__init__(
            f"rate limit exceeded; retry in {wait_s} s", status=429, reason="rate_limited", retry_after_s=wait_s
        )
        self.retry_after_s = wait_s
        self.headers = headers


def fastapi_dependency(guard: ApiGuard, role: str = USER, action: str | None = None) -> Any:
    """A FastAPI dependency returning the admitted Caller; refusals raise AccessDenied (handled by the app)."""
    from fastapi import Request, Response

    def admitted(request: Request, response: Response) -> Caller:
        caller = guard.identify(request.headers.get("authorization"))  # never ?token=: see ApiGuard.identify
        route = request.scope.get("route")
        route_name = f"{request.method} {getattr(route, 'path', request.url.path)}"
        for key, value in guard.admit(caller, route_name, role, action).items():
            response.headers[key] = value
        return caller

    admitted.__annotations__ = {"request": Request, "response": Response, "return": Caller}
    return admitted
