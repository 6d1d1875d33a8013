"""Channels on the Redis backend: pub/sub per channel, coalesced publishes, catch-up, retained state, epochs,
and cluster-wide membership that forgets the members of a dead node."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import anyio
import pytest

from starlette_pomo_ws._events import Position
from starlette_pomo_ws.backends.base import Record
from starlette_pomo_ws.exceptions import BackendUnavailable

from .conftest import Recorder, RedisServer, delete_prefix
from .test_redis_batching import calls, private  # noqa: F401  # a fixture
from .test_redis_faults import eventually, gate_reconnects, kill_clients

redis = pytest.importorskip("redis")
import redis.asyncio as aioredis  # noqa: E402  # after the skip: redis is an optional extra

from starlette_pomo_ws.backends.redis import RedisBackend  # noqa: E402

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

Factory = Callable[..., Any]


def head(n: int) -> str:
    return f'{{"type":"E","userId":null,"data":{n},"timestamp":"2025-01-06T12:00:00.000Z"'


def left(channel: str, user_id: str, users: int = 0) -> tuple[str, dict[str, Any]]:
    return ("presence", {"channel": channel, "user_id": user_id, "joined": False, "users": users})


async def numsub(url: str, *channels: str) -> dict[str, int]:
    admin = aioredis.Redis.from_url(url)
    try:
        pairs = await admin.pubsub_numsub(*channels)
    finally:
        await admin.aclose()
    return {name.decode() if isinstance(name, bytes) else name: int(count) for name, count in pairs}


async def test_a_node_receives_only_the_channels_it_subscribes_to(redis_factory: Factory, key_prefix: str) -> None:
    publisher, _ = await redis_factory()
    subscriber, recorder = await redis_factory()
    await subscriber.subscribe_channel("team:42")
    mine = await publisher.publish_to_channel("team:42", head(1), False)
    await publisher.publish_to_channel("team:43", head(2), False)
    barrier = await publisher.publish(None, head(3))
    await recorder.wait(lambda: barrier in recorder.records)
    assert recorder.records == [mine, barrier]
    assert mine.channel == "team:42" and mine.user_id is None
    await subscriber.unsubscribe_channel("team:42")
    await eventually(lambda: _numsub_is(subscriber, f"{key_prefix}c:team:42", 0))
    await publisher.publish_to_channel("team:42", head(4), True)
    last = await publisher.publish(None, head(5))
    await recorder.wait(lambda: last in recorder.records)
    assert recorder.records == [mine, barrier, last]


async def _numsub_is(backend: RedisBackend, channel: str, expected: int) -> bool:
    count = (await backend._client.pubsub_numsub(channel))[0][1]
    return int(count) == expected


async def test_channel_publishes_share_script_calls_with_user_publishes(private: Any) -> None:  # noqa: F811
    server, make = private
    publisher, _ = await make()
    subscriber, recorder = await make()
    await subscriber.subscribe("u1")
    await subscriber.subscribe_channel("room:1")
    await subscriber.subscribe_channel("room:2")
    before = await calls(server.url, "evalsha", "eval")
    targets = [("u1", "room:1", None, "room:2")[n % 4] for n in range(400)]
    records = await asyncio.gather(
        *(
            publisher.publish(t, head(n))
            if t is None or t == "u1"
            else publisher.publish_to_channel(t, head(n), n == 1)
            for n, t in enumerate(targets)
        )
    )
    scripts = await calls(server.url, "evalsha", "eval") - before
    assert scripts <= 12, f"400 publishes took {scripts} script calls"
    assert sorted(r.seq for r in records) == list(range(records[0].seq, records[0].seq + 400))
    await recorder.wait(lambda: len(recorder.records) == 400)
    assert recorder.records == sorted(records, key=lambda r: r.seq)
    for target in ("room:1", "room:2"):
        delivered = [r for r in recorder.records if r.channel == target]
        assert [r.head for r in delivered] == [head(n) for n, t in enumerate(targets) if t == target]
    assert await subscriber.retained(["room:1"]) == {"room:1": records[1]}


@pytest.mark.slow
async def test_100k_channels_subscribed_and_unsubscribed_leave_no_subscription(
    redis_factory: Factory, key_prefix: str
) -> None:
    """The pub/sub connection holds a channel only while the node has a subscriber: nothing piles up."""
    backend, recorder = await redis_factory()
    pubsub = backend._pubsub
    pattern = f"{key_prefix}*"
    baseline = sorted(await backend._client.pubsub_channels(pattern))
    started = time.monotonic()
    total, wave = 100_000, 5_000
    for start in range(0, total, wave):
        names = [f"room:{n}" for n in range(start, start + wave)]
        await asyncio.gather(*(backend.subscribe_channel(name) for name in names))
        if start == 0:
            # They are real subscriptions: Redis counts this connection on them.
            assert await numsub(backend._url, *(f"{key_prefix}c:{name}" for name in names[:3])) == {
                f"{key_prefix}c:{name}": 1 for name in names[:3]
            }
        await asyncio.gather(*(backend.unsubscribe_channel(name) for name in names))
    assert time.monotonic() - started < 60
    # Redis, and the client's own bookkeeping, are back where they started.
    await eventually(lambda: _channels_are(backend, pattern, baseline), 10)
    assert pubsub.channels == set()
    assert pubsub._waiters == {}
    assert not pubsub._outgoing
    # The connection is still in step: a channel subscribed now gets its events.
    await backend.subscribe_channel("room:7")
    record = await backend.publish_to_channel("room:7", head(1), False)
    await recorder.wait(lambda: record in recorder.records)
    assert [r for r in recorder.records if r.channel is not None] == [record]


async def _channels_are(backend: RedisBackend, pattern: str, expected: list[bytes]) -> bool:
    return sorted(await backend._client.pubsub_channels(pattern)) == expected


async def test_missed_channel_events_are_fetched_after_a_reconnect(
    redis_factory: Factory, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    publisher, _ = await redis_factory()
    subscriber, recorder = await redis_factory()
    await subscriber.subscribe_channel("team:42")
    first = await publisher.publish_to_channel("team:42", head(0), False)
    await recorder.wait(lambda: first in recorder.records)
    gate = gate_reconnects(subscriber, monkeypatch)
    assert await kill_clients(redis_url, subscriber._pubsub.name) == 1
    await eventually(lambda: not subscriber.connected)
    missed = [
        await publisher.publish_to_channel("team:42", head(1), False),
        await publisher.publish_to_channel("team:43", head(2), False),  # not held here
        await publisher.publish(None, head(3)),
        await publisher.publish_to_channel("team:42", head(4), True),
    ]
    gate.set()
    after: Record | None = None
    with anyio.fail_after(10):
        while after is None:
            try:
                after = await publisher.publish_to_channel("team:42", head(5), False)
            except BackendUnavailable:
                await anyio.sleep(0.05)
    await recorder.wait(lambda: after in recorder.records)
    assert recorder.records == [first, missed[0], missed[2], missed[3], after]
    assert recorder.controls == []


async def test_retained_state_has_no_ttl_and_outlives_the_history(
    redis_factory: Factory, redis_url: str, key_prefix: str
) -> None:
    backend, _ = await redis_factory(history_ttl=0.3)
    kept = await backend.publish_to_channel("board:7:tasks", head(1), True)
    admin = aioredis.Redis.from_url(redis_url)
    try:
        assert await admin.ttl(f"{key_prefix}retained:board:7:tasks") == -1
        stream = f"{key_prefix}{kept.epoch}:c:board:7:tasks"
        assert await admin.exists(stream) == 1
        await eventually(lambda: _gone(admin, stream))
    finally:
        await admin.aclose()
    assert await backend.retained(["board:7:tasks"]) == {"board:7:tasks": kept}


async def _gone(admin: aioredis.Redis, key: str) -> bool:
    return int(await admin.exists(key)) == 0


async def test_a_flush_starts_a_new_epoch_for_channels_too(
    redis_server_factory: Callable[..., RedisServer], redis_factory: Factory
) -> None:
    server = redis_server_factory()
    server.start()
    backend, recorder = await redis_factory(url=server.url)
    await backend.subscribe_channel("team:42")
    since = await backend.position()
    old = await backend.publish_to_channel("team:42", head(1), True)
    assert (await backend.history(None, since, ["team:42"])).records == [old]
    admin = aioredis.Redis.from_url(server.url)
    await admin.flushdb()
    await admin.aclose()
    history = await backend.history(None, Position(old.epoch, old.seq), ["team:42"])
    assert not history.complete
    assert history.position.epoch != old.epoch
    assert await backend.retained(["team:42"]) == {}
    new = await backend.publish_to_channel("team:42", head(2), False)
    assert (new.epoch, new.seq) == (history.position.epoch, 1)
    await recorder.wait(lambda: new in recorder.records)


@pytest.mark.parametrize("min_replicas", [0, 1], ids=["async-replication", "min-replicas-1"])
async def test_a_promoted_replica_keeps_channel_history_only_when_publishes_waited_for_it(
    redis_server_factory: Callable[..., RedisServer], redis_factory: Factory, min_replicas: int
) -> None:
    """A failover: the replica becomes the primary. Without `redis_min_replicas` a new epoch begins (the old
    primary may have acknowledged events it never sent); with it the channel's history resumes exactly."""
    primary = redis_server_factory()
    primary.start()
    replica = redis_server_factory("--replicaof", "127.0.0.1", str(primary.port))
    replica.start()
    admin = aioredis.Redis.from_url(replica.url)
    try:
        await eventually(lambda: _in_sync(admin), 10)
        backend, _ = await redis_factory(url=primary.url, min_replicas=min_replicas)
        since = await backend.position()
        published = [await backend.publish_to_channel("team:42", head(n), n == 1) for n in range(3)]
        if not min_replicas:
            await eventually(lambda: _replicated(admin, published[-1].seq), 5)
        await backend.stop()
        await admin.execute_command("REPLICAOF", "NO", "ONE")  # type: ignore[no-untyped-call]  # redis-py
    finally:
        await admin.aclose()
    promoted, _ = await redis_factory(url=replica.url, min_replicas=min_replicas)
    history = await promoted.history(None, since, ["team:42"])
    if min_replicas:
        assert history.complete
        assert list(history.records) == published
    else:
        assert not history.complete
        assert history.position.epoch != since.epoch
    # The retained state is state, not a position: it survives either way.
    kept = await promoted.retained(["team:42"])
    assert kept["team:42"].head == head(1)


async def _in_sync(admin: aioredis.Redis) -> bool:
    info = await admin.info("replication")
    return info.get("master_link_status") == "up"


async def _replicated(admin: aioredis.Redis, seq: int) -> bool:
    keys = [key async for key in admin.scan_iter(match="*meta")]
    return bool(keys) and int(await admin.hget(keys[0], "seq") or 0) >= seq


async def heard(recorder: Recorder, controls: list[tuple[str, dict[str, Any]]]) -> None:
    await recorder.wait(lambda: all(c in recorder.controls for c in controls))


# -- membership ---------------------------------------------------------------------------------------------


async def test_a_dead_nodes_members_leave_and_every_node_hears_it(redis_factory: Factory) -> None:
    crashing, crashed_recorder = await redis_factory(presence_ttl=0.6)
    survivor, survivor_recorder = await redis_factory(presence_ttl=0.6)
    observer, observer_recorder = await redis_factory(presence_ttl=0.6)
    assert await crashing.join_channel("node-crash", "team:42", "u1") == (1, 1)
    assert await crashing.join_channel("node-crash", "team:42", "u2") == (1, 2)
    assert await crashing.join_channel("node-crash", "team:43", "u1") == (1, 1)
    assert await survivor.join_channel("node-ok", "team:42", "u2") == (2, 2)
    # The refresh keeps a live node's members beyond their TTL.
    with anyio.fail_after(3):
        await anyio.sleep(1.5)
    assert await observer.channel_members("team:42") == {"u1": 1, "u2": 2}
    # A crash: the refresher stops, and no goodbye is written.
    assert crashing._members_task is not None
    crashing._members_task.cancel()
    crashing._members.local.clear()
    await crashing.stop()
    assert await observer.channel_subscriber_count("team:42") == 3
    gone = [left("team:42", "u1", 1), left("team:43", "u1", 0)]
    for recorder in (survivor_recorder, observer_recorder):
        await heard(recorder, gone)
    # Exactly once per user and channel, whichever node noticed; u2 still has a connection.
    for recorder in (survivor_recorder, observer_recorder):
        presence = [c for c in recorder.controls if c[0] == "presence"]
        assert len(presence) == len(gone)
    assert crashed_recorder.controls == []
    assert await observer.channel_members("team:42") == {"u2": 1}
    assert await observer.channel_members("team:43") == {}
    assert await observer.channel_subscriber_count("team:42") == 1
    assert await observer.channel_subscriber_count("team:43") == 0


async def test_a_graceful_stop_forgets_the_nodes_members_at_once(redis_factory: Factory) -> None:
    leaving, _ = await redis_factory()
    observer, recorder = await redis_factory()
    await leaving.join_channel("node-a", "team:42", "u1")
    await observer.join_channel("node-b", "team:42", "u2")
    await leaving.stop()
    assert await observer.channel_members("team:42") == {"u2": 1}
    await recorder.wait(lambda: left("team:42", "u1", 1) in recorder.controls)


async def test_a_node_forgotten_as_dead_writes_its_members_again(redis_factory: Factory) -> None:
    """A node paused past the TTL (a long GC, a partition) is forgotten; when it refreshes again its
    members come back and every node hears that they joined."""
    paused, _ = await redis_factory(presence_ttl=0.6)
    observer, recorder = await redis_factory(presence_ttl=0.6)
    await paused.join_channel("node-a", "team:42", "u1")
    await paused.join_channel("node-a", "team:42", "u1")
    assert paused._members_task is not None
    paused._members_task.cancel()
    await recorder.wait(lambda: left("team:42", "u1") in recorder.controls)
    assert await observer.channel_members("team:42") == {}
    await paused._members.refresh()
    assert await observer.channel_members("team:42") == {"u1": 2}
    joined = ("presence", {"channel": "team:42", "user_id": "u1", "joined": True, "users": 1})
    await recorder.wait(lambda: joined in recorder.controls)
    # Its later leaves count from the restored view.
    assert await paused.leave_channel("node-a", "team:42", "u1") == (1, 1)


async def test_members_are_written_again_after_a_flush(redis_factory: Factory, redis_url: str, key_prefix: str) -> None:
    node, _ = await redis_factory(presence_ttl=0.3)
    await node.join_channel("n1", "team:42", "u1")
    await node.join_channel("n1", "team:42", "u2")
    await delete_prefix(redis_url, key_prefix)
    assert await node.channel_members("team:42") == {}
    await eventually(lambda: _members_are(node, "team:42", {"u1": 1, "u2": 1}))
    assert await node.channel_subscriber_count("team:42") == 2


async def _members_are(backend: RedisBackend, channel: str, expected: dict[str, int]) -> bool:
    return await backend.channel_members(channel) == expected


async def test_a_failed_join_is_not_counted_and_a_failed_leave_is_repaired(
    redis_server_factory: Callable[..., RedisServer], redis_factory: Factory
) -> None:
    server = redis_server_factory()
    server.start(persist=True)
    node, _ = await redis_factory(url=server.url, presence_ttl=0.6, socket_timeout=0.3)
    assert await node.join_channel("n1", "team:42", "u1") == (1, 1)
    assert await node.join_channel("n1", "team:42", "u2") == (1, 2)
    server.stop()
    with pytest.raises(BackendUnavailable):
        await node.join_channel("n1", "team:42", "u3")
    with pytest.raises(BackendUnavailable):
        await node.leave_channel("n1", "team:42", "u2")
    server.start(persist=True)
    await eventually(lambda: _members_are(node, "team:42", {"u1": 1}), 10)


async def test_channel_keys_follow_the_layout(redis_factory: Factory, redis_url: str, key_prefix: str) -> None:
    """Channel names are confined to their own key kinds, so a name never reaches a user's keys."""
    backend, _ = await redis_factory()
    record = await backend.publish_to_channel("u:x", head(1), True)
    await backend.publish("x", head(2))
    await backend.join_channel("n1", "u:x", "x")
    admin = aioredis.Redis.from_url(redis_url)
    try:
        keys = [k.decode()[len(key_prefix) :] async for k in admin.scan_iter(match=f"{key_prefix}*")]
    finally:
        await admin.aclose()
    epoch = record.epoch
    assert {
        f"{epoch}:c:u:x",
        f"{epoch}:lc:u:x",
        "retained:u:x",
        f"{epoch}:u:x",
        f"{epoch}:l:x",
        "members:n1",
        "member-nodes",
        "cm:u:x",
        "cs",
    } <= set(keys)
    history = await backend.history("x", Position(epoch, 0))
    assert [r.head for r in history.records] == [head(2)]


async def test_catch_up_covers_many_users_and_channels(
    redis_factory: Factory, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Users and channels share the catch-up's batches of 200 streams (451 here, so three script calls): the
    events of every batch are fetched, in order."""
    publisher, _ = await redis_factory()
    subscriber, recorder = await redis_factory()
    users = [f"user-{n}" for n in range(150)]
    channels = [f"room:{n}" for n in range(300)]
    await asyncio.gather(*(subscriber.subscribe(user) for user in users))
    await asyncio.gather(*(subscriber.subscribe_channel(channel) for channel in channels))
    gate = gate_reconnects(subscriber, monkeypatch)
    assert await kill_clients(redis_url, subscriber._pubsub.name) == 1
    await eventually(lambda: not subscriber.connected)
    await subscriber.subscribe_channel("late")  # while disconnected: returns at once, caught up later
    missed = [
        await publisher.publish_to_channel("room:0", head(1), False),
        await publisher.publish("user-149", head(2)),
        await publisher.publish_to_channel("room:120", head(3), False),
        await publisher.publish_to_channel("room:299", head(4), False),
        await publisher.publish_to_channel("late", head(5), False),
        await publisher.publish_to_channel("room:300", head(6), False),  # not held
    ]
    gate.set()
    await recorder.wait(lambda: missed[4] in recorder.records, 10)
    assert recorder.records == missed[:5]
    assert recorder.controls == []
