from __future__ import annotations

import logging
import time
from typing import Any

import anyio
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.requests import HTTPConnection
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from starlette_pomo_ws import AuthenticationError, ConfigurationError, PomoWS, Principal, Settings
from starlette_pomo_ws._auth import JWTAuthenticator, RefusalLog, _token_algorithm

from .conftest import SECRET, make_app, make_settings, make_token


def refusal(app: Any, path: str = "/ws", **kwargs: Any) -> tuple[int, str]:
    with TestClient(app) as client:
        with pytest.raises(WebSocketDisconnect) as exc:
            with client.websocket_connect(path, **kwargs) as ws:
                ws.receive_json()
    return exc.value.code, exc.value.reason


def hello(app: Any, path: str = "/ws", **kwargs: Any) -> dict[str, Any]:
    with TestClient(app) as client, client.websocket_connect(path, **kwargs) as ws:
        message: dict[str, Any] = ws.receive_json()
        assert message["type"] == "CONNECTION_ESTABLISHED"
        return message


@pytest.fixture(scope="module")
def rsa_keys() -> tuple[bytes, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, public.decode()


def test_token_from_each_place() -> None:
    app = make_app(PomoWS(make_settings()))
    token = make_token("alice")
    assert hello(app, f"/ws?token={token}")["userId"] == "alice"
    assert hello(app, "/ws/", subprotocols=["bearer", token])["userId"] == "alice"
    assert hello(app, "/ws", headers={"Authorization": f"Bearer {token}"})["userId"] == "alice"


def test_query_tokens_can_be_refused() -> None:
    app = make_app(PomoWS(make_settings(token_query_param=None)))
    assert refusal(app, f"/ws?token={make_token()}") == (1008, "No authentication token provided")
    assert hello(app, "/ws", subprotocols=["bearer", make_token()])["userId"] == "u1"


def test_cookie_tokens_need_an_allowed_origin() -> None:
    settings = make_settings(token_cookie="session", allowed_origins=("https://app.example.com",))
    app = make_app(PomoWS(settings))
    cookie = {"cookie": f"session={make_token('carol')}"}
    assert hello(app, headers={**cookie, "origin": "https://app.example.com"})["userId"] == "carol"
    assert refusal(app, headers=cookie) == (1008, "Origin not allowed")
    assert refusal(app, headers={**cookie, "origin": "https://evil.example"}) == (1008, "Origin not allowed")


def test_alg_none_is_refused() -> None:
    unsigned = jwt.encode({"userId": "u1", "exp": int(time.time()) + 60}, key="", algorithm="none")
    assert refusal(make_app(PomoWS(make_settings())), f"/ws?token={unsigned}") == (1008, "Invalid authentication token")


def test_algorithm_confusion_is_refused(rsa_keys: tuple[bytes, str]) -> None:
    """An HS256 token signed with the server's RSA public key must not pass as RS256."""
    private, public = rsa_keys
    app = make_app(PomoWS(Settings(jwt_secret=public, jwt_algorithms=("RS256",), cursor_secret="c" * 32)))
    good = jwt.encode({"userId": "u1", "exp": int(time.time()) + 60}, private, algorithm="RS256")
    assert hello(app, f"/ws?token={good}")["userId"] == "u1"
    import base64
    import hashlib
    import hmac
    import json

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = b64(json.dumps({"userId": "u1", "exp": int(time.time()) + 60}).encode())
    signature = b64(hmac.new(public.encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest())
    forged = f"{header}.{payload}.{signature}"
    assert refusal(app, f"/ws?token={forged}") == (1008, "Invalid authentication token")


# Times are offsets from the moment the test runs (parametrize values are built at collection).
@pytest.mark.parametrize(
    ("settings", "claims", "reason"),
    [
        ({}, {"exp": -5}, "Authentication token expired"),
        ({"jwt_leeway": 60}, {"exp": -5}, None),
        ({}, {"nbf": 60}, "Invalid authentication token"),
        ({"jwt_audience": "pomo"}, {"aud": "other"}, "Invalid authentication token"),
        ({"jwt_audience": "pomo"}, {"aud": "pomo"}, None),
        ({"jwt_audience": "pomo"}, {}, "Invalid authentication token"),
        ({"jwt_issuer": "https://auth"}, {"iss": "https://evil"}, "Invalid authentication token"),
        ({"jwt_issuer": "https://auth"}, {"iss": "https://auth"}, None),
        ({}, {"exp": None}, "Invalid authentication token"),
        ({"jwt_require_exp": False}, {"exp": None}, None),
        ({}, {"userId": None}, "Invalid authentication token"),
        ({}, {"userId": ""}, "Invalid authentication token"),
        ({}, {"userId": ["a"]}, "Invalid authentication token"),
        ({"user_id_claim": "sub"}, {"sub": "dana"}, None),
    ],
)
def test_claims_are_enforced(settings: dict[str, Any], claims: dict[str, Any], reason: str | None) -> None:
    now = int(time.time())
    payload: dict[str, Any] = {"userId": "u1", "exp": now + 60}
    for claim, value in claims.items():
        payload[claim] = now + value if claim in ("exp", "nbf") and value is not None else value
    payload = {k: v for k, v in payload.items() if v is not None}
    token = jwt.encode(payload, SECRET, algorithm="HS256")
    app = make_app(PomoWS(make_settings(**settings)))
    if reason is None:
        assert hello(app, f"/ws?token={token}")["type"] == "CONNECTION_ESTABLISHED"
    else:
        assert refusal(app, f"/ws?token={token}") == (1008, reason)


def test_a_numeric_user_id_becomes_a_string() -> None:
    app = make_app(PomoWS(make_settings()))
    assert hello(app, f"/ws?token={make_token(42)}")["userId"] == "42"


def test_a_custom_authenticate_replaces_the_jwt_check() -> None:
    async def authenticate(connection: HTTPConnection) -> Principal:
        api_key = connection.headers.get("x-api-key")
        if api_key != "let-me-in":
            raise AuthenticationError("Bad API key")
        return Principal(user_id=7, claims={"plan": "pro"})  # type: ignore[arg-type]

    app = make_app(PomoWS(Settings(), authenticate=authenticate))
    assert hello(app, headers={"x-api-key": "let-me-in"})["userId"] == "7"
    assert refusal(app, headers={"x-api-key": "nope"}) == (1008, "Bad API key")


def test_a_broken_authenticate_is_an_internal_error(caplog: pytest.LogCaptureFixture) -> None:
    async def authenticate(connection: HTTPConnection) -> Principal:
        raise RuntimeError("database down")

    app = make_app(PomoWS(Settings(), authenticate=authenticate))
    with caplog.at_level(logging.ERROR, logger="starlette_pomo_ws"):
        assert refusal(app) == (1011, "Internal error")
    assert "authenticate callable failed" in caplog.text


def test_tokens_never_reach_the_logs(caplog: pytest.LogCaptureFixture) -> None:
    app = make_app(PomoWS(make_settings()))
    good, expired, forged = make_token("u1"), make_token("u1", ttl=-10), make_token("u1", secret="f" * 40)
    with caplog.at_level(logging.DEBUG):
        hello(app, f"/ws?token={good}")
        refusal(app, f"/ws?token={expired}")
        refusal(app, f"/ws?token={forged}")
    assert caplog.records, "connections are logged"
    for token in (good, expired, forged):
        assert token not in caplog.text
        assert token.split(".")[2] not in caplog.text


# -- claims PyJWT lets through ---------------------------------------------------------------------------

INVALID = (1008, "Invalid authentication token")


@pytest.mark.parametrize(
    ("exp", "cause"),
    [
        ("99999999999", "claim 'exp' must be a number, not str"),  # PyJWT calls int(): it never expired
        (10**17, "claim 'exp' is out of range"),  # iso_timestamp cannot write it: the handler crashed
        (253402300800, "claim 'exp' is out of range"),  # 10000-01-01T00:00:00Z
        (1e300, "claim 'exp' is out of range"),
    ],
)
def test_an_exp_that_is_not_a_sane_number_is_refused(exp: Any, cause: str, caplog: pytest.LogCaptureFixture) -> None:
    app = make_app(PomoWS(make_settings()))
    with caplog.at_level(logging.WARNING, logger="starlette_pomo_ws"):
        assert refusal(app, f"/ws?token={make_token(exp=exp)}") == INVALID
    assert cause in caplog.text


def test_the_latest_exp_that_can_be_written_is_accepted() -> None:
    app = make_app(PomoWS(make_settings()))
    assert hello(app, f"/ws?token={make_token(exp=253402300799)}")["userId"] == "u1"


@pytest.mark.parametrize("exp", [10**17, "99999999999", True])
def test_a_refresh_token_with_an_absurd_exp_gets_an_error_event(exp: Any) -> None:
    """A REFRESH_TOKEN whose exp is 10**17 crashed the handler (OSError in iso_timestamp): no close frame."""
    app = make_app(PomoWS(make_settings()))
    with TestClient(app) as client, client.websocket_connect(f"/ws?token={make_token()}") as ws:
        assert ws.receive_json()["type"] == "CONNECTION_ESTABLISHED"
        ws.send_json({"type": "REFRESH_TOKEN", "data": {"token": make_token(exp=exp)}})
        error = ws.receive_json()
        assert (error["type"], error["data"]["code"]) == ("ERROR", "invalid_token")
        assert error["data"]["message"] in ("Invalid authentication token", "Authentication token expired")
        ws.send_json({"type": "PING"})
        assert ws.receive_json()["type"] == "PONG"


def test_an_issuer_that_only_partly_matches_is_refused() -> None:
    """CVE-2024-53861: PyJWT 2.10.0 let `iss: "auth"` pass a check for "https://auth.example.com"."""
    app = make_app(PomoWS(make_settings(jwt_issuer="https://auth.example.com")))
    assert refusal(app, f"/ws?token={make_token(iss='auth')}") == INVALID
    assert refusal(app, f"/ws?token={make_token(iss='https://auth.example.co')}") == INVALID
    assert hello(app, f"/ws?token={make_token(iss='https://auth.example.com')}")["userId"] == "u1"


# -- user ids ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("user", "cause"),
    [
        ("\ud800", "the user id contains the character '\\ud800'"),  # was a 1011 with a UnicodeEncodeError
        ("alice\nINFO forged line", "the user id contains the character '\\n'"),
        ("a\x00b", "the user id contains the character '\\x00'"),
        ("a\u2028b", "the user id contains the character '\\u2028'"),
        ("a" * 257, "the user id is longer than 256 characters"),
        ("", "claim 'userId': the user id is empty"),
        (10**300, "the user id is longer than 256 characters"),
        (True, "unusable claim 'userId'"),
    ],
)
def test_unusable_user_ids_are_refused_and_the_log_says_why(
    user: Any, cause: str, caplog: pytest.LogCaptureFixture
) -> None:
    pomo = PomoWS(make_settings())
    with caplog.at_level(logging.WARNING, logger="starlette_pomo_ws"):
        assert refusal(make_app(pomo), f"/ws?token={make_token(user)}") == INVALID
    assert cause in caplog.text
    assert "\n" not in caplog.records[-1].getMessage(), "a user id cannot forge a log line"
    assert pomo.broadcaster.stats.rejected["auth"] == 1


def test_user_ids_of_256_characters_and_any_script_are_fine() -> None:
    app = make_app(PomoWS(make_settings()))
    for user in ("a" * 256, "Zoë 😀 مرحبا", "user:42@example.com", "a\u00a0b"):
        assert hello(app, f"/ws?token={make_token(user)}")["userId"] == user


def test_a_custom_authenticate_that_returns_an_unusable_user_id_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    async def authenticate(connection: HTTPConnection) -> Principal:
        return Principal(user_id="bob\r\nx")

    app = make_app(PomoWS(Settings(), authenticate=authenticate))
    with caplog.at_level(logging.WARNING, logger="starlette_pomo_ws"):
        assert refusal(app) == INVALID
    assert "authenticate returned an unusable user id: the user id contains the character '\\r'" in caplog.text


# -- JWT errors that escaped as 1011 --------------------------------------------------------------------


def test_a_token_for_an_algorithm_the_key_cannot_check_is_a_1008(caplog: pytest.LogCaptureFixture) -> None:
    """An EdDSA token against an HMAC key: PyJWT raises InvalidKeyError-type errors, not InvalidTokenError."""
    from cryptography.hazmat.primitives.asymmetric import ed25519

    private = ed25519.Ed25519PrivateKey.generate()
    token = jwt.encode({"userId": "u1", "exp": int(time.time()) + 60}, private, algorithm="EdDSA")
    with caplog.at_level(logging.WARNING, logger="starlette_pomo_ws"):
        assert refusal(make_app(PomoWS(make_settings())), f"/ws?token={token}") == INVALID
    assert "unsupported algorithm 'EdDSA' (accepted: HS256)" in caplog.text
    assert not [r for r in caplog.records if r.exc_info], "no traceback for a bad token"


@pytest.mark.parametrize("error", [jwt.InvalidKeyError, jwt.PyJWTError, RecursionError, OverflowError])
def test_every_pyjwt_failure_is_a_1008_without_a_traceback(
    error: type[Exception], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Whatever PyJWT raises (InvalidKeyError, RecursionError on old versions' deep headers), the client gets 1008."""

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise error("boom")

    monkeypatch.setattr(jwt.PyJWT, "decode", broken)
    with caplog.at_level(logging.WARNING, logger="starlette_pomo_ws"):
        assert refusal(make_app(PomoWS(make_settings())), f"/ws?token={make_token()}") == INVALID
    assert not [r for r in caplog.records if r.exc_info]


@pytest.mark.parametrize(
    ("algorithms", "wrong"), [(("RS256", "EdDSA"), "EdDSA"), (("ES256",), "ES256"), (("PS256", "RS512"), None)]
)
def test_algorithms_that_do_not_fit_the_key_are_refused_at_startup(
    rsa_keys: tuple[bytes, str], algorithms: tuple[str, ...], wrong: str | None
) -> None:
    _, public = rsa_keys
    pomo = PomoWS(Settings(jwt_secret=public, jwt_algorithms=algorithms, cursor_secret="c" * 32))
    if wrong is None:
        with TestClient(make_app(pomo)):
            pass
        return
    with pytest.raises(ConfigurationError, match=f"Setting 'jwt_algorithms' has {wrong}, which an RSA key"):
        with TestClient(make_app(pomo)):
            pass  # pragma: no cover


def test_key_types_and_curves_are_matched_at_startup() -> None:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    def pem(key: Any) -> str:
        return str(
            key.public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            .decode()
        )

    p256, p384, ed = (
        pem(ec.generate_private_key(ec.SECP256R1())),
        pem(ec.generate_private_key(ec.SECP384R1())),
        pem(ed25519.Ed25519PrivateKey.generate()),
    )
    for key, algorithms in ((p256, ("ES256",)), (p384, ("ES384",)), (ed, ("EdDSA",))):
        JWTAuthenticator(Settings(jwt_secret=key, jwt_algorithms=algorithms))
    for key, algorithms in ((p256, ("ES384",)), (ed, ("RS256",))):
        with pytest.raises(ConfigurationError, match="'jwt_algorithms'"):
            JWTAuthenticator(Settings(jwt_secret=key, jwt_algorithms=algorithms))
    with pytest.raises(ConfigurationError, match="'jwt_secret' is not a readable PEM public key"):
        JWTAuthenticator(
            Settings(jwt_secret="-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----", jwt_algorithms=("RS256",))
        )


# -- the log says why ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "token", "cause"),
    [
        ({}, lambda: jwt.encode({"sub": "u1", "exp": int(time.time()) + 60}, SECRET, algorithm="HS256"),
         "missing claim 'userId' (hint: set user_id_claim=\"sub\")"),
        ({}, lambda: make_token(ttl=None), "missing exp"),
        ({}, lambda: make_token(secret="x" * 40), "bad signature"),
        ({"jwt_audience": "pomo"}, lambda: make_token(aud="other"), "wrong audience (expected 'pomo')"),
        ({"jwt_issuer": "https://a"}, lambda: make_token(iss="https://b"), "wrong issuer (expected 'https://a')"),
        ({}, lambda: make_token(ttl=-30), "expired"),
        ({}, lambda: jwt.encode({"userId": "u1"}, "k" * 64, algorithm="HS512"), "unsupported algorithm 'HS512'"),
        ({}, lambda: make_token(nbf=int(time.time()) + 600), "not valid yet"),
        ({}, lambda: "not.a.token", "malformed token (DecodeError"),
        ({}, lambda: "x" * 9000, "longer than 8192 characters"),
    ],
)  # fmt: skip
def test_the_log_line_names_the_cause_but_the_client_sees_the_documented_reason(
    settings: dict[str, Any], token: Any, cause: str, caplog: pytest.LogCaptureFixture
) -> None:
    text = token()
    with caplog.at_level(logging.WARNING, logger="starlette_pomo_ws"):
        code, reason = refusal(make_app(PomoWS(make_settings(**settings))), f"/ws?token={text}")
    assert code == 1008
    assert reason in ("Invalid authentication token", "Authentication token expired")
    lines = [r for r in caplog.records if r.getMessage().startswith("Refused a WebSocket")]
    assert len(lines) == 1
    assert lines[0].levelno == logging.WARNING
    assert cause in lines[0].getMessage()
    assert text not in caplog.text


def test_origin_and_limit_refusals_are_warnings(caplog: pytest.LogCaptureFixture) -> None:
    app = make_app(PomoWS(make_settings(allowed_origins=("https://app.example.com",), max_connections_per_user=1)))
    token = make_token()
    with caplog.at_level(logging.WARNING, logger="starlette_pomo_ws"), TestClient(app) as client:
        with (
            pytest.raises(WebSocketDisconnect),
            client.websocket_connect(f"/ws?token={token}", headers={"origin": "https://evil.example"}) as ws,
        ):
            ws.receive_json()
        with client.websocket_connect(f"/ws?token={token}") as first:
            first.receive_json()
            with pytest.raises(WebSocketDisconnect) as exc, client.websocket_connect(f"/ws?token={token}") as second:
                second.receive_json()
            assert exc.value.code == 1008
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("(origin): Origin not allowed; origin 'https://evil.example'" in m for m in messages)
    assert any("(limit): Too many connections for this user; user 'u1'" in m for m in messages)
    assert token not in caplog.text


@pytest.mark.anyio
async def test_a_flood_of_refusals_is_rate_limited_with_a_summary(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    log = RefusalLog(per_second=3, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="starlette_pomo_ws"):
        for _ in range(1000):
            log.refused("auth", "Invalid authentication token", "bad signature", ("10.0.0.1", 5000))
        log.refused("origin", "Origin not allowed", "origin 'x'")  # another reason has its own budget
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 4
        assert lines[0] == "Refused a WebSocket from 10.0.0.1:5000 (auth): Invalid authentication token; bad signature"
        now[0] += 1.0  # the next second: the summary first, then a fresh budget
        log.refused("auth", "Invalid authentication token")
    lines = [r.getMessage() for r in caplog.records]
    assert lines[4:] == [
        "997 more refusals (auth: Invalid authentication token) suppressed in one second",
        "Refused a WebSocket (auth): Invalid authentication token",
    ]


@pytest.mark.anyio
async def test_the_summary_comes_even_when_the_flood_stops() -> None:
    log = RefusalLog(per_second=1)
    summary = "4 more refusals (auth: No authentication token provided) suppressed in one second"
    arrived = anyio.Event()

    class Watch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage() == summary:
                arrived.set()

    watch = Watch()
    logging.getLogger("starlette_pomo_ws").addHandler(watch)
    try:
        for _ in range(5):
            log.refused("auth", "No authentication token provided")
        with anyio.fail_after(3):
            await arrived.wait()
    finally:
        logging.getLogger("starlette_pomo_ws").removeHandler(watch)


def test_a_key_type_that_jwts_cannot_use_is_refused_at_startup() -> None:
    from cryptography.hazmat.primitives.asymmetric import x25519

    pem = (
        x25519.X25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    with pytest.raises(ConfigurationError, match=r"'jwt_secret' holds a \w*X25519\w*, which JWTs cannot use"):
        JWTAuthenticator(Settings(jwt_secret=pem, jwt_algorithms=("EdDSA",)))


def test_the_algorithm_named_in_a_log_line_is_bounded() -> None:
    assert _token_algorithm("garbage") == "?"
    assert _token_algorithm(jwt.encode({}, "k" * 32, headers={"alg": "HS256", "x": 1})) == "HS256"
    assert _token_algorithm(jwt.encode({}, "k" * 64, algorithm="HS512")) == "HS512"


@pytest.mark.anyio
async def test_many_reasons_in_one_second_stay_bounded(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    log = RefusalLog(per_second=1, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="starlette_pomo_ws"):
        log.refused("auth", "old reason")
        log.refused("auth", "old reason")  # suppressed
        now[0] = 2.0
        for n in range(70):  # a custom authenticate with many reasons: stale ones are dropped, with their summary
            log.refused("auth", f"reason {n}")
    assert "1 more refusals (auth: old reason) suppressed in one second" in caplog.text
    assert len(log._windows) <= 70
    assert "auth: old reason" not in log._windows
