"""Who is calling and what they may do: hashed-password users, JWT bearer tokens, roles.

Pure functions and classes; no web framework is imported at module load. The shells use them like this::

    users = load_users(settings)                       # UserStore; empty when no users are configured
    user = users.authenticate(name, password)          # User | None (Gradio login, token endpoint)
    tokens = TokenIssuer(settings.jwt_secret, settings.jwt_issuer, settings.jwt_audience)
    token = tokens.create(user, ttl="24h")             # `python app.py token create ...`
    claims = tokens.verify(parse_bearer(request.headers.get("authorization")))   # AccessDenied(401)
    authorize(claims, ADMIN)                           # AccessDenied(403) for non-admins

Every refusal is :class:`engine.errors.AccessDenied` with ``status`` (401: who are you?, 403: not allowed)
and ``reason`` (a short code such as ``"expired"`` or ``"bad_signature"``) in its details.

Passwords are stored as ``scrypt$<n>$<r>$<p>$<salt>$<hash>`` (salt and hash in unpadded urlsafe base64).
Users come from a JSON file (``settings.users_file``)::

    {"users": [{"name": "alice", "password_hash": "scrypt$...", "role": "admin"}]}

or from the environment: ``SD35_USERS="alice:admin:<hash>,bob:user:<hash>"``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import tempfile
import threading
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jwt

from engine.errors import AccessDenied, EngineError

if TYPE_CHECKING:
    from engine.settings import Settings

_log = logging.getLogger(__name__)

__all__ = [
    "ADMIN",
    "ADMIN_ACTIONS",
    "ROLES",
    "USER",
    "USERS_ENV",
    "Claims",
    "ReloadingUserStore",
    "TokenIssuer",
    "User",
    "UserStore",
    "add_user",
    "authorize",
    "hash_password",
    "is_admin",
    "load_users",
    "parse_bearer",
    "parse_ttl",
    "remove_user",
    "signing_key_for",
    "stored_signing_key",
    "verify_password",
]

USER = "user"
ADMIN = "admin"
ROLES = (USER, ADMIN)
# Actions only admins may take; the shells name them when calling `authorize` so refusals say what was refused.
ADMIN_ACTIONS = frozenset({"switch_model", "upload_template", "edit_template", "manage_users"})
USERS_ENV = "SD35_USERS"

# scrypt cost: n=2**14, r=8 uses 16 MiB and ~50 ms per hash, OWASP's minimum recommendation.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
_SCRYPT_MAXMEM = 256 * 1024 * 1024  # accept stored hashes up to n=2**17, r=8 without hashlib refusing them
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")  # no ':' or ',' so names fit SD35_USERS
MIN_SECRET_BYTES = 32  # RFC 7518 3.2: an HS256 key must be at least as long as the hash output
JWT_ALGORITHM = "HS256"
_TTL_PATTERN = re.compile(r"^\s*(\d+)\s*([smhd])\s*$")
_TTL_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
LONGEST_TTL = timedelta(days=3650)  # ten years: the longest lifetime any token may have, CLI-issued ones included
SIGNING_KEY_FILE = "token-signing-key"  # in the data folder: the key used when users exist and none is set


# --- passwords -----------------------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """Hash ``password`` with scrypt and a fresh 16-byte salt; returns ``scrypt$n$r$p$salt$hash``."""
    if not password:
        raise EngineError("a password cannot be empty")
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=_SCRYPT_MAXMEM, dklen=32)
    return f"scrypt${n}${r}${p}${_b64(salt)}${_b64(digest)}"


def _parse_hash(encoded: str) -> tuple[int, int, int, bytes, bytes]:
    parts = encoded.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        scheme = parts[0] if len(parts) > 1 else "?"
        raise EngineError(
            f"unsupported password hash format (scheme '{scheme}'); supported: scrypt$n$r$p$salt$hash "
            "as written by `python app.py users add` (users file) or `python app.py users entry` (SD35_USERS)",
            scheme=scheme,
        )
    try:
        n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
        return n, r, p, _unb64(parts[4]), _unb64(parts[5])
    except ValueError as exc:
        raise EngineError(f"malformed scrypt password hash: {exc}", scheme="scrypt") from exc


def verify_password(password: str, encoded: str) -> bool:
    """True when ``password`` hashes to ``encoded``; the final comparison is constant-time."""
    n, r, p, salt, expected = _parse_hash(encoded)
    digest = hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=_SCRYPT_MAXMEM, dklen=len(expected)
    )
    return hmac.compare_digest(digest, expected)


# --- users ---------------------------------------------------------------------------------------------------


def _check_role(role: str) -> str:
    if role not in ROLES:
        raise EngineError(f"unknown role '{role}'; supported roles: {', '.join(ROLES)}", role=role)
    return role


def _check_name(name: str) -> str:
    if not _NAME_PATTERN.match(name or ""):
        raise EngineError(
            f"invalid user name {name!r}: use 1-64 letters, digits, '_', '.', '@' or '-'", name=name
        )
    return name


@dataclass(frozen=True)
class User:
    """A configured user. ``password_hash`` is never shown in ``repr``."""

    name: str
    role: str = USER
    password_hash: str = ""

    def __repr__(self) -> str:
        return f"User(name={self.name!r}, role={self.role!r})"

    @property
    def is_admin(self) -> bool:
        return self.role == ADMIN

    @property
    def credential_id(self) -> str:
        """Changes whenever the password is set again (a new salt each time): tokens and sessions carry it,
        so a new password, or a removed user added back under the same name, leaves none of the old ones
        working. A hash of the hash: nothing about the password can be learnt from it."""
        return hashlib.sha256(self.password_hash.encode()).hexdigest()[:16] if self.password_hash else ""

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "password_hash": self.password_hash, "role": self.role}


def _index_users(users: Iterable[User]) -> dict[str, User]:
    indexed: dict[str, User] = {}
    for user in users:
        _check_name(user.name)
        _check_role(user.role)
        _parse_hash(user.password_hash)  # a broken hash is a startup error, not a login failure later
        if user.name in indexed:
            raise EngineError(f"user '{user.name}' is configured twice", name=user.name)
        indexed[user.name] = user
    return indexed


class UserStore:
    """The configured users, looked up by name. An empty store means login is not configured."""

    def __init__(self, users: Iterable[User] = ()) -> None:
        self._users: dict[str, User] = _index_users(users)
        self._configured = bool(self._users)
        # Unknown names are checked against this so a miss costs the same scrypt time as a wrong password.
        self._decoy_hash = hash_password(secrets.token_urlsafe(16)) if self._users else ""

    def _current(self) -> dict[str, User]:
        """The users as they are now (a store read from a file that changes re-reads it here)."""
        return self._users

    def __len__(self) -> int:
        return len(self._current())

    def __contains__(self, name: object) -> bool:
        return name in self._current()

    def __iter__(self):
        return iter(list(self._current().values()))

    @property
    def configured(self) -> bool:
        """True when the app must ask for a login: users existed when the store was made. Fixed for the
        store's life, so removing every user from a file locks the app rather than opening it."""
        return self._configured

    def get(self, name: str) -> User | None:
        return self._current().get(name)

    def authenticate(self, name: str, password: str) -> User | None:
        """The user when ``password`` is theirs, else None (unknown name and wrong password look alike)."""
        user = self._current().get(name)
        if user is None:
            if self._decoy_hash:
                verify_password(password, self._decoy_hash)
            return None
        return user if verify_password(password, user.password_hash) else None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "users file") -> UserStore:
        """Parse ``{"users": [{"name", "password_hash", "role"}]}``."""
        return cls(_users_from_dict(data, source))

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], also: Iterable[User] = ()) -> UserStore:
        """The users of a JSON file (plus ``also``, e.g. from ``SD35_USERS``), re-read when the file changes."""
        return ReloadingUserStore(Path(path), also)


class ReloadingUserStore(UserStore):
    """Users from a JSON file that follows the file: ``python app.py users add|remove`` (or an edit) takes
    effect on the next request, in every process reading it. A removed user's sessions and tokens stop
    working (:class:`webapp.server.WebAuth` and :class:`webapp.guard.ApiGuard` look the user up each time).

    Each lookup costs one ``stat``; the file is read again only when its modification time, size or inode
    changed. A file that cannot be read or parsed keeps the users last loaded (logged), so a half-saved
    edit neither locks everyone out nor lets anyone in; a deleted file means no users from it.
    """

    def __init__(self, path: Path, also: Iterable[User] = ()) -> None:
        self.path = path
        self._also = list(also)
        self._stamp = self._file_stamp()
        super().__init__([*_users_from_file(path), *self._also])
        self._lock = threading.Lock()

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _current(self) -> dict[str, User]:
        stamp = self._file_stamp()
        if stamp == self._stamp:
            return self._users
        with self._lock:
            if stamp != self._stamp:  # another thread may have reloaded while this one waited
                self._reload(stamp)
            return self._users

    def _reload(self, stamp: tuple[int, int, int] | None) -> None:
        try:
            from_file = _users_from_file(self.path) if stamp is not None else []
            users = _index_users([*from_file, *self._also])
        except EngineError as exc:
            _log.error("users file %s not reloaded, keeping the users loaded before: %s", self.path, exc.message)
        else:
            if stamp is None:
                _log.warning("users file %s is gone: its users can no longer sign in", self.path)
            if users and not self._decoy_hash:
                self._decoy_hash = hash_password(secrets.token_urlsafe(16))
            self._users = users
            _log.info("users file %s reloaded: %d user(s)", self.path, len(users))
        self._stamp = stamp


def _users_from_dict(data: Mapping[str, Any], source: str) -> list[User]:
    entries = data.get("users") if isinstance(data, Mapping) else None
    if not isinstance(entries, list):
        raise EngineError(f"{source}: expected an object with a 'users' list", source=source)
    users = []
    for index, entry in enumerate(entries):
        missing = [k for k in ("name", "password_hash") if not isinstance(entry, Mapping) or k not in entry]
        if missing:
            raise EngineError(f"{source}: user #{index + 1} lacks {', '.join(missing)}", source=source, index=index)
        users.append(User(str(entry["name"]), str(entry.get("role", USER)), str(entry["password_hash"])))
    return users


def _users_from_file(path: Path) -> list[User]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise EngineError(f"users file not found: {path}", path=str(path)) from exc
    except json.JSONDecodeError as exc:
        raise EngineError(f"users file {path} is not valid JSON: {exc}", path=str(path)) from exc
    return _users_from_dict(data, source=str(path))


def users_entry(name: str, password: str, role: str = USER) -> str:
    """One ``name:role:hash`` entry of ``SD35_USERS`` (entries are joined with commas)."""
    return f"{_check_name(name)}:{_check_role(role)}:{hash_password(password)}"


def _users_from_env_value(value: str) -> list[User]:
    users = []
    for item in filter(None, (part.strip() for part in value.split(","))):
        pieces = item.split(":", 2)
        if len(pieces) != 3:
            raise EngineError(f"{USERS_ENV}: entry {item.split(':', 1)[0]!r} is not name:role:hash", source=USERS_ENV)
        users.append(User(pieces[0], pieces[1], pieces[2]))
    return users


def load_users(settings: Settings, environ: Mapping[str, str] | None = None) -> UserStore:
    """Users from ``settings.users_file`` and ``SD35_USERS`` together (a name in both is an error); the
    file's users follow the file as it changes."""
    env = os.environ if environ is None else environ
    from_env = _users_from_env_value(env[USERS_ENV]) if env.get(USERS_ENV, "").strip() else []
    if settings.users_file:  # followed while the app runs: see ReloadingUserStore
        return UserStore.from_file(settings.users_file, also=from_env)
    return UserStore(from_env)


def _read_users_file(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    return [user.to_dict() for user in _users_from_file(path)]


def _write_users_file(path: Path, users: list[dict[str, str]]) -> None:
    # Write a private temp file and rename it over the old one: readers never see half a file.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump({"users": users}, handle, indent=2)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def add_user(
    path: str | os.PathLike[str], name: str, password: str, role: str = USER, *, replace: bool = False
) -> User:
    """Add (or with ``replace=True`` update) a user in the JSON users file, creating it if needed.

    Backs ``python app.py users add NAME --role admin``.
    """
    path = Path(path)
    user = User(_check_name(name), _check_role(role), hash_password(password))
    users = _read_users_file(path)
    existing = [i for i, entry in enumerate(users) if entry["name"] == name]
    if existing and not replace:
        raise EngineError(f"user '{name}' already exists in {path}; pass replace=True to change it", name=name)
    if existing:
        users[existing[0]] = user.to_dict()
    else:
        users.append(user.to_dict())
    _write_users_file(path, users)
    return user


def remove_user(path: str | os.PathLike[str], name: str) -> None:
    """Remove a user from the JSON users file; an unknown name is an error."""
    path = Path(path)
    users = _read_users_file(path)
    kept = [entry for entry in users if entry["name"] != name]
    if len(kept) == len(users):
        raise EngineError(f"no user '{name}' in {path}", name=name)
    _write_users_file(path, kept)


# --- tokens --------------------------------------------------------------------------------------------------


def parse_ttl(ttl: timedelta | str, maximum: timedelta | None = None) -> timedelta:
    """``"30s"``, ``"30m"``, ``"24h"``, ``"7d"`` or a timedelta -> a positive timedelta.

    Refused (EngineError naming the value): anything else, zero, and lifetimes over ``maximum`` (when
    given) or over :data:`LONGEST_TTL`, past which a token is as good as a password that never expires.
    """
    shown = str(ttl)[:40]  # the value as messages echo it: a request body may hold megabytes of digits
    if isinstance(ttl, timedelta):
        value = ttl
    else:
        match = _TTL_PATTERN.match(str(ttl))
        if not match:
            raise EngineError(
                f"invalid token lifetime {shown!r}; use a number with s, m, h or d (e.g. 30m, 24h, 7d)", ttl=shown
            )
        try:
            value = timedelta(**{_TTL_UNITS[match.group(2)]: int(match.group(1))})
        except (OverflowError, ValueError):  # more than a timedelta (or an int) holds: far past any limit
            value = timedelta.max
    if value <= timedelta(0):
        raise EngineError(f"token lifetime must be positive, got {shown!r}", ttl=shown)
    limit = LONGEST_TTL if maximum is None else min(maximum, LONGEST_TTL)
    if value > limit:
        raise EngineError(
            f"token lifetime {shown!r} is longer than the {_describe_ttl(limit)} allowed",
            ttl=shown,
            max_ttl=_describe_ttl(limit),
        )
    return value


def _describe_ttl(value: timedelta) -> str:
    """``7d``, ``12h``, ``90m``, ``45s``: a lifetime in the largest unit that divides it."""
    seconds = int(value.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


@dataclass(frozen=True)
class Claims:
    """The verified contents of a token."""

    sub: str
    role: str
    issued_at: datetime
    expires_at: datetime
    jti: str
    issuer: str
    audience: str
    credential: str = ""  # the user's credential_id when issued; "" for tokens of a bare name

    @property
    def name(self) -> str:
        return self.sub

    def check_credential(self, user: "User") -> None:
        """AccessDenied when ``user``'s password was set again after this token was issued, or when the
        token was not issued for this password at all: one of a bare name that a user took later, or one
        from before tokens carried the credential. Either would otherwise outlive every password reset."""
        if self.credential == user.credential_id:
            return
        if not self.credential:
            raise _denied(f"this token was not issued for the current password of {user.name!r}; sign in again "
                          "(or issue a new token)", "credentials_changed")
        raise _denied(f"the password of {user.name!r} was set again after this token was issued; sign in again",
                      "credentials_changed")

    @property
    def is_admin(self) -> bool:
        return self.role == ADMIN


def _denied(message: str, reason: str) -> AccessDenied:
    return AccessDenied(message, status=401, reason=reason)


class TokenIssuer:
    """Signs and verifies HS256 bearer tokens for one issuer and audience.

    ``secret`` must be at least 32 bytes (RFC 7518). :meth:`for_process` makes an issuer with a random key
    that dies with the process; it refuses to mint tokens unless the caller says they are process-local
    (e.g. browser sessions of this very process), so no one hands out API tokens that break on restart.
    """

    def __init__(self, secret: str, issuer: str, audience: str, *, leeway_s: float = 10.0) -> None:
        if not secret:
            raise EngineError(
                "no token signing key configured: set SD35_JWT_SECRET (e.g. to the output of "
                "`python -c \"import secrets; print(secrets.token_urlsafe(48))\"`), or configure users "
                "(a key is then generated and kept in the data folder)",
                setting="jwt_secret",
            )
        if len(secret.encode("utf-8")) < MIN_SECRET_BYTES:
            raise EngineError(
                f"the token signing key is {len(secret.encode('utf-8'))} bytes; HS256 needs at least "
                f"{MIN_SECRET_BYTES} (e.g. `python -c \"import secrets; print(secrets.token_urlsafe(48))\"`)",
                setting="jwt_secret",
            )
        if not issuer or not audience:
            raise EngineError("token issuer and audience must both be set", setting="jwt_issuer/jwt_audience")
        self._secret = secret
        self.issuer = issuer
        self.audience = audience
        self.leeway_s = leeway_s
        self.ephemeral = False

    def __repr__(self) -> str:
        return f"TokenIssuer(issuer={self.issuer!r}, audience={self.audience!r}, ephemeral={self.ephemeral})"

    @classmethod
    def for_process(cls, issuer: str, audience: str, *, leeway_s: float = 10.0) -> TokenIssuer:
        """An issuer with a random key, valid only while this process lives."""
        made = cls(secrets.token_urlsafe(48), issuer, audience, leeway_s=leeway_s)
        made.ephemeral = True
        return made

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenIssuer:
        return cls(settings.jwt_secret, settings.jwt_issuer, settings.jwt_audience)

    def create(
        self,
        user: User | str,
        role: str | None = None,
        ttl: timedelta | str = "24h",
        *,
        process_local: bool = False,
    ) -> str:
        """A signed token for ``user`` (a User, or a name with ``role``) expiring after ``ttl``."""
        if self.ephemeral and not process_local:
            raise EngineError(
                "refusing to issue a token with a per-process key: it would stop working when this process "
                "exits; set SD35_JWT_SECRET",
                setting="jwt_secret",
            )
        name = user.name if isinstance(user, User) else user
        credential = user.credential_id if isinstance(user, User) else ""
        if role is None:
            if not isinstance(user, User):
                raise EngineError("a role is needed when issuing a token for a bare user name", name=name)
            role = user.role
        now = datetime.now(timezone.utc).replace(microsecond=0)
        claims = {
            "sub": _check_name(name),
            "role": _check_role(role),
            "iat": now,
            "nbf": now,
            "exp": now + parse_ttl(ttl),
            "iss": self.issuer,
            "aud": self.audience,
            "jti": uuid.uuid4().hex,
        }
        if credential:
            claims["cred"] = credential
        return jwt.encode(claims, self._secret, algorithm=JWT_ALGORITHM)

    def verify(self, token: str) -> Claims:
        """The token's claims, or AccessDenied(status=401) saying why it was refused."""
        if not token:
            raise _denied("no token given", "missing_token")
        try:
            payload = jwt.decode(
                token,
                self._secret,
                algorithms=[JWT_ALGORITHM],  # pinned: "none" and every other algorithm are refused
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway_s,
                options={"require": ["exp", "iat", "sub", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise _denied("token expired", "expired") from exc
        except jwt.InvalidAlgorithmError as exc:
            raise _denied(f"token algorithm not allowed; only {JWT_ALGORITHM} is accepted", "bad_algorithm") from exc
        except jwt.InvalidSignatureError as exc:
            raise _denied("token signature does not match", "bad_signature") from exc
        except jwt.InvalidAudienceError as exc:
            raise _denied(f"token audience is not '{self.audience}'", "bad_audience") from exc
        except jwt.InvalidIssuerError as exc:
            raise _denied(f"token issuer is not '{self.issuer}'", "bad_issuer") from exc
        except jwt.MissingRequiredClaimError as exc:
            raise _denied(f"token lacks the '{exc.claim}' claim", "missing_claim") from exc
        except jwt.ImmatureSignatureError as exc:
            raise _denied("token is not valid yet", "not_yet_valid") from exc
        except jwt.InvalidTokenError as exc:  # malformed, bad padding, iat in the future, ...
            raise _denied(f"token is invalid: {exc}", "malformed") from exc
        role = payload.get("role")
        if role not in ROLES:
            raise _denied(f"token role {role!r} is not one of {', '.join(ROLES)}", "bad_role")
        aud = payload["aud"]
        return Claims(
            sub=payload["sub"],
            role=role,
            issued_at=datetime.fromtimestamp(payload["iat"], timezone.utc),
            expires_at=datetime.fromtimestamp(payload["exp"], timezone.utc),
            jti=str(payload.get("jti", "")),
            issuer=payload["iss"],
            audience=aud if isinstance(aud, str) else self.audience,
            credential=str(payload.get("cred", "")),
        )


def stored_signing_key(folder: str | os.PathLike[str]) -> tuple[Path, str, bool]:
    """``(path, key, created)``: the signing key kept in ``folder``, generated the first time it is asked for.

    The key is written to a private (0600) temporary file and linked into place, so a second process
    starting at the same moment finds either no file or the whole key, never half of one, and both end up
    with the same key.
    """
    path = Path(folder) / SIGNING_KEY_FILE
    created = False
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{SIGNING_KEY_FILE}.", suffix=".tmp")  # mode 0600
        try:
            with os.fdopen(fd, "w", encoding="ascii") as handle:
                handle.write(secrets.token_urlsafe(48) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            try:
                os.link(tmp, path)  # fails if the file appeared meanwhile: that one is the key
                created = True
            except FileExistsError:
                pass
        finally:
            Path(tmp).unlink(missing_ok=True)
    key = path.read_text(encoding="ascii").strip()
    if len(key.encode("ascii")) < MIN_SECRET_BYTES:
        raise EngineError(
            f"the token signing key in {path} is shorter than {MIN_SECRET_BYTES} bytes; delete the file to have "
            "a new one generated (everyone signs in again) or set SD35_JWT_SECRET",
            path=str(path),
        )
    return path, key, created


def signing_key_for(settings: Settings, users: UserStore) -> tuple[Settings, str | None]:
    """``settings`` with the key that signs API tokens and sessions, and a line for the log saying where
    it came from (None when nothing changed).

    ``jwt_secret`` when set. Otherwise, once users are configured, the key kept in the data folder
    (:func:`stored_signing_key`): sign-in and API tokens then work without a secret to manage, and sessions
    survive restarts (on a Space, persistent storage keeps the file). Without users nothing signs in and
    no key is made: a workstation's API stays open on localhost.
    """
    from dataclasses import replace

    if settings.jwt_secret or not users.configured:
        return settings, None
    path, key, created = stored_signing_key(settings.data_path)
    how = "generated a token signing key and stored it in" if created else "token signing key read from"
    note = f"{how} {path} (sessions and API tokens stay valid across restarts; SD35_JWT_SECRET overrides it)"
    return replace(settings, jwt_secret=key), note


# --- roles and headers ---------------------------------------------------------------------------------------


def is_admin(principal: User | Claims | None) -> bool:
    return principal is not None and principal.role == ADMIN


def authorize(principal: User | Claims | None, required_role: str, action: str | None = None) -> User | Claims:
    """Return ``principal`` when its role allows ``required_role`` (admin implies user), else refuse.

    No principal -> AccessDenied(401); too low a role -> AccessDenied(403). ``action`` names what was
    attempted (e.g. ``"switch_model"``) for the message.
    """
    _check_role(required_role)
    what = f" to {action.replace('_', ' ')}" if action else ""
    if principal is None:
        raise AccessDenied(f"log in{what}", status=401, reason="not_authenticated", action=action)
    if required_role == ADMIN and principal.role != ADMIN:
        raise AccessDenied(
            f"the admin role is needed{what}; '{principal.name}' is a {principal.role}",
            status=403,
            reason="forbidden",
            action=action,
            user=principal.name,
        )
    return principal


def parse_bearer(authorization: str | None) -> str:
    """The token in an ``Authorization: Bearer <token>`` header value; AccessDenied(401) otherwise."""
    if not authorization or not authorization.strip():
        raise _denied("missing Authorization header (expected 'Bearer <token>')", "missing_token")
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _denied("Authorization header must be 'Bearer <token>'", "bad_scheme")
    return token.strip()
