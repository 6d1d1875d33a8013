"""Who may connect and how much they may send: origins, cookie auth, per-user caps, rate limits, sizes, bad frames."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from starlette.requests import HTTPConnection
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from starlette_pomo_ws import AuthenticationError, ConfigurationError, Connection, PomoWS, Principal, Settings

from .conftest import (
    WS_IMPLEMENTATIONS,
    RunningServer,
    closed_with,
    make_app,
    make_settings,
    make_token,
    recv,
    run_server,
    wait_until,
)

pytestmark = pytest.mark.anyio

ALLOWED = ("https://app.example.com", "https://*.example.com")


async def established(ws: ClientConnection) -> dict[str, Any]:
    hello = await recv(ws)
    assert hello["type"] == "CONNECTION_ESTABLISHED", hello
    return hello


async def ping_pong(ws: ClientConnection) -> None:
    """The connection is alive and answers in order: the next message after a PING is its PONG."""
    await ws.send(json.dumps({"type": "PING"}))
    assert (await recv(ws))["type"] == "PONG"


@pytest.fixture
async def origin_server() -> AsyncIterator[RunningServer]:
    pomo = PomoWS(make_settings(allowed_origins=ALLOWED))
    async with run_server(make_app(pomo)) as server:
        yield server


# -- origins -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "origin",
    [
        "https://app.example.com",
        "https://a.example.com",
        "https://a.b.example.com",
        "HTTPS://A.Example.COM",
        None,  # a non-browser client sends no Origin: allowed for token auth
    ],
)
async def test_allowed_origins_connect(origin_server: RunningServer, origin: str | None) -> None:
    headers = {} if origin is None else {"Origin": origin}
    async with connect(origin_server.url(f"/ws?token={make_token('u1')}"), additional_headers=headers) as ws:
        await established(ws)
        await ping_pong(ws)


@pytest.mark.parametrize(
    "origin",
    [
        "https://example.com",  # the wildcard needs a subdomain
        "https://evil-example.com",
        "https://a.example.com.evil.com",
        "http://a.example.com",  # another scheme is another origin
        "https://app.example.org",
        "null",  # sandboxed iframes and file:// pages: never allowed
    ],
)
async def test_refused_origins_get_1008(origin_server: RunningServer, origin: str) -> None:
    url = origin_server.url(f"/ws?token={make_token('u1')}")
    async with connect(url, additional_headers={"Origin": origin}) as ws:
        assert await closed_with(ws) == (1008, "Origin not allowed")


async def test_null_origin_is_refused_even_without_an_allow_list() -> None:
    pomo = PomoWS(make_settings())
    async with run_server(make_app(pomo)) as server:
        url = server.url(f"/ws?token={make_token('u1')}")
        async with connect(url, additional_headers={"Origin": "null"}) as ws:
            assert await closed_with(ws) == (1008, "Origin not allowed")
        async with connect(url, additional_headers={"Origin": "https://anything.test"}) as ws:
            await established(ws)
        await wait_until(lambda: pomo.broadcaster.total_connection_count() == 0, what="all released")


# -- cookie auth ---------------------------------------------------------------------------------------


async def test_cookie_auth_without_an_origin_allow_list_refuses_to_start() -> None:
    pomo = PomoWS(make_settings(token_cookie="session"))
    with anyio.fail_after(5), pytest.raises(ConfigurationError, match="allowed_origins"):
        async with pomo.lifespan():
            pytest.fail("the lifespan must not start")  # pragma: no cover
    assert not pomo.broadcaster.running


async def test_cookie_auth_needs_an_allowed_origin() -> None:
    pomo = PomoWS(make_settings(token_cookie="session", token_query_param=None, allowed_origins=ALLOWED))
    async with run_server(make_app(pomo)) as server:
        cookie = {"Cookie": f"session={make_token('cookie-user')}"}
        async with connect(server.url("/ws"), additional_headers={**cookie, "Origin": "https://app.example.com"}) as ws:
            hello = await established(ws)
            assert hello["userId"] == "cookie-user"
            await ping_pong(ws)
        # A cookie travels with every request the browser makes, so without an Origin the handshake could
        # come from anywhere: refused.
        async with connect(server.url("/ws"), additional_headers=cookie) as ws:
            assert await closed_with(ws) == (1008, "Origin not allowed")
        async with connect(server.url("/ws"), additional_headers={**cookie, "Origin": "https://evil.test"}) as ws:
            assert await closed_with(ws) == (1008, "Origin not allowed")
        await wait_until(lambda: pomo.broadcaster.total_connection_count() == 0, what="all released")


# -- refusal reasons -------------------------------------------------------------------------------------


@pytest.mark.parametrize("ws_impl", WS_IMPLEMENTATIONS)
async def test_a_long_refusal_reason_is_cut_to_fit_a_close_frame(ws_impl: str) -> None:
    """A close reason holds at most 123 bytes of UTF-8; a longer `AuthenticationError` reason must not lose it."""
    reason = "Your subscription has lapsed: " + "é" * 100

    async def authenticate(connection: HTTPConnection) -> Principal:
        raise AuthenticationError(reason)

    pomo = PomoWS(Settings(), authenticate=authenticate)
    async with run_server(make_app(pomo), ws=ws_impl) as server:
        async with connect(server.url("/ws")) as ws:
            code, received = await closed_with(ws)
    assert code == 1008
    assert len(received.encode()) <= 123
    assert reason.startswith(received) and len(received) > 30


# -- per-user connection cap ---------------------------------------------------------------------------


async def test_max_connections_per_user_is_enforced_per_user() -> None:
    pomo = PomoWS(make_settings(max_connections_per_user=2))
    async with run_server(make_app(pomo)) as server:
        url = server.url(f"/ws?token={make_token('alice')}")
        async with connect(url) as tab1, connect(url) as tab2:
            await established(tab1)
            await established(tab2)
            async with connect(url) as tab3:
                assert await closed_with(tab3) == (1008, "Too many connections for this user")
            assert pomo.broadcaster.user_connection_count("alice") == 2
            async with connect(server.url(f"/ws?token={make_token('bob')}")) as bob:
                await established(bob)
                await ping_pong(bob)
            await ping_pong(tab1)
            await ping_pong(tab2)
            await tab2.close()
            await wait_until(lambda: pomo.broadcaster.user_connection_count("alice") == 1, what="tab2 released")
            async with connect(url) as tab4:  # a freed slot can be used again
                await established(tab4)
                await ping_pong(tab4)
        await wait_until(lambda: pomo.broadcaster.total_connection_count() == 0, what="all released")


# -- client message rate -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "answer"),
    [
        ('{"type": "PING"}', "PONG"),
        ("not json", "ERROR"),
        (b"\x00", "ERROR"),  # binary frames cost the server an ERROR each: they count too
    ],
    ids=["ping", "invalid-json", "binary"],
)
async def test_a_flood_gets_errors_then_1008_and_a_control_connection_is_unaffected(
    frame: str | bytes, answer: str
) -> None:
    pomo = PomoWS(make_settings(client_message_rate=1, client_message_burst=5))
    async with run_server(make_app(pomo)) as server:
        url = server.url(f"/ws?token={make_token('u1')}")
        async with connect(url) as flooder, connect(url) as control:
            await established(flooder)
            await established(control)
            with contextlib.suppress(ConnectionClosed):  # the close may overtake the last sends
                for _ in range(40):
                    await flooder.send(frame)
            seen: list[dict[str, Any]] = []
            close = (0, "")
            with anyio.fail_after(5):
                try:
                    while len(seen) < 40:  # one answer per frame at most: 40 answers mean no close came
                        seen.append(json.loads(await flooder.recv()))
                except ConnectionClosed as exc:
                    assert exc.rcvd is not None
                    close = (exc.rcvd.code, exc.rcvd.reason)
            answers = [m["data"]["code"] if m["type"] == "ERROR" else m["type"] for m in seen]
            assert close == (1008, "Too many messages"), f"no close after {len(seen)} answers: {answers}"
            # The burst is served as usual, then come the warnings, then the close.
            assert [m["type"] for m in seen[:5]] == [answer] * 5
            warnings = seen[5:]
            assert warnings, "the flood was closed without a warning"
            assert all(m["type"] == "ERROR" and m["data"]["code"] == "rate_limited" for m in warnings), warnings
            # The same user's other connection has its own bucket.
            for _ in range(3):
                await ping_pong(control)
            assert pomo.broadcaster.user_connection_count("u1") == 1


# -- disconnect_user -----------------------------------------------------------------------------------


async def test_disconnect_user_closes_every_connection_of_that_user_with_1000() -> None:
    pomo = PomoWS(make_settings())
    async with run_server(make_app(pomo)) as server:
        alice = server.url(f"/ws?token={make_token('alice')}")
        async with (
            connect(alice) as tab1,
            connect(alice) as tab2,
            connect(server.url(f"/ws?token={make_token('bob')}")) as bob,
        ):
            for ws in (tab1, tab2, bob):
                await established(ws)
            await pomo.broadcaster.disconnect_user("alice")
            assert await closed_with(tab1) == (1000, "Disconnected by the server")
            assert await closed_with(tab2) == (1000, "Disconnected by the server")
            assert pomo.broadcaster.user_connection_count("alice") == 0
            await ping_pong(bob)
            async with connect(alice) as tab3:
                await established(tab3)
                await pomo.broadcaster.disconnect_user("alice", reason="Access revoked")
                assert await closed_with(tab3) == (1000, "Access revoked")
            async with connect(alice) as tab4:
                await established(tab4)
                # A close reason holds at most 123 bytes of UTF-8: a longer one is cut at a character boundary.
                await pomo.broadcaster.disconnect_user("alice", reason="é" * 100)
                assert await closed_with(tab4) == (1000, "é" * 61)
            await ping_pong(bob)
            assert pomo.broadcaster.total_connection_count() == 1


async def test_disconnect_user_with_a_newline_in_the_id_closes_nobody_else() -> None:
    """The user id travels as structured data: `"bob\\nx"` is not `bob` with the reason `"x\\n..."`."""
    pomo = PomoWS(make_settings())
    async with run_server(make_app(pomo)) as server:
        async with connect(server.url(f"/ws?token={make_token('bob')}")) as bob:
            await established(bob)
            await pomo.broadcaster.disconnect_user("bob\nx", reason="banned")
            await ping_pong(bob)
            assert pomo.broadcaster.user_connection_count("bob") == 1


# -- message size --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        "x" * 1025,
        "€" * 400,  # 400 characters but 1,200 bytes of UTF-8
        b"\x00" * 1025,
    ],
    ids=["text", "multibyte-text", "binary"],
)
async def test_a_message_over_max_message_size_closes_with_1009(payload: str | bytes) -> None:
    pomo = PomoWS(make_settings(max_message_size=1024))
    async with run_server(make_app(pomo)) as server:
        async with connect(server.url(f"/ws?token={make_token('u1')}")) as ws:
            await established(ws)
            await ws.send(payload)
            assert await closed_with(ws) == (1009, "Message too big")
        await wait_until(lambda: pomo.broadcaster.total_connection_count() == 0, what="released")


async def test_a_message_of_exactly_max_message_size_is_read() -> None:
    pomo = PomoWS(make_settings(max_message_size=1024))
    async with run_server(make_app(pomo)) as server:
        async with connect(server.url(f"/ws?token={make_token('u1')}")) as ws:
            await established(ws)
            message = '{"type": "PING", "pad": "' + "€" * 300 + '"}'
            message += " " * (1024 - len(message.encode()))  # JSON allows trailing whitespace
            assert len(message.encode()) == 1024
            await ws.send(message)
            assert (await recv(ws))["type"] == "PONG"


# -- malformed frames ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("{", "invalid_json"),
        ("", "invalid_json"),
        ("PING", "invalid_json"),
        ("[1, 2]", "not_an_object"),
        ('"PING"', "not_an_object"),
        ("null", "not_an_object"),
        ('{"data": 1}', "missing_type"),
        ('{"type": 5}', "missing_type"),
        ('{"type": ""}', "missing_type"),
        ('{"type": null}', "missing_type"),
        ('{"type": "NOPE"}', "unknown_type"),
        ('{"type": "TASK_CREATED", "data": {}}', "unknown_type"),
        ('{"type": "REFRESH_TOKEN"}', "invalid_token"),
        ('{"type": "REFRESH_TOKEN", "data": {"token": 5}}', "invalid_token"),
        (b"\x00\x01", "binary_not_supported"),
        (b"\xff\xfe not utf-8", "binary_not_supported"),
        (b'{"type": "PING"}', "binary_not_supported"),
    ],
)
async def test_malformed_frames_get_error_and_the_connection_stays(frame: str | bytes, code: str) -> None:
    pomo = PomoWS(make_settings())
    async with run_server(make_app(pomo)) as server:
        async with connect(server.url(f"/ws?token={make_token('u1')}")) as ws:
            await established(ws)
            await ws.send(frame)
            error = await recv(ws)
            assert error["type"] == "ERROR"
            assert error["userId"] == "u1"
            assert error["data"]["code"] == code
            assert isinstance(error["data"]["message"], str)
            assert "id" not in error, "protocol messages carry no id"
            await ping_pong(ws)
            assert pomo.broadcaster.user_connection_count("u1") == 1


@pytest.mark.parametrize(
    "frame",
    ["[" * 60_000, '{"a":' * 13_000, '{"type": "X", "data": ' + "[" * 60_000],
    ids=["arrays", "objects", "in-data"],
)
async def test_deeply_nested_json_gets_error_and_the_connection_stays(frame: str) -> None:
    """Nesting within `max_message_size` can exhaust the JSON decoder's recursion limit; that is malformed input."""
    pomo = PomoWS(make_settings())
    async with run_server(make_app(pomo)) as server:
        async with connect(server.url(f"/ws?token={make_token('u1')}")) as ws:
            await established(ws)
            assert len(frame.encode()) <= pomo.settings.max_message_size
            await ws.send(frame)
            error = await recv(ws)
            assert error["type"] == "ERROR"
            assert error["data"]["code"] == "invalid_json"
            await ping_pong(ws)


# -- on_message ----------------------------------------------------------------------------------------


async def test_on_message_gets_other_types_and_can_answer() -> None:
    received: list[tuple[str, dict[str, Any]]] = []

    async def on_message(connection: Connection, message: dict[str, Any]) -> None:
        received.append((connection.user_id, message))
        if message["type"] == "BOOM":
            raise RuntimeError("handler bug")
        await connection.send("ECHO", {"got": message.get("data")})

    pomo = PomoWS(make_settings(), on_message=on_message)
    async with run_server(make_app(pomo)) as server:
        async with connect(server.url(f"/ws?token={make_token(42)}")) as ws:
            await established(ws)
            await ws.send(json.dumps({"type": "TIMER_TICK", "data": {"left": 1500}}))
            echo = await recv(ws)
            assert echo["type"] == "ECHO"
            assert echo["userId"] == "42"
            assert echo["data"] == {"got": {"left": 1500}}
            assert echo["timestamp"].endswith("Z")
            assert "id" not in echo
            # The protocol's own types never reach the handler.
            await ping_pong(ws)
            # A failing handler costs the client an ERROR, not its connection.
            await ws.send(json.dumps({"type": "BOOM"}))
            error = await recv(ws)
            assert error["type"] == "ERROR"
            assert error["data"]["code"] == "handler_error"
            await ping_pong(ws)
    assert received == [("42", {"type": "TIMER_TICK", "data": {"left": 1500}}), ("42", {"type": "BOOM"})]
