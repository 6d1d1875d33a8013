"""Channels and presence, end to end: a real uvicorn server on 127.0.0.1 and real WebSocket clients."""

from __future__ import annotations

import contextlib
import json
import secrets
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from websockets.asyncio.client import ClientConnection, connect

from starlette_pomo_ws import PomoWS, Principal

from .conftest import RunningServer, make_settings, make_token, recv, run_server

pytestmark = pytest.mark.anyio

TEAM = ["team:*"]
_backend: dict[str, str] = {}


@pytest.fixture(autouse=True, params=["memory", "redis"])
def backend_url(request: pytest.FixtureRequest) -> str:
    """Every test runs on the memory backend and on a real Redis (a fresh key prefix each)."""
    url = "memory://" if request.param == "memory" else str(request.getfixturevalue("redis_url"))
    _backend["url"] = url
    return url


def past_the_window() -> int:
    """How many events push the first out of a history of 2 or 3: Redis trims its streams approximately
    (`MAXLEN ~`, by whole nodes of 100 entries), so it keeps more than `history_size` for a while."""
    return 3 if _backend["url"] == "memory://" else 250


def channel_app(pomo: PomoWS) -> Starlette:
    async def publish(request: Request) -> JSONResponse:
        body = await request.json()
        broadcaster = request.state.broadcaster
        if "channel" in body:
            event = await broadcaster.broadcast_to_channel(
                body["channel"], body["type"], body.get("data"), retain=body.get("retain", False)
            )
        elif body.get("user") is None:
            event = await broadcaster.broadcast_to_all(body["type"], body.get("data"))
        else:
            event = await broadcaster.broadcast_to_user(body["user"], body["type"], body.get("data"))
        return JSONResponse({"id": event.id})

    async def membership(request: Request) -> JSONResponse:
        body = await request.json()
        broadcaster = request.state.broadcaster
        if body["action"] == "subscribe":
            await broadcaster.subscribe_user(body["user"], body["channel"])
        else:
            await broadcaster.unsubscribe_user(body["user"], body["channel"], reason="Removed from the team")
        return JSONResponse({})

    async def counts(request: Request) -> JSONResponse:
        channel = request.query_params["channel"]
        broadcaster = request.state.broadcaster
        return JSONResponse(
            {
                "subscribers": await broadcaster.channel_subscriber_count(channel),
                "presence": await broadcaster.presence(channel),
            }
        )

    routes = [
        Route("/publish", publish, methods=["POST"]),
        Route("/membership", membership, methods=["POST"]),
        Route("/counts", counts),
    ]
    app = Starlette(lifespan=pomo.lifespan, routes=routes)
    app.mount("/ws", pomo)
    return app


class Site:
    def __init__(self, server: RunningServer, http: httpx.AsyncClient, stack: contextlib.AsyncExitStack) -> None:
        self.server = server
        self.http = http
        self.stack = stack

    async def publish(self, **body: Any) -> str:
        response = await self.http.post("/publish", json=body)
        assert response.status_code == 200, response.text
        event_id: str = response.json()["id"]
        return event_id

    async def connect(
        self, user: str, query: str = "", channels: Any = TEAM
    ) -> tuple[ClientConnection, dict[str, Any]]:
        token = make_token(user, channels=channels) if channels is not None else make_token(user)
        ws = await self.stack.enter_async_context(
            connect(self.server.url(f"/ws?token={token}{query}"), compression=None)
        )
        hello = await recv(ws)
        assert hello["type"] == "CONNECTION_ESTABLISHED"
        return ws, hello

    async def counts(self, channel: str) -> dict[str, Any]:
        response = await self.http.get("/counts", params={"channel": channel})
        result: dict[str, Any] = response.json()
        return result


@contextlib.asynccontextmanager
async def site(**settings: Any) -> AsyncIterator[Site]:
    authorize = settings.pop("authorize_channel", None)
    backend = None
    if _backend["url"] != "memory://":
        from starlette_pomo_ws.backends.redis import RedisBackend

        backend = RedisBackend(
            _backend["url"],
            key_prefix=f"pomo-test-ch-{secrets.token_hex(4)}:",
            history_size=settings.get("history_size", 1000),
        )
    pomo = PomoWS(make_settings(**settings), backend=backend, authorize_channel=authorize)
    async with (
        run_server(channel_app(pomo)) as server,
        httpx.AsyncClient(base_url=server.http) as http,
        contextlib.AsyncExitStack() as stack,
    ):
        yield Site(server, http, stack)


async def send(ws: ClientConnection, type_: str, **data: Any) -> None:
    await ws.send(json.dumps({"type": type_, "data": data}))


async def subscribe(ws: ClientConnection, channel: str, **data: Any) -> dict[str, Any]:
    await send(ws, "SUBSCRIBE", channel=channel, **data)
    answer = await recv(ws)
    assert answer["type"] == "SUBSCRIBED", answer
    assert answer["data"]["channel"] == channel
    return answer


async def until_pong(ws: ClientConnection) -> list[dict[str, Any]]:
    """Everything the server sent before the answer to a PING: proves nothing else is queued."""
    await send(ws, "PING")
    seen = []
    while (message := await recv(ws))["type"] != "PONG":
        seen.append(message)
    return seen


async def test_a_channel_event_reaches_its_subscribers_once_and_nobody_else() -> None:
    async with site() as s:
        alice, _ = await s.connect("alice")
        bob, _ = await s.connect("bob")
        carol, _ = await s.connect("carol")
        await subscribe(alice, "team:42")
        await subscribe(bob, "team:42")
        await subscribe(carol, "team:7")
        event_id = await s.publish(channel="team:42", type="TASK_CREATED", data={"title": "Write"})
        for ws in (alice, bob):
            event = await recv(ws)
            assert event["type"] == "TASK_CREATED"
            assert event["userId"] is None
            assert event["channel"] == "team:42"
            assert event["data"] == {"title": "Write"}
            assert event["id"] == event_id
            assert await until_pong(ws) == []
        assert await until_pong(carol) == []
        assert (await s.counts("team:42"))["subscribers"] == 2


async def test_unsubscribe_stops_the_channel_and_frees_it() -> None:
    async with site() as s:
        alice, _ = await s.connect("alice")
        await subscribe(alice, "team:1")
        await send(alice, "UNSUBSCRIBE", channel="team:1")
        assert (await recv(alice))["type"] == "UNSUBSCRIBED"
        await s.publish(channel="team:1", type="X")
        assert await until_pong(alice) == []
        assert (await s.counts("team:1"))["subscribers"] == 0


async def test_the_channels_claim_decides_who_may_subscribe_and_a_refusal_keeps_the_socket() -> None:
    async with site() as s:
        ws, _ = await s.connect("alice", channels=["team:42", "board:7:*"])
        await subscribe(ws, "team:42")
        await subscribe(ws, "board:7:tasks")
        for refused in ("team:43", "board:8:tasks", "board:7"):
            await send(ws, "SUBSCRIBE", channel=refused)
            error = await recv(ws)
            assert error["type"] == "ERROR"
            assert error["data"]["code"] == "forbidden"
            assert error["data"]["channel"] == refused
        await s.publish(channel="team:43", type="SECRET")
        assert await until_pong(ws) == []
        none, _ = await s.connect("bob", channels=None)  # no claim and no authorize_channel: refused
        await send(none, "SUBSCRIBE", channel="team:42")
        assert (await recv(none))["data"]["code"] == "forbidden"


async def test_authorize_channel_replaces_the_claim() -> None:
    asked: list[tuple[str, str]] = []

    async def authorize(principal: Principal, channel: str) -> bool:
        asked.append((principal.user_id, channel))
        return channel == f"room:{principal.user_id}"

    async with site(authorize_channel=authorize) as s:
        ws, _ = await s.connect("alice", channels=["room:*"])
        await subscribe(ws, "room:alice")
        await send(ws, "SUBSCRIBE", channel="room:bob")
        assert (await recv(ws))["data"]["code"] == "forbidden"
        assert asked == [("alice", "room:alice"), ("alice", "room:bob")]


async def test_bad_names_too_many_channels_and_floods_get_clear_errors() -> None:
    async with site(max_channels_per_connection=2, client_message_rate=1, client_message_burst=6) as s:
        ws, _ = await s.connect("alice", channels=["*"])
        for bad in ("", "has space", "x" * 201, "ünï", 42):
            await send(ws, "SUBSCRIBE", channel=bad)
            error = await recv(ws)
            assert error["data"]["code"] == "invalid_channel", (bad, error)
        await subscribe(ws, "a")
        # the one left in the burst: a second channel, then the limit
        await send(ws, "SUBSCRIBE", channel="b")
        answer = await recv(ws)
        assert answer["data"]["code"] == "rate_limited"
    async with site(max_channels_per_connection=2) as s:
        ws, _ = await s.connect("alice", channels=["*"])
        await subscribe(ws, "a")
        await subscribe(ws, "b")
        await send(ws, "SUBSCRIBE", channel="c")
        error = await recv(ws)
        assert error["data"] == {
            "code": "too_many_channels",
            "message": "Too many channels; a connection may hold 2.",
            "channel": "c",
        }
        await send(ws, "SUBSCRIBE", channel="a")  # already held: answered again, nothing replayed
        assert (await recv(ws))["type"] == "SUBSCRIBED"
        await send(ws, "SUBSCRIBE")
        assert (await recv(ws))["data"]["code"] == "invalid_message"


async def test_a_retained_event_is_the_state_a_later_subscriber_gets_first() -> None:
    async with site() as s:
        await s.publish(channel="team:1", type="TIMER", data={"endsAt": 1}, retain=True)
        await s.publish(channel="team:1", type="TIMER", data={"endsAt": 2}, retain=True)
        await s.publish(channel="team:1", type="TASK_CREATED", data={"not": "retained"})
        ws, _ = await s.connect("alice")
        await subscribe(ws, "team:1")
        state = await recv(ws)
        assert state["type"] == "TIMER"
        assert state["data"] == {"endsAt": 2}
        assert state["retained"] is True
        assert "id" not in state
        assert await until_pong(ws) == []
        live = await s.publish(channel="team:1", type="TIMER", data={"endsAt": 3}, retain=True)
        event = await recv(ws)
        assert event["id"] == live
        assert "retained" not in event


async def test_a_reconnect_resumes_the_user_the_broadcasts_and_every_channel_exactly_once() -> None:
    async with site() as s:
        ws, hello = await s.connect("alice", query="&channels=team:1,team:2")
        assert [(await recv(ws))["data"]["channel"] for _ in range(2)] == ["team:1", "team:2"]
        first = await s.publish(channel="team:1", type="SEEN")
        assert (await recv(ws))["id"] == first
        await ws.close()
        missed = [
            await s.publish(channel="team:2", type="A"),
            await s.publish(user="alice", type="B"),
            await s.publish(channel="team:3", type="NOT_MINE"),
            await s.publish(type="C"),
            await s.publish(user="bob", type="NOT_MINE"),
            await s.publish(channel="team:1", type="D"),
        ]
        ws, hello = await s.connect("alice", query=f"&last_event_id={first}&channels=team:1,team:2")
        assert hello["data"]["resumed"] is True
        subscribed = [await recv(ws), await recv(ws)]
        assert [m["type"] for m in subscribed] == ["SUBSCRIBED", "SUBSCRIBED"]
        replay = await until_pong(ws)
        assert [m["type"] for m in replay] == ["A", "B", "C", "D"]
        assert [m["id"] for m in replay] == [missed[0], missed[1], missed[3], missed[5]]
        live = await s.publish(channel="team:2", type="LIVE")
        assert (await recv(ws))["id"] == live


async def test_a_resume_re_authorizes_each_channel_and_a_refused_one_leaks_nothing() -> None:
    async with site() as s:
        ws, hello = await s.connect("alice", query="&channels=team:1,team:2")
        await recv(ws), await recv(ws)
        cursor = hello["id"]
        await ws.close()
        await s.publish(channel="team:2", type="SECRET")
        await s.publish(channel="team:1", type="OK")
        # The new token no longer allows team:2 (removed from that team).
        ws, _ = await s.connect("alice", query=f"&last_event_id={cursor}&channels=team:1,team:2", channels=["team:1"])
        assert (await recv(ws))["type"] == "SUBSCRIBED"
        refusal = await recv(ws)
        assert refusal["type"] == "ERROR"
        assert refusal["data"]["code"] == "forbidden"
        assert refusal["data"]["channel"] == "team:2"
        assert [m["type"] for m in await until_pong(ws)] == ["OK"]
        await s.publish(channel="team:2", type="SECRET")
        assert await until_pong(ws) == []


async def test_a_resume_past_a_channel_s_history_gets_resync_and_no_partial_replay() -> None:
    async with site(history_size=2) as s:
        ws, hello = await s.connect("alice", query="&channels=team:1")
        await recv(ws)
        await ws.close()
        for n in range(past_the_window()):
            await s.publish(channel="team:1", type="E", data=n)
        await s.publish(channel="team:1", type="STATE", data="now", retain=True)
        ws, hello = await s.connect("alice", query=f"&last_event_id={hello['id']}&channels=team:1")
        assert hello["data"]["resumed"] is False
        messages = await until_pong(ws)
        assert [m["type"] for m in messages] == ["RESYNC_REQUIRED", "SUBSCRIBED", "STATE"]
        assert messages[2]["retained"] is True


async def test_subscribe_with_since_replays_that_channel_or_asks_for_a_resync() -> None:
    async with site(history_size=3) as s:
        ws, _ = await s.connect("alice")
        since = await s.publish(channel="board:7", type="OLD")
        newer = [await s.publish(channel="board:7", type="NEW", data=n) for n in range(2)]
        await s.publish(user="alice", type="MINE")
        assert (await recv(ws))["type"] == "MINE"
        await subscribe(ws, "team:board", since=since)  # nothing published there yet: a clean, empty replay
        await send(ws, "SUBSCRIBE", channel="board:7", since=since)
        await send(ws, "PING")
        # board:7 is not under the team:* claim
        assert (await recv(ws))["data"]["code"] == "forbidden"
        assert (await recv(ws))["type"] == "PONG"
        ws2, _ = await s.connect("bob", channels=["board:*"])
        await subscribe(ws2, "board:7", since=since)
        replay = await until_pong(ws2)
        assert [m["id"] for m in replay] == newer
        for n in range(past_the_window() + 1):
            await s.publish(channel="board:8", type="E", data=n)
        await send(ws2, "SUBSCRIBE", channel="board:8", since=since)
        messages = await until_pong(ws2)
        assert [m["type"] for m in messages] == ["SUBSCRIBED", "RESYNC_REQUIRED"]
        assert messages[1]["data"] == {"reason": "history_unavailable", "channel": "board:8"}


async def test_subscribe_user_and_unsubscribe_user_change_live_subscriptions_at_once() -> None:
    async with site() as s:
        tabs = [(await s.connect("alice"))[0] for _ in range(2)]
        other, _ = await s.connect("bob")
        response = await s.http.post("/membership", json={"action": "subscribe", "user": "alice", "channel": "team:9"})
        assert response.status_code == 200
        for ws in tabs:
            assert (await recv(ws))["type"] == "SUBSCRIBED"
        assert (await s.counts("team:9"))["subscribers"] == 2
        await s.publish(channel="team:9", type="HELLO")
        for ws in tabs:
            assert (await recv(ws))["type"] == "HELLO"
        await s.http.post("/membership", json={"action": "unsubscribe", "user": "alice", "channel": "team:9"})
        for ws in tabs:
            revoked = await recv(ws)
            assert revoked["type"] == "UNSUBSCRIBED"
            assert revoked["data"] == {"channel": "team:9", "reason": "Removed from the team"}
        await s.publish(channel="team:9", type="AFTER")
        for ws in (*tabs, other):
            assert await until_pong(ws) == []


async def test_presence_joins_once_per_user_and_leaves_with_the_last_tab() -> None:
    async with site(presence_channels=("team:*",)) as s:
        watcher, _ = await s.connect("watcher")
        answer = await subscribe(watcher, "team:1")
        assert answer["data"]["presence"] is True
        snapshot = await recv(watcher)
        assert snapshot["type"] == "PRESENCE"
        assert snapshot["data"] == {"channel": "team:1", "users": [{"userId": "watcher", "connections": 1}], "count": 1}
        tabs = [(await s.connect("alice"))[0] for _ in range(3)]
        for ws in tabs:
            await subscribe(ws, "team:1")
            assert (await recv(ws))["type"] == "PRESENCE"
        joined = await until_pong(watcher)
        assert [(m["type"], m["data"]) for m in joined] == [("PRESENCE_JOIN", {"channel": "team:1", "userId": "alice"})]
        assert joined[0]["channel"] == "team:1"
        await send(watcher, "PRESENCE", channel="team:1")
        answer = await recv(watcher)
        assert answer["data"]["users"] == [
            {"userId": "alice", "connections": 3},
            {"userId": "watcher", "connections": 1},
        ]
        assert (await s.counts("team:1"))["presence"] == {"watcher": 1, "alice": 3}
        await tabs[0].close()
        await tabs[1].close()
        assert await until_pong(watcher) == []
        await tabs[2].close()
        left = await recv(watcher)
        assert (left["type"], left["data"]) == ("PRESENCE_LEAVE", {"channel": "team:1", "userId": "alice"})
        await send(watcher, "PRESENCE", channel="team:2")
        assert (await recv(watcher))["data"]["code"] == "forbidden"


async def test_above_presence_max_members_members_get_counts_only() -> None:
    async with site(presence_channels=("team:*",), presence_max_members=2) as s:
        first, _ = await s.connect("u1")
        await subscribe(first, "team:1")
        await recv(first)
        second, _ = await s.connect("u2")
        await subscribe(second, "team:1")
        await recv(second)
        assert [m["type"] for m in await until_pong(first)] == ["PRESENCE_JOIN"]
        third, _ = await s.connect("u3")
        await subscribe(third, "team:1")
        assert (await recv(third))["data"] == {"channel": "team:1", "count": 3, "truncated": True}
        for ws in (first, second):
            switched = await until_pong(ws)
            assert [(m["type"], m["data"]) for m in switched] == [
                ("PRESENCE", {"channel": "team:1", "count": 3, "truncated": True})
            ]
        fourth, _ = await s.connect("u4")
        await subscribe(fourth, "team:1")
        await recv(fourth)
        assert await until_pong(first) == []  # no per-user events above the limit
        await fourth.close()
        await third.close()  # back to 2 users: the list again
        back = await recv(first)
        assert back["type"] == "PRESENCE"
        assert back["data"]["users"] == [{"userId": "u1", "connections": 1}, {"userId": "u2", "connections": 1}]


async def test_a_channel_nobody_subscribes_to_costs_no_fan_out() -> None:
    async with site() as s:
        ws, _ = await s.connect("alice")
        event_id = await s.publish(channel="team:empty", type="X")
        assert event_id
        assert await until_pong(ws) == []
        assert (await s.counts("team:empty"))["subscribers"] == 0
