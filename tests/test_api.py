"""The JSON API on a running server (uvicorn on a localhost port) with tokens, roles, rate and upload limits,
over the real library: the demo model, a real ledger, the shipped templates (copied to a scratch folder)."""

from __future__ import annotations

import base64
import io
import json
import shutil
import socket
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import jwt
import pytest

from engine.settings import load_settings
from live_server import live_server
from webapp.auth import TokenIssuer, add_user, load_users

ROOT = Path(__file__).resolve().parents[1]
SECRET = "test-signing-key-" + "k" * 40
RATE_LIMIT = 40
# product_shot's smallest image; 2 steps keep a row well under a second on the demo model.
SMALL = {"width": 64, "height": 64, "steps": 2}


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from engine.runtime import Engine

    return Engine(load_settings({"data_dir": str(tmp_path_factory.mktemp("engine"))}, environ={}))


@pytest.fixture(scope="module")
def server(tmp_path_factory, engine):
    from webapp.server import create_app

    root = tmp_path_factory.mktemp("api")
    shutil.copytree(ROOT / "templates", root / "templates")  # a scratch copy of the shipped templates
    users_file = root / "users.json"
    for name, role in (("alice", "admin"), ("bob", "user"), ("carol", "user"), ("dave", "user"), ("erin", "user")):
        add_user(users_file, name, f"{name}-pass", role)
    settings = load_settings(
        {
            "data_dir": str(root / "data"),
            "templates_dir": str(root / "templates"),
            "users_file": str(users_file),
            "jwt_secret": SECRET,
            "rate_limit_per_minute": RATE_LIMIT,
            "max_upload_mb": 1,
            "row_timeout_s": 60.0,
        },
        environ={},
    )
    app, services = create_app(settings, engine)
    tokens = TokenIssuer.from_settings(settings)
    with live_server(app) as url:
        yield SimpleNamespace(url=url, services=services, settings=settings, tokens=tokens)


def token_for(server, name: str) -> str:
    """A token for a user of the users file, tied to their password as every token the server issues is."""
    return server.tokens.create(load_users(server.settings).get(name))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def bob(server):
    with httpx.Client(base_url=server.url, headers=bearer(token_for(server, "bob")), timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def alice(server):
    with httpx.Client(base_url=server.url, headers=bearer(token_for(server, "alice")), timeout=60) as c:
        yield c


def client_of(server, name: str) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers=bearer(token_for(server, name)), timeout=60)


# Users of their own for the tests that post many batches: rate limits count per user and route.
@pytest.fixture
def carol(server):
    with client_of(server, "carol") as c:
        yield c


@pytest.fixture
def dave(server):
    with client_of(server, "dave") as c:
        yield c


@pytest.fixture
def erin(server):
    with client_of(server, "erin") as c:
        yield c


@pytest.fixture
def anonymous(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def finished(server, batch_id: str):
    progress = server.services.queue.wait(batch_id, timeout=60)
    assert progress is not None and progress.state not in {"queued", "running"}, progress
    return progress


def error_of(answer: httpx.Response) -> dict:
    return answer.json()["error"]


class _AnyText(str):
    """Equal to any non-empty string: for messages worded by a library the test does not own."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and bool(other)

    __hash__ = str.__hash__


ANY_TEXT = _AnyText()


# ----------------------------------------------------------------------------------------------- tokens


def test_token_for_a_password_and_refusals(server, anonymous):
    answer = anonymous.post("/api/token", json={"username": "alice", "password": "alice-pass", "ttl": "1h"})
    assert answer.status_code == 200 and answer.json()["role"] == "admin"
    token = answer.json()["access_token"]
    assert anonymous.get("/api/templates", headers=bearer(token)).status_code == 200

    wrong = anonymous.post("/api/token", json={"username": "alice", "password": "nope"})
    assert wrong.status_code == 401 and error_of(wrong)["details"]["reason"] == "bad_credentials"


def lifetime(token: str) -> int:
    payload = jwt.decode(token, options={"verify_signature": False})
    return payload["exp"] - payload["iat"]


def test_token_lifetimes_are_capped_by_max_token_ttl(anonymous):
    login = {"username": "bob", "password": "bob-pass"}
    assert lifetime(anonymous.post("/api/token", json=login).json()["access_token"]) == 24 * 3600
    assert lifetime(anonymous.post("/api/token", json={**login, "ttl": "7d"}).json()["access_token"]) == 7 * 86400
    for ttl in ("8d", "36500d", "9999999999d"):
        refused = anonymous.post("/api/token", json={**login, "ttl": ttl})
        assert refused.status_code == 400, (ttl, refused.text)
        assert ttl in error_of(refused)["message"] and error_of(refused)["details"]["max_ttl"] == "7d"


@pytest.mark.parametrize("bad", ["forever", "5000d"])
def test_a_bad_max_token_ttl_stops_the_app_at_start_up(bad):
    from engine.errors import EngineError
    from webapp.api import api_router
    from webapp.auth import UserStore
    from webapp.ratelimit import UploadLimit
    from webapp.server import api_guard

    settings = load_settings({"max_token_ttl": bad}, environ={})
    with pytest.raises(EngineError, match=f"setting max_token_ttl: .*'{bad}'"):
        api_router(SimpleNamespace(settings=settings), api_guard(settings, UserStore([])), UploadLimit(1024))


def test_tokens_act_with_the_users_current_role_and_die_with_the_user(server, anonymous):
    # A token says admin, but the users store says bob is a user: the store wins.
    promoted = bearer(jwt.encode(claims(server, role="admin"), SECRET, algorithm="HS256"))
    assert anonymous.get("/api/templates", headers=promoted).status_code == 200
    refused = anonymous.post("/api/system/model", json={"checkpoint": "sd35_demo_tiny"}, headers=promoted)
    assert refused.status_code == 403 and error_of(refused)["details"]["action"] == "switch_model"
    # A validly signed token not tied to bob's password (a bare name's, or one from before tokens carried
    # the credential) is refused: it would outlive every password reset.
    untied = {k: v for k, v in claims(server).items() if k != "cred"}
    refused = anonymous.get("/api/templates", headers=bearer(jwt.encode(untied, SECRET, algorithm="HS256")))
    assert refused.status_code == 401 and error_of(refused)["details"]["reason"] == "credentials_changed"
    # A validly signed token of a user who is not (or no longer) in the store is refused.
    gone = anonymous.get("/api/templates", headers=bearer(server.tokens.create("mallory", "admin")))
    assert gone.status_code == 401 and error_of(gone)["details"]["reason"] == "unknown_user"


def test_the_users_file_is_followed_without_a_restart(server, anonymous):
    import subprocess
    import sys

    users_file = server.settings.users_file
    # A user added while the server runs signs in at once ...
    add_user(users_file, "frank", "frank-pass", "user")
    answer = anonymous.post("/api/token", json={"username": "frank", "password": "frank-pass"})
    assert answer.status_code == 200, answer.text
    token = answer.json()["access_token"]
    assert anonymous.get("/api/templates", headers=bearer(token)).status_code == 200
    with httpx.Client(base_url=server.url, timeout=30) as browser:
        assert browser.post("/login", data={"username": "frank", "password": "frank-pass"}).status_code == 303
        session = browser.cookies.get("sd35_session")
    outputs = Path(server.settings.outputs_path)
    with httpx.Client(base_url=server.url, timeout=30, cookies={"sd35_session": session}) as browser:
        assert browser.get("/", follow_redirects=False).status_code == 200

        # ... and once removed, their session and their tokens stop working on the next request.
        removed = subprocess.run([sys.executable, "app.py", "users", "remove", "frank", "--file", str(users_file)],
                                 cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert removed.returncode == 0, removed.stderr
        assert "frank" in removed.stdout
        assert browser.get("/", follow_redirects=False).status_code == 303  # to the sign-in form
        assert browser.get("/gradio_api/info").status_code == 401
        if any(outputs.rglob("*.png")):
            image = "/files/" + next(outputs.rglob("*.png")).relative_to(outputs).as_posix()
            assert browser.get(image).status_code == 401
    gone = anonymous.get("/api/templates", headers=bearer(token))
    assert gone.status_code == 401 and error_of(gone)["details"]["reason"] == "unknown_user"
    refused = anonymous.post("/api/token", json={"username": "frank", "password": "frank-pass"})
    assert refused.status_code == 401

    # A new frank (the name added back) is not the old one: what the old one held stays dead.
    add_user(users_file, "frank", "another-pass", "admin")
    revived = anonymous.get("/api/templates", headers=bearer(token))
    assert revived.status_code == 401 and error_of(revived)["details"]["reason"] == "credentials_changed"
    with httpx.Client(base_url=server.url, timeout=30, cookies={"sd35_session": session}) as browser:
        assert browser.get("/", follow_redirects=False).status_code == 303
    fresh = anonymous.post("/api/token", json={"username": "frank", "password": "another-pass"}).json()
    assert anonymous.get("/api/templates", headers=bearer(fresh["access_token"])).status_code == 200


def test_an_unreadable_users_file_keeps_the_users_loaded_before(server, bob):
    users_file = Path(server.settings.users_file)
    saved = users_file.read_bytes()
    try:
        users_file.write_text('{"users": [', encoding="utf-8")  # half-saved by an editor
        assert bob.get("/api/templates").status_code == 200
        users_file.write_text('{"users": []}', encoding="utf-8")  # everyone removed: locked, never open
        assert bob.get("/api/templates").status_code == 401
        with httpx.Client(base_url=server.url, timeout=30) as nobody:
            assert nobody.get("/api/templates").status_code == 401
            assert nobody.get("/", follow_redirects=False).status_code == 303
    finally:
        users_file.write_bytes(saved)
    assert bob.get("/api/templates").status_code == 200


def test_an_admin_revokes_one_token_and_only_that_one_stops_working(server, alice, bob, anonymous):
    leaked, other = token_for(server, "dave"), token_for(server, "dave")
    assert anonymous.get("/api/templates", headers=bearer(leaked)).status_code == 200
    refused = bob.post("/api/token/revoke", json={"token": leaked})
    assert refused.status_code == 403 and error_of(refused)["details"]["action"] == "revoke_tokens"
    answer = alice.post("/api/token/revoke", json={"token": leaked})
    assert answer.status_code == 200 and answer.json()["user"] == "dave"
    gone = anonymous.get("/api/templates", headers=bearer(leaked))
    assert gone.status_code == 401 and error_of(gone)["details"]["reason"] == "revoked"
    assert anonymous.get("/api/templates", headers=bearer(other)).status_code == 200
    # The ComfyUI routes share the guard.
    assert anonymous.get("/queue", headers=bearer(leaked)).status_code == 401
    both = alice.post("/api/token/revoke", json={"token": other, "user": "dave"})
    assert both.status_code == 400 and error_of(both)["details"]["reason"] == "bad_request"


@pytest.mark.parametrize(("body", "status", "reason"), [
    ({"user": ["bob"]}, 400, "bad_request"),
    ({"user": "nobody"}, 404, "not_found"),
    ({"token": 12345}, 400, "bad_request"),
    ({"token": "garbage"}, 400, "token_malformed"),
])
def test_revoking_something_that_is_not_there_is_a_clear_refusal_not_a_success(server, alice, bob, body, status, reason):
    answer = alice.post("/api/token/revoke", json=body)
    assert answer.status_code == status, answer.text
    assert error_of(answer)["details"]["reason"] == reason
    assert "WWW-Authenticate" not in answer.headers  # the admin's own token is fine
    assert bob.get("/api/templates").status_code == 200  # and nothing was revoked


def test_revoking_an_expired_token_says_so_with_400(server, alice):
    past = int(time.time()) - 7200
    expired = jwt.encode(claims(server, sub="dave", iat=past, nbf=past, exp=past + 600), SECRET, algorithm="HS256")
    answer = alice.post("/api/token/revoke", json={"token": expired})
    assert answer.status_code == 400 and error_of(answer)["details"]["reason"] == "token_expired"


def test_the_cli_revokes_every_token_of_a_user_in_the_running_server(server, anonymous):
    import subprocess
    import sys

    before = token_for(server, "erin")
    assert anonymous.get("/api/templates", headers=bearer(before)).status_code == 200
    env = {"SD35_DATA_DIR": server.settings.data_dir, "SD35_JWT_SECRET": SECRET, "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "app.py", "token", "revoke", "--user", "erin"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "erin" in done.stdout
    gone = anonymous.get("/api/templates", headers=bearer(before))
    assert gone.status_code == 401 and error_of(gone)["details"]["reason"] == "revoked"
    time.sleep(1.1)  # tokens carry whole seconds: the cutoff is the second after the revocation
    after = token_for(server, "erin")
    assert anonymous.get("/api/templates", headers=bearer(after)).status_code == 200


def test_http_routes_refuse_a_token_in_the_query_string(server, anonymous):
    token = token_for(server, "bob")
    for path in ("/api/templates", "/api/batches"):
        refused = anonymous.get(path, params={"token": token})
        assert refused.status_code == 401 and error_of(refused)["details"]["reason"] == "missing_token"


def claims(server, **changes) -> dict:
    now = int(time.time())
    base = {
        "sub": "bob", "role": "user", "iat": now, "nbf": now, "exp": now + 600,
        "iss": server.settings.jwt_issuer, "aud": server.settings.jwt_audience, "jti": "t",
        "cred": load_users(server.settings).get("bob").credential_id,
    }
    return {**base, **changes}


def b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def tampered(server) -> str:
    header, _, signature = token_for(server, "bob").split(".")
    return ".".join([header, b64(claims(server, role="admin")), signature])  # escalated, old signature


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda s: None, "missing_token"),
        (lambda s: "not-a-jwt", "malformed"),
        (lambda s: jwt.encode(claims(s, iat=int(time.time()) - 7200, nbf=int(time.time()) - 7200,
                                     exp=int(time.time()) - 3600), SECRET, algorithm="HS256"), "expired"),
        (tampered, "bad_signature"),
        (lambda s: b64({"alg": "none", "typ": "JWT"}) + "." + b64(claims(s, role="admin")) + ".", "bad_algorithm"),
        (lambda s: jwt.encode(claims(s), "another-key-" + "x" * 40, algorithm="HS256"), "bad_signature"),
        (lambda s: jwt.encode(claims(s, aud="someone-else"), SECRET, algorithm="HS256"), "bad_audience"),
        (lambda s: jwt.encode(claims(s, iss="someone-else"), SECRET, algorithm="HS256"), "bad_issuer"),
        (lambda s: jwt.encode({k: v for k, v in claims(s).items() if k != "exp"}, SECRET, algorithm="HS256"),
         "missing_claim"),
    ],
    ids=["no-token", "garbage", "expired", "tampered", "alg-none", "wrong-key", "wrong-audience", "wrong-issuer",
         "no-expiry"],
)
def test_bad_tokens_are_refused_with_401(server, anonymous, make, reason):
    token = make(server)
    headers = bearer(token) if token else {}
    for path in ("/api/templates", "/api/batches", "/queue"):
        answer = anonymous.get(path, headers=headers)
        assert answer.status_code == 401, (path, answer.text)
        assert answer.headers["www-authenticate"] == "Bearer"
        assert error_of(answer)["details"]["reason"] == reason


def test_rate_limit_answers_429_with_retry_after_per_user_and_route(server, bob):
    with httpx.Client(base_url=server.url, headers=bearer(token_for(server, "carol"))) as carol:
        answers = [carol.get("/api/templates") for _ in range(RATE_LIMIT + 1)]
        assert [a.status_code for a in answers[:RATE_LIMIT]] == [200] * RATE_LIMIT
        refused = answers[-1]
        assert refused.status_code == 429
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.headers["x-ratelimit-remaining"] == "0"
        assert error_of(refused)["details"]["reason"] == "rate_limited"
        assert error_of(refused)["details"]["retry_after_s"] == int(refused.headers["retry-after"])
        assert carol.get("/api/batches").status_code == 200  # another route has its own budget
    assert bob.get("/api/templates").status_code == 200  # another user too


# -------------------------------------------------------------------------------------------- templates


def test_templates_with_their_schemas(bob):
    listed = bob.get("/api/templates").json()
    assert {"product_shot", "turbo_draft"} <= {t["name"] for t in listed}
    one = bob.get("/api/templates/product_shot").json()
    width = next(f for f in one["fields"] if f["name"] == "width")
    assert width["type"] == "int" and width["min"] <= SMALL["width"] <= width["max"]
    missing = bob.get("/api/templates/no_such_template")
    assert missing.status_code == 404 and "product_shot" in error_of(missing)["message"]
    assert error_of(missing)["code"] == "template_not_found"  # clients word it in their own language
    assert "product_shot" in error_of(missing)["details"]["available"]


def template_upload(name: str, workflow: str | None = None) -> dict:
    schema = json.loads((ROOT / "templates" / "product_shot" / "template.json").read_text())
    schema["name"] = name
    text = workflow if workflow is not None else (ROOT / "templates" / "product_shot" / "workflow.json.j2").read_text()
    return {"template_json": ("template.json", json.dumps(schema)), "workflow": ("workflow.json.j2", text)}


def test_only_admins_upload_templates(server, alice, bob):
    refused = bob.post("/api/templates", files=template_upload("shot_copy"))
    assert refused.status_code == 403 and error_of(refused)["details"]["action"] == "upload_template"

    saved = alice.post("/api/templates", files=template_upload("shot_copy"))
    assert saved.status_code == 200, saved.text
    assert saved.json()["name"] == "shot_copy"
    assert bob.get("/api/templates/shot_copy").status_code == 200
    # Kept with the app's data, not in the code's templates folder (a Space's checkout, a git tree).
    assert (Path(server.settings.data_dir) / "templates" / "shot_copy" / "template.json").is_file()
    assert not (Path(server.settings.templates_dir) / "shot_copy").exists()

    broken = alice.post("/api/templates", files=template_upload("shot_broken", workflow="{{ no_such_field }}"))
    assert broken.status_code == 400 and error_of(broken)["type"] == "TemplateError"
    assert not (Path(server.settings.data_dir) / "templates" / "shot_broken").exists()

    shipped = alice.post("/api/templates", files=template_upload("product_shot"), data={"replace": "true"})
    assert shipped.status_code == 400 and "shipped template" in error_of(shipped)["message"]


# ---------------------------------------------------------------------------------------------- batches


def test_json_rows_meet_the_same_limits_as_a_spreadsheet(bob):
    too_many = bob.post("/api/batches", json={"template": "product_shot",
                                               "rows": [{"product_name": "x"}] * 10_001})
    assert too_many.status_code == 400 and "10001 rows; the limit is 10000" in too_many.text

    huge = {"product_name": "x" * 20_000, **SMALL}
    answer = bob.post("/api/batches", json={"template": "product_shot", "rows": [huge], "on_invalid": "stop"})
    assert answer.status_code == 400, answer.text
    assert "row 2" in answer.text and "20,000 characters; the limit is 10,000" in answer.text


def test_batch_from_json_rows_runs_and_reports_its_rows(server, bob):
    rows = [
        {"product_name": "api teapot", "color": "green", "seed": 1, **SMALL},
        {"product_name": "api lamp", "seed": 2, **SMALL, "width": 9999},  # row 3 of the sheet: bad width
    ]
    answer = bob.post("/api/batches", json={"template": "product_shot", "rows": rows, "batch_seed": 5})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["queued_rows"] == 1 and body["started"]
    bad = body["report"]["rows"][1]
    assert bad["row"] == 3 and bad["problems"][0]["column"] == "width"

    batch_id = body["batch_id"]
    finished(server, batch_id)
    status = bob.get(f"/api/batches/{batch_id}").json()
    assert status["counts"] == {"done": 1, "failed": 0, "timed_out": 0, "skipped": 1, "not_run": 0, "running": 0,
                                "total": 2}
    assert status["batch"]["user"] == "bob" and status["progress"]["state"] == "done"
    done = next(r for r in status["rows"] if r["status"] == "done")
    assert "workflow" not in done and "image_path" not in done  # no server paths leak
    image = bob.get(done["image_url"])
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")

    assert batch_id in [b["id"] for b in bob.get("/api/batches").json()]
    archive = bob.get(f"/api/batches/{batch_id}/zip")
    assert archive.status_code == 200
    names = zipfile.ZipFile(io.BytesIO(archive.content)).namelist()
    assert sum(n.endswith(".png") for n in names) == 1 and "manifest.csv" in names


def test_a_submission_may_ask_for_only_its_rows_with_problems_in_the_answer(server, bob):
    """Every row's values made a 10,000-row submission's answer MBs; report=problems lists the bad rows only,
    in JSON and in an upload, with row_counts of every row either way. Only a check: nothing is started."""
    rows = [{"product_name": f"listed {i}", "seed": i, **SMALL, "width": 9999 if i in (1, 4) else 64} for i in range(6)]
    full = bob.post("/api/batches", json={"template": "product_shot", "rows": rows, "start": False}).json()
    assert [r["row"] for r in full["report"]["rows"]] == [2, 3, 4, 5, 6, 7]
    assert full["report"]["row_counts"] == {"total": 6, "ok": 4, "with_problems": 2}

    short = bob.post("/api/batches", json={"template": "product_shot", "rows": rows, "start": False,
                                           "report": "problems"}).json()
    assert [r["row"] for r in short["report"]["rows"]] == [3, 6]
    assert short["report"]["rows"] == [r for r in full["report"]["rows"] if not r["ok"]]
    assert short["report"]["row_counts"] == full["report"]["row_counts"] and short["queued_rows"] == 4

    csv = "product_name,seed,width,height,steps\ncup,1,64,64,1\npen,2,9999,64,1\n"
    uploaded = bob.post("/api/batches/upload", data={"template": "product_shot", "report": "problems", "start": "false"},
                        files={"sheet": ("rows.csv", csv.encode(), "text/csv")})
    assert uploaded.status_code == 200, uploaded.text
    assert [r["row"] for r in uploaded.json()["report"]["rows"]] == [3]

    refused = bob.post("/api/batches", json={"template": "product_shot", "rows": rows, "report": "short"})
    assert refused.status_code == 400 and error_of(refused)["type"] == "RequestInvalid"
    assert "report must be one of rows, problems" in error_of(refused)["message"]


def test_a_batchs_rows_come_in_pages_that_say_where_the_next_one_starts(server, bob, monkeypatch):
    """10,000 rows with their values answered 12 MB at once: the rows come a page at a time (at most
    ROWS_PAGE_MAX), optionally only those of one status, and ``rows_page`` says how many there are."""
    from webapp import api

    monkeypatch.setattr(api, "ROWS_PAGE_MAX", 4)  # the server reads it per request: pages of 4 stand in for 1,000
    rows = [{"product_name": f"paged {i}", "seed": i, **SMALL, "width": 9999 if i in (2, 5) else 64} for i in range(7)]
    prepared = server.services.runner.prepare("product_shot", sheet_from(rows), user="bob")
    batch_id = server.services.runner.start(prepared)  # recorded, not queued: its rows stay as they are

    everything, offset = [], 0
    while offset is not None:
        page = bob.get(f"/api/batches/{batch_id}", params={"offset": offset, "limit": 1000}).json()
        assert len(page["rows"]) <= 4 and page["rows_page"]["limit"] == 4 and page["rows_page"]["total"] == 7
        everything += page["rows"]
        offset = page["rows_page"]["next_offset"]
    assert [r["row_number"] for r in everything] == list(range(2, 9))

    skipped = bob.get(f"/api/batches/{batch_id}", params={"status": "skipped"}).json()
    assert [r["row_number"] for r in skipped["rows"]] == [4, 7] and skipped["rows_page"]["next_offset"] is None
    unknown = bob.get(f"/api/batches/{batch_id}", params={"status": "broken"})
    assert unknown.status_code == 400 and "failed" in error_of(unknown)["message"]
    assert "rows_page" not in bob.get(f"/api/batches/{batch_id}", params={"rows": "false"}).json()


def sheet_from(records: list[dict]):
    from engine.sheets import sheet_from_records

    return sheet_from_records(records, "api.json")


def as_javascript_reads_it(answer: httpx.Response):
    """The body as JavaScript's ``JSON.parse`` reads it: every number a double (exact only up to 2^53)."""
    return json.loads(answer.text, parse_int=float)


def test_seeds_come_also_as_exact_strings_wherever_the_api_answers_with_one(server, dave):
    from engine.sheets import derive_seed

    big, batch_seed = 2**64 - 1, 2**64 - 59
    assert float(big) != big and float(batch_seed) != batch_seed  # past 2^53: a double cannot hold them
    rows = [{"product_name": "exact seed", "seed": str(big), **SMALL}, {"product_name": "derived seed", **SMALL}]
    answer = dave.post("/api/batches", json={"template": "product_shot", "rows": rows, "batch_seed": str(batch_seed)})
    assert answer.status_code == 200, answer.text
    report = as_javascript_reads_it(answer)["report"]["rows"]
    assert report[0]["values_str"]["seed"] == str(big) and report[0]["values_str"]["width"] == "64"
    assert answer.json()["report"]["rows"][0]["values"]["seed"] == big  # the number stays for existing clients
    batch_id = answer.json()["batch_id"]
    finished(server, batch_id)
    derived = derive_seed(batch_seed, 3)

    status = as_javascript_reads_it(dave.get(f"/api/batches/{batch_id}"))
    assert status["batch"]["batch_seed_str"] == str(batch_seed)
    assert [(r["seed_str"], r["row_values_str"]["seed"]) for r in status["rows"]] == [(str(big), str(big)),
                                                                                      (str(derived), str(derived))]
    assert dave.get(f"/api/batches/{batch_id}").json()["rows"][1]["seed"] == derived
    listed = as_javascript_reads_it(dave.get("/api/batches"))
    assert next(b for b in listed if b["id"] == batch_id)["batch_seed_str"] == str(batch_seed)
    one = as_javascript_reads_it(dave.get(f"/api/generations/{batch_id}:2"))
    assert one["seed_str"] == str(big)
    found = as_javascript_reads_it(dave.get("/api/generations", params={"batch": batch_id}))
    assert sorted(g["seed_str"] for g in found) == sorted([str(big), str(derived)])

    values = {"product_name": "exact kettle", "seed": str(big - 1), **SMALL}
    single = dave.post("/api/generate", json={"template": "product_shot", "values": values})
    assert as_javascript_reads_it(single)["generation"]["seed_str"] == str(big - 1)

    out_of_range = dave.post("/api/batches", json={"template": "product_shot", "start": False,
                                                  "rows": [{"product_name": "x", "seed": str(big + 1)}]})
    problem = as_javascript_reads_it(out_of_range)["report"]["rows"][0]["problems"][0]
    assert problem["code"] == "seed_out_of_range" and problem["params_str"] == {"value": str(big + 1), "max": str(big)}
    stopped = dave.post("/api/batches", json={"template": "product_shot", "on_invalid": "stop",
                                              "rows": [{"product_name": "x", "seed": str(big + 1)}]})
    assert as_javascript_reads_it(stopped)["error"]["details"]["problems"][0]["params_str"]["value"] == str(big + 1)


@pytest.mark.parametrize("batch_seed, code", [
    (1.5, "batch_seed_not_whole"), (True, "batch_seed_not_whole"), ("abc", "batch_seed_not_whole"),
    (1e19, "batch_seed_not_whole"),  # a double past 2^53: some other seed than the one the client meant
    (-3, "batch_seed_out_of_range"), (2**64, "batch_seed_out_of_range"),
])
def test_a_batch_seed_that_is_not_an_exact_seed_is_refused_not_rounded(server, erin, batch_seed, code):
    before = len(server.services.ledger.list_batches(limit=500))
    for route, kwargs in (
        ("/api/batches", {"json": {"template": "product_shot", "rows": [{"product_name": "x"}],
                                   "batch_seed": batch_seed}}),
        ("/api/batches/upload", {"data": {"template": "product_shot", "batch_seed": str(batch_seed)},
                                 "files": {"sheet": ("rows.csv", b"product_name\nx\n", "text/csv")}}),
    ):
        if route.endswith("upload") and isinstance(batch_seed, (bool, float)) and batch_seed != 1.5:
            continue  # a form field is text: "True" is plain text, "1e+19" Excel's rounding, both refused anyway
        answer = erin.post(route, **kwargs)
        assert answer.status_code == 400, (route, answer.text)
        assert error_of(answer)["code"] == code, answer.text
        if code == "batch_seed_out_of_range":
            assert as_javascript_reads_it(answer)["error"]["details"]["limit_str"] == str(2**64 - 1)
    assert len(server.services.ledger.list_batches(limit=500)) == before
    exact = erin.post("/api/batches", json={"template": "product_shot", "rows": [{"product_name": "x"}],
                                           "batch_seed": str(2**64 - 1), "start": False})
    assert exact.status_code == 200, exact.text


def test_polling_a_batch_can_leave_its_rows_out(server, dave):
    rows = [{"product_name": f"polled {n}", **SMALL} for n in range(3)]
    batch_id = dave.post("/api/batches", json={"template": "product_shot", "rows": rows}).json()["batch_id"]
    finished(server, batch_id)
    whole = dave.get(f"/api/batches/{batch_id}").json()
    polled = dave.get(f"/api/batches/{batch_id}", params={"rows": "false"})
    assert polled.status_code == 200 and "rows" not in polled.json()
    assert polled.json()["counts"] == whole["counts"] and len(whole["rows"]) == 3
    assert dave.get(f"/api/batches/{batch_id}", params={"rows": "maybe"}).status_code == 400


def test_bad_rows_refused_with_row_and_column_named(bob):
    rows = [{"product_name": "fine", **SMALL}, {"product_name": "too wide", **SMALL, "width": 9999}]
    answer = bob.post("/api/batches", json={"template": "product_shot", "rows": rows, "on_invalid": "stop"})
    assert answer.status_code == 400
    error = error_of(answer)
    assert "row 3" in error["message"] and "width" in error["message"]
    assert error["details"]["problems"][0]["row"] == 3 and error["details"]["problems"][0]["column"] == "width"

    missing = bob.post("/api/batches", json={"template": "product_shot", "rows": [{"color": "red"}]})
    assert missing.status_code == 400 and error_of(missing)["details"]["missing_columns"] == ["product_name"]
    assert error_of(missing)["code"] == "required_columns_missing"
    for body in ({"rows": []}, {"template": "product_shot", "rows": []}, {"template": "nope", "rows": [{"a": 1}]},
                 {"template": "product_shot", "rows": [{"product_name": "x"}], "on_invalid": "maybe"},
                 {"template": "product_shot", "rows": [{"product_name": "x"}], "batch_id": "../escape"}):
        assert bob.post("/api/batches", json=body).status_code == 400, body
    assert bob.post("/api/batches", content=b"not json", headers={"content-type": "application/json"}).status_code == 400


def test_json_fields_of_the_wrong_type_are_refused_not_guessed(server, erin):
    before = len(server.services.ledger.list_batches(limit=500))
    for start in ("false", 0, "no", None):
        answer = erin.post("/api/batches", json={"template": "product_shot", "rows": [{"product_name": "x"}],
                                                "start": start})
        assert answer.status_code == 400, (start, answer.text)
        assert error_of(answer)["details"]["problems"] == [{"field": "start", "location": "body", "message": ANY_TEXT}]
    assert len(server.services.ledger.list_batches(limit=500)) == before  # "false" no longer started a batch
    listed = erin.post("/api/generate", json={"template": "product_shot", "values": [{"product_name": "x"}]})
    assert listed.status_code == 400 and error_of(listed)["details"]["problems"][0]["field"] == "values"


def test_fields_a_route_does_not_read_are_refused_naming_the_one_meant(server, erin, anonymous):
    before = len(server.services.ledger.list_batches(limit=500))
    body = {"template": "product_shot", "rows": [{"product_name": "x", **SMALL}], "batchId": "my-order-7",
            "onInvalid": "stop"}
    answer = erin.post("/api/batches", json=body)  # camelCase, as a JavaScript client writes it
    assert answer.status_code == 400, answer.text
    assert error_of(answer)["details"]["problems"] == [
        {"field": "batchId", "location": "body", "message": "unknown field; did you mean 'batch_id'?"},
        {"field": "onInvalid", "location": "body", "message": "unknown field; did you mean 'on_invalid'?"},
    ]
    upload = erin.post("/api/batches/upload", data={"template": "product_shot", "batchSeed": "7"},
                       files={"sheet": ("rows.csv", b"product_name\nx\n", "text/csv")})
    assert upload.status_code == 400 and error_of(upload)["details"]["problems"] == [
        {"field": "batchSeed", "location": "form", "message": "unknown field; did you mean 'batch_seed'?"}]
    assert len(server.services.ledger.list_batches(limit=500)) == before  # neither made a batch
    token = anonymous.post("/api/token", json={"user": "erin", "password": "erin-pass"})
    assert token.status_code == 400 and error_of(token)["details"]["problems"][0]["field"] == "user"
    generate = erin.post("/api/generate", json={"template": "product_shot", "value": {"product_name": "x"}})
    assert generate.status_code == 400 and "'values'" in error_of(generate)["details"]["problems"][0]["message"]
    # the form fields the check knows are the ones the route declares
    from webapp.api import UPLOAD_FIELDS

    document = anonymous.get("/openapi.json").json()
    form = document["paths"]["/api/batches/upload"]["post"]["requestBody"]["content"]["multipart/form-data"]
    name = form["schema"]["$ref"].rsplit("/", 1)[1]
    assert set(document["components"]["schemas"][name]["properties"]) == set(UPLOAD_FIELDS)


def test_a_json_object_or_list_in_a_cell_is_a_problem_of_that_cell_not_python_text(erin):
    rows = [{"product_name": {"en": "teapot"}, **SMALL}, {"product_name": "kettle", "color": ["red", "blue"]}]
    answer = erin.post("/api/batches", json={"template": "product_shot", "rows": rows, "start": False})
    assert answer.status_code == 200, answer.text
    report = answer.json()["report"]["rows"]
    assert [(p["row"], p["column"], p["code"], p["params"]) for r in report for p in r["problems"]] == [
        (2, "product_name", "not_a_cell_value", {"type": "object"}),
        (3, "color", "not_a_cell_value", {"type": "array"}),
    ]
    assert answer.json()["queued_rows"] == 0
    assert "{'en'" not in answer.text  # never Python's repr of the object as the prompt's text


def test_resubmitting_a_batch_id_resumes_it_and_other_inputs_conflict(server, bob):
    rows = [{"product_name": "resumable mug", "seed": 3, **SMALL}]
    first = bob.post("/api/batches", json={"template": "product_shot", "rows": rows, "batch_id": "client-batch-1"})
    assert first.status_code == 200 and not first.json()["resumed"]
    finished(server, "client-batch-1")
    again = bob.post("/api/batches", json={"template": "product_shot", "rows": rows, "batch_id": "client-batch-1"})
    assert again.status_code == 200 and again.json()["resumed"]

    changed = [{"product_name": "another mug", "seed": 3, **SMALL}]
    conflict = bob.post("/api/batches", json={"template": "product_shot", "rows": changed, "batch_id": "client-batch-1"})
    assert conflict.status_code == 409 and error_of(conflict)["type"] == "BatchMismatch"


def test_sheet_upload_cancel_and_resume(server, bob):
    csv = "product_name,seed,width,height,steps\nuploaded cup,7,64,64,2\nuploaded pen,8,64,64,2\n"
    answer = bob.post(
        "/api/batches/upload",
        data={"template": "product_shot", "batch_seed": "9"},
        files={"sheet": ("rows.csv", csv.encode(), "text/csv")},
    )
    assert answer.status_code == 200, answer.text
    batch_id = answer.json()["batch_id"]
    assert answer.json()["queued_rows"] == 2

    cancelled = bob.post(f"/api/batches/{batch_id}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["state"] in {"cancelling", "removed_from_queue"}
    finished(server, batch_id)
    again = bob.post(f"/api/batches/{batch_id}/cancel")  # nothing left to cancel, and the answer says so
    assert again.status_code == 200 and again.json() == {"batch_id": batch_id, "state": "not_running"}
    resumed = bob.post(f"/api/batches/{batch_id}/resume")
    assert resumed.status_code == 200 and resumed.json()["state"] in {"queued", "running"}
    finished(server, batch_id)
    assert bob.get(f"/api/batches/{batch_id}").json()["counts"]["done"] == 2

    unreadable = bob.post("/api/batches/upload", data={"template": "product_shot"},
                          files={"sheet": ("rows.xlsx", b"not a workbook", "application/octet-stream")})
    assert unreadable.status_code == 400 and error_of(unreadable)["type"] == "SheetError"


@pytest.mark.parametrize("method, path", [
    ("GET", "/api/batches/no-such-batch"),
    ("POST", "/api/batches/no-such-batch/cancel"),
    ("POST", "/api/batches/no-such-batch/resume"),
    ("GET", "/api/batches/no-such-batch/zip"),
    ("GET", "/api/generations/no-such-batch:2"),
    ("GET", "/api/generations/no-such-batch:2/image"),
])
def test_unknown_batches_and_generations_are_404(bob, method, path):
    answer = bob.request(method, path)
    assert answer.status_code == 404 and error_of(answer)["details"]["reason"] == "not_found"


def test_single_generation_waits_and_is_searchable(server, bob):
    values = {"product_name": "searchable kettle", "seed": 11, **SMALL}
    answer = bob.post("/api/generate", json={"template": "product_shot", "values": values})
    assert answer.status_code == 200, answer.text
    generation = answer.json()["generation"]
    assert generation["status"] == "done" and generation["seed"] == 11 and generation["width"] == 64

    found = bob.get("/api/generations", params={"q": "searchable kettle"}).json()
    assert [g["row_key"] for g in found] == [generation["row_key"]]
    assert bob.get("/api/generations", params={"status": "done", "batch": answer.json()["batch_id"]}).json()
    one = bob.get(f"/api/generations/{generation['row_key']}").json()
    assert one["prompt"].startswith("professional product photo of searchable kettle")

    refused = bob.post("/api/generate", json={"template": "product_shot", "values": {**values, "height": 5}})
    assert refused.status_code == 400 and "height" in error_of(refused)["message"]


@pytest.mark.parametrize("timeout_s", ["soon", -1, [5], True])
def test_generate_refuses_a_bad_timeout_naming_the_field(server, bob, timeout_s):
    batches = len(server.services.ledger.list_batches(limit=500))
    values = {"product_name": "kettle", "seed": 1, **SMALL}
    refused = bob.post("/api/generate", json={"template": "product_shot", "values": values, "timeout_s": timeout_s})
    assert refused.status_code == 400, refused.text
    assert "timeout_s" in error_of(refused)["message"] and error_of(refused)["details"]["field"] == "timeout_s"
    assert len(server.services.ledger.list_batches(limit=500)) == batches  # refused before anything was queued


def test_system_info_and_admin_only_model_switch(alice, bob):
    info = bob.get("/api/system").json()
    assert info["demo_in_use"] and "sd35_demo_tiny" in info["allowed_checkpoints"]

    refused = bob.post("/api/system/model", json={"checkpoint": "sd35_demo_tiny"})
    assert refused.status_code == 403 and error_of(refused)["details"]["action"] == "switch_model"
    switched = alice.post("/api/system/model", json={"checkpoint": "sd35_demo_tiny"})
    assert switched.status_code == 200 and switched.json() == {"default_checkpoint": "sd35_demo_tiny"}
    unknown = alice.post("/api/system/model", json={"checkpoint": "no_such_model"})
    assert unknown.status_code == 400 and "sd35_demo_tiny" in error_of(unknown)["message"]


def test_admins_free_resident_models(alice, bob):
    assert bob.post("/api/system/free").status_code == 403
    alice.post("/api/generate", json={"template": "product_shot",
                                      "values": {"product_name": "kettle", "width": 64, "height": 64, "steps": 1}})
    assert any(m["kind"] == "checkpoint" for m in alice.get("/api/system").json()["loaded_models"])
    freed = alice.post("/api/system/free").json()
    assert freed["freed"] >= 1 and freed["model_memory_bytes"] == 0
    assert alice.get("/api/system").json()["loaded_models"] == []


def test_openapi_schema_is_published(anonymous):
    paths = anonymous.get("/openapi.json").json()["paths"]
    assert {"/api/batches", "/api/batches/upload", "/api/generate", "/api/templates", "/prompt"} <= set(paths)


def test_openapi_describes_the_json_bodies_tokens_and_error_shape_the_api_really_has(anonymous, bob):
    schema = anonymous.get("/openapi.json").json()
    submit = schema["paths"]["/api/batches"]["post"]
    body = submit["requestBody"]["content"]["application/json"]["schema"]
    assert set(body["required"]) == {"template", "rows"} and {"batch_id", "on_invalid"} <= set(body["properties"])
    for path in ("/api/generate", "/api/token", "/api/system/model"):
        assert "requestBody" in schema["paths"][path]["post"], path
    assert schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert submit["security"] == [{"bearer": []}] and "security" not in schema["paths"]["/api/token"]["post"]

    # The documented refusal is the one sent: no 422 {"detail": ...} anywhere, the Error shape instead
    listing = schema["paths"]["/api/batches"]["get"]["responses"]
    assert "422" not in listing and listing["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/Error")
    error_schema = schema["components"]["schemas"]["Error"]
    for refused in (bob.get("/api/batches", params={"limit": "x"}), bob.post("/api/batches", json={"rows": []}),
                    anonymous.get("/api/batches")):
        answer = refused.json()
        assert set(answer) == set(error_schema["required"]), answer
        assert set(error_schema["properties"]["error"]["required"]) == set(answer["error"]), answer


def answer_schema(document: dict, name: str):
    """A validator of one answer schema of the published OpenAPI document (OpenAPI 3.1 is JSON Schema 2020-12)."""
    import jsonschema

    root = {"$ref": f"#/components/schemas/{name}", "components": document["components"]}
    return jsonschema.Draft202012Validator(root)


def test_openapi_is_valid_and_its_answers_are_the_ones_sent(server, anonymous, dave):
    from openapi_spec_validator import validate

    document = anonymous.get("/openapi.json").json()
    validate(document)
    paths = document["paths"]
    # files are files: a client generated from the schema must not parse a zip or a PNG as JSON
    for path, media_type in (("/api/batches/{batch_id}/zip", "application/zip"), ("/view", "image/png"),
                             ("/api/generations/{row_key}/image", "image/png"),
                             ("/files/zip/{batch_id}", "application/zip")):
        assert next(iter(paths[path]["get"]["responses"]["200"]["content"])) == media_type, path
        assert "application/json" not in paths[path]["get"]["responses"]["200"]["content"], path
    assert "code" in document["components"]["schemas"]["Error"]["properties"]["error"]["properties"]
    # the ComfyUI routes ask for the same bearer token (this server has users); /prompt refuses in ComfyUI's shape
    for path, method in (("/prompt", "post"), ("/history", "get"), ("/view", "get"), ("/upload/image", "post")):
        assert paths[path][method]["security"] == [{"bearer": []}], path
        assert {"401", "429"} <= set(paths[path][method]["responses"]), path
    assert paths["/prompt"]["post"]["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/ComfyError")
    for path in ("/api/batches", "/api/batches/upload", "/api/generate"):
        responses = paths[path]["post"]["responses"]
        assert {"409", "413", "422"} <= set(responses), path
        assert any(p["name"] == "Idempotency-Key" and p["in"] == "header" for p in paths[path]["post"]["parameters"])

    rows = [{"product_name": "described mug", "seed": str(2**64 - 1), **SMALL}, {"product_name": "x", "width": 1}]
    submitted = dave.post("/api/batches", json={"template": "product_shot", "rows": rows})
    answer_schema(document, "BatchSubmitted").validate(submitted.json())
    finished(server, submitted.json()["batch_id"])
    answer_schema(document, "BatchStatus").validate(dave.get(f"/api/batches/{submitted.json()['batch_id']}").json())
    for batch in dave.get("/api/batches").json():
        answer_schema(document, "Batch").validate(batch)
    generated = dave.post("/api/generate", json={"template": "product_shot", "values": {"product_name": "y", **SMALL}})
    answer_schema(document, "Generated").validate(generated.json())
    for generation in dave.get("/api/generations").json():
        answer_schema(document, "Generation").validate(generation)
    refused = dave.post("/api/batches", json={"template": "nope", "rows": [{"a": "b"}]})
    answer_schema(document, "Error").validate(refused.json())


# -------------------------------------------------------------------------------------------- uploads


def read_head(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def test_upload_declared_over_the_limit_is_refused_before_the_body_is_sent(server):
    host, port = server.url.removeprefix("http://").split(":")
    token = token_for(server, "bob")
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        sock.sendall(
            (
                "POST /api/batches/upload HTTP/1.1\r\nHost: test\r\n"
                f"Authorization: Bearer {token}\r\n"
                "Content-Type: multipart/form-data; boundary=xyz\r\n"
                f"Content-Length: {3 * 2**20}\r\n\r\n"
            ).encode()
        )
        head = read_head(sock)  # not one byte of the 3 MiB body was sent
    assert head.split(b"\r\n")[0].split(b" ")[1] == b"413"


def test_upload_without_length_is_stopped_at_the_limit(server):
    host, port = server.url.removeprefix("http://").split(":")
    token = token_for(server, "bob")
    chunk = b"x" * (256 * 1024)
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        sock.sendall(
            (
                "POST /api/batches/upload HTTP/1.1\r\nHost: test\r\n"
                f"Authorization: Bearer {token}\r\n"
                "Content-Type: multipart/form-data; boundary=xyz\r\n"
                "Transfer-Encoding: chunked\r\n\r\n"
            ).encode()
        )
        part = b'--xyz\r\nContent-Disposition: form-data; name="sheet"; filename="big.csv"\r\n\r\n'
        for piece in [part] + [chunk] * 5:  # a file part of 1.25 MiB that never ends: the answer comes anyway
            sock.sendall(b"%x\r\n" % len(piece) + piece + b"\r\n")
        head = read_head(sock)
    assert head.split(b"\r\n")[0].split(b" ")[1] == b"413"


# ------------------------------------------------------------------------------------- path traversal


def test_generation_image_never_leaves_the_outputs(server, bob):
    values = {"product_name": "moved file", "seed": 12, **SMALL}
    generation = bob.post("/api/generate", json={"template": "product_shot", "values": values}).json()["generation"]
    url = generation["image_url"]
    assert bob.get(url).status_code == 200
    for key in ("..%2F..%2Fledger.db", "%2e%2e", "..", "..%2fdata"):
        assert bob.get(f"/api/generations/{key}/image").status_code in (403, 404), key

    # A ledger path pointing outside the outputs (a tampered or moved database) is refused, not served.
    ledger = server.services.ledger
    ledger.conn.execute(
        "UPDATE generations SET image_path = ? WHERE row_key = ?",
        (str(Path(server.settings.data_dir) / "ledger.db"), generation["row_key"]),
    )
    assert bob.get(url).status_code == 403


def test_signing_out_kills_the_session_cookie_even_where_a_copy_was_kept(server):
    outputs = Path(server.settings.outputs_path)
    image = "/files/" + next(outputs.rglob("*.png")).relative_to(outputs).as_posix()
    with httpx.Client(base_url=server.url, timeout=30) as browser:
        assert browser.post("/login", data={"username": "carol", "password": "carol-pass"}).status_code == 303
        kept = browser.cookies.get("sd35_session")
        assert kept and browser.get(image).status_code == 200
        assert browser.get("/logout").status_code == 303
    with httpx.Client(base_url=server.url, timeout=30, cookies={"sd35_session": kept}) as replay:
        assert replay.get(image).status_code == 401
    with httpx.Client(base_url=server.url, timeout=30) as again:  # signing in again works
        assert again.post("/login", data={"username": "carol", "password": "carol-pass"}).status_code == 303
        assert again.get(image).status_code == 200


def test_list_filters_a_client_got_wrong_are_400_and_huge_offsets_find_nothing(bob):
    bad = bob.get("/api/generations", params={"status": "bogus"})
    assert bad.status_code == 400 and "supported: queued, running, done" in error_of(bad)["message"]
    for path in ("/api/generations", "/api/batches"):
        answer = bob.get(path, params={"offset": 10**20})
        assert answer.status_code == 200 and answer.json() == [], path


def test_search_dates_a_client_got_wrong_are_400_naming_the_field(bob):
    for field in ("date_from", "date_to"):
        answer = bob.get("/api/generations", params={field: "last week"})
        assert answer.status_code == 400 and error_of(answer)["details"]["field"] == field, answer.text


def test_malformed_requests_answer_in_the_api_error_shape_naming_the_field(bob):
    answer = bob.get("/api/batches", params={"limit": "ten"})
    assert answer.status_code == 400, answer.text
    error = error_of(answer)
    assert error["type"] == "RequestInvalid" and "limit" in error["message"]
    assert error["details"]["problems"] == [{"field": "limit", "location": "query", "message": ANY_TEXT}]

    for path in ("/api/batches", "/api/generations"):  # a negative offset is refused, not read as page one
        negative = bob.get(path, params={"offset": -5})
        assert negative.status_code == 400 and error_of(negative)["details"]["problems"][0]["field"] == "offset"

    no_sheet = bob.post("/api/batches/upload", data={"template": "product_shot"})
    assert no_sheet.status_code == 400 and [p["field"] for p in error_of(no_sheet)["details"]["problems"]] == ["sheet"]

    not_json = bob.post("/api/batches", content=b"template=product_shot", headers={"content-type": "text/plain"})
    assert not_json.status_code == 400 and error_of(not_json)["type"] == "RequestInvalid"


def test_paths_under_api_that_no_route_serves_answer_404_or_405_in_the_api_error_shape(bob):
    unknown = bob.get("/api/batchs")
    assert unknown.status_code == 404 and error_of(unknown)["details"]["reason"] == "not_found"
    wrong_method = bob.delete("/api/batches/some-batch")
    assert wrong_method.status_code == 405 and error_of(wrong_method)["details"]["reason"] == "method_not_allowed"
    assert wrong_method.headers["allow"] == "GET"


def test_a_retried_submission_racing_the_first_makes_one_batch_and_resumes_it(server, bob):
    rows = [{"product_name": f"raced {n}", "seed": n, **SMALL} for n in range(40)]
    body = {"template": "product_shot", "rows": rows, "batch_id": "client-retry-race"}
    start_together = threading.Barrier(6)

    def post(_):
        start_together.wait(timeout=30)
        return bob.post("/api/batches", json=body)

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(post, range(6)))
    assert [a.status_code for a in answers] == [200] * 6, [a.text[:200] for a in answers]
    assert sorted(a.json()["resumed"] for a in answers) == [False] + [True] * 5
    finished(server, "client-retry-race")
    ledger_rows = server.services.ledger.rows("client-retry-race")
    assert sorted(r.row_number for r in ledger_rows) == list(range(2, 42))
    assert {r.status for r in ledger_rows} == {"done"}


def batch_count(server) -> int:
    return len(server.services.ledger.list_batches(limit=500))


def test_a_retry_with_the_same_idempotency_key_gets_the_first_answer_not_a_second_batch(server, carol):
    rows = [{"product_name": "keyed mug", "seed": str(2**64 - 1), **SMALL}]
    body = {"template": "product_shot", "rows": rows, "start": True}
    before = batch_count(server)
    first = carol.post("/api/batches", json=body, headers={"Idempotency-Key": "order-4711"})
    assert first.status_code == 200, first.text
    assert "Idempotent-Replayed" not in first.headers
    # the retry, its fields in another order and the key quoted as the draft writes it
    retried = carol.post("/api/batches", json=dict(reversed(list(body.items()))),
                         headers={"Idempotency-Key": '"order-4711"'})
    assert retried.status_code == 200 and retried.headers["Idempotent-Replayed"] == "true"
    assert retried.json() == first.json()
    assert batch_count(server) == before + 1

    csv = b"product_name,seed,width,height,steps\nkeyed cup,7,64,64,2\n"
    uploads = [carol.post("/api/batches/upload", data={"template": "product_shot"},
                          files={"sheet": ("rows.csv", csv, "text/csv")}, headers={"Idempotency-Key": "upload-1"})
               for _ in range(2)]
    assert [u.status_code for u in uploads] == [200, 200], uploads[0].text
    assert uploads[0].json()["batch_id"] == uploads[1].json()["batch_id"]
    assert uploads[1].headers["Idempotent-Replayed"] == "true"

    single = {"template": "product_shot", "values": {"product_name": "keyed kettle", **SMALL}}
    generated = [carol.post("/api/generate", json=single, headers={"Idempotency-Key": "one-kettle"}) for _ in range(2)]
    assert generated[0].json()["batch_id"] == generated[1].json()["batch_id"], generated[0].text
    assert batch_count(server) == before + 3
    finished(server, first.json()["batch_id"])
    finished(server, uploads[0].json()["batch_id"])


def test_an_idempotency_key_names_one_request_of_one_user(server, carol, bob):
    body = {"template": "product_shot", "rows": [{"product_name": "first request", **SMALL}], "start": False}
    assert carol.post("/api/batches", json=body, headers={"Idempotency-Key": "k-reused"}).status_code == 200
    other = {**body, "rows": [{"product_name": "another request", **SMALL}]}
    reused = carol.post("/api/batches", json=other, headers={"Idempotency-Key": "k-reused"})
    assert reused.status_code == 422, reused.text
    assert error_of(reused)["code"] == "idempotency_key_reused" and error_of(reused)["details"]["key"] == "k-reused"
    elsewhere = carol.post("/api/batches/upload", data={"template": "product_shot", "start": "false"},
                           files={"sheet": ("rows.csv", b"product_name\nfirst request\n", "text/csv")},
                           headers={"Idempotency-Key": "k-reused"})
    assert elsewhere.status_code == 422  # another route is another request
    bobs = bob.post("/api/batches", json=other, headers={"Idempotency-Key": "k-reused"})
    assert bobs.status_code == 200 and "Idempotent-Replayed" not in bobs.headers  # keys are per user

    refused = carol.post("/api/batches", json={**body, "rows": [{"product_name": "x", "width": 9999}],
                                                "on_invalid": "stop"}, headers={"Idempotency-Key": "k-refused"})
    assert refused.status_code == 400
    corrected = carol.post("/api/batches", json=body | {"rows": [{"product_name": "x", **SMALL}]},
                           headers={"Idempotency-Key": "k-refused"})
    assert corrected.status_code == 200, corrected.text  # a refused request kept nothing under its key

    for bad in ("", "k" * 300, "schlüssel".encode()):
        answer = carol.post("/api/batches", json=body, headers={"Idempotency-Key": bad})
        assert answer.status_code == 400, (bad, answer.text)
        assert error_of(answer)["details"]["problems"][0] == {
            "field": "Idempotency-Key", "location": "header", "message": ANY_TEXT}


def test_concurrent_retries_under_one_idempotency_key_make_one_batch(server, carol):
    rows = [{"product_name": f"raced keyed {n}", "seed": n, **SMALL} for n in range(40)]
    body = {"template": "product_shot", "rows": rows}
    before = batch_count(server)
    start_together = threading.Barrier(5)

    def post(_):
        start_together.wait(timeout=30)
        return carol.post("/api/batches", json=body, headers={"Idempotency-Key": "raced-key"})

    with ThreadPoolExecutor(5) as pool:
        answers = list(pool.map(post, range(5)))
    assert {a.status_code for a in answers} <= {200, 409}, [a.text[:200] for a in answers]
    assert all(error_of(a)["code"] == "idempotency_key_in_use" and a.headers["Retry-After"]
               for a in answers if a.status_code == 409)
    made = {a.json()["batch_id"] for a in answers if a.status_code == 200}
    assert len(made) == 1 and batch_count(server) == before + 1
    finished(server, made.pop())
    again = carol.post("/api/batches", json=body, headers={"Idempotency-Key": "raced-key"})
    assert again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true"


def test_resubmitting_a_finished_batch_says_it_queues_nothing(server, bob):
    rows = [{"product_name": f"counted {n}", "seed": n, **SMALL} for n in range(2)]
    body = {"template": "product_shot", "rows": rows, "batch_id": "client-batch-counted"}
    assert bob.post("/api/batches", json=body).json()["queued_rows"] == 2
    finished(server, "client-batch-counted")
    again = bob.post("/api/batches", json=body).json()
    assert again["resumed"] and again["queued_rows"] == 0


def test_only_the_owner_or_an_admin_cancels_or_resumes_a_batch(server, alice, bob):
    rows = [{"product_name": "owned", "seed": 41, **SMALL}]
    batch_id = bob.post("/api/batches", json={"template": "product_shot", "rows": rows}).json()["batch_id"]
    carol = token_for(server, "carol")
    with httpx.Client(base_url=server.url, headers=bearer(carol), timeout=60) as other:
        assert other.get(f"/api/batches/{batch_id}").status_code == 200  # the team sees every batch
        for action in ("cancel", "resume"):
            refused = other.post(f"/api/batches/{batch_id}/{action}")
            assert refused.status_code == 403 and error_of(refused)["details"]["reason"] == "not_owner", action
        # Resubmitting the same batch id is a resume too
        again = other.post("/api/batches", json={"template": "product_shot", "rows": rows, "batch_id": batch_id})
        assert again.status_code == 403 and error_of(again)["details"]["reason"] == "not_owner"
    assert alice.post(f"/api/batches/{batch_id}/resume").status_code == 200  # an admin may
    finished(server, batch_id)


def test_batch_ids_that_file_routes_use_are_reserved(bob):
    answer = bob.post("/api/batches", json={"template": "product_shot", "batch_id": "zip",
                                             "rows": [{"product_name": "x", **SMALL}]})
    assert answer.status_code == 400 and "reserved" in error_of(answer)["message"]


def test_batch_progress_shows_image_urls_not_server_paths(server, bob):
    rows = [{"product_name": "progress urls", "seed": 31, **SMALL}]
    batch_id = bob.post("/api/batches", json={"template": "product_shot", "rows": rows}).json()["batch_id"]
    finished(server, batch_id)
    progress = bob.get(f"/api/batches/{batch_id}").json()["progress"]
    assert progress["recent_images"] and all(u.startswith(f"/files/{batch_id}/") for u in progress["recent_images"])
    assert str(server.settings.data_dir) not in json.dumps(progress)


def test_image_links_the_api_returns_download_with_its_bearer_token(server, bob):
    rows = [{"product_name": "fetched with a token", "seed": 33, **SMALL}]
    batch_id = bob.post("/api/batches", json={"template": "product_shot", "rows": rows}).json()["batch_id"]
    finished(server, batch_id)
    link = bob.get(f"/api/batches/{batch_id}").json()["progress"]["recent_images"][0]
    image = bob.get(link)
    assert image.status_code == 200 and image.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert "x-ratelimit-remaining" in {k.lower() for k in image.headers}
    archive = bob.get(f"/files/zip/{batch_id}")
    assert archive.status_code == 200 and any(n.endswith(".png") for n in zipfile.ZipFile(io.BytesIO(archive.content)).namelist())
    with httpx.Client(base_url=server.url, timeout=30) as anonymous:
        assert anonymous.get(link).status_code == 401
        assert anonymous.get(link, headers=bearer(tampered(server))).status_code == 401
        # A revoked token is refused here as on the API.
        token = token_for(server, "dave")
        assert anonymous.get(link, headers=bearer(token)).status_code == 200
        assert anonymous.post("/api/token/revoke", json={"token": token},
                              headers=bearer(token_for(server, "alice"))).status_code == 200
        gone = anonymous.get(link, headers=bearer(token))
        assert gone.status_code == 401 and error_of(gone)["details"]["reason"] == "revoked"
        # And the API's rate limit applies, per user and route.
        other = bearer(token_for(server, "dave"))
        answers = [anonymous.get(link, headers=other) for _ in range(RATE_LIMIT + 1)]
        assert answers[0].status_code == 200 and answers[-1].status_code == 429  # dave spent one above
        assert int(answers[-1].headers["retry-after"]) >= 1


def test_session_file_routes_never_leave_the_outputs(server):
    with httpx.Client(base_url=server.url, timeout=30) as browser:
        assert browser.post("/login", data={"username": "bob", "password": "bob-pass"}).status_code == 303
        outputs = Path(server.settings.outputs_path)
        image = next(outputs.rglob("*.png"))
        relative = image.relative_to(outputs).as_posix()
        assert browser.get(f"/files/{relative}").status_code == 200
        for path in ("/files/%2e%2e/ledger.db", "/files/..%2fledger.db", "/files/..%2F..%2Fetc%2Fpasswd",
                     "/files/%2Fetc%2Fpasswd", "/files/zip/..%2Fledger.db", "/files/nothing-here.png"):
            assert browser.get(path).status_code in (403, 404), path


def test_a_restarted_web_app_resumes_the_batches_its_last_process_left_but_not_cancelled_ones(engine, tmp_path):
    """RELIABILITY: killed mid-batch, the app restarts and the batch resumes by itself; the API shows rows
    a process still holds as ``running``, so a client never waits on rows counted nowhere."""
    import subprocess
    import sys

    from engine.services import build_services
    from engine.sheets import read_sheet
    from webapp.server import create_app

    settings = load_settings({"data_dir": str(tmp_path / "data"), "templates_dir": str(ROOT / "templates")},
                             environ={})
    sheet = tmp_path / "rows.csv"
    sheet.write_text("product_name,width,height,steps\nA,64,64,1\nB,64,64,1\n", encoding="utf-8")
    before = build_services(settings, engine=engine)  # the process that "died"
    started = []
    for batch_id in ("waiting", "half-done", "cancelled-by-user"):
        prepared = before.runner.prepare("product_shot", read_sheet(sheet), batch_seed=1, batch_id=batch_id)
        started.append(before.runner.start(prepared))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    first, second = before.ledger.rows("half-done")
    before.ledger.set_batch_status("half-done", "running")
    before.ledger.claim_row(first.row_key, worker=f"{socket.gethostname()}:{int(dead.stdout)}")
    before.ledger.set_batch_status("cancelled-by-user", "cancelled")
    before.close()

    app, services = create_app(settings, engine)
    with live_server(app) as url:
        status = httpx.get(f"{url}/api/batches/half-done").json()
        assert status["counts"]["running"] + status["counts"]["done"] + status["counts"]["not_run"] == 2
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            counts = {b: httpx.get(f"{url}/api/batches/{b}").json()["counts"]
                      for b in ("waiting", "half-done")}
            if all(c["done"] == 2 for c in counts.values()):
                break
            time.sleep(0.2)
        assert all(c["done"] == 2 and c["running"] == 0 for c in counts.values()), counts
        untouched = httpx.get(f"{url}/api/batches/cancelled-by-user").json()
        assert untouched["counts"]["done"] == 0 and untouched["batch"]["status"] == "cancelled"
