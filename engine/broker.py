"""The Redis broker of scale-out: its URL and the first contact with it.

Three clients read the one ``broker`` setting: our own (``redis.Redis.from_url``: heartbeats, row marks),
kombu's (the queues) and Celery's result backend. They disagree on a ``rediss://`` URL without
``ssl_cert_reqs``: redis-py verifies the server's certificate, kombu silently does not (``CERT_NONE``), and
Celery's backend refuses the URL, in a worker only once its models are loaded. They also disagree on how
``ssl_cert_reqs`` is spelled (``CERT_REQUIRED`` is Celery's, redis-py knows only ``required``).
:func:`parse_broker_url` checks the URL once and gives every client the same one: a TLS URL verifies the
certificate unless it says otherwise.

The URL carries the password, so it is never printed as given: :attr:`BrokerUrl.redacted` (also its
``str``) blanks it, for logs and messages.

:func:`reach_broker` is the first contact, the one place a PING's failure is judged: a broker that refuses us
(wrong password, a certificate that cannot be verified, a URL whose scheme is not what the port speaks)
is said at start-up in one line; one that is unreachable for now is waited for. :func:`check_channels`
then makes sure the ACL user may use the Pub/Sub channels Celery needs in the role it runs in.
"""

from __future__ import annotations

import re
import socket
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from engine.errors import BrokerError

SCHEMES = ("redis", "rediss")
MASK = "***"
# What redis-py calls each level of certificate checking; Celery's and Python's names map onto them.
CERT_REQS = {"required": "required", "cert_required": "required", "optional": "optional",
             "cert_optional": "optional", "none": "none", "cert_none": "none"}
ENCODING_HINT = "a password with @ : / ? # % in it is percent-encoded (p@ss is p%40ss)"
_SECRET_QUERY_KEYS = re.compile(r"pass|token|secret|credential", re.IGNORECASE)


@dataclass(frozen=True)
class BrokerUrl:
    """A checked broker URL. ``url`` (with the password) is for the clients only; ``redacted`` is for people."""

    url: str
    redacted: str
    host: str
    port: int
    db: int
    tls: bool

    def __str__(self) -> str:
        return self.redacted

    def __repr__(self) -> str:
        return f"BrokerUrl({self.redacted!r})"


def redact_broker_url(text: str) -> str:
    """``text`` with its password (and any secret-looking query value) blanked. Read as plain text, not
    parsed: a password with an unencoded ``#``, ``/`` or ``@`` in it must not end up shown because the URL
    did not parse. Everything up to the last ``@`` is credentials; of them only a plain user name stays
    (a lone user part, ``redis://SECRET@host``, is blanked: some write the password there)."""
    scheme, separator, rest = text.partition("://")
    if not separator:
        scheme, rest = "", text
    userinfo, at, location = rest.rpartition("@")
    if at:
        user, colon, _password = userinfo.partition(":")
        shown = f"{user}:{MASK}" if colon and re.fullmatch(r"[\w.%-]*", user) else MASK
        rest = f"{shown}@{location}"
    else:
        location = rest
    path, question, query = rest.partition("?")
    if question:
        pairs = [(key, MASK if _SECRET_QUERY_KEYS.search(key) else value)
                 for key, value in parse_qsl(query, keep_blank_values=True)]
        rest = f"{path}?{urlencode(pairs, safe='/:*')}"
    return f"{scheme}{separator}{rest}"


def parse_broker_url(text: str) -> BrokerUrl:
    """Check a broker URL and return the form every client connects with; BrokerError naming what is wrong
    (the URL shown without its password).

    Forms: ``redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]``, ``rediss://`` for TLS, with ``ssl_cert_reqs``
    (``required``, the default; ``optional``; ``none``) and ``ssl_ca_certs``/``ssl_certfile``/``ssl_keyfile``
    in the query. A password with ``@ : / ? # %`` in it is percent-encoded (``p@ss`` is ``p%40ss``)."""
    redacted = redact_broker_url(text)
    try:
        parts = urlsplit(text.strip())
        port = parts.port
    except ValueError:  # its message quotes the part it could not read: a piece of the password, maybe
        raise BrokerError(f"the broker URL {redacted} cannot be read: its host and port cannot be told apart; {ENCODING_HINT}",
                          broker=redacted) from None
    if parts.scheme not in SCHEMES:
        raise BrokerError(
            f"the broker URL {redacted} must start with redis:// (or rediss:// for TLS), e.g. "
            "redis://:PASSWORD@HOST:6379/0", broker=redacted,
        )
    if not parts.hostname:
        raise BrokerError(f"the broker URL {redacted} names no host; {ENCODING_HINT}", broker=redacted)
    db_text = parts.path.strip("/") or "0"
    if not re.fullmatch(r"[0-9]+", db_text):  # str.isdigit also takes ² and other scripts' digits
        raise BrokerError(
            f"the broker URL {redacted} ends in /{db_text}: the part after the host is the database number, "
            f"a whole number such as /0; {ENCODING_HINT}", broker=redacted,
        )
    tls = parts.scheme == "rediss"
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    ssl_keys = sorted(key for key in query if key.startswith("ssl_"))
    if ssl_keys and not tls:
        raise BrokerError(
            f"the broker URL {redacted} sets {', '.join(ssl_keys)} but starts with redis://, which does not use "
            "TLS: write rediss://", broker=redacted,
        )
    if tls:
        asked = query.get("ssl_cert_reqs", "required")
        if asked.lower() not in CERT_REQS:
            raise BrokerError(
                f"the broker URL {redacted} has ssl_cert_reqs={asked}; use required (the default), optional or none",
                broker=redacted,
            )
        query["ssl_cert_reqs"] = CERT_REQS[asked.lower()]
    url = urlunsplit((parts.scheme, parts.netloc, f"/{int(db_text)}", urlencode(query, safe="/:"), ""))
    return BrokerUrl(url, redact_broker_url(url), parts.hostname, port or 6379, int(db_text), tls)


def unreachable_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean "Redis is unreachable right now" (imported lazily with the clients)."""
    import kombu.exceptions
    import redis

    return (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, kombu.exceptions.OperationalError,
            ConnectionError, TimeoutError)


def reach_broker(client: Any, broker: BrokerUrl) -> BaseException | None:
    """One PING through ``client``: None when Redis answers; the error when it is unreachable for now (down,
    restarting, a network blink: worth waiting for). BrokerError when it refuses us or speaks the other
    protocol than the URL's scheme says (see :func:`broker_refusal`): waiting would not help."""
    try:
        client.ping()
        return None
    except Exception as exc:
        reason = broker_refusal(exc, broker)
        if reason is not None:
            raise refused(broker, reason) from None
        if not isinstance(exc, unreachable_errors()):
            raise
        return exc


def broker_refusal(exc: BaseException, broker: BrokerUrl) -> str | None:
    """Why the broker refuses us, when ``exc`` (from a first command) says it does; None when it is merely
    unreachable, which is worth waiting for."""
    import redis

    if isinstance(exc, redis.exceptions.AuthenticationError):
        return f"it refused the user name or password ({exc})"
    if isinstance(exc, redis.exceptions.ResponseError):  # e.g. an ACL user that may not PING
        return f"it refused the first command ({exc})"
    # The wrong scheme for the port fails as an outage would: a TLS handshake that a plain Redis never
    # answers (a timeout), or plain text that a TLS port drops (a reset). Ask the port which it speaks.
    mismatch = scheme_mismatch(broker) if isinstance(exc, unreachable_errors()) else None
    if mismatch is not None:
        return mismatch
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, ssl.SSLCertVerificationError):
        return (f"its TLS certificate cannot be verified ({cause.verify_message}); name the CA that signed it with "
                "ssl_cert_reqs=required&ssl_ca_certs=/path/to/ca.pem in the URL")
    if isinstance(cause, ssl.SSLError):
        return f"the TLS handshake failed ({cause.reason or cause}); check the ssl_* options of the URL"
    return None


PROBE_TIMEOUT_S = 2.0


def scheme_mismatch(broker: BrokerUrl, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """What to write instead when the server at the broker's host and port speaks the other protocol than
    the URL's scheme; None when it speaks the URL's, or cannot be reached to tell. The probe sends no
    credentials: a plain ``PING`` (rediss://), or a TLS handshake that checks nothing (redis://)."""
    where = f"{broker.host}:{broker.port}"
    if broker.tls and _answers_plain_redis(broker.host, broker.port, timeout_s):
        return f"the server at {where} answered without TLS; use redis:// (or the port where it speaks TLS)"
    if not broker.tls and _speaks_tls(broker.host, broker.port, timeout_s):
        return f"the server at {where} speaks TLS; use rediss://"
    return None


def _answers_plain_redis(host: str, port: int, timeout_s: float) -> bool:
    """Whether ``host:port`` answers an unencrypted inline PING as Redis does (+PONG, or -NOAUTH ...)."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(1)[:1] in (b"+", b"-")
    except OSError:
        return False


def _speaks_tls(host: str, port: int, timeout_s: float) -> bool:
    """Whether ``host:port`` completes a TLS handshake, or refuses it with a TLS alert (a server that wants
    a client certificate): either way it speaks TLS. Nothing is sent after the handshake."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # only asking, sending no secrets
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as raw, \
                context.wrap_socket(raw, server_hostname=host):
            return True
    except ssl.SSLError as exc:
        return "ALERT" in str(exc.reason or "").upper()
    except OSError:
        return False


# Pub/Sub channels Celery uses. kombu's Redis transport carries Celery's remote control (the broadcasts that
# revoke rows and add a queue) on the first, per database; a worker subscribes to it as a pattern. Celery's
# Redis result backend announces each stored result on a channel named after its key.
CONTROL_CHANNEL = "/{db}.celery.pidbox"
RESULT_CHANNEL_PREFIX = "celery-task-meta-"
# (what is asked for, the channel, the probe's channel name, why it is needed), by role
_CHANNEL_NEEDS: dict[str, tuple[tuple[str, str, str, str], ...]] = {
    "worker": (
        ("psubscribe", CONTROL_CHANNEL, CONTROL_CHANNEL, "Celery's remote control needs"),
        ("subscribe", CONTROL_CHANNEL, CONTROL_CHANNEL, "Celery's remote control needs"),
        ("subscribe", RESULT_CHANNEL_PREFIX + "*", RESULT_CHANNEL_PREFIX + "sd35-access-check",
         "Celery announces each row's result on"),
    ),
    "coordinator": (
        ("subscribe", CONTROL_CHANNEL, CONTROL_CHANNEL, "Celery's remote control (revoking rows) needs"),
        ("subscribe", RESULT_CHANNEL_PREFIX + "*", RESULT_CHANNEL_PREFIX + "sd35-access-check",
         "Celery announces each row's result on"),
    ),
}


def check_channels(client: Any, broker: BrokerUrl, role: str) -> None:
    """BrokerError when this ACL user may not use a Pub/Sub channel Celery needs in ``role`` ("worker" or
    "coordinator"). Redis 7 gives a new ACL user no channels unless ``&*``; without them a worker is
    stopped by Celery once its models are loaded, or on its first result, and a coordinator cannot revoke
    rows. Subscribing asks for the same permission as publishing, with no message sent."""
    import redis

    pubsub = client.pubsub()
    try:
        for how, channel, probe, needed_for in _CHANNEL_NEEDS[role]:
            getattr(pubsub, how)(probe.format(db=broker.db))
            try:
                pubsub.get_message(timeout=5)
            except redis.exceptions.NoPermissionError as exc:
                control = CONTROL_CHANNEL.format(db=broker.db)
                raise refused(broker, f"this user may not use the channel {channel.format(db=broker.db)} that "
                                      f"{needed_for} ({exc}); allow it channels, e.g. &* in its ACL rule (at least "
                                      f"&{control} &{RESULT_CHANNEL_PREFIX}*)") from None
    finally:
        pubsub.close()


def refused(broker: BrokerUrl, reason: str) -> BrokerError:
    """The one-line start-up refusal naming the broker (password blanked)."""
    return BrokerError(f"the broker at {broker.redacted} cannot be used: {reason}", broker=broker.redacted,
                       setting="broker")


__all__ = ["BrokerUrl", "broker_refusal", "check_channels", "parse_broker_url", "reach_broker", "redact_broker_url",
           "refused", "scheme_mismatch", "unreachable_errors"]
