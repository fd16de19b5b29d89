"""The web app factory: one FastAPI app serving the Gradio UI, the JSON API, the ComfyUI-compatible routes,
login, authenticated file routes and Prometheus metrics.

``create_app(settings)`` returns ``(app, services)``: every shell shares one engine, one ledger and one batch
queue in one process. Routes are added before Gradio is mounted at ``/`` (the mount answers every path it
is given, so anything added after it would never be reached).

Request flow: :class:`webapp.metrics.HttpMetricsMiddleware` (outermost, so refusals are counted) ->
:class:`webapp.ratelimit.UploadLimitMiddleware` (bodies over ``max_upload_mb`` are refused before they are
read whole) -> the routes. The JSON API and the ComfyUI routes go through one
:class:`webapp.guard.ApiGuard` (bearer tokens when configured, rate limits per user and route, admin roles).

Sign-in: when users are configured (a users file or ``SD35_USERS``), ``/login`` checks the password with
:class:`webapp.auth.UserStore` and sets an HttpOnly session cookie holding a signed token; the Gradio app
accepts only requests carrying a valid one, and the ``/files`` routes that or an API bearer token. Sign-in attempts are rate-limited per
client address by the API's guard (``POST /login``; a 429 page says how long to wait). With no users
configured nobody signs in, and :func:`listen_address` keeps the server on localhost.

Images and zips are served only through ``/files/...`` (never a public cache): paths are resolved inside
the outputs folder and anything outside it is refused.
"""

from __future__ import annotations

import html
import logging
import os
import secrets
import signal
import threading
from collections.abc import Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse

from engine.batch import BatchEvent
from engine.errors import AccessDenied, EngineError
from engine.logs import configure_logging
from engine.runtime import import_model_libraries
from engine.settings import Settings
from engine.store import row_key
from webapp.auth import USER, TokenIssuer, User, UserStore, load_users, signing_key_for, stored_signing_key
from webapp.files import file_response, resolve_inside
from webapp.guard import ApiGuard, RateLimited
from webapp.i18n import PAGE_LANGUAGE_TAGS, gradio_i18n, language_of_request, page_locale_script, text
from webapp.metrics import GENERATION_STATUSES, HttpMetricsMiddleware, Metrics
from webapp.revocation import TokenRevocations
from webapp.ratelimit import RateLimiter, UploadLimit, UploadLimitMiddleware, parse_route_limits

log = logging.getLogger(__name__)

SESSION_COOKIE = "sd35_session"
SESSION_TTL = "12h"
LOCALHOST = "127.0.0.1"
# Where a Hugging Face Space's proxy connects from: the container is reached only through it, over the
# platform's private network. Trusting these (not "*") makes uvicorn take the client address the proxy
# appended to X-Forwarded-For, not whatever the client wrote there itself.
SPACE_PROXY_NETWORKS = "127.0.0.0/8,::1,10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,fc00::/7"


class WebAuth:
    """Who is signed in: checks passwords, issues and reads session cookies.

    ``revocations``: a user's tokens revoked with ``python app.py token revoke --user`` sign their browser
    sessions out too, and signing out revokes the session's own token.
    """

    def __init__(self, users: UserStore, sessions: TokenIssuer, revocations: TokenRevocations | None = None) -> None:
        self.users = users
        self.sessions = sessions
        self.revocations = revocations

    @property
    def required(self) -> bool:
        return self.users.configured

    def sign_in(self, name: str, password: str) -> str | None:
        """A session token for a correct name and password, else None."""
        user = self.users.authenticate(name.strip(), password)
        if user is None:
            return None
        return self.sessions.create(user, ttl=SESSION_TTL, process_local=True)

    def user_of(self, request: Any) -> User | None:
        """The signed-in user of a request (its session cookie), or None. A removed user is signed out."""
        token = request.cookies.get(SESSION_COOKIE)
        if not token:
            return None
        try:
            claims = self.sessions.verify(token)
            if self.revocations is not None:
                self.revocations.check(claims)
            user = self.users.get(claims.sub)
            if user is not None:
                claims.check_credential(user)
        except AccessDenied:
            return None
        return user

    def sign_out(self, request: Any) -> None:
        """Refuse the request's session cookie from now on: a copy of it kept elsewhere is dead too."""
        token = request.cookies.get(SESSION_COOKIE)
        if not token or self.revocations is None:
            return
        try:
            claims = self.sessions.verify(token)
        except AccessDenied:
            return  # expired or not ours: nothing left to refuse
        self.revocations.revoke(claims, claims.sub)

    def username_of(self, request: Any) -> str | None:
        """Gradio's ``auth_dependency``: the user name, or None to refuse the request."""
        user = self.user_of(request)
        return user.name if user is not None else None


class VisitorIdentity:
    """Who a browser is on a public app without users (a Space), for ownership checks only: each browser
    gets a signed cookie naming a ``visitor-...`` of its own, so one visitor cannot cancel or resume
    another's batch. It grants nothing else: visitors are ordinary users, and the cookie's audience is
    not the API's, so it never passes as a bearer token.

    A browser that refuses the cookie (third-party cookies blocked in HF's frame) is named after its page
    session instead: it still cannot touch others' batches, only loses its own after a reload.
    """

    COOKIE = "sd35_visitor"
    TTL = "30d"
    AUDIENCE = "sd35-visitor"

    def __init__(self, secret: str, issuer: str) -> None:
        self.tokens = TokenIssuer(secret, issuer, self.AUDIENCE)

    @classmethod
    def from_settings(cls, settings: Settings) -> VisitorIdentity:
        """Signed with the token key, or the one kept in the data folder, so visitors stay who they were
        across restarts."""
        secret = settings.jwt_secret or stored_signing_key(settings.data_path)[1]
        return cls(secret, settings.jwt_issuer)

    def new_cookie(self) -> str:
        return self.tokens.create(f"visitor-{secrets.token_hex(8)}", USER, ttl=self.TTL, process_local=True)

    def name_in(self, cookies: Mapping[str, str]) -> str | None:
        token = cookies.get(self.COOKIE)
        if not token:
            return None
        try:
            return self.tokens.verify(token).sub
        except AccessDenied:
            return None

    def name_of(self, request: Any) -> str:
        """The visitor behind a Gradio request: the cookie's name, else one for this page session."""
        try:
            name = self.name_in(request.cookies)
        except AttributeError:  # no HTTP request behind it
            name = None
        return name or f"visitor-page-{str(getattr(request, 'session_hash', '') or 'unknown')[:16]}"


SHUTDOWN_GRACE_S = 5  # how long a stop waits for open requests and page streams before ending them
# How long a stop then waits for the running batch to stop between sampler steps (it was told to when the
# signal came) before giving its rows back anyway; a run still going after that stores nothing more.
RUN_STOP_WAIT_S = 5.0
ABANDONED_CHECK_S = 60.0  # how often the app looks for batches a process that stopped left unfinished


class AbandonedBatchWatch:
    """Resumes batches that a process left unfinished (the app killed, a CLI run that died): once at
    start-up, then every ``interval_s``. A batch another live process still works on is left to it, and one
    a full or unwritable disk stopped waits for its next try (:meth:`engine.batch_queue.BatchQueue.ready_to_retry`:
    backed off while the problem lasts, at once when the space is back)."""

    def __init__(self, services: Any, interval_s: float = ABANDONED_CHECK_S) -> None:
        self.services, self.interval_s = services, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="abandoned-batches", daemon=True)

    def start(self) -> None:
        self.check()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def check(self, now: float | None = None) -> list[str]:
        """Submit every abandoned batch not already queued or running here, nor waiting for its disk's next
        try at ``now`` (epoch seconds; the present by default); returns their ids."""
        resumed = []
        queue = self.services.queue
        for batch_id in self.services.runner.abandoned_batches():
            progress = queue.status(batch_id)
            if progress is not None and progress.state in ("queued", "running"):
                continue
            if not queue.ready_to_retry(batch_id, now):
                continue
            if progress is None or progress.state != "waiting_for_storage":  # a waiting one logs when it fails again
                log.info("resuming batch %s, left unfinished by a process that stopped", batch_id)
            self.services.queue.submit(batch_id)
            resumed.append(batch_id)
        return resumed

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check()
            except EngineError:  # the ledger busy or gone for a moment: the next round tries again
                log.exception("checking for abandoned batches failed")


def session_issuer(settings: Settings) -> TokenIssuer:
    """Sessions signed with the configured key (they survive restarts), else with a per-process key."""
    if settings.jwt_secret:
        return TokenIssuer.from_settings(settings)
    return TokenIssuer.for_process(settings.jwt_issuer, settings.jwt_audience)


def api_guard(settings: Settings, users: UserStore, ledger: Any = None) -> ApiGuard:
    """The guard of the JSON API, the ComfyUI routes and ``POST /login``: tokens only when a signing key is
    configured, minus those revoked in ``ledger`` (when given); ``route_rate_limits`` overrides
    ``rate_limit_per_minute`` route by route."""
    tokens = TokenIssuer.from_settings(settings) if settings.jwt_secret else None
    limiter = RateLimiter(int(settings.rate_limit_per_minute), overrides=parse_route_limits(settings.route_rate_limits))
    revocations = TokenRevocations(ledger) if tokens is not None and ledger is not None else None
    return ApiGuard(users, tokens, limiter, revocations)


class BatchMetrics:
    """Keeps :class:`Metrics` current: finished rows from batch events, gauges from live state.

    :meth:`on_batch_event` is a :class:`engine.batch_queue.BatchQueue` listener (it runs on the queue thread);
    :meth:`refresh` reads the queue and the model cache, and runs before every scrape as well, so gauges
    are right even when nothing happened since the last event.
    """

    def __init__(self, metrics: Metrics, services: Any) -> None:
        self.metrics = metrics
        self.services = services
        self._loads_seen: set[tuple[str, str, float]] = set()
        self._running: set[str] = set()
        self._lock = threading.Lock()

    def on_batch_event(self, event: BatchEvent) -> None:
        with self._lock:
            if event.kind == "batch_started":
                self._running.add(event.batch_id)
            elif event.kind == "batch_done":
                self._running.discard(event.batch_id)
        if event.kind in ("row_done", "row_failed") and event.row_number is not None:
            row = self.services.ledger.get_generation(row_key(event.batch_id, event.row_number))
            if row is not None and row.status in GENERATION_STATUSES:
                self.metrics.observe_generation(row.status, row.duration_s, row.sampler_s, row.steps)
        # Rows that end without a row event: refused at validation (told once, on the first start) and
        # cancelled while their batch still waited in the queue.
        for _ in range(event.skipped):
            self.metrics.observe_generation("skipped")
        for _ in range(event.cancelled):
            self.metrics.observe_generation("cancelled")
        # batch_queued arrives on the submitting request's thread: refreshing there would make a submission
        # wait for the model cache (a model loading holds it for minutes).
        if event.kind not in ("step", "batch_queued"):
            self.refresh()

    def refresh(self) -> None:
        queue = self.services.queue
        waiting = 0
        for batch_id in queue.queued():
            waiting += self.services.ledger.batch_summary(batch_id)["counts"].get("queued", 0)
        with self._lock:
            # A batch that died with an exception never sends batch_done; the queue knows it stopped.
            running = [p for p in map(queue.status, self._running) if p is not None and p.state == "running"]
            self._running = {p.batch_id for p in running}
        waiting += sum(p.remaining for p in running)
        self.metrics.set_queue_depth(waiting)
        self.metrics.set_batches_running(len(running))
        loaded = self.services.engine.models.loaded()
        self.metrics.set_resident_models(len(loaded))
        with self._lock:
            fresh = []
            for entry in loaded:
                key = (entry["kind"], entry["name"], float(entry["load_seconds"]))
                if key not in self._loads_seen:
                    self._loads_seen.add(key)
                    fresh.append(entry)
        for entry in fresh:
            self.metrics.observe_model_load(entry["name"], float(entry["load_seconds"]))


def on_space(environ: Mapping[str, str] | None = None) -> bool:
    """Running as a Hugging Face Space (``SPACE_ID`` set): public, behind HF's HTTPS proxy, in an iframe."""
    env = os.environ if environ is None else environ
    return bool(env.get("SPACE_ID"))


def public_without_users(users: UserStore, environ: Mapping[str, str] | None = None) -> bool:
    """A Hugging Face Space (``SPACE_ID``) serves whoever reaches it; without users nobody signs in."""
    return not users.configured and on_space(environ)


def uvicorn_options(settings: Settings, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """How uvicorn reads proxy headers: ``X-Forwarded-Proto`` and ``-For`` are believed from the peers in
    the ``forwarded_allow_ips`` setting; by default from loopback only on a workstation (uvicorn's own
    default, ``FORWARDED_ALLOW_IPS`` included) and from :data:`SPACE_PROXY_NETWORKS` on a Space, whose HTTPS
    proxy would otherwise make every request look like plain http from one address."""
    env = os.environ if environ is None else environ
    trusted = settings.forwarded_allow_ips.strip()
    if not trusted and on_space(env):
        trusted = SPACE_PROXY_NETWORKS
    options: dict[str, Any] = {"proxy_headers": True}
    if trusted:
        options["forwarded_allow_ips"] = trusted
    return options


def session_cookie_options(request: Any, space: bool) -> dict[str, Any]:
    """Attributes of the session cookie. A Space is shown inside huggingface.co's page, a cross-site iframe
    where browsers send only ``SameSite=None; Secure`` cookies (what Gradio sets there too; HF serves the
    Space over https). Elsewhere ``Lax``, Secure when the request came over https (through a trusted
    proxy: see :func:`uvicorn_options`)."""
    if space:
        return {"httponly": True, "samesite": "none", "secure": True}
    return {"httponly": True, "samesite": "lax", "secure": request.url.scheme == "https"}


async def _with_page_locale(response: Any, lang: str) -> Any:
    """Gradio's page with :func:`webapp.ui.page_locale_script` for ``lang`` first in its ``<head>``."""
    if response.status_code != 200 or not response.headers.get("content-type", "").startswith("text/html"):
        return response
    body = b"".join([chunk async for chunk in response.body_iterator])
    script = page_locale_script(lang).encode()
    body = body.replace(b"<head>", b"<head>" + script, 1)
    page = Response(content=body, status_code=response.status_code)
    page.raw_headers = [(name, value) for name, value in response.raw_headers if name.lower() != b"content-length"]
    page.raw_headers.append((b"content-length", str(len(body)).encode()))
    return page


def sent_from_another_site(request: Any) -> bool:
    """True for a request a browser sent on behalf of another site's page (``Sec-Fetch-Site: cross-site``):
    a form there posting to ``/login`` would sign the visitor in as the form's author (their sheets and
    photos then go to that account), an image pointing at ``/logout`` would sign them out. The header is
    set by the browser, so no page can forge it; clients that send none (scripts, older browsers) pass."""
    return request.headers.get("sec-fetch-site", "").strip().lower() == "cross-site"


def listen_address(settings: Settings, users: UserStore, environ: Mapping[str, str] | None = None) -> tuple[str, int, str | None]:
    """``(host, port, note)``. Without users, a workstation listens on localhost only (``note`` says so).

    On a Hugging Face Space (``SPACE_ID`` set) the Space's own access rules apply and the host is kept.
    """
    env = os.environ if environ is None else environ
    if users.configured or env.get("SPACE_ID"):
        return settings.host, int(settings.port), None
    if settings.host not in {LOCALHOST, "localhost", "::1"}:
        note = (
            f"no users are configured, so the web app listens on {LOCALHOST} only instead of {settings.host}; "
            "configure a users file (SD35_USERS_FILE) to serve the network"
        )
        return LOCALHOST, int(settings.port), note
    return settings.host, int(settings.port), None


def _login_page(lang: str, error: str | None = None, open_in_tab: bool = False) -> str:
    """The sign-in form in ``lang``, with ``error`` (already in ``lang``) above the fields when given.
    ``open_in_tab``: also a link that opens the app outside the frame it is shown in, where its cookie is
    first-party."""
    t = lambda key: html.escape(text(key, lang))  # noqa: E731
    error = f'<p class="error" role="alert">{html.escape(error)}</p>' if error else ""
    if open_in_tab:
        error += f'<p><a id="open-in-tab" href="/login" target="_blank" rel="noopener">{t("login.open_in_tab")}</a></p>'
    return f"""<!doctype html>
<html lang="{PAGE_LANGUAGE_TAGS[lang]}"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{t("login.title")} · {t("app.title")}</title>
<style>
body {{ font-family: system-ui, "Noto Sans CJK SC", sans-serif; background: #f4f5f7; margin: 0; }}
main {{ max-width: 22rem; margin: 12vh auto; background: #fff; padding: 2rem; border-radius: 10px;
        box-shadow: 0 2px 12px rgba(0,0,0,.08); }}
h1 {{ font-size: 1.3rem; margin: 0 0 1.2rem; }} label {{ display: block; margin: .8rem 0 .3rem; }}
input {{ width: 100%; box-sizing: border-box; padding: .55rem; font-size: 1rem; border: 1px solid #bbb;
         border-radius: 6px; }}
button {{ margin-top: 1.2rem; width: 100%; padding: .6rem; font-size: 1rem; border: 0; border-radius: 6px;
          background: #c2410c; color: #fff; cursor: pointer; }}
.error {{ color: #b91c1c; }}
</style></head>
<body><main>
<h1>{t("app.title")}</h1>
<form method="post" action="/login">
{error}
<label for="username">{t("login.username")}</label>
<input id="username" name="username" autocomplete="username" required autofocus>
<label for="password">{t("login.password")}</label>
<input id="password" name="password" type="password" autocomplete="current-password" required>
<button type="submit">{t("login.submit")}</button>
</form></main></body></html>"""


WARM_UP_JOIN_S = 120.0  # how long shutting down waits for a warm-up still running


def start_warm_up(engine: Any) -> threading.Thread:
    """Load the default model and sample one step on a background thread, so start-up does not wait for it
    and the first user's row does not pay for it.

    While it runs ``engine.warming_up`` is True (the web app says so); GPU work takes turns on the engine,
    so a batch submitted meanwhile waits for the warm-up and then runs. A model that fails to load is
    logged here and reported again by the first row that needs it.
    """

    def warm_up() -> None:
        try:
            result = engine.warm_up()
        except EngineError as exc:
            log.error("model warm-up failed: %s", exc.message)
            return
        log.info("model warmed up: %s", result)

    thread = threading.Thread(target=warm_up, name="model-warm-up", daemon=True)
    thread.start()
    return thread


def create_app(
    settings: Settings,
    engine: Any = None,
    *,
    users: UserStore | None = None,
    services: Any = None,
):
    """Build the FastAPI app with the Gradio UI mounted at ``/``; returns ``(app, services)``.

    ``engine`` (e.g. a test's demo engine) and ``services`` (an already built
    :class:`engine.services.Services`) may be passed in; ``users`` defaults to :func:`load_users`.
    The batch queue thread starts with the app and stops when it shuts down; the model warms up on a
    background thread as the app starts (:func:`start_warm_up`).
    """
    import gradio as gr

    from engine.services import build_services
    from webapp.api import answer_unknown_api_paths, api_router, describe_api_errors, install_error_handlers
    from webapp.comfy_api import comfy_router
    from webapp.ui import CSS, build_ui, page_head, page_theme

    services = services or build_services(settings, engine)
    users = users if users is not None else load_users(settings)
    settings, key_note = signing_key_for(settings, users)
    if key_note:
        log.info(key_note)
    space = on_space()
    if space and not Path("/data").is_dir():
        log.warning("this Space has no persistent storage (/data): the ledger, images, uploads and signing key "
                    "live in %s, on the Space's own disk, and are lost when it restarts or is rebuilt; enable "
                    "persistent storage in the Space's settings", Path(settings.data_dir).resolve())
    guard = api_guard(settings, users, services.ledger)
    visitors = None
    if public_without_users(users):
        guard.anonymous_role = USER
        visitors = VisitorIdentity.from_settings(settings)
        log.warning("no users are configured and this app is public (a Space): everyone uses it without "
                    "signing in, as an ordinary user; admin actions are off until users are configured "
                    "(SD35_USERS or SD35_USERS_FILE)")
    if settings.jwt_secret and not users.configured and (space or settings.forwarded_allow_ips.strip()):
        # Tokens name API callers only: nobody signs in to the page, so it cannot ask for them.
        log.warning("a token signing key is configured but no users, and this app is reachable beyond this "
                    "machine (%s): the JSON API and the ComfyUI routes ask for bearer tokens, but the web page, "
                    "its Gradio API (/gradio_api/...) and /files are open to whoever reaches it; configure users "
                    "(SD35_USERS or SD35_USERS_FILE) to close them",
                    "a Space" if space else "behind a proxy, forwarded_allow_ips")
    auth = WebAuth(users, session_issuer(settings), guard.revocations or TokenRevocations(services.ledger))
    upload_limit = UploadLimit.from_megabytes(settings.max_upload_mb)
    metrics = Metrics()
    batch_metrics = BatchMetrics(metrics, services)
    services.queue.listeners.append(batch_metrics.on_batch_event)
    outputs = Path(settings.outputs_path)

    @asynccontextmanager
    async def lifespan(_app):
        import_model_libraries()  # before any thread of ours imports them (see its docstring)
        services.queue.start()
        # RELIABILITY: a batch whose process died resumes, now and whenever such a process goes away later
        watch = AbandonedBatchWatch(services)
        watch.start()
        # A coordinator (rows go to GPU workers over the broker) never samples: nothing to warm up.
        warming = None if settings.broker else start_warm_up(services.engine)
        try:
            yield
        finally:
            watch.stop()
            # The running batch stops between sampler steps before its rows are given back: a second server
            # on the same data folder may claim them the moment they are, and must never find this one
            # still writing them.
            if not services.close(wait_s=RUN_STOP_WAIT_S):
                log.warning("the running batch did not stop within %g s; its rows are given back now and "
                            "nothing it finishes from now on is stored", RUN_STOP_WAIT_S)
            if warming is not None:
                # A process must not exit while the warm-up is inside torch (the runtime aborts).
                warming.join(timeout=WARM_UP_JOIN_S)
            # Rows this process claimed are given back, so the next start resumes them and none is
            # blamed for a crash that did not happen.
            services.runner.release_claims()
            services.ledger.checkpoint()  # the ledger file complete by itself while the app is stopped

    app = FastAPI(title="SD3.5 batch images", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.services = services
    app.state.auth = auth
    app.state.guard = guard
    app.state.metrics = metrics
    install_error_handlers(app)  # every library error, AccessDenied included, answered in one place

    @app.middleware("http")
    async def page_load(request: Request, call_next):
        # Loads of the page itself: a signed-out browser goes to the login form (Gradio would answer a bare
        # 401), the page is told its language (_with_page_locale), and a visitor gets a cookie.
        if request.method != "GET" or request.url.path not in {"/", ""}:
            return await call_next(request)
        if auth.required and auth.user_of(request) is None:
            return RedirectResponse("/login", status_code=303)
        response = await _with_page_locale(await call_next(request), language_of_request(request))
        if visitors is not None and visitors.name_in(request.cookies) is None:
            response.set_cookie(visitors.COOKIE, visitors.new_cookie(), max_age=30 * 86400,
                                **session_cookie_options(request, space))
        return response

    @app.get("/login", response_class=HTMLResponse)
    def login_form(request: Request, failed: int = 0, cookie_refused: int = 0):
        if not auth.required:
            return RedirectResponse("/", status_code=303)
        lang = language_of_request(request)
        if cookie_refused:
            return HTMLResponse(_login_page(lang, text("login.cookie_refused", lang), open_in_tab=True))
        return HTMLResponse(_login_page(lang, text("login.failed", lang) if failed else None))

    @app.get("/signed-in")
    def signed_in(request: Request):
        # Where a sign-in lands: a browser that did not keep the cookie it was just given (third-party
        # cookies blocked in a Space's huggingface.co frame) would otherwise be sent back to an empty form
        # without a word. It is told why, with a link that opens the app in a tab of its own.
        if auth.required and auth.user_of(request) is None:
            return RedirectResponse("/login?cookie_refused=1", status_code=303)
        return RedirectResponse("/", status_code=303)

    @app.post("/login")
    def login(request: Request, username: str = Form(""), password: str = Form("")):
        lang = language_of_request(request)
        try:  # every attempt costs a password hash: guessing is limited per client address, like /api/token
            guard.admit_address(request.client.host if request.client else "unknown", "POST /login")
        except RateLimited as refused:
            message = text("login.rate_limited", lang, seconds=refused.retry_after_s)
            return HTMLResponse(_login_page(lang, message), status_code=429, headers=refused.headers)
        if sent_from_another_site(request):
            return HTMLResponse(_login_page(lang, text("login.cross_site", lang)), status_code=403)
        token = auth.sign_in(username, password) if auth.required else None
        if token is None:
            return HTMLResponse(_login_page(lang, text("login.failed", lang)), status_code=401)
        response = RedirectResponse("/signed-in", status_code=303)
        response.set_cookie(SESSION_COOKIE, token, max_age=12 * 3600, **session_cookie_options(request, space))
        return response

    @app.get("/logout")
    def logout(request: Request):
        if sent_from_another_site(request):  # another site's link or image: nobody asked to sign out
            return RedirectResponse("/", status_code=303)
        auth.sign_out(request)
        response = RedirectResponse("/login" if auth.required else "/", status_code=303)
        # With the attributes it was set with: a browser in a cross-site frame ignores a Lax deletion.
        response.delete_cookie(SESSION_COOKIE, **session_cookie_options(request, space))
        return response

    def may_download(request: Request, route: str) -> dict[str, str]:
        """A browser's session cookie, or the API's bearer token (the links the API hands out, such as a
        batch's ``recent_images``, must work with the token that fetched them: revocation and rate limits
        as on the API). Returns the rate-limit headers for the answer."""
        authorization = request.headers.get("authorization")
        if authorization and guard.auth_required:
            return guard.admit(guard.identify(authorization), route)
        if auth.required and auth.user_of(request) is None:
            raise AccessDenied("sign in, or send an API bearer token, to download files", status=401,
                               reason="not_authenticated")
        return {}

    @app.get("/files/zip/{batch_id}")
    def batch_zip(batch_id: str, request: Request):
        limits = may_download(request, "GET /files/zip/{batch_id}")
        if services.ledger.get_batch(batch_id) is None:
            raise AccessDenied(f"no batch {batch_id!r}", status=404, reason="not_found", batch_id=batch_id)
        # Streamed as it is built: a batch of thousands of images never sits in memory or on disk twice.
        return StreamingResponse(
            services.runner.zip_stream(batch_id),
            media_type="application/zip",
            headers={"Content-Disposition": f'attachment; filename="{batch_id}.zip"', **limits},
        )

    @app.get("/files/{relative:path}")
    def output_file(relative: str, request: Request):
        limits = may_download(request, "GET /files/{relative:path}")
        response = file_response(resolve_inside(outputs, relative))
        response.headers.update(limits)
        return response

    @app.get("/metrics", include_in_schema=False)
    def prometheus_metrics(request: Request):
        # Like every route, behind a bearer token once auth is configured (Prometheus sends one with
        # `authorization: {credentials: ...}`); not rate-limited, a scraper calls it on a schedule.
        guard.identify(request.headers.get("authorization"))
        batch_metrics.refresh()
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    app.include_router(api_router(services, guard, upload_limit))
    comfy = comfy_router(services, guard, upload_limit)
    app.include_router(comfy)
    # ComfyUI serves every route under /api as well, and newer clients use that form.
    app.include_router(comfy, prefix="/api", include_in_schema=False)
    app.state.comfy = comfy.bridge
    answer_unknown_api_paths(app)  # after every /api route, before Gradio takes whatever is left
    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:  # built once, on the first request for it
        if app.openapi_schema is None:
            app.openapi_schema = describe_api_errors(default_openapi(), guard.auth_required)
        return app.openapi_schema

    app.openapi = openapi

    # Added last = outermost: the metrics middleware sees the upload limit's 413s.
    app.add_middleware(UploadLimitMiddleware, limit=upload_limit)
    app.add_middleware(HttpMetricsMiddleware, metrics=metrics)

    blocks = build_ui(services, settings, users=users, anonymous_role=guard.anonymous_role,
                      visitor_of=visitors.name_of if visitors is not None else None)
    gr.mount_gradio_app(
        app,
        blocks,
        path="/",
        auth_dependency=auth.username_of if auth.required else None,
        i18n=gradio_i18n(),
        ssr_mode=False,
        footer_links=[],
        max_file_size=f"{int(settings.max_upload_mb)}mb",
        show_error=True,
        css=CSS,
        head=page_head(),
        theme=page_theme(),
        # example images only (shipped templates and those uploaded)
        allowed_paths=[str(settings.templates_path.resolve()), str(settings.user_templates_path.resolve())],
    )
    # Gradio checks that a file input's path is one a user uploaded (not any file of the server's, named by
    # a caller of /gradio_api/) only in an app that "has launched", which launch() records and a mounted app
    # never does. Without it every signed-in user could have the server read its own files as a sheet,
    # photos zip or template.
    blocks.has_launched = True

    return app, services


# What an open page asks for by itself, every second while it lives (its progress timer), and the stream that
# keeps it live: in uvicorn's access log, two lines a second per open tab, about 170,000 a day each, idle.
PAGE_POLLING_PATHS = ("/gradio_api/queue/join", "/gradio_api/queue/data", "/gradio_api/heartbeat/")


class PagePollingFilter(logging.Filter):
    """Keeps the access log for requests people and scripts make: drops the lines of the page's own polling
    (:data:`PAGE_POLLING_PATHS`) that were answered; a refused or failed one (4xx, 5xx) is still logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        # uvicorn's access record: (client address, method, path with query, HTTP version, status code)
        if not isinstance(args, tuple) or len(args) != 5:
            return True
        path, status = str(args[2]), args[4]
        return not (path.startswith(PAGE_POLLING_PATHS) and isinstance(status, int) and status < 400)


def quiet_page_polling() -> PagePollingFilter:
    """Install :class:`PagePollingFilter` on uvicorn's access log (once); returns it."""
    access = logging.getLogger("uvicorn.access")
    installed = next((f for f in access.filters if isinstance(f, PagePollingFilter)), None)
    if installed is None:
        installed = PagePollingFilter()
        access.addFilter(installed)
    return installed


def _stopping_server(config: Any, services: Any) -> Any:
    """A uvicorn server whose stop signal also tells the running batch to stop between sampler steps at
    once, while open requests get their grace period; the app's shutdown then waits for it
    (``RUN_STOP_WAIT_S``) before giving its rows back."""
    import uvicorn

    class StoppingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            # A signal handler must not wait for a lock the interrupted code may hold: a thread does it.
            threading.Thread(target=services.queue.stop, name="stop-batches", daemon=True).start()
            super().handle_exit(sig, frame)

    return StoppingServer(config)


@contextmanager
def _hangup_stops(server: Any) -> Iterator[None]:
    """SIGHUP stops ``server`` as SIGTERM does (where signals can be set: the main thread, not Windows)."""
    hangup = getattr(signal, "SIGHUP", None)
    if hangup is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(hangup, lambda _signum, frame: server.handle_exit(signal.SIGTERM, frame))
    try:
        yield
    finally:
        signal.signal(hangup, previous)


def serve(settings: Settings, engine: Any = None, environ: Mapping[str, str] | None = None) -> None:
    """Run the web app with uvicorn on the address :func:`listen_address` picks (``python app.py``).

    Logs go to stderr in ``settings.log_format`` (JSON lines or the console format), uvicorn's own
    included: it is started without a logging config of its own so its records reach the same handler.
    """
    import uvicorn

    configure_logging(settings.log_format, "INFO")
    quiet_page_polling()
    users = load_users(settings, environ)
    host, port, note = listen_address(settings, users, environ)
    if note:
        log.warning(note)
    app, services = create_app(settings, engine, users=users)
    log.info(services.engine.describe_model_banner())
    log.info("serving on http://%s:%d", host, port)
    # An open page holds a Gradio heartbeat stream that never ends by itself: without a bound, a stop
    # (systemd, docker stop, a Space restart) would wait for every browser tab to close, until the
    # supervisor kills the process, and the rows it was sampling then count as crashes.
    config = uvicorn.Config(app, host=host, port=port, log_config=None, log_level="info",
                            timeout_graceful_shutdown=SHUTDOWN_GRACE_S, **uvicorn_options(settings, environ))
    server = _stopping_server(config, services)
    # uvicorn stops gracefully on SIGINT and SIGTERM; a hangup (the terminal or SSH session that started
    # the server closed) would otherwise kill it outright, leaving its rows claimed. Stop the same way.
    with _hangup_stops(server):
        server.run()
    if not server.started:  # the port taken, say: uvicorn has logged why
        raise SystemExit(3)


__all__ = [
    "SESSION_COOKIE",
    "BatchMetrics",
    "VisitorIdentity",
    "WebAuth",
    "api_guard",
    "create_app",
    "listen_address",
    "on_space",
    "serve",
    "session_cookie_options",
    "session_issuer",
    "start_warm_up",
    "uvicorn_options",
]

