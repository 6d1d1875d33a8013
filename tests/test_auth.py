from __future__ import annotations

import logging
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.requests import HTTPConnection
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from starlette_pomo_ws import AuthenticationError, PomoWS, Principal, Settings

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
