"""The test kit for users' apps: lifespan runner, in-process sockets with bounded waits, token minting."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any, Literal
from unittest.mock import ANY

import jwt
import pytest
from fastapi import FastAPI
from litestar import Litestar
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from starlette_pomo_ws import ConfigurationError, EventType, PomoWS, Settings, testing
from starlette_pomo_ws._types import Message, Receive, Scope, Send
from starlette_pomo_ws.litestar import PomoWSPlugin
from starlette_pomo_ws.testing import (
    ChannelRefused,
    PomoTestClient,
    PomoWebSocket,
    ReceiveTimeout,
    WebSocketClosed,
    mint_token,
    run_lifespan,
)

from .conftest import SECRET, make_app, make_settings

pytestmark = pytest.mark.anyio


def pomo_app(**settings: Any) -> Starlette:
    return make_app(PomoWS(make_settings(**settings)))


# -- PomoTestClient and PomoWebSocket -------------------------------------------------------------------


async def test_connect_expect_and_http() -> None:
    async with PomoTestClient(pomo_app()) as client, client.connect("u1") as ws:
        assert ws.established is not None
        assert ws.established["type"] == "CONNECTION_ESTABLISHED"
        assert ws.last_id == ws.established["id"]
        response = await client.http.post("/publish", json={"user": "u1", "type": "TASK_CREATED", "data": {"a": 1}})
        assert response.status_code == 200
        event = await ws.expect(EventType.TASK_CREATED, data={"a": 1}, user_id="u1")
        assert event["id"] == response.json()["id"] == ws.last_id
        assert client.http is client.http  # one client per PomoTestClient


async def test_every_framework() -> None:
    """Starlette, FastAPI and Litestar apps all run, and the client finds their settings to mint tokens."""
    fastapi = FastAPI(lifespan=(fast := PomoWS(make_settings())).lifespan)
    fastapi.mount("/ws", fast)
    litestar = Litestar(plugins=[PomoWSPlugin(lite := PomoWS(make_settings()))])
    for app, pomo in [(fastapi, fast), (litestar, lite)]:
        async with PomoTestClient(app) as client, client.connect("u1") as ws:
            assert client.pomo is pomo
            assert client.broadcaster is pomo.broadcaster
            await client.broadcaster.broadcast_to_all("NOTIFICATION", {"n": 1})
            await ws.expect("NOTIFICATION", data={"n": 1}, user_id=None)


async def test_token_sources_and_paths() -> None:
    async with PomoTestClient(pomo_app()) as client:
        async with client.connect("u1", token_via="subprotocol") as ws:
            assert ws.subprotocol == "bearer"
        async with client.connect("u1", token_via="header", path="/ws/") as ws:
            assert ws.subprotocol is None
        async with client.connect(token=client.mint_token("u2"), params={"x": "1"}) as ws:
            assert ws.established is not None and ws.established["userId"] == "u2"
        with pytest.raises(TypeError):
            async with client.connect("u1", token="t"):
                pass  # pragma: no cover


async def test_query_tokens_refused_falls_back_to_header() -> None:
    async with PomoTestClient(pomo_app(token_query_param=None)) as client, client.connect("u1") as ws:
        assert ws.established is not None


async def test_refusals() -> None:
    async with PomoTestClient(pomo_app(allowed_origins=("https://app.example.com",))) as client:
        with pytest.raises(WebSocketClosed) as refused:
            async with client.connect(token="forged"):
                pass  # pragma: no cover
        assert (refused.value.code, refused.value.reason) == (1008, "Invalid authentication token")
        assert "while waiting for a CONNECTION_ESTABLISHED event" in str(refused.value)
        async with client.connect(wait_established=False) as ws:
            assert await ws.expect_close(1008, "No authentication token provided") == (
                1008,
                "No authentication token provided",
            )
            assert ws.closed and ws.close_code == 1008
            with pytest.raises(WebSocketClosed):
                await ws.receive()
            with pytest.raises(WebSocketClosed):
                await ws.send_text("late")
        async with client.connect("u1", origin="https://evil.example", wait_established=False) as ws:
            with pytest.raises(AssertionError, match="Expected close code 1000, got 1008"):
                await ws.expect_close(1000)
        async with client.connect("u1", origin="https://evil.example", wait_established=False) as ws:
            with pytest.raises(AssertionError, match="Expected close reason 'x'"):
                await ws.expect_close(reason="x")
        async with client.connect("u1", origin="https://app.example.com") as ws:
            assert ws.established is not None


async def test_expect_failures_say_what_was_expected() -> None:
    async with PomoTestClient(pomo_app()) as client, client.connect("u1") as ws:
        started = time.monotonic()
        with pytest.raises(ReceiveTimeout, match="TASK_CREATED event") as timeout:
            await ws.expect("TASK_CREATED", timeout=0.05)
        assert isinstance(timeout.value, AssertionError) and isinstance(timeout.value, TimeoutError)
        assert time.monotonic() - started < 2
        with pytest.raises(ReceiveTimeout, match="a message"):
            await ws.receive(timeout=0.05)
        await client.broadcaster.broadcast_to_user("u1", "TASK_UPDATED", {"title": "Coffee"})
        with pytest.raises(AssertionError, match="Expected a TASK_CREATED event, got 'TASK_UPDATED'"):
            await ws.expect("TASK_CREATED")
        await client.broadcaster.broadcast_to_user("u1", "TASK_UPDATED", {"title": "Coffee"})
        with pytest.raises(AssertionError, match="data differ") as differ:
            await ws.expect("TASK_UPDATED", data={"title": "Tea"})
        assert "'Tea'" in str(differ.value) and "'Coffee'" in str(differ.value)
        await client.broadcaster.broadcast_to_user("u1", "TASK_UPDATED", None)
        with pytest.raises(AssertionError, match="for userId 'u1', expected None"):
            await ws.expect("TASK_UPDATED", user_id=None)
        await client.broadcaster.broadcast_to_user("u1", "TASK_UPDATED", {"id": "t9", "title": "Tea"})
        await ws.expect("TASK_UPDATED", data={"id": ANY, "title": "Tea"}, timeout=1)


async def test_expect_close_timeout_and_unexpected_message() -> None:
    async with PomoTestClient(pomo_app()) as client, client.connect("u1") as ws:
        with pytest.raises(ReceiveTimeout, match="server to close"):
            await ws.expect_close(timeout=0.05)
        await client.broadcaster.broadcast_to_user("u1", "TASK_DELETED")
        with pytest.raises(AssertionError, match="Expected a close, got 'TASK_DELETED'"):
            await ws.expect_close()


async def test_expect_close_may_skip_messages() -> None:
    async with PomoTestClient(pomo_app()) as client, client.connect("u1") as ws:
        await client.broadcaster.broadcast_to_user("u1", "TASK_DELETED")
        await client.broadcaster.disconnect_user("u1", reason="Logged out")
        assert await ws.expect_close(1000, "Logged out", skip_messages=True) == (1000, "Logged out")


async def test_a_close_while_expecting() -> None:
    async with PomoTestClient(pomo_app()) as client, client.connect("u1") as ws:
        await client.broadcaster.disconnect_user("u1")
        with pytest.raises(WebSocketClosed, match="while waiting for a TASK_CREATED event") as closed:
            await ws.expect("TASK_CREATED")
        assert (closed.value.code, closed.value.reason) == (1000, "Disconnected by the server")


async def test_heartbeats_are_skipped_by_expect() -> None:
    async with PomoTestClient(pomo_app(heartbeat_interval=0.05)) as client, client.connect("u1") as ws:
        assert (await ws.receive(timeout=2))["type"] == "HEARTBEAT"
        await ws.assert_no_event(within=0.2)
        # Put a heartbeat, unread, in front of the event: the server's own, sent the way the ticker sends it.
        (connection,) = client.broadcaster.registry.of_user("u1")
        connection.notify(EventType.HEARTBEAT)
        await client.broadcaster.broadcast_to_user("u1", "SESSION_START", {"minutes": 25})
        await ws.expect("SESSION_START", data={"minutes": 25})


async def test_assert_no_event() -> None:
    async with PomoTestClient(pomo_app()) as client, client.connect("u1") as u1, client.connect("u2") as u2:
        await client.broadcaster.broadcast_to_user("u1", "TASK_CREATED")
        await u2.assert_no_event(within=0.05)
        with pytest.raises(AssertionError, match=r"Expected no event within 0\.05 s, got 'TASK_CREATED'"):
            await u1.assert_no_event(within=0.05)


async def test_resume_with_last_id() -> None:
    async with PomoTestClient(pomo_app()) as client:
        async with client.connect("u1") as ws:
            await client.broadcaster.broadcast_to_user("u1", "TASK_CREATED", 1)
            await ws.expect("TASK_CREATED")
            cursor = ws.last_id
        await client.broadcaster.broadcast_to_user("u1", "TASK_UPDATED", 2)
        async with client.connect("u1", last_event_id=cursor) as ws:
            assert ws.established is not None and ws.established["data"]["resumed"] is True
            await ws.expect("TASK_UPDATED", data=2)
        async with client.connect("u2", last_event_id=cursor) as ws:
            await ws.expect("RESYNC_REQUIRED", data={"reason": "unknown_cursor"})


async def test_client_messages() -> None:
    async with PomoTestClient(pomo_app()) as client, client.connect("u1") as ws:
        pong = await ws.ping()
        assert pong["userId"] == "u1"
        await ws.send_text("{nope")
        await ws.expect("ERROR", data={"code": "invalid_json", "message": ANY})
        await ws.send_bytes(b"\x00")
        await ws.expect("ERROR", data={"code": "binary_not_supported", "message": ANY})
        await ws.send_json({"type": "REFRESH_TOKEN", "data": {"token": client.mint_token("u1", ttl=600)}})
        await ws.expect("TOKEN_REFRESHED")
        await ws.close()
        await ws.close()  # twice is harmless
        with pytest.raises(RuntimeError, match="closed"):
            await ws.send_json({"type": "PING"})


async def test_auth_headers_and_receive_text() -> None:
    async def whoami(request: Request) -> JSONResponse:
        token = request.headers["authorization"].removeprefix("Bearer ")
        return JSONResponse(jwt.decode(token, SECRET, algorithms=["HS256"]))

    pomo = PomoWS(make_settings())
    app = Starlette(lifespan=pomo.lifespan, routes=[Route("/whoami", whoami)])
    app.mount("/ws", pomo)
    async with PomoTestClient(app) as client, client.connect("u1") as ws:
        claims = (await client.http.get("/whoami", headers=client.auth_headers(7))).json()
        assert claims["userId"] == 7
        await client.broadcaster.broadcast_to_user("u1", "NOTIFICATION", "hi")
        assert '"data":"hi"' in await ws.receive_text()
        assert "PomoWebSocket /ws open" in repr(ws)
        assert "PomoTestClient(app=" in repr(client)


async def test_settings_lookup() -> None:
    explicit = make_settings(user_id_claim="sub")
    async with PomoTestClient(pomo_app(), settings=explicit) as client:
        assert client.settings is explicit
    bare = Starlette()
    async with PomoTestClient(bare) as client:
        with pytest.raises(LookupError, match="settings="):
            _ = client.settings
        with pytest.raises(LookupError, match="No broadcaster"):
            _ = client.broadcaster
        assert client.pomo is None
        assert client._token_query_param() == "token"


async def test_without_running_the_lifespan() -> None:
    pomo = PomoWS(make_settings())
    app = make_app(pomo)
    async with PomoTestClient(app) as outer, PomoTestClient(app, run_lifespan=False) as client:
        assert client.state == {}
        assert client.settings is pomo.settings
        assert client.broadcaster is pomo.broadcaster
        async with client.connect("u1") as ws:
            await outer.broadcaster.broadcast_to_user("u1", "TASK_CREATED")
            await ws.expect("TASK_CREATED")


async def test_configuration_errors_raise_on_enter() -> None:
    with pytest.raises(ConfigurationError, match="jwt_secret"):
        async with PomoTestClient(make_app(PomoWS(Settings(jwt_secret="short")))):
            pass  # pragma: no cover


async def test_the_client_closes_open_sockets_on_exit() -> None:
    async with PomoTestClient(pomo_app()) as client:
        cm = client.connect("u1")
        ws = await cm.__aenter__()
        assert client.broadcaster.total_connection_count() == 1
    assert ws.closed
    await cm.__aexit__(None, None, None)


# -- raw ASGI apps: the edges of the in-process transport -------------------------------------------------


async def test_an_app_that_refuses_before_accepting() -> None:
    async def close_first(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await receive()
            await send({"type": "websocket.close", "code": 1008, "reason": "nope"})

    async def return_first(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()

    async with PomoTestClient(close_first, run_lifespan=False, settings=make_settings()) as client:
        with pytest.raises(WebSocketClosed) as closed:
            async with client.connect("u1"):
                pass  # pragma: no cover
        assert (closed.value.code, closed.value.reason) == (1008, "nope")
    async with PomoTestClient(return_first, run_lifespan=False, settings=make_settings()) as client:
        with pytest.raises(WebSocketClosed, match="HTTP 403") as closed:
            async with client.connect("u1"):
                pass  # pragma: no cover
        assert closed.value.code == 1006


async def test_an_app_that_raises_or_returns() -> None:
    async def echo_then(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        message = await receive()
        if message.get("text") == "boom":
            raise ValueError("the app failed")
        if message.get("text") == "bytes":
            await send({"type": "websocket.send", "bytes": b"\x01"})
            await receive()
            return
        if message.get("text") == "other":
            await send({"type": "websocket.http.response.start"})
            await receive()

    async with PomoTestClient(echo_then, run_lifespan=False, settings=make_settings()) as client:
        async with client.connect("u1", wait_established=False) as ws:
            await ws.send_text("boom")
            with pytest.raises(ValueError, match="the app failed"):
                await ws.receive()
        async with client.connect("u1", wait_established=False) as ws:
            await ws.send_text("bytes")
            with pytest.raises(AssertionError, match="Expected a text frame"):
                await ws.receive()
            await ws.close()
            with pytest.raises(WebSocketClosed) as closed:
                await ws.receive()
            assert closed.value.code == 1006
        async with client.connect("u1", wait_established=False) as ws:
            await ws.send_text("other")
            with pytest.raises(AssertionError, match="Expected a text frame"):
                await ws.receive()


async def test_an_app_that_answers_the_handshake_oddly() -> None:
    async def odd(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "websocket.send", "text": "too early"})
        await receive()

    async with PomoTestClient(odd, run_lifespan=False, settings=make_settings()) as client:
        with pytest.raises(AssertionError, match=r"Expected websocket\.accept"):
            async with client.connect("u1"):
                pass  # pragma: no cover


async def test_an_app_that_sends_after_closing_or_never_returns() -> None:
    sent_after_close: list[BaseException] = []

    async def stubborn(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.close", "code": 1000})
        await send({"type": "websocket.close", "code": 1000})  # ignored, as servers do
        try:
            await send({"type": "websocket.send", "text": "late"})
        except OSError as exc:
            sent_after_close.append(exc)
        await asyncio.Event().wait()  # never returns

    async with PomoTestClient(stubborn, run_lifespan=False, settings=make_settings(), timeout=0.2) as client:
        with pytest.raises(AssertionError, match="did not return"):
            async with client.connect("u1", wait_established=False) as ws:
                await ws.expect_close(1000)
    assert len(sent_after_close) == 1


async def test_the_socket_repr_and_state() -> None:
    ws = PomoWebSocket(make_app(PomoWS(make_settings())), "/ws", "", [], [], 1.0)
    assert not ws.closed
    await ws.close()  # never opened: nothing to wait for
    assert "closed" in repr(ws)


# -- run_lifespan ---------------------------------------------------------------------------------------


async def test_run_lifespan_yields_the_state() -> None:
    pomo = PomoWS(make_settings())
    async with run_lifespan(make_app(pomo)) as state:
        assert state == {"broadcaster": pomo.broadcaster}
        assert pomo.broadcaster.running
    assert not pomo.broadcaster.running


async def test_run_lifespan_reports_failures() -> None:
    async def reports_failure(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "lifespan.startup.failed", "message": "no database"})

    async def returns_at_once(scope: Scope, receive: Receive, send: Send) -> None:
        return None

    async def raises_at_once(scope: Scope, receive: Receive, send: Send) -> None:
        raise KeyError("unsupported")

    async def hangs(scope: Scope, receive: Receive, send: Send) -> None:
        await asyncio.Event().wait()

    async def odd_message(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "lifespan.something"})

    cases: list[tuple[Any, type[BaseException], str]] = [
        (reports_failure, RuntimeError, "Lifespan startup failed: no database"),
        (returns_at_once, RuntimeError, "does it support lifespan"),
        (raises_at_once, KeyError, "unsupported"),
        (hangs, TimeoutError, r"did not complete within 0\.2 s"),
        (odd_message, RuntimeError, "Unexpected lifespan message"),
    ]
    for app, error, match in cases:
        with pytest.raises(error, match=match):
            async with run_lifespan(app, timeout=0.2):
                pass  # pragma: no cover


async def test_run_lifespan_shutdown_failures() -> None:
    def app_failing_on(shutdown: str) -> Any:
        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            await receive()
            await send({"type": "lifespan.startup.complete"})
            await receive()
            if shutdown == "raise":
                raise RuntimeError("shutdown exploded")
            await send({"type": "lifespan.shutdown.failed", "message": "could not flush"})

        return app

    with pytest.raises(RuntimeError, match="shutdown exploded"):
        async with run_lifespan(app_failing_on("raise")):
            pass
    with pytest.raises(RuntimeError, match="could not flush"):
        async with run_lifespan(app_failing_on("report")):
            pass
    # An error in the block wins over a shutdown failure.
    with pytest.raises(ZeroDivisionError):
        async with run_lifespan(app_failing_on("raise")):
            1 / 0  # noqa: B018


async def test_run_lifespan_with_an_own_lifespan() -> None:
    pomo = PomoWS(make_settings())
    events: list[str] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        events.append("start")
        async with pomo.lifespan(app) as state:
            yield {**state, "extra": 1}
        events.append("stop")

    app = Starlette(lifespan=lifespan)
    app.mount("/ws", pomo)
    async with PomoTestClient(app) as client, client.connect("u1"):
        assert client.state["extra"] == 1
    assert events == ["start", "stop"]


# -- mint_token -----------------------------------------------------------------------------------------


# -- channels and presence ------------------------------------------------------------------------------


def channel_app(**settings: Any) -> Starlette:
    """Who may subscribe comes from the token's `channels` claim; `team:*` channels have presence."""
    return pomo_app(presence_channels=("team:*",), **settings)


async def test_subscribe_expect_a_channel_event_and_unsubscribe() -> None:
    async with PomoTestClient(channel_app()) as client, client.connect("u1", claims={"channels": ["board:*"]}) as ws:
        subscribed = await ws.subscribe("board:7")
        assert subscribed["data"] == {"channel": "board:7", "presence": False}
        assert ws.established is not None and ws.last_id == ws.established["id"], "SUBSCRIBED's id is not a cursor"
        event = await client.broadcaster.broadcast_to_channel("board:7", "CARD_MOVED", {"card": 1})
        await ws.expect("CARD_MOVED", data={"card": 1}, channel="board:7", user_id=None, retained=False)
        assert ws.last_id == event.id
        assert (await ws.unsubscribe("board:7"))["data"] == {"channel": "board:7"}
        await client.broadcaster.broadcast_to_channel("board:7", "CARD_MOVED", {"card": 2})
        await ws.assert_no_event()


async def test_a_refused_subscribe_raises_channel_refused() -> None:
    async with PomoTestClient(channel_app()) as client, client.connect("u1", claims={"channels": ["team:1"]}) as ws:
        with pytest.raises(ChannelRefused) as refused:
            await ws.subscribe("team:2")
        assert (refused.value.channel, refused.value.code) == ("team:2", "forbidden")
        assert "Channel 'team:2' refused: ERROR forbidden: " in str(refused.value)
        assert isinstance(refused.value, AssertionError)
        with pytest.raises(ChannelRefused, match="invalid_channel"):
            await ws.subscribe("a b")
        with pytest.raises(ChannelRefused, match="forbidden"):
            await ws.presence("team:1")  # not subscribed
        await ws.ping()  # the socket stays up
    async with PomoTestClient(channel_app()) as client, client.connect("u1") as ws:  # no claim: nothing allowed
        with pytest.raises(ChannelRefused, match="forbidden"):
            await ws.subscribe("team:1")


async def test_retained_state_comes_after_subscribed_and_is_not_a_cursor() -> None:
    async with PomoTestClient(channel_app()) as client, client.connect("u1", claims={"channels": ["board:*"]}) as ws:
        await client.broadcaster.broadcast_to_channel("board:7", "BOARD_STATE", {"cards": 3}, retain=True)
        await ws.subscribe("board:7")
        cursor = ws.last_id
        retained = await ws.expect("BOARD_STATE", data={"cards": 3}, channel="board:7", retained=True)
        assert "id" not in retained and ws.last_id == cursor
        await client.broadcaster.broadcast_to_channel("board:7", "BOARD_STATE", {"cards": 4}, retain=True)
        with pytest.raises(AssertionError, match="is a live event, expected retained=True"):
            await ws.expect("BOARD_STATE", retained=True)
        await client.broadcaster.broadcast_to_channel("board:8", "BOARD_STATE")  # not subscribed: nothing
        await client.broadcaster.broadcast_to_channel("board:7", "BOARD_STATE", {"cards": 5})
        with pytest.raises(AssertionError, match="BOARD_STATE event of channel 'board:7', expected 'board:1'"):
            await ws.expect("BOARD_STATE", channel="board:1")


async def test_resume_with_channels_in_the_handshake() -> None:
    claims = {"channels": ["board:*"]}
    async with PomoTestClient(channel_app()) as client:
        async with client.connect("u1", claims=claims, channels=["board:1", "board:2"]) as ws:
            await ws.expect("SUBSCRIBED", channel="board:1")
            await ws.expect("SUBSCRIBED", channel="board:2")
            cursor = ws.last_id
        await client.broadcaster.broadcast_to_channel("board:2", "CARD_MOVED", 1)
        await client.broadcaster.broadcast_to_user("u1", "TASK_CREATED", 2)
        await client.broadcaster.broadcast_to_channel("board:1", "CARD_MOVED", 3)
        async with client.connect(
            "u1", claims=claims, last_event_id=cursor, channels=["board:1", "board:2", "team:1"]
        ) as ws:
            assert ws.established is not None and ws.established["data"]["resumed"] is True
            await ws.expect("SUBSCRIBED", channel="board:1")
            await ws.expect("SUBSCRIBED", channel="board:2")
            await ws.expect("ERROR", data={"code": "forbidden", "message": ANY, "channel": "team:1"}, channel="team:1")
            await ws.expect("CARD_MOVED", data=1, channel="board:2")
            await ws.expect("TASK_CREATED", data=2, channel=None)
            await ws.expect("CARD_MOVED", data=3, channel="board:1")
        with pytest.raises(TypeError, match="list of channel names"):
            async with client.connect("u1", channels="board:1"):
                pass  # pragma: no cover
        with pytest.raises(TypeError, match="claims="):
            async with client.connect(token=client.mint_token("u1"), claims=claims):
                pass  # pragma: no cover


async def test_subscribe_since_and_a_channel_resync() -> None:
    async with PomoTestClient(channel_app()) as client, client.connect("u1", claims={"channels": ["board:*"]}) as ws:
        since = (await client.broadcaster.broadcast_to_channel("board:1", "CARD_MOVED", 1)).id
        await client.broadcaster.broadcast_to_channel("board:1", "CARD_MOVED", 2)
        await ws.subscribe("board:1", since=since)
        await ws.expect("CARD_MOVED", data=2, channel="board:1")
        cursor = ws.last_id
        await ws.subscribe("board:2", since="forged")
        await ws.expect("RESYNC_REQUIRED", data={"reason": "unknown_cursor", "channel": "board:2"}, channel="board:2")
        assert ws.last_id == cursor, "one channel's RESYNC_REQUIRED is not the connection's cursor"


async def test_presence() -> None:
    claims = {"channels": ["team:*"]}
    async with PomoTestClient(channel_app()) as client, client.connect("alice", claims=claims) as alice:
        assert (await alice.subscribe("team:1"))["data"] == {"channel": "team:1", "presence": True}
        await alice.expect("PRESENCE", data={"channel": "team:1", "users": [ANY], "count": 1}, channel="team:1")
        async with client.connect("bob", claims=claims, channels=["team:1"]) as bob:
            await bob.expect("SUBSCRIBED", channel="team:1")
            await bob.expect("PRESENCE", channel="team:1")
            await alice.expect("PRESENCE_JOIN", data={"channel": "team:1", "userId": "bob"}, channel="team:1")
            answer = await alice.presence("team:1")
            assert answer["data"]["users"] == [
                {"userId": "alice", "connections": 1},
                {"userId": "bob", "connections": 1},
            ]
            assert await client.broadcaster.presence("team:1") == {"alice": 1, "bob": 1}
        await alice.expect("PRESENCE_LEAVE", data={"channel": "team:1", "userId": "bob"}, channel="team:1")
        await alice.subscribe("team:2")
        await alice.expect("PRESENCE", channel="team:2")
        with pytest.raises(AssertionError, match="Expected SUBSCRIBED for channel 'team:3', got 'PRESENCE'"):
            await alice.send_json({"type": "PRESENCE", "data": {"channel": "team:2"}})
            await alice.subscribe("team:3")  # the PRESENCE answer comes first


async def test_channel_helpers_report_timeouts_and_closes() -> None:
    async with PomoTestClient(channel_app()) as client, client.connect("u1", claims={"channels": ["board:*"]}) as ws:
        await ws.subscribe("board:1")
        ws.feed({"type": "websocket.receive", "text": '{"type": "PING"}'})
        with pytest.raises(AssertionError, match="Expected UNSUBSCRIBED for channel 'board:1', got 'PONG'"):
            await ws.unsubscribe("board:1")
        await ws.expect("UNSUBSCRIBED", channel="board:1")
        ws.feed({"type": "websocket.disconnect", "code": 1006})  # the peer vanished: the app returns, answering nothing
        with pytest.raises(WebSocketClosed, match="while waiting for SUBSCRIBED for channel 'board:1'"):
            await ws.subscribe("board:1")


def test_mint_token_with_a_channels_claim() -> None:
    token = mint_token(make_settings(), "alice", channels=["team:42", "board:*"])
    assert jwt.decode(token, SECRET, algorithms=["HS256"])["channels"] == ["team:42", "board:*"]


def test_mint_token_follows_the_settings() -> None:
    settings = make_settings(user_id_claim="sub", jwt_audience="pomo", jwt_issuer="https://idp.example")
    claims = jwt.decode(mint_token(settings, "alice", role="admin"), SECRET, algorithms=["HS256"], audience="pomo")
    assert claims["sub"] == "alice" and claims["iss"] == "https://idp.example" and claims["role"] == "admin"
    assert claims["exp"] > time.time() + 200
    no_exp = jwt.decode(mint_token(settings, 42, ttl=None), SECRET, algorithms=["HS256"], audience="pomo")
    assert "exp" not in no_exp and no_exp["sub"] == "42"  # `sub` must be a string
    numeric = jwt.decode(mint_token(make_settings(), 42), SECRET, algorithms=["HS256"])
    assert numeric["userId"] == 42  # the guide's numeric ids stay numbers


def test_mint_token_with_public_keys() -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    private = ec.generate_private_key(ec.SECP256R1())
    private_pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public_pem = (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    settings = Settings(jwt_secret=public_pem, jwt_algorithms=("ES256",))
    with pytest.raises(ValueError, match="pass key="):
        mint_token(settings, "alice")
    token = mint_token(settings, "alice", key=private_pem)
    assert jwt.decode(token, public_pem, algorithms=["ES256"])["userId"] == "alice"
    with pytest.raises(ValueError, match="pass key="):
        mint_token(Settings(), "alice")


def test_exceptions() -> None:
    closed = WebSocketClosed(1013, "Client too slow")
    assert str(closed) == "WebSocket closed with 1013: 'Client too slow'"
    assert str(WebSocketClosed(1006)) == "WebSocket closed with 1006"
    assert repr(testing._ANY) == "ANY"  # how the default shows in signatures and the API reference


async def test_the_transport_scope() -> None:
    seen: list[Scope] = []

    async def recorder(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope)
        await receive()
        await send({"type": "websocket.accept", "subprotocol": "x"})
        message: Message = await receive()
        assert message["type"] == "websocket.disconnect"

    async with PomoTestClient(recorder, run_lifespan=False, settings=make_settings()) as client:
        async with client.connect(
            path="/ws/?a=1", headers={"Cookie": "c=1"}, subprotocols=["x"], wait_established=False
        ) as ws:
            assert ws.subprotocol == "x"
    scope = seen[0]
    assert scope["path"] == "/ws/" and scope["query_string"] == b"a=1"
    assert scope["subprotocols"] == ["x"]
    assert (b"cookie", b"c=1") in scope["headers"]
    assert (b"sec-websocket-protocol", b"x") in scope["headers"]


# -- the ASGI-level socket ------------------------------------------------------------------------------


async def test_a_socket_read_message_by_message() -> None:
    """`start()`, `receive_message()`, `feed()` and `finished()`: the protocol itself, one ASGI message at a time."""
    pomo = PomoWS(make_settings())
    app = make_app(pomo)
    async with testing.run_lifespan(app) as state:
        ws = PomoWebSocket(app, "/ws", f"token={mint_token(pomo.settings, 'u1')}")
        ws.scope["state"] = state
        ws.start()
        ws.start()  # once only
        assert (await ws.receive_message())["type"] == "websocket.accept"
        hello = await ws.receive_message()
        assert hello["type"] == "websocket.send" and "CONNECTION_ESTABLISHED" in hello["text"]
        ws.feed({"type": "websocket.receive", "text": '{"type": "PING"}'})
        assert '"PONG"' in (await ws.receive_message())["text"]
        ws.feed({"type": "websocket.disconnect", "code": 1001})
        await ws.finished()
        assert ws.violations == []
        with pytest.raises(WebSocketClosed):
            await ws.receive_message(timeout=1)


@pytest.mark.parametrize("mode", ["instant", "yield", "fail"])
async def test_send_modes_act_like_other_servers(mode: Literal["instant", "yield", "fail"]) -> None:
    """`"yield"` switches tasks in every send (as hypercorn's does); `"fail"` is a vanished peer."""
    order: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        assert (await receive())["type"] == "websocket.connect"
        asyncio.get_running_loop().call_soon(order.append, "another task")
        await send({"type": "websocket.accept"})
        order.append("accepted")
        await send({"type": "websocket.send", "text": "hi"})
        await send({"type": "websocket.close", "code": 1000})

    ws = PomoWebSocket(app, "/ws", send_mode=mode)
    ws.start()
    assert (await ws.receive_message())["type"] == "websocket.accept"
    if mode == "fail":
        with pytest.raises(OSError, match="reset by peer"):
            await ws.finished()
        return
    assert await ws.receive_message() == {"type": "websocket.send", "text": "hi"}
    await ws.finished()
    assert order[:2] == (["another task", "accepted"] if mode == "yield" else ["accepted", "another task"])


async def test_a_send_after_the_apps_own_close_is_a_recorded_violation() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.close", "code": 1000})
        with contextlib.suppress(OSError):
            await send({"type": "websocket.send", "text": "late"})

    ws = PomoWebSocket(app, "/ws")
    ws.start()
    await ws.finished()
    assert ws.violations == [{"type": "websocket.send", "text": "late"}]


async def test_cancel_stops_the_handler_as_a_server_does() -> None:
    pomo = PomoWS(make_settings())
    app = make_app(pomo)
    async with testing.run_lifespan(app) as state:
        ws = PomoWebSocket(app, "/ws", f"token={mint_token(pomo.settings, 'u1')}")
        ws.scope["state"] = state
        ws.start()
        await ws.receive_message()
        await ws.receive_message()
        assert pomo.broadcaster.user_connection_count("u1") == 1
        ws.cancel()
        await ws.finished()
        assert pomo.broadcaster.user_connection_count("u1") == 0
