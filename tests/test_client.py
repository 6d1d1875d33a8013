"""`PomoClient` and channels: one channel set, resumed with the one cursor on every reconnect.

Against a real uvicorn, as a user's process would connect (the other client tests are in test_cli.py).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import anyio
import pytest
from websockets.protocol import State

from starlette_pomo_ws import PomoWS
from starlette_pomo_ws._auth import Principal
from starlette_pomo_ws.client import PomoClient

from .conftest import make_app, make_settings, make_token, run_server, wait_until

pytestmark = pytest.mark.anyio

Events = AsyncGenerator[dict[str, Any], None]


async def only_teams(principal: Principal, channel: str) -> bool:
    return channel.startswith("team:")


def team_pomo(**settings: Any) -> PomoWS:
    return PomoWS(make_settings(**settings), authorize_channel=only_teams)


async def next_event(events: Events, within: float = 5) -> dict[str, Any]:
    with anyio.fail_after(within):
        return await events.__anext__()


async def next_of(events: Events, *types: str) -> dict[str, Any]:
    """The next event, which must be one of `types` (heartbeats are passed over)."""
    while True:
        event = await next_event(events)
        if event["type"] != "HEARTBEAT":
            assert event["type"] in types, event
            return event


async def close(client: PomoClient, events: Events) -> None:
    await client.close()
    with anyio.fail_after(5):
        async for _ in events:
            pass


async def test_channels_resume_with_the_one_cursor_exactly_once() -> None:
    pomo = team_pomo()
    async with run_server(make_app(pomo)) as server:
        client = PomoClient(server.url("/ws"), token=make_token("u1"), channels=["team:1", "team:2"], min_delay=0.01)
        assert "channels=team:1,team:2" in client.connect_url()
        events = client.events()
        established = await next_of(events, "CONNECTION_ESTABLISHED")
        for channel in ("team:1", "team:2"):
            subscribed = await next_of(events, "SUBSCRIBED")
            assert subscribed["data"] == {"channel": channel, "presence": False}
            assert client.last_event_id == established["id"], "SUBSCRIBED's id is not a cursor"
        first = await pomo.broadcaster.broadcast_to_channel("team:1", "TIMER_STARTED", {"n": 1})
        event = await next_of(events, "TIMER_STARTED")
        assert (event["channel"], event["userId"], event["id"]) == ("team:1", None, first.id)
        assert client.last_event_id == first.id

        client._ws.transport.abort()  # a network failure: no close frame
        await pomo.broadcaster.broadcast_to_channel("team:2", "TIMER_STARTED", {"n": 2})
        await pomo.broadcaster.broadcast_to_user("u1", "TASK_CREATED", {"n": 3})
        await pomo.broadcaster.broadcast_to_channel("team:1", "TIMER_STARTED", {"n": 4})
        assert "channels=team:1,team:2" in client.connect_url()
        assert f"last_event_id={first.id}" in client.connect_url()
        welcome = await next_of(events, "CONNECTION_ESTABLISHED")
        assert welcome["data"]["resumed"] is True
        assert [(await next_of(events, "SUBSCRIBED"))["data"]["channel"] for _ in range(2)] == ["team:1", "team:2"]
        replay = [await next_of(events, "TIMER_STARTED", "TASK_CREATED") for _ in range(3)]
        assert [e["data"]["n"] for e in replay] == [2, 3, 4]
        assert [e.get("channel") for e in replay] == ["team:2", None, "team:1"]
        assert client.last_event_id == replay[-1]["id"]
        await close(client, events)


async def test_retained_state_never_moves_the_cursor() -> None:
    pomo = team_pomo()
    async with run_server(make_app(pomo)) as server:
        timer = await pomo.broadcaster.broadcast_to_channel("team:1", "TIMER_STATE", {"left": 1500}, retain=True)
        client = PomoClient(server.url("/ws"), token=make_token("u1"), min_delay=0.01)
        events = client.events()
        established = await next_of(events, "CONNECTION_ESTABLISHED")
        await client.subscribe("team:1")
        assert list(client.channels) == ["team:1"]
        assert (await next_of(events, "SUBSCRIBED"))["data"]["channel"] == "team:1"
        retained = await next_of(events, "TIMER_STATE")
        assert retained["retained"] is True and "id" not in retained
        assert retained["data"] == {"left": 1500} and retained["timestamp"] == timer.timestamp
        assert client.last_event_id == established["id"]

        # A clean resume sends no retained state again: the replay says what changed.
        client._ws.transport.abort()
        assert (await next_of(events, "CONNECTION_ESTABLISHED"))["data"]["resumed"] is True
        assert (await next_of(events, "SUBSCRIBED"))["data"]["channel"] == "team:1"
        await pomo.broadcaster.broadcast_to_channel("team:1", "TIMER_STATE", {"left": 900}, retain=True)
        live = await next_of(events, "TIMER_STATE")
        assert live["data"] == {"left": 900} and "retained" not in live
        assert client.last_event_id == live["id"]
        await close(client, events)


async def test_refused_and_revoked_channels_leave_the_set() -> None:
    pomo = team_pomo()
    async with run_server(make_app(pomo)) as server:
        client = PomoClient(server.url("/ws?channels=admin"), token=make_token("u1"), channels=["team:1"])
        assert list(client.channels) == ["admin", "team:1"]
        events = client.events()
        await next_of(events, "CONNECTION_ESTABLISHED")
        refused = await next_of(events, "ERROR")
        assert (refused["data"]["code"], refused["data"]["channel"]) == ("forbidden", "admin")
        await next_of(events, "SUBSCRIBED")
        assert list(client.channels) == ["team:1"]

        await client.subscribe("board:7")  # refused on a live connection: the same
        refused = await next_of(events, "ERROR")
        assert (refused["data"]["code"], refused["data"]["channel"]) == ("forbidden", "board:7")
        assert list(client.channels) == ["team:1"]

        await pomo.broadcaster.subscribe_user("u1", "team:9")  # added by the server: resumed too
        assert (await next_of(events, "SUBSCRIBED"))["data"]["channel"] == "team:9"
        assert list(client.channels) == ["team:1", "team:9"]
        await pomo.broadcaster.unsubscribe_user("u1", "team:1", reason="Left the team")
        revoked = await next_of(events, "UNSUBSCRIBED")
        assert revoked["data"] == {"channel": "team:1", "reason": "Left the team"}
        assert list(client.channels) == ["team:9"]
        assert "channels=team:9" in client.connect_url()
        await close(client, events)


async def test_unsubscribe_and_subscribe_again() -> None:
    """The answer to our own UNSUBSCRIBE does not undo a SUBSCRIBE sent after it."""
    pomo = team_pomo()
    async with run_server(make_app(pomo)) as server:
        client = PomoClient(server.url("/ws"), token=make_token("u1"), channels=["team:1"])
        events = client.events()
        await next_of(events, "CONNECTION_ESTABLISHED")
        await next_of(events, "SUBSCRIBED")
        await client.unsubscribe("team:1")
        await client.subscribe("team:1")
        assert (await next_of(events, "UNSUBSCRIBED"))["data"] == {"channel": "team:1"}
        assert (await next_of(events, "SUBSCRIBED"))["data"]["channel"] == "team:1"
        assert list(client.channels) == ["team:1"]
        await client.unsubscribe("team:1")
        assert (await next_of(events, "UNSUBSCRIBED"))["data"] == {"channel": "team:1"}
        assert list(client.channels) == []
        await pomo.broadcaster.broadcast_to_channel("team:1", "TIMER_STARTED")
        await client.send("PING")
        assert (await next_of(events, "PONG", "TIMER_STARTED"))["type"] == "PONG"
        assert "channels" not in client.connect_url()
        await client.send("PRESENCE", {"channel": "team:1"})  # no longer held
        assert (await next_of(events, "ERROR"))["data"]["code"] == "forbidden"
        assert list(client.channels) == []

        # A subscribe on a connection that has just closed is not an error: the next handshake carries it.
        await pomo.broadcaster.disconnect_user("u1")
        ws = client._ws
        await wait_until(lambda: ws.state is State.CLOSED, what="the client to see the close")
        await client.subscribe("team:2")
        assert list(client.channels) == ["team:2"]
        with anyio.fail_after(5):
            assert [event async for event in events] == []
        assert "channels=team:2" in client.connect_url()


async def test_subscribe_since_replays_the_channel_then_resumes_with_the_cursor() -> None:
    pomo = team_pomo()
    async with run_server(make_app(pomo)) as server:
        old = await pomo.broadcaster.broadcast_to_channel("team:1", "TIMER_STARTED", {"n": 1})
        await pomo.broadcaster.broadcast_to_channel("team:1", "TIMER_STARTED", {"n": 2})
        client = PomoClient(server.url("/ws"), token=make_token("u1"), min_delay=0.01)
        await client.subscribe("team:1", since=old.id)  # not connected yet: sent after CONNECTION_ESTABLISHED
        assert "channels" not in client.connect_url()
        events = client.events()
        await next_of(events, "CONNECTION_ESTABLISHED")
        assert (await next_of(events, "SUBSCRIBED"))["data"]["channel"] == "team:1"
        assert (await next_of(events, "TIMER_STARTED"))["data"] == {"n": 2}
        assert "channels=team:1" in client.connect_url(), "answered: later reconnects resume it"

        cursor = client.last_event_id
        await pomo.broadcaster.broadcast_to_user("u2", "TASK_CREATED")  # the position moves on, u1's cursor not
        await client.subscribe("team:2", since="not-a-cursor")  # connected: sent at once
        assert (await next_of(events, "SUBSCRIBED"))["data"]["channel"] == "team:2"
        resync = await next_of(events, "RESYNC_REQUIRED")
        assert resync["data"] == {"reason": "unknown_cursor", "channel": "team:2"}
        assert resync["id"] != cursor
        assert client.last_event_id == cursor, "one channel's resync is not the connection's cursor"
        assert list(client.channels) == ["team:1", "team:2"]
        await close(client, events)


async def test_channel_names_are_checked_before_sending() -> None:
    with pytest.raises(ValueError, match="Invalid channel name 'a,b'"):
        PomoClient("ws://x/ws", token="t", channels=["a,b"])
    with pytest.raises(TypeError, match="list of channel names"):
        PomoClient("ws://x/ws", token="t", channels="team:1")
    client = PomoClient("http://x/ws?channels=team:1&last_event_id=old", token="t", last_event_id="new")
    with pytest.raises(ValueError, match="Invalid channel name ''"):
        await client.subscribe("")
    await client.subscribe("board:7")  # not connected: it joins the next handshake
    await client.subscribe("team:1")  # already there: once
    await client.unsubscribe("nope")  # not there: nothing to do
    assert client.connect_url() == "ws://x/ws?last_event_id=new&channels=team:1,board:7"
    assert repr(client) == "PomoClient(url='http://x/ws', last_event_id='new', channels=('team:1', 'board:7'))"
