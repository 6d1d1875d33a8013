"""Paths that need a backend or a socket to misbehave on cue: slow subscriptions, stuck sends, odd data."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import enum
from collections.abc import MutableMapping
from typing import Any

import pytest
from asgi_lifespan import LifespanManager

from starlette_pomo_ws import BackendUnavailable, PomoWS, Principal
from starlette_pomo_ws._connection import Connection
from starlette_pomo_ws._events import dumps
from starlette_pomo_ws.backends import MemoryBackend

from .conftest import make_app, make_settings, make_token, settled, wait_until
from .test_churn import Socket

pytestmark = pytest.mark.anyio


class GatedBackend(MemoryBackend):
    """A shared-style backend whose subscribe waits for the test, and can fail."""

    kind = "gated"
    shared = True  # like a remote backend: one subscription per user

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.fail = False
        self.subscribes = 0
        self.unsubscribes = 0

    async def subscribe(self, user_id: str) -> None:
        self.subscribes += 1
        await self.gate.wait()
        if self.fail:
            raise BackendUnavailable("subscribe failed")

    async def unsubscribe(self, user_id: str) -> None:
        self.unsubscribes += 1


def pomo_on(backend: MemoryBackend, **settings: Any) -> PomoWS:
    return PomoWS(make_settings(cursor_secret="c" * 32, **settings), backend=backend)


async def test_connections_of_one_user_share_one_subscription() -> None:
    backend = GatedBackend()
    pomo = pomo_on(backend)
    async with LifespanManager(make_app(pomo)) as manager:
        first = Socket(manager.app, "/ws", {"token": make_token()})
        second = Socket(manager.app, "/ws", {"token": make_token()})
        # Both handshakes wait on the one subscription, before they are accepted.
        await wait_until(lambda: pomo.broadcaster.user_connection_count("u1") == 2, what="both handshakes")
        assert backend.subscribes == 1
        backend.gate.set()
        for ws in (first, second):
            assert (await ws.next())["type"] == "websocket.accept"
            assert (await ws.next_json() or {})["type"] == "CONNECTION_ESTABLISHED"
        await pomo.broadcaster.broadcast_to_user("u1", "AFTER")
        for ws in (first, second):
            assert (await ws.next_json() or {})["type"] == "AFTER"
        assert backend.subscribes == 1
        for ws in (first, second):
            ws.leave()
            await ws.finished()
        await settled(pomo.broadcaster._tasks)
        assert backend.unsubscribes == 1


async def test_a_failed_subscription_closes_with_1011_and_is_retried_by_the_next_connection() -> None:
    backend = GatedBackend()
    backend.fail = True
    pomo = pomo_on(backend)
    async with LifespanManager(make_app(pomo)) as manager:
        first = Socket(manager.app, "/ws", {"token": make_token()})
        second = Socket(manager.app, "/ws", {"token": make_token()})
        await wait_until(lambda: pomo.broadcaster.user_connection_count("u1") == 2, what="both handshakes")
        backend.gate.set()
        for ws in (first, second):
            assert (await ws.next())["type"] == "websocket.accept"
            close = await ws.next()
            assert (close["type"], close["code"]) == ("websocket.close", 1011)
        # Nothing of the refused handshakes is left: no connection, no count, no subscription.
        assert pomo.broadcaster.user_connection_count("u1") == 0
        assert await pomo.broadcaster.cluster_user_connection_count("u1") == 0
        backend.fail = False
        third = Socket(manager.app, "/ws", {"token": make_token()})
        assert (await third.next_json() or {})["type"] == "CONNECTION_ESTABLISHED"
        assert backend.subscribes == 2


async def test_events_while_subscribing_are_bounded_by_the_queue() -> None:
    backend = GatedBackend()
    pomo = pomo_on(backend, send_queue_size=3)
    async with LifespanManager(make_app(pomo)) as manager:
        ws = Socket(manager.app, "/ws", {"token": make_token()})
        await wait_until(lambda: pomo.broadcaster.user_connection_count("u1") == 1, what="the handshake")
        for n in range(4):
            await pomo.broadcaster.broadcast_to_user("u1", "FLOOD", {"n": n})
        assert pomo.broadcaster.user_connection_count("u1") == 0  # let go at once
        backend.gate.set()
        assert (await ws.next())["type"] == "websocket.accept"
        close = await ws.next()
        assert (close["code"], close["reason"]) == (1013, "Client too slow")
        await ws.finished()
        await settled(pomo.broadcaster._tasks)
        assert await pomo.broadcaster.cluster_user_connection_count("u1") == 0


async def test_a_send_stuck_past_send_timeout_closes_with_1013_and_frees_the_handler() -> None:
    pomo = PomoWS(make_settings(send_timeout=0.2))
    stuck = asyncio.Event()

    async def receive_forever() -> dict[str, Any]:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")  # pragma: no cover

    sent: list[MutableMapping[str, Any]] = []
    first_send = asyncio.Event()

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "websocket.send":
            first_send.set()
        if stuck.is_set():
            await asyncio.Event().wait()  # a peer that never reads: no send returns, not even the close

    async with LifespanManager(make_app(pomo)) as manager:
        scope = {
            "type": "websocket", "path": "/ws", "raw_path": b"/ws", "root_path": "", "headers": [],
            "query_string": f"token={make_token()}".encode(), "subprotocols": [], "asgi": {"version": "3.0"},
        }  # fmt: skip
        handler = asyncio.ensure_future(manager.app(scope, receive_forever, send))
        await asyncio.wait_for(first_send.wait(), 5)  # CONNECTION_ESTABLISHED went out
        stuck.set()
        await pomo.broadcaster.broadcast_to_user("u1", "STUCK")
        await asyncio.wait_for(handler, 5)  # the ticker gave up on the peer, and the handler returned
    assert pomo.broadcaster.stats.slow_closes == 1
    assert pomo.broadcaster.total_connection_count() == 0


class Colour(enum.Enum):
    RED = "red"


class LegacyModel:
    __fields__ = ("x",)

    def dict(self) -> dict[str, int]:
        return {"x": 1}


@dataclasses.dataclass
class Point:
    x: int


def test_data_conversions() -> None:
    naive = datetime.datetime(2025, 1, 6, 12, 0, 0, 123000)
    assert dumps(naive) == '"2025-01-06T12:00:00.123Z"'  # a naive datetime is taken as UTC (#14)
    assert dumps(datetime.date(2025, 1, 6)) == '"2025-01-06"'
    assert dumps(datetime.time(12, 30)) == '"12:30:00.000"'
    assert dumps(Colour.RED) == '"red"'
    assert dumps({1}) == "[1]"
    assert dumps(LegacyModel()) == '{"x":1}'
    assert dumps(Point(2)) == '{"x":2}'


def test_backends_export_redis_lazily() -> None:
    from starlette_pomo_ws import backends

    assert backends.RedisBackend.kind == "redis"
    with pytest.raises(AttributeError):
        getattr(backends, "NoSuchBackend")  # noqa: B009


def test_connection_repr_names_user_and_id() -> None:
    pomo = PomoWS(make_settings())

    async def send(message: MutableMapping[str, Any]) -> None:
        return None  # pragma: no cover

    connection = Connection(pomo.broadcaster, Principal("u9"), send, {})
    assert repr(connection) == f"<Connection id={connection.id!r} user_id='u9'>"
