"""Token lifetime: TOKEN_EXPIRING before `exp`, REFRESH_TOKEN, and the 1008 close at `exp` plus leeway."""

from __future__ import annotations

import json
import time
from typing import Any

import anyio
import jwt
import pytest
from starlette.requests import HTTPConnection
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from starlette_pomo_ws import AuthenticationError, PomoWS, Principal, Settings

from .conftest import WS_IMPLEMENTATIONS, make_app, make_settings, make_token, recv, run_server, wait_until

pytestmark = pytest.mark.anyio

WARNING = 2.0


@pytest.fixture(params=WS_IMPLEMENTATIONS)
def ws_impl(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def token_expiring_in(user_id: str, seconds: float) -> tuple[str, float]:
    """A token whose integer `exp` lies `seconds` from now (give or take under a second); and that `exp`."""
    exp = int(time.time() + seconds)
    return make_token(user_id, exp=exp), float(exp)


async def recv_type(ws: ClientConnection, type_: str, within: float = 8) -> dict[str, Any]:
    """The next message of a type, skipping HEARTBEATs; anything else is a failure."""
    with anyio.fail_after(within):
        while True:
            message = await recv(ws, within)
            if message["type"] != "HEARTBEAT":
                assert message["type"] == type_, message
                return message


async def closed_with(ws: ClientConnection, within: float = 8) -> tuple[tuple[int, str], list[dict[str, Any]]]:
    """Read until the close frame; return its code and reason, and the messages before it."""
    seen: list[dict[str, Any]] = []
    with anyio.fail_after(within):
        try:
            while True:
                seen.append(json.loads(await ws.recv()))
        except ConnectionClosed as exc:
            assert exc.rcvd is not None, "the server closed without a close frame"
            return (exc.rcvd.code, exc.rcvd.reason), seen


async def ping_pong(ws: ClientConnection) -> None:
    await ws.send(json.dumps({"type": "PING"}))
    await recv_type(ws, "PONG")


async def refresh(ws: ClientConnection, token: str) -> None:
    await ws.send(json.dumps({"type": "REFRESH_TOKEN", "data": {"token": token}}))


async def test_token_expiring_is_sent_before_exp_then_the_connection_closes_at_exp(ws_impl: str) -> None:
    pomo = PomoWS(make_settings(token_expiry_warning=WARNING))
    async with run_server(make_app(pomo), ws=ws_impl) as server:
        token, exp = token_expiring_in("u1", 3.5)
        async with connect(server.url(f"/ws?token={token}")) as ws:
            await recv_type(ws, "CONNECTION_ESTABLISHED")
            warning = await recv_type(ws, "TOKEN_EXPIRING")
            warned_at = time.time()
            # Sent `token_expiry_warning` seconds before exp (the server ticks every 0.5 s here).
            assert exp - WARNING - 0.05 <= warned_at <= exp - WARNING + 1.0
            assert warning["userId"] == "u1"
            assert "id" not in warning
            assert warning["data"]["expiresAt"].endswith("Z")
            assert 0 < warning["data"]["expiresIn"] <= WARNING + 0.05
            close, before = await closed_with(ws)
            closed_at = time.time()
        assert close == (1008, "Authentication token expired")
        assert [m["type"] for m in before if m["type"] != "HEARTBEAT"] == []
        assert exp - 0.05 <= closed_at <= exp + 1.5
        await wait_until(lambda: pomo.broadcaster.total_connection_count() == 0, what="the expired connection released")


async def test_the_close_waits_for_the_leeway() -> None:
    leeway = 1.5
    pomo = PomoWS(make_settings(token_expiry_warning=0, jwt_leeway=leeway))
    async with run_server(make_app(pomo)) as server:
        token, exp = token_expiring_in("u1", 1.5)
        async with connect(server.url(f"/ws?token={token}")) as ws:
            await recv_type(ws, "CONNECTION_ESTABLISHED")
            close, before = await closed_with(ws)
            closed_at = time.time()
        assert close == (1008, "Authentication token expired")
        # With the warning off, nothing comes before the close.
        assert [m["type"] for m in before if m["type"] != "HEARTBEAT"] == []
        assert exp + leeway - 0.05 <= closed_at <= exp + leeway + 1.5


async def test_refresh_keeps_the_connection_alive_past_the_old_exp(ws_impl: str) -> None:
    pomo = PomoWS(make_settings(token_expiry_warning=WARNING))
    async with run_server(make_app(pomo), ws=ws_impl) as server:
        token, exp = token_expiring_in("u1", 3.5)
        url = server.url(f"/ws?token={token}")
        async with connect(url) as refreshed, connect(url) as control:
            await recv_type(refreshed, "CONNECTION_ESTABLISHED")
            await recv_type(control, "CONNECTION_ESTABLISHED")
            await recv_type(refreshed, "TOKEN_EXPIRING")
            new_token = make_token("u1", ttl=300)
            new_exp = jwt.decode(new_token, options={"verify_signature": False})["exp"]
            await refresh(refreshed, new_token)
            answer = await recv_type(refreshed, "TOKEN_REFRESHED")
            assert answer["userId"] == "u1"
            assert "id" not in answer
            assert answer["data"]["expiresAt"].startswith(time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(new_exp)))
            # The control connection, with the same old token and no refresh, is closed at the old exp.
            close, _ = await closed_with(control)
            assert close == (1008, "Authentication token expired")
            assert time.time() >= exp - 0.05
            # The refreshed one lives on; its old expiry timer is void.
            await ping_pong(refreshed)
            assert pomo.broadcaster.user_connection_count("u1") == 1
            event = await pomo.broadcaster.broadcast_to_user("u1", "TASK_CREATED", {"id": 1})
            delivered = await recv_type(refreshed, "TASK_CREATED")
            assert delivered["id"] == event.id


async def test_a_refreshed_token_gets_its_own_warning_and_close() -> None:
    pomo = PomoWS(make_settings(token_expiry_warning=1))
    async with run_server(make_app(pomo)) as server:
        token, _ = token_expiring_in("u1", 300)
        async with connect(server.url(f"/ws?token={token}")) as ws:
            await recv_type(ws, "CONNECTION_ESTABLISHED")
            short, short_exp = token_expiring_in("u1", 2.5)
            await refresh(ws, short)
            await recv_type(ws, "TOKEN_REFRESHED")
            await recv_type(ws, "TOKEN_EXPIRING")
            close, _ = await closed_with(ws)
            assert close == (1008, "Authentication token expired")
            assert time.time() >= short_exp - 0.05


async def test_a_refresh_token_for_another_user_closes_with_1008(ws_impl: str) -> None:
    pomo = PomoWS(make_settings())
    async with run_server(make_app(pomo), ws=ws_impl) as server:
        async with (
            connect(server.url(f"/ws?token={make_token('alice')}")) as alice,
            connect(server.url(f"/ws?token={make_token('bob')}")) as bob,
        ):
            await recv_type(alice, "CONNECTION_ESTABLISHED")
            await recv_type(bob, "CONNECTION_ESTABLISHED")
            await refresh(alice, make_token("bob"))
            close, before = await closed_with(alice)
            assert close == (1008, "Token is for another user")
            assert before == []
            # Neither the victim nor anyone else is touched.
            await ping_pong(bob)
            assert pomo.broadcaster.user_connection_count("alice") == 0
            assert pomo.broadcaster.user_connection_count("bob") == 1


@pytest.mark.parametrize(
    ("bad_token", "reason"),
    [
        ("not-a-jwt", "Invalid authentication token"),
        (make_token("u1", secret="another-secret-0123456789-0123456789-0123"), "Invalid authentication token"),
        (make_token("u1", ttl=-60), "Authentication token expired"),
        (make_token(None, ttl=86_400), "Invalid authentication token"),  # minted at collection: outlive the suite
        (make_token("u1", ttl=None), "Invalid authentication token"),  # no exp, and jwt_require_exp is on
        ("x" * 20_000, "Invalid authentication token"),
    ],
    ids=["garbage", "wrong-key", "expired", "no-user-claim", "no-exp", "oversized"],
)
async def test_an_invalid_refresh_token_gets_error_and_the_connection_stays(bad_token: str, reason: str) -> None:
    pomo = PomoWS(make_settings(token_expiry_warning=WARNING))
    async with run_server(make_app(pomo)) as server:
        token, exp = token_expiring_in("u1", 300)
        async with connect(server.url(f"/ws?token={token}")) as ws:
            await recv_type(ws, "CONNECTION_ESTABLISHED")
            await refresh(ws, bad_token)
            error = await recv_type(ws, "ERROR")
            assert error["data"]["code"] == "invalid_token"
            assert error["data"]["message"] == reason
            assert bad_token not in json.dumps(error), "the token is never echoed"
            await ping_pong(ws)
            # The failed refresh changed nothing: the connection keeps its original expiry.
            (connection,) = pomo.broadcaster.registry.of_user("u1")
            assert connection.expires_at == exp


async def test_a_custom_authenticate_gets_the_same_warning_refresh_and_close() -> None:
    """`Principal.expires_at` drives the timers; a refresh calls the callable with the new token as a Bearer header."""
    calls: list[tuple[str | None, str | None]] = []
    deadline = time.time() + 2.5

    async def authenticate(connection: HTTPConnection) -> Principal:
        header, key = connection.headers.get("authorization"), connection.query_params.get("key")
        calls.append((header, key))
        credential = header.removeprefix("Bearer ") if header else key
        if credential == "short":
            return Principal("u1", expires_at=deadline)
        if credential == "forever":
            return Principal("u1")
        raise AuthenticationError("Invalid authentication token")

    pomo = PomoWS(Settings(token_expiry_warning=1), authenticate=authenticate)
    async with run_server(make_app(pomo)) as server:
        url = server.url("/ws?key=short")
        async with connect(url) as refreshed, connect(url) as control:
            await recv_type(refreshed, "CONNECTION_ESTABLISHED")
            await recv_type(control, "CONNECTION_ESTABLISHED")
            await recv_type(refreshed, "TOKEN_EXPIRING")
            await refresh(refreshed, "forever")
            answer = await recv_type(refreshed, "TOKEN_REFRESHED")
            assert answer["data"]["expiresAt"] is None
            # The refresh re-ran the callable with the new token as the only credential.
            assert calls[-1] == ("Bearer forever", None)
            close, _ = await closed_with(control)
            assert close == (1008, "Authentication token expired")
            assert time.time() >= deadline - 0.05
            await ping_pong(refreshed)
