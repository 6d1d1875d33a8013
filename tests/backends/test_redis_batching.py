"""Coalesced round trips: what many handlers ask of Redis in the same moment goes as one script call or command,
with no timer, in order per stream, and every call still bounded by its timeout."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import anyio
import pytest
from websockets.asyncio.client import connect

from starlette_pomo_ws import PomoWS
from starlette_pomo_ws.exceptions import BackendUnavailable

from ..conftest import closed_with, make_app, make_settings, make_token, recv, run_server, settled
from .conftest import Recorder, RedisServer

redis = pytest.importorskip("redis")
import redis.asyncio as aioredis  # noqa: E402  # after the skip: redis is an optional extra

from starlette_pomo_ws.backends.redis import RedisBackend  # noqa: E402

pytestmark = [pytest.mark.anyio, pytest.mark.redis]


def head(n: int) -> str:
    return f'{{"type":"E","userId":null,"data":{n},"timestamp":"2025-01-06T12:00:00.000Z"'


async def calls(url: str, *commands: str) -> int:
    """How many times Redis ran these commands so far (`INFO commandstats`)."""
    admin = aioredis.Redis.from_url(url)
    try:
        stats = await admin.info("commandstats")
    finally:
        await admin.aclose()
    return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in commands)


@pytest.fixture
async def private(redis_server_factory: Callable[..., RedisServer], anyio_backend: str) -> Any:
    """A Redis of this test's own, so that its command counts are this test's alone."""
    server = redis_server_factory()
    server.start()
    started: list[RedisBackend] = []

    async def make(**options: Any) -> tuple[RedisBackend, Recorder]:
        backend = RedisBackend(server.url, **options)
        recorder = Recorder()
        await backend.start(recorder.deliver, recorder.control)
        started.append(backend)
        return backend, recorder

    yield server, make
    for backend in started:
        await backend.stop()


async def test_concurrent_publishes_share_script_calls_and_keep_each_streams_order(private: Any) -> None:
    server, make = private
    publisher, _ = await make()
    subscriber, recorder = await make()
    for user in ("u1", "u2"):
        await subscriber.subscribe(user)
    before = await calls(server.url, "evalsha", "eval")
    # 300 handlers publish in the same moment, to two users and to everyone.
    targets = [("u1", "u2", None)[n % 3] for n in range(300)]
    records = await asyncio.gather(*(publisher.publish(user, head(n)) for n, user in enumerate(targets)))
    scripts = await calls(server.url, "evalsha", "eval") - before
    assert scripts <= 10, f"300 publishes took {scripts} script calls"
    assert sorted(r.seq for r in records) == list(range(records[0].seq, records[0].seq + 300))
    await recorder.wait(lambda: len(recorder.records) == 300)
    for stream in ("u1", "u2", None):
        mine = [r for r in recorder.records if r.user_id == stream]
        # Delivered in the order the handlers called, with increasing seqs.
        assert [r.head for r in mine] == [head(n) for n, t in enumerate(targets) if t == stream]
        assert [r.seq for r in mine] == sorted(r.seq for r in mine)
    assert recorder.records == sorted(records, key=lambda r: r.seq)


async def test_concurrent_handshakes_share_round_trips(private: Any) -> None:
    """What a handshake asks (presence, a subscription, the position) is coalesced across handshakes."""
    server, make = private
    node, recorder = await make()
    before = await calls(server.url, "evalsha", "eval", "subscribe")

    async def handshake(n: int) -> int:
        count: int = await node.add_presence("node-a", f"user{n % 100}", f"c{n}")
        await node.subscribe(f"user{n % 100}")
        await node.position()
        return count

    counts = await asyncio.gather(*(handshake(n) for n in range(300)))
    trips = await calls(server.url, "evalsha", "eval", "subscribe") - before
    assert trips <= 20, f"300 handshakes took {trips} round trips"
    # Each user's three connections were counted 1, 2, 3 in their order.
    for user in range(100):
        assert [counts[n] for n in range(user, 300, 100)] == [1, 2, 3]
    assert await node.cluster_total_count() == 300
    assert await node.cluster_user_count("user7") == 3
    # The subscriptions are live: an event for the last user arrives.
    record = await node.publish("user99", head(1))
    await recorder.wait(lambda: record in recorder.records)


async def connections_received(url: str) -> int:
    """How many connections Redis accepted so far (`INFO stats`), the one asking included."""
    admin = aioredis.Redis.from_url(url)
    try:
        return int((await admin.info("stats"))["total_connections_received"])
    finally:
        await admin.aclose()


async def test_a_subscribe_storm_reads_retained_state_together_on_one_connection(private: Any) -> None:
    """Each SUBSCRIBE reads its channel's retained event: 100 at once, and one read of 100 channels, open no
    connection of their own (they used to take a pooled connection each) and get every channel's state."""
    server, make = private
    node, _ = await make()
    kept = {f"team:{n}": await node.publish_to_channel(f"team:{n}", head(n), True) for n in range(0, 100, 2)}
    assert await node.retained(["team:0", "team:1"]) == {"team:0": kept["team:0"]}  # its connection is open now
    before = await connections_received(server.url)
    singles = await asyncio.gather(*(node.retained([f"team:{n}"]) for n in range(100)))
    together = await node.retained([f"team:{n}" for n in range(100)])
    assert await connections_received(server.url) - before == 1, "only the test's own INFO connection is new"
    assert singles == [{f"team:{n}": kept[f"team:{n}"]} if n % 2 == 0 else {} for n in range(100)]
    assert together == kept


async def test_calls_behind_a_hung_round_trip_fail_within_their_own_timeout(private: Any) -> None:
    server, make = private
    backend, _ = await make(socket_timeout=0.3)
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGSTOP)  # Redis hangs: connections stay open, nothing answers
    try:
        started = time.monotonic()
        first = asyncio.ensure_future(backend.publish("u1", head(1)))
        await asyncio.sleep(0.3)  # the first call is in flight: the next ones wait behind it
        late = time.monotonic()
        behind = [asyncio.ensure_future(backend.publish("u1", head(n))) for n in range(2, 5)]
        with anyio.fail_after(5):
            results = await asyncio.gather(first, *behind, return_exceptions=True)
        finished = time.monotonic()
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
    assert all(isinstance(r, BackendUnavailable) for r in results), results
    limit = backend._op_timeout + 0.5
    assert finished - started <= limit
    assert finished - late <= limit
    # Redis answers again: publishing works without a restart of the backend.
    with anyio.fail_after(5):
        while True:
            try:
                await backend.publish("u1", head(9))
                break
            except BackendUnavailable:
                await anyio.sleep(0.05)


async def test_each_of_a_batchs_publishers_gets_the_id_its_subscribers_receive(private: Any) -> None:
    from starlette_pomo_ws import PomoWS
    from starlette_pomo_ws.testing import PomoTestClient

    from ..conftest import make_app, make_settings

    server, _ = private
    pomo = PomoWS(make_settings(), backend=RedisBackend(server.url))
    async with PomoTestClient(make_app(pomo)) as client, client.connect("u1") as ws:
        broadcaster = client.broadcaster
        before = await calls(server.url, "evalsha", "eval")
        # One batch: its events come back through pub/sub, and each publisher's id is that event's.
        events = await asyncio.gather(*(broadcaster.broadcast_to_user("u1", "N", {"n": n}) for n in range(20)))
        assert await calls(server.url, "evalsha", "eval") - before < 20, "the publishes were not batched"
        received = {}
        for _ in range(20):
            message = await ws.receive(timeout=5)
            received[message["data"]["n"]] = message["id"]
        assert received == {n: event.id for n, event in enumerate(events)}
        assert len(set(received.values())) == 20


def seq_of(event_id: str) -> int:
    """The seq a cursor stands for (`epoch.seq-in-hex.signature`)."""
    return int(event_id.split(".")[1], 16)


async def test_a_fresh_handshake_takes_one_subscribe_and_one_script_call_and_a_refused_one_none(
    redis_server_factory: Callable[..., RedisServer],
) -> None:
    """The connection count and the starting position come from one script call, after the subscription."""
    server = redis_server_factory()
    server.start()
    # No heartbeat or refresh runs during the test: every command counted is the handshake's.
    backend = RedisBackend(server.url, heartbeat_interval=60, presence_ttl=600)
    pomo = PomoWS(make_settings(cursor_secret="c" * 32, max_connections_per_user=1), backend=backend)
    async with run_server(make_app(pomo)) as app:
        async with connect(app.url(f"/ws?token={make_token('warm-up')}")) as ws:
            assert (await recv(ws))["type"] == "CONNECTION_ESTABLISHED"
        await settled(pomo.broadcaster._tasks)
        scripts, subscribes = await calls(server.url, "evalsha"), await calls(server.url, "subscribe")
        async with connect(app.url(f"/ws?token={make_token('u1')}")) as ws:
            established = await recv(ws)
            assert established["type"] == "CONNECTION_ESTABLISHED"
            assert await calls(server.url, "evalsha") - scripts == 1
            assert await calls(server.url, "subscribe") - subscribes == 1
            # The position it read is where the user's events continue.
            event = await pomo.broadcaster.broadcast_to_user("u1", "TASK_CREATED", {"n": 1})
            assert seq_of(event.id) == seq_of(established["id"]) + 1
            assert (await recv(ws))["id"] == event.id
            assert await pomo.broadcaster.cluster_user_connection_count("u1") == 1
            # A second tab over the limit, which this node's own connection fills, costs Redis nothing.
            scripts = await calls(server.url, "evalsha", "subscribe")
            async with connect(app.url(f"/ws?token={make_token('u1')}")) as refused:
                assert await closed_with(refused) == (1008, "Too many connections for this user")
            assert await calls(server.url, "evalsha", "subscribe") == scripts


async def test_handshakes_amid_publishes_get_every_event_after_their_position(
    redis_server_factory: Callable[..., RedisServer],
) -> None:
    """Events published while connections open are each delivered exactly when they follow its position."""
    server = redis_server_factory()
    server.start()
    pomo = PomoWS(make_settings(cursor_secret="c" * 32), backend=RedisBackend(server.url))
    users = [f"u{n}" for n in range(30)]
    published: dict[str, list[int]] = {user: [] for user in users}
    opening = True

    async def publish(first: int) -> None:
        n = first
        while opening and n < 5_000:  # bounded, and it stops once every socket is open
            user = users[n % len(users)]
            published[user].append(seq_of((await pomo.broadcaster.broadcast_to_user(user, "E", {"n": n})).id))
            n += 4

    async def open_and_read(user: str, stack: contextlib.AsyncExitStack) -> tuple[Any, int]:
        ws = await stack.enter_async_context(connect(app.url(f"/ws?token={make_token(user)}")))
        established = await recv(ws)
        assert established["type"] == "CONNECTION_ESTABLISHED"
        return ws, seq_of(established["id"])

    async with run_server(make_app(pomo)) as app, contextlib.AsyncExitStack() as stack:
        publishers = [asyncio.ensure_future(publish(first)) for first in range(4)]
        try:
            opened = []
            for group in range(0, len(users), 3):  # a few at a time, so that publishes fall between them
                opened += await asyncio.gather(*(open_and_read(user, stack) for user in users[group : group + 3]))
        finally:
            opening = False
            await asyncio.gather(*publishers)
        straddled = 0
        for user, (ws, start) in zip(users, opened, strict=True):
            last = await pomo.broadcaster.broadcast_to_user(user, "END")
            received = []
            while (event := await recv(ws))["type"] != "END":
                received.append(seq_of(event["id"]))
            assert event["id"] == last.id
            assert received == sorted(seq for seq in published[user] if seq > start), user
            seqs = published[user]
            straddled += bool(seqs) and min(seqs) <= start < max(seqs)
        # The race was run: for most users, events were published both before and after the handshake.
        assert straddled >= len(users) // 2, (straddled, {user: len(seqs) for user, seqs in published.items()})
