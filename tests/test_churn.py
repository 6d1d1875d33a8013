"""Churn: thousands of connect/close cycles, in every way a client can leave, leave nothing behind.

The cycles drive the whole Starlette app (routing, lifespan state, the mount) at the ASGI level, with a scripted
`receive` and a recording `send`, so that thousands fit in a few seconds and each way of leaving is exact:
clean closes, leaving before CONNECTION_ESTABLISHED, resumes, protocol errors, a transport that fails under a
send, a handler cancelled by the server, and closes by the server (`disconnect_user`) in the middle of it all.
"""

from __future__ import annotations

import asyncio
import gc
import json
import time
import urllib.parse
from collections.abc import MutableMapping
from typing import Any, Literal

import anyio
import pytest
from asgi_lifespan import LifespanManager

from starlette_pomo_ws import Broadcaster, PomoWS
from starlette_pomo_ws._connection import Connection
from starlette_pomo_ws.testing import PomoWebSocket

from .conftest import make_app, make_settings, make_token, wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

Message = MutableMapping[str, Any]

CYCLES = 2000
WORKERS = 40
USERS = 25
KINDS = 7


def leftovers(broadcaster: Broadcaster) -> dict[str, int]:
    """Every per-connection structure of the broadcaster that must be empty when no one is connected."""
    return {
        "connections": broadcaster.total_connection_count(),
        "users": broadcaster.registry.users,
        "queued": len(broadcaster.backed_up),
        "subscriptions": len(broadcaster._subscriptions),
        "closers": len(broadcaster._closers),
        "background": len(broadcaster._tasks),
        "activity": len(broadcaster._user_activity),
    }


EMPTY = dict.fromkeys(("connections", "users", "queued", "subscriptions", "closers", "background", "activity"), 0)


class Socket:
    """One WebSocket at the ASGI level: the test kit's `PomoWebSocket`, read message by message.

    `broken=True` makes every send fail, as a vanished peer's transport does; `yielding=True` makes every send
    switch tasks once, as a server whose send() awaits a queue or a drain does.
    """

    def __init__(
        self, app: Any, path: str, query: dict[str, str], *, broken: bool = False, yielding: bool = False
    ) -> None:
        mode: Literal["instant", "yield", "fail"] = "fail" if broken else "yield" if yielding else "instant"
        self.ws = PomoWebSocket(app, path, urllib.parse.urlencode(query), send_mode=mode)
        self.ws.start()

    async def next(self) -> Message:
        return await self.ws.receive_message(timeout=5)

    async def next_json(self) -> dict[str, Any] | None:
        """The next text message, or `None` when the server closed the socket (then the close is answered)."""
        message = await self.next()
        if message["type"] == "websocket.accept":
            message = await self.next()
        if message["type"] == "websocket.close":
            assert (message["code"], message["reason"]) == (1000, "Disconnected by the server"), message
            return None
        assert message["type"] == "websocket.send", message
        result: dict[str, Any] = json.loads(message["text"])
        return result

    def send_text(self, text: str) -> None:
        self.ws.feed({"type": "websocket.receive", "text": text})

    def leave(self, code: int = 1000) -> None:
        self.ws.feed({"type": "websocket.disconnect", "code": code})

    def cancel(self) -> None:
        self.ws.cancel()

    async def finished(self) -> None:
        await self.ws.finished(timeout=5)  # re-raises a crash: the app never crashes, whatever the client does
        assert self.ws.violations == [], f"the app sent after its close: {self.ws.violations}"


async def test_thousands_of_connect_close_cycles_return_to_the_baseline() -> None:
    """Afterwards the registry, the queues, the subscriptions and the number of asyncio tasks are where they started."""
    pomo = PomoWS(make_settings(client_message_burst=1000, max_connections_per_user=1000))
    app = make_app(pomo)
    broadcaster = pomo.broadcaster
    tokens = {f"user{n}": make_token(f"user{n}") for n in range(USERS)}
    cursors: dict[str, str] = {}
    counts = dict.fromkeys(("done", "kicked"), 0)
    started = time.monotonic()

    async with LifespanManager(app) as manager:
        asgi = manager.app
        # Warm up once (the ticker and the first subscription exist), then take the baseline.
        warm = Socket(asgi, "/ws", {"token": tokens["user0"]})
        hello = await warm.next_json()
        assert hello is not None and hello["type"] == "CONNECTION_ESTABLISHED"
        cursors["user0"] = hello["id"]
        warm.leave()
        await warm.finished()
        await wait_until(lambda: leftovers(broadcaster) == EMPTY, what="the warm-up connection released")
        baseline_tasks = len(asyncio.all_tasks())

        async def cycle(worker: int, n: int) -> None:
            user = f"user{(worker + n) % USERS}"
            kind = (worker + n) % KINDS
            query = {"token": tokens[user]}
            if kind == 2 and user in cursors:
                query["last_event_id"] = cursors[user]
            path = "/ws" if n % 2 else "/ws/"
            ws = Socket(asgi, path, query, broken=kind == 5, yielding=n % 3 == 0)
            if kind == 0:  # read the greeting, leave cleanly
                hello = await ws.next_json()
                if hello is not None:
                    assert hello["type"] == "CONNECTION_ESTABLISHED"
                    cursors[user] = hello["id"]
                    ws.leave()
            elif kind == 1:  # a round trip
                ws.send_text('{"type": "PING"}')
                while (message := await ws.next_json()) is not None and message["type"] != "PONG":
                    pass
                ws.leave()
            elif kind in (2, 4):  # leave at once: the server may still be authenticating or replaying
                ws.leave(1001)
            elif kind == 3:  # a protocol error, then leave
                ws.send_text("not json")
                while (message := await ws.next_json()) is not None and message["type"] != "ERROR":
                    pass
                ws.leave()
            elif kind == 5:  # the peer vanished: the transport fails under the first send
                pass
            elif kind == 6:  # the server drops the handler (as at a hard shutdown of that socket)
                await ws.next()
                ws.cancel()
            await ws.finished()
            counts["done"] += 1

        async def worker(index: int) -> None:
            for n in range(CYCLES // WORKERS):
                await cycle(index, n)

        async def publisher(stop: anyio.Event) -> None:
            n = 0
            while not stop.is_set():
                n += 1
                if n % 7 == 0:
                    await broadcaster.broadcast_to_all("NOTIFICATION", {"n": n})
                else:
                    await broadcaster.broadcast_to_user(f"user{n % USERS}", "TASK_UPDATED", {"n": n})
                await asyncio.sleep(0.0005)

        async def kicker(stop: anyio.Event) -> None:
            """Server-side closes in the middle of the churn (logout everywhere)."""
            n = 0
            while not stop.is_set():
                n += 1
                counts["kicked"] += broadcaster.user_connection_count(f"user{n % USERS}")
                await broadcaster.disconnect_user(f"user{n % USERS}")
                await asyncio.sleep(0.01)

        stop = anyio.Event()
        with anyio.fail_after(30):
            async with anyio.create_task_group() as background:
                background.start_soon(publisher, stop)
                background.start_soon(kicker, stop)
                async with anyio.create_task_group() as workers:
                    for index in range(WORKERS):
                        workers.start_soon(worker, index)
                stop.set()

        assert counts["done"] == CYCLES
        assert counts["kicked"] > 0, "the kicker never caught a connection: the test lost its teeth"
        await wait_until(lambda: leftovers(broadcaster) == EMPTY, what="the broadcaster's structures to empty")
        assert leftovers(broadcaster) == EMPTY
        await wait_until(lambda: len(asyncio.all_tasks()) <= baseline_tasks, what="asyncio tasks back to baseline")
        assert len(asyncio.all_tasks()) == baseline_tasks
        print(f"{CYCLES} cycles in {time.monotonic() - started:.1f} s; the server closed {counts['kicked']}")


async def test_closed_connections_leave_the_expiry_timers() -> None:
    """A closed connection is freed at once, not kept by its token's timers until `exp` (tokens often
    live for hours), even while other connections stay open and keep the timers busy."""
    pomo = PomoWS(make_settings())
    async with LifespanManager(make_app(pomo)) as manager:
        token = make_token("u1", ttl=3600)
        staying = []
        for n in range(50):
            ws = Socket(manager.app, "/ws", {"token": make_token(f"stays{n}", ttl=3600)})
            assert (await ws.next_json()) is not None
            staying.append(ws)
        for _ in range(280):
            ws = Socket(manager.app, "/ws", {"token": token})
            assert (await ws.next_json()) is not None
            ws.leave()
            await ws.finished()
        assert pomo.broadcaster.total_connection_count() == 50
        gc.collect()
        alive = sum(1 for obj in gc.get_objects() if isinstance(obj, Connection))
        assert alive == 50, f"{alive - 50} closed connections (and their scopes) are still alive"
        # The stale timer entries are bounded by the live connections, not by the churn.
        assert len(pomo.broadcaster._expiries) <= 4 * 50 + 64
        for ws in staying:
            ws.leave()
            await ws.finished()
