"""Channel bookkeeping is freed with the last local subscriber: 100,000 distinct channel names subscribed
and left leave the registry, the subscribe seam, the node's subscriptions and the memory backend's
membership empty, and the process's memory where it was (compare litestar#4867, where this grew)."""

from __future__ import annotations

import contextlib
import gc
import sys

import pytest

from starlette_pomo_ws import PomoWS
from starlette_pomo_ws.backends.memory import MemoryBackend
from starlette_pomo_ws.testing import PomoTestClient, PomoWebSocket

from .conftest import make_app, make_settings

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

CHANNELS = 100_000
BATCH = 50  # names held at once, within max_channels_per_connection


async def cycle(ws: PomoWebSocket, names: list[str]) -> None:
    """Subscribe to every name, then leave each; every answer is read."""
    for name in names:
        await ws.send_json({"type": "SUBSCRIBE", "data": {"channel": name}})
    for name in names:
        answer = await ws.receive()
        assert (answer["type"], answer["data"]["channel"]) == ("SUBSCRIBED", name)
    for name in names:
        await ws.send_json({"type": "UNSUBSCRIBE", "data": {"channel": name}})
    for name in names:
        answer = await ws.receive()
        assert (answer["type"], answer["data"]["channel"]) == ("UNSUBSCRIBED", name)


async def test_100k_distinct_channels_subscribed_and_left_return_memory_to_its_baseline() -> None:
    settings = make_settings(client_message_rate=1e9, client_message_burst=10**9, heartbeat_interval=0)
    pomo = PomoWS(settings)
    app = make_app(pomo)
    async with PomoTestClient(app) as client, contextlib.AsyncExitStack() as stack:
        tabs = [
            await stack.enter_async_context(client.connect(token=client.mint_token(f"user{n}", channels=["*"])))
            for n in range(4)
        ]
        broadcaster = pomo.broadcaster
        backend = broadcaster.backend
        assert isinstance(backend, MemoryBackend)

        async def run(start: int, count: int) -> None:
            for first in range(start, start + count, BATCH * len(tabs)):
                for index, ws in enumerate(tabs):
                    base = first + index * BATCH
                    await cycle(ws, [f"room:{n}" for n in range(base, base + BATCH)])

        await run(0, 2_000)  # warm up: the dicts reach their working size
        gc.collect()
        before = sys.getallocatedblocks()
        await run(2_000, CHANNELS)
        gc.collect()
        after = sys.getallocatedblocks()
        assert broadcaster.registry.channels == 0
        assert broadcaster.channels.joining == {}
        assert broadcaster.channels._names == {}
        assert len(broadcaster.channels.streams) == 0
        assert backend._members == {}
        assert all(not ws_connection.channels for ws_connection in broadcaster.registry.everyone())
        # A channel's bookkeeping is several objects (its name, dicts, entries): 100,000 channels leaked
        # would be hundreds of thousands of blocks more.
        assert after - before < 5_000, f"{after - before} more memory blocks after {CHANNELS} channels"
