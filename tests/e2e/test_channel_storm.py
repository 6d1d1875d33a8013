"""A reconnect storm with channels: tabs in several channels, dropped again and again while events go to
users, to everyone and to channels, end with no gap and no duplicate, on one node (memory) and on two
nodes that share a real Redis (each reconnect picks a node at random)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import secrets
from typing import Any

import anyio
import pytest
from websockets.asyncio.client import connect

from starlette_pomo_ws import PomoWS

from ..conftest import make_app, make_settings, make_token, run_server

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

USERS = [f"user{i}" for i in range(4)]
CHANNELS = ["team:a", "team:b", "team:c"]
TABS_PER_USER = 2
EVENTS = 500


def tab_channels(user_index: int, tab: int) -> list[str]:
    """Each tab holds two of the three channels; the two tabs of a user hold different pairs."""
    first = (user_index + tab) % len(CHANNELS)
    return [CHANNELS[first], CHANNELS[(first + 1) % len(CHANNELS)]]


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_a_reconnect_storm_with_channels_ends_with_zero_gaps_and_zero_duplicates(
    backend: str, request: pytest.FixtureRequest
) -> None:
    if backend == "redis":
        url = request.getfixturevalue("redis_url")
        prefix = f"pomo-test-storm-{secrets.token_hex(4)}:"
        nodes = [
            PomoWS(make_settings(backend_url=url, history_size=5000), backend=_redis(url, prefix)) for _ in range(2)
        ]
    else:
        nodes = [PomoWS(make_settings(history_size=5000))]
    # (target kind, target, id) in publish order
    published: list[tuple[str, str | None, str]] = []
    rng = random.Random(4321)
    all_connected = asyncio.Event()
    publishing_done = asyncio.Event()
    connected_tabs = 0
    reconnects = 0

    async def publisher() -> None:
        await all_connected.wait()
        for n in range(EVENTS):
            broadcaster = nodes[n % len(nodes)].broadcaster
            if n % 7 == 0:
                event = await broadcaster.broadcast_to_all("NOTIFICATION", {"n": n})
                published.append(("all", None, event.id))
            elif n % 2 == 0:
                channel = CHANNELS[n % len(CHANNELS)]
                event = await broadcaster.broadcast_to_channel(channel, "TASK_UPDATED", {"n": n})
                published.append(("channel", channel, event.id))
            else:
                user = USERS[n % len(USERS)]
                event = await broadcaster.broadcast_to_user(user, "TASK_UPDATED", {"n": n})
                published.append(("user", user, event.id))
            if n % 3 == 0:
                await asyncio.sleep(0.002)
        final = await nodes[0].broadcaster.broadcast_to_all("FINAL")
        published.append(("all", None, final.id))
        publishing_done.set()

    async def tab(urls: list[str], user: str, channels: list[str], seed: int) -> list[str]:
        nonlocal reconnects, connected_tabs
        local = random.Random(seed)
        cursor: str | None = None
        got: list[str] = []
        token = make_token(user, channels=["team:*"])
        for _cycle in range(200):
            query = f"?token={token}&channels={','.join(channels)}"
            if cursor:
                query += f"&last_event_id={cursor}"
            async with connect(local.choice(urls) + query, compression=None) as ws:
                hello = json.loads(await ws.recv())
                assert hello["type"] == "CONNECTION_ESTABLISHED"
                if cursor is not None:
                    assert hello["data"]["resumed"] is True, "a resume inside the window never needs a resync"
                for channel in channels:
                    subscribed = json.loads(await ws.recv())
                    assert (subscribed["type"], subscribed["data"]["channel"]) == ("SUBSCRIBED", channel)
                if cursor is None:
                    cursor = hello["id"]
                    connected_tabs += 1
                    if connected_tabs == len(USERS) * TABS_PER_USER:
                        all_connected.set()
                budget = local.randint(1, 40)
                while True:
                    message = json.loads(await ws.recv())
                    assert message["type"] != "RESYNC_REQUIRED", message
                    got.append(message["id"])
                    cursor = message["id"]
                    if message["type"] == "FINAL":
                        return got
                    budget -= 1
                    if budget == 0 and not publishing_done.is_set():
                        break
                reconnects += 1
                if local.random() < 0.5:
                    ws.transport.abort()  # abrupt: no close handshake
        raise AssertionError("a tab used up its 200 reconnects without seeing FINAL")

    async with contextlib.AsyncExitStack() as stack:
        servers = [await stack.enter_async_context(run_server(make_app(node))) for node in nodes]
        urls = [server.url("/ws") for server in servers]
        results: dict[tuple[str, int], tuple[list[str], list[str]]] = {}

        async def run_tab(user_index: int, index: int) -> None:
            user = USERS[user_index]
            channels = tab_channels(user_index, index)
            results[(user, index)] = (await tab(urls, user, channels, rng.randint(0, 1 << 30)), channels)

        with anyio.fail_after(90):
            async with anyio.create_task_group() as group:
                for user_index in range(len(USERS)):
                    for index in range(TABS_PER_USER):
                        group.start_soon(run_tab, user_index, index)
                group.start_soon(publisher)

    assert reconnects > 50, "the storm did not storm"
    for (user, _index), (got, channels) in results.items():
        expected = [
            event_id
            for kind, target, event_id in published
            if kind == "all" or (kind == "user" and target == user) or (kind == "channel" and target in channels)
        ]
        assert len(got) == len(set(got)), f"{user} saw a duplicate"
        assert got == expected, f"{user} in {channels} missed or reordered events"


def _redis(url: str, prefix: str) -> Any:
    from starlette_pomo_ws.backends.redis import RedisBackend

    return RedisBackend(url, key_prefix=prefix, history_size=5000)
