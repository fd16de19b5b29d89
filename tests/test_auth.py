import base64
import json
import time
from datetime import timedelta

import jwt
import pytest

from engine.errors import AccessDenied, EngineError
from engine.settings import Settings
from webapp.guard import ApiGuard, Caller
from webapp.ratelimit import RateLimiter
from webapp.auth import (
    ADMIN,
    USER,
    TokenIssuer,
    User,
    UserStore,
    add_user,
    authorize,
    hash_password,
    load_users,
    parse_bearer,
    parse_ttl,
    remove_user,
    verify_password,
)

SECRET = "k" * 64
ISSUER, AUDIENCE = "sd35-batch", "sd35-batch-api"


@pytest.fixture(scope="module")
def alice_hash():
    return hash_password("correct horse")


@pytest.fixture
def tokens():
    return TokenIssuer(SECRET, ISSUER, AUDIENCE)


def _claims(**overrides):
    now = int(time.time())
    claims = {"sub": "alice", "role": "user", "iat": now, "nbf": now, "exp": now + 600, "iss": ISSUER, "aud": AUDIENCE}
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def _refusal(tokens, token):
    with pytest.raises(AccessDenied) as caught:
        tokens.verify(token)
    assert caught.value.status == 401
    return caught.value.details["reason"]


# --- passwords and users -------------------------------------------------------------------------------------


def test_hash_format_and_verify(alice_hash):
    scheme, n, r, p, salt, digest = alice_hash.split("$")
    assert (scheme, n, r, p) == ("scrypt", "16384", "8", "1")
    assert len(base64.urlsafe_b64decode(salt + "==")) == 16
    assert verify_password("correct horse", alice_hash)
    assert not verify_password("correct horse ", alice_hash)
    assert hash_password("correct horse") != alice_hash  # fresh salt every time


def test_unknown_hash_scheme_is_named():
    with pytest.raises(EngineError, match="unsupported password hash format.*md5"):
        verify_password("x", "md5$abc")


def test_authenticate(alice_hash):
    store = UserStore([User("alice", ADMIN, alice_hash)])
    assert store.authenticate("alice", "correct horse") == User("alice", ADMIN, alice_hash)
    assert store.authenticate("alice", "wrong") is None
    assert store.authenticate("mallory", "correct horse") is None
    assert store.configured and not UserStore().configured


def test_users_file_parsing(tmp_path, alice_hash):
    path = tmp_path / "users.json"
    path.write_text(json.dumps({"users": [{"name": "alice", "password_hash": alice_hash, "role": "admin"},
                                          {"name": "bob", "password_hash": alice_hash}]}))
    store = UserStore.from_file(path)
    assert store.get("alice").is_admin and store.get("bob").role == USER
    assert "password_hash" not in repr(store.get("alice")) and alice_hash not in repr(store.get("alice"))


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"people": []}', "'users' list"),
        ("{not json", "not valid JSON"),
        ('{"users": [{"name": "x"}]}', "lacks password_hash"),
        ('{"users": [{"name": "x", "password_hash": "HASH", "role": "root"}]}',
         "unknown role 'root'; supported roles: user, admin"),
        ('{"users": [{"name": "a:b", "password_hash": "HASH"}]}', "invalid user name"),
        ('{"users": [{"name": "x", "password_hash": "plain"}]}', "unsupported password hash"),
    ],
)
def test_users_file_errors(tmp_path, alice_hash, content, message):
    path = tmp_path / "users.json"
    path.write_text(content.replace("HASH", alice_hash))
    with pytest.raises(EngineError, match=message):
        UserStore.from_file(path)


def test_users_from_env_and_file_together(tmp_path, alice_hash):
    path = tmp_path / "users.json"
    add_user(path, "alice", "correct horse", ADMIN)
    env = {"SD35_USERS": f"bob:user:{alice_hash}, carol:admin:{alice_hash}"}
    store = load_users(Settings(users_file=str(path)), environ=env)
    assert sorted(u.name for u in store) == ["alice", "bob", "carol"]
    assert store.authenticate("carol", "correct horse").is_admin
    with pytest.raises(EngineError, match="configured twice"):
        load_users(Settings(users_file=str(path)), environ={"SD35_USERS": f"alice:user:{alice_hash}"})
    with pytest.raises(EngineError, match="not name:role:hash"):
        load_users(Settings(), environ={"SD35_USERS": "bob:user"})
    assert not load_users(Settings(), environ={}).configured


def test_add_and_remove_user_file(tmp_path):
    path = tmp_path / "sub" / "users.json"
    add_user(path, "alice", "pw-1", ADMIN)
    add_user(path, "bob", "pw-2")
    assert path.stat().st_mode & 0o777 == 0o600
    with pytest.raises(EngineError, match="already exists"):
        add_user(path, "bob", "pw-3")
    add_user(path, "bob", "pw-3", ADMIN, replace=True)
    store = UserStore.from_file(path)
    assert store.authenticate("bob", "pw-3").is_admin and store.authenticate("bob", "pw-2") is None
    remove_user(path, "alice")
    assert [u.name for u in UserStore.from_file(path)] == ["bob"]
    with pytest.raises(EngineError, match="no user 'alice'"):
        remove_user(path, "alice")
    assert not list(path.parent.glob("*.tmp"))


# --- tokens --------------------------------------------------------------------------------------------------


def test_valid_token_round_trip(tokens):
    token = tokens.create(User("alice", ADMIN), ttl="30m")
    claims = tokens.verify(token)
    assert (claims.sub, claims.role, claims.issuer, claims.audience) == ("alice", ADMIN, ISSUER, AUDIENCE)
    assert claims.is_admin and len(claims.jti) == 32
    assert timedelta(minutes=29) < claims.expires_at - claims.issued_at <= timedelta(minutes=30)
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "HS256"
    payload = jwt.decode(token, options={"verify_signature": False})
    assert set(payload) == {"sub", "role", "iat", "nbf", "exp", "iss", "aud", "jti"}
    assert tokens.verify(tokens.create("bob", USER, "7d")).role == USER


def test_expired_token(tokens):
    token = jwt.encode(_claims(iat=int(time.time()) - 3600, nbf=None, exp=int(time.time()) - 60), SECRET, "HS256")
    assert _refusal(tokens, token) == "expired"


def test_tampered_signature(tokens):
    token = tokens.create("alice", USER, "1h")
    head, body, sig = token.split(".")
    flipped = sig[:5] + ("A" if sig[5] != "A" else "B") + sig[6:]  # a middle character: all 6 bits are data
    assert _refusal(tokens, f"{head}.{body}.{flipped}") == "bad_signature"


def test_tampered_payload_role_escalation(tokens):
    token = tokens.create("alice", USER, "1h")
    head, _, sig = token.split(".")
    forged_body = base64.urlsafe_b64encode(json.dumps(_claims(role="admin")).encode()).rstrip(b"=").decode()
    assert _refusal(tokens, f"{head}.{forged_body}.{sig}") == "bad_signature"


def test_alg_none_crafted_by_hand(tokens):
    def b64(obj):
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    unsigned = f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(_claims(role='admin'))}."
    assert _refusal(tokens, unsigned) == "bad_algorithm"


def test_other_algorithm_with_same_key_refused(tokens):
    token = jwt.encode(_claims(), SECRET, algorithm="HS512")
    assert _refusal(tokens, token) == "bad_algorithm"


def test_wrong_key(tokens):
    other = TokenIssuer("z" * 40, ISSUER, AUDIENCE)
    assert _refusal(tokens, other.create("alice", USER)) == "bad_signature"


def test_wrong_audience_and_issuer(tokens):
    assert _refusal(tokens, TokenIssuer(SECRET, ISSUER, "another-api").create("alice", USER)) == "bad_audience"
    assert _refusal(tokens, TokenIssuer(SECRET, "someone-else", AUDIENCE).create("alice", USER)) == "bad_issuer"


@pytest.mark.parametrize("claim", ["exp", "iat", "sub", "aud", "iss"])
def test_missing_required_claim(tokens, claim):
    token = jwt.encode(_claims(**{claim: None}), SECRET, "HS256")
    assert _refusal(tokens, token) == "missing_claim"


def test_unknown_role_and_garbage(tokens):
    assert _refusal(tokens, jwt.encode(_claims(role="root"), SECRET, "HS256")) == "bad_role"
    assert _refusal(tokens, "not.a.token") == "malformed"
    assert _refusal(tokens, "") == "missing_token"


def test_issuer_key_requirements():
    with pytest.raises(EngineError, match="SD35_JWT_SECRET"):
        TokenIssuer("", ISSUER, AUDIENCE)
    with pytest.raises(EngineError, match="at least 32"):
        TokenIssuer("short", ISSUER, AUDIENCE)


def test_per_process_key_refuses_lasting_tokens():
    ephemeral = TokenIssuer.for_process(ISSUER, AUDIENCE)
    with pytest.raises(EngineError, match="per-process key"):
        ephemeral.create("alice", USER, "24h")
    token = ephemeral.create("alice", USER, "1h", process_local=True)
    assert ephemeral.verify(token).sub == "alice"


def test_parse_ttl():
    assert parse_ttl("24h") == timedelta(hours=24)
    assert parse_ttl("30m") == timedelta(minutes=30)
    assert parse_ttl("7d") == timedelta(days=7)
    assert parse_ttl(timedelta(seconds=5)) == timedelta(seconds=5)
    for bad in ("24", "1w", "-1h", "0m", ""):
        with pytest.raises(EngineError):
            parse_ttl(bad)


@pytest.mark.parametrize("absurd", ["9999999999d", "3651d", "99999999999999999999999s", "1" * 5000 + "d"])
def test_parse_ttl_refuses_absurd_lifetimes_naming_them(absurd):
    with pytest.raises(EngineError) as refused:
        parse_ttl(absurd)
    assert absurd[:40] in refused.value.message and refused.value.details["max_ttl"] == "3650d"
    assert len(refused.value.message) < 200  # the value is named, not echoed whole


def test_parse_ttl_maximum():
    assert parse_ttl("7d", maximum=timedelta(days=7)) == timedelta(days=7)
    with pytest.raises(EngineError, match="'169h' is longer than the 7d allowed"):
        parse_ttl("169h", maximum=timedelta(days=7))
    with pytest.raises(EngineError, match="longer than the 12h allowed"):
        parse_ttl(timedelta(hours=13), maximum=timedelta(hours=12))


# --- the API guard -------------------------------------------------------------------------------------------


def _guard(users):
    return ApiGuard(UserStore(users), TokenIssuer(SECRET, ISSUER, AUDIENCE), RateLimiter(100))


def test_guard_uses_the_users_current_role_and_refuses_removed_users(alice_hash, tokens):
    guard = _guard([User("alice", USER, alice_hash)])
    # alice was an admin when the token was issued; the store says she is a user now
    token = tokens.create(User("alice", ADMIN, alice_hash))
    assert guard.identify(f"Bearer {token}") == Caller("alice", USER)
    with pytest.raises(AccessDenied) as refused:
        guard.identify(f"Bearer {tokens.create('bob', ADMIN)}")  # bob is not (or no longer) a user
    assert refused.value.status == 401 and refused.value.details["reason"] == "unknown_user"


def test_guard_without_users_trusts_the_signed_token(tokens):
    guard = _guard([])  # API-only deployment: just a signing key
    assert guard.identify(f"Bearer {tokens.create('ci-bot', ADMIN)}") == Caller("ci-bot", ADMIN)


# --- roles and headers ---------------------------------------------------------------------------------------


def test_role_checks(tokens):
    user_claims = tokens.verify(tokens.create("bob", USER))
    admin_claims = tokens.verify(tokens.create("alice", ADMIN))
    assert authorize(user_claims, USER) is user_claims
    assert authorize(admin_claims, USER) is admin_claims
    assert authorize(admin_claims, ADMIN) is admin_claims
    assert authorize(User("carol", ADMIN), ADMIN).name == "carol"
    with pytest.raises(AccessDenied, match="admin role is needed to switch model") as caught:
        authorize(user_claims, ADMIN, action="switch_model")
    assert caught.value.status == 403
    with pytest.raises(AccessDenied) as caught:
        authorize(User("dave", USER), ADMIN, action="upload_template")
    assert caught.value.status == 403
    with pytest.raises(AccessDenied) as caught:
        authorize(None, USER)
    assert caught.value.status == 401
    with pytest.raises(EngineError, match="supported roles"):
        authorize(admin_claims, "superuser")


def test_parse_bearer():
    assert parse_bearer("Bearer abc.def.ghi") == "abc.def.ghi"
    assert parse_bearer("bearer   abc ") == "abc"
    for bad in (None, "", "Basic dXNlcjpwdw==", "Bearer", "Bearer  "):
        with pytest.raises(AccessDenied) as caught:
            parse_bearer(bad)
        assert caught.value.status == 401


def test_revoking_a_user_signs_out_their_browser_sessions_and_api_tokens(tmp_path):
    from types import SimpleNamespace

    from engine.store import BatchLedger
    from webapp.revocation import TokenRevocations
    from webapp.server import SESSION_COOKIE, WebAuth

    users = UserStore([User("ann", "user", hash_password("pw", n=2**4))])
    issuer = TokenIssuer("k" * 48, "sd35-batch", "sd35-batch-api")
    revocations = TokenRevocations(BatchLedger(tmp_path / "ledger.db"))
    auth = WebAuth(users, issuer, revocations)
    guard = ApiGuard(users, issuer, RateLimiter(100), revocations)
    session = auth.sign_in("ann", "pw")
    api_token = issuer.create(users.get("ann"))
    request = SimpleNamespace(cookies={SESSION_COOKIE: session})
    assert auth.user_of(request).name == "ann"
    assert guard.identify(f"Bearer {api_token}").name == "ann"

    revocations.revoke_user("ann", "test")
    assert auth.user_of(request) is None
    with pytest.raises(AccessDenied) as refused:
        guard.identify(f"Bearer {api_token}")
    assert refused.value.details["reason"] == "revoked" and refused.value.details["status"] == 401
    assert revocations.entries()["users"][0]["subject"] == "ann"


def test_a_token_is_tied_to_the_password_its_user_had_when_it_was_issued():
    tokens = TokenIssuer(SECRET, ISSUER, AUDIENCE)
    alice = User("alice", ADMIN, hash_password("first-pass"))
    claims = tokens.verify(tokens.create(alice))
    claims.check_credential(alice)  # unchanged: accepted

    again = User("alice", ADMIN, hash_password("first-pass"))  # the same password set again: a new salt
    with pytest.raises(AccessDenied) as refused:
        claims.check_credential(again)
    assert refused.value.details["reason"] == "credentials_changed"
    assert tokens.verify(tokens.create("bot", USER)).credential == ""  # a bare name has no password to follow
    assert "first-pass" not in alice.credential_id and len(alice.credential_id) == 16


def test_a_token_without_a_credential_is_refused_for_a_user_with_a_password():
    """A bare-name token issued before a user of that name was added (or one from before tokens carried the
    credential) would otherwise be that user's for as long as it lives, whatever passwords are set."""
    tokens = TokenIssuer(SECRET, ISSUER, AUDIENCE)
    bare = tokens.verify(tokens.create("alice", ADMIN))
    with pytest.raises(AccessDenied) as refused:
        bare.check_credential(User("alice", ADMIN, hash_password("first-pass")))
    assert refused.value.details["reason"] == "credentials_changed" and refused.value.status == 401
    bare.check_credential(User("alice", ADMIN))  # a user without a password has no credential to follow
