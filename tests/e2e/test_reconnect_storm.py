"""A reconnect storm: clients dropped again and again while events flow end with no gap and no duplicate."""

from __future__ import annotations

import asyncio
import json
import random

import anyio
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from starlette_pomo_ws import PomoWS

from ..conftest import WS_IMPLEMENTATIONS, make_app, make_settings, make_token, run_server

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

USERS = [f"user{i}" for i in range(4)]
TABS_PER_USER = 3


@pytest.mark.parametrize("ws_impl", WS_IMPLEMENTATIONS)
async def test_reconnect_storm_ends_with_zero_gaps_and_zero_duplicates(ws_impl: str) -> None:
    pomo = PomoWS(make_settings())
    published: list[tuple[str | None, str]] = []  # (user or None, id) in publish order
    rng = random.Random(1234)
    publishing_done = asyncio.Event()
    all_connected = asyncio.Event()
    connected_tabs = 0
    reconnects = 0

    async def publisher() -> None:
        broadcaster = pomo.broadcaster
        await all_connected.wait()  # every tab holds a cursor from before the first event
        for n in range(600):
            if n % 5 == 0:
                event = await broadcaster.broadcast_to_all("NOTIFICATION", {"n": n})
            else:
                user = USERS[n % len(USERS)]
                event = await broadcaster.broadcast_to_user(user, "TASK_UPDATED", {"n": n})
            published.append((event.user_id, event.id))
            if n % 3 == 0:
                await asyncio.sleep(0.002)
        final = await broadcaster.broadcast_to_all("FINAL")
        published.append((None, final.id))
        publishing_done.set()

    async def tab(url: str, user: str, seed: int) -> list[str]:
        nonlocal reconnects, connected_tabs
        local = random.Random(seed)
        cursor: str | None = None
        got: list[str] = []
        for _cycle in range(200):
            query = f"?token={make_token(user)}" + (f"&last_event_id={cursor}" if cursor else "")
            async with connect(url + query) as ws:
                hello = json.loads(await ws.recv())
                assert hello["type"] == "CONNECTION_ESTABLISHED"
                if cursor is not None:
                    assert hello["data"]["resumed"] is True, "a resume inside the window never needs a resync"
                    assert hello["id"] == cursor
                if cursor is None:
                    connected_tabs += 1
                    if connected_tabs == len(USERS) * TABS_PER_USER:
                        all_connected.set()
                cursor = hello["id"]
                budget = local.randint(1, 40)
                try:
                    while True:
                        message = json.loads(await ws.recv())
                        assert message["type"] != "RESYNC_REQUIRED"
                        got.append(message["id"])
                        cursor = message["id"]
                        if message["type"] == "FINAL":
                            return got
                        budget -= 1
                        if budget == 0 and not publishing_done.is_set():
                            break
                except ConnectionClosed:  # pragma: no cover - the server never drops these tabs
                    raise
                reconnects += 1
                if local.random() < 0.5:
                    ws.transport.abort()  # abrupt: no close handshake
                # else: the context manager closes cleanly
        raise AssertionError("a tab used up its 200 reconnects without seeing FINAL")

    async with run_server(make_app(pomo), ws=ws_impl) as server:
        results: dict[tuple[str, int], list[str]] = {}

        async def run_tab(user: str, index: int) -> None:
            results[(user, index)] = await tab(server.url("/ws"), user, rng.randint(0, 1 << 30))

        with anyio.fail_after(60):
            async with anyio.create_task_group() as group:
                for user in USERS:
                    for index in range(TABS_PER_USER):
                        group.start_soon(run_tab, user, index)
                group.start_soon(publisher)

    assert reconnects > 50, "the storm did not storm"
    for (user, _index), got in results.items():
        expected = [event_id for target, event_id in published if target in (user, None)]
        assert len(got) == len(set(got)), f"{user} saw a duplicate"
        assert got == expected, f"{user} missed or reordered events"
