"""The Redis backend under real faults: killed connections, flushes, restarts, TLS, crashed nodes."""

from __future__ import annotations

import asyncio
import logging
import pathlib
import re
import subprocess
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest

from starlette_pomo_ws._events import Position
from starlette_pomo_ws.backends.base import Record
from starlette_pomo_ws.exceptions import BackendUnavailable

from .conftest import Recorder, RedisServer, replica_in_sync

redis = pytest.importorskip("redis")
import redis.asyncio as aioredis  # noqa: E402  # after the skip: redis is an optional extra

from starlette_pomo_ws.backends.redis import RedisBackend  # noqa: E402

pytestmark = pytest.mark.anyio

Factory = Callable[..., Any]


def resynced(recorder: Any, reason: str) -> bool:
    """Whether the backend asked the core to resync, once, for `reason`, naming the position live events follow."""
    if [kind for kind, _ in recorder.controls] != ["resync"]:
        return False
    arguments = recorder.controls[0][1]
    return bool(arguments["reason"] == reason and isinstance(arguments["epoch"], str) and arguments["seq"] >= 0)


def head(n: int) -> str:
    return f'{{"type":"E","userId":null,"data":{n},"timestamp":"2025-01-06T12:00:00.000Z"'


async def eventually(predicate: Callable[[], Any], limit: float = 5.0) -> None:
    """Wait (bounded) for a state that no event announces, such as a connection noticing it is gone."""
    with anyio.fail_after(limit):
        while True:
            result = predicate()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return
            await anyio.sleep(0.01)


async def kill_clients(url: str, *names: str) -> int:
    admin = aioredis.Redis.from_url(url, socket_timeout=2)
    killed = 0
    try:
        for info in await admin.client_list():
            if info.get("name") in names:
                await admin.client_kill_filter(_id=info["id"])
                killed += 1
    finally:
        await admin.aclose()
    return killed


async def _equals(value: Awaitable[int], expected: int) -> bool:
    return await value == expected


def gate_reconnects(backend: RedisBackend, monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """Hold the backend's next pub/sub connection until the returned event is set."""
    gate = asyncio.Event()
    original = backend._pubsub._session

    async def gated(ready: asyncio.Future[None]) -> None:
        await gate.wait()
        await original(ready)

    monkeypatch.setattr(backend._pubsub, "_session", gated)
    return gate


async def publish_retrying(backend: RedisBackend, user_id: str | None, n: int, limit: float = 10) -> Record:
    with anyio.fail_after(limit):
        while True:
            try:
                return await backend.publish(user_id, head(n))
            except BackendUnavailable:
                await anyio.sleep(0.05)


def relevant(records: list[Record], user_id: str) -> list[Record]:
    return [r for r in records if r.user_id in (user_id, None)]


@pytest.mark.slow
async def test_client_kill_during_publishing_loses_nothing(
    redis_factory: Factory, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Every event whose publish returned reaches the subscriber exactly once, in order."""
    caplog.set_level(logging.INFO, "starlette_pomo_ws")
    # A history the outages cannot outrun (a publish loop makes thousands a second): this tests the kills;
    # an outage longer than the history is `test_history_trimmed_while_disconnected_asks_for_a_resync`'s.
    publisher, _ = await redis_factory(history_size=100_000)
    subscriber, recorder = await redis_factory(history_size=100_000)
    subscriber._pubsub._backoff_cap = 0.2
    await subscriber.subscribe("u1")
    returned: list[Record] = []
    failed = 0
    done = anyio.Event()

    async def publish_forever() -> None:
        nonlocal failed
        n = 0
        while not done.is_set():
            n += 1
            try:
                returned.append(await publisher.publish("u1" if n % 3 else None, head(n)))
            except BackendUnavailable:
                failed += 1
                await anyio.sleep(0.01)

    def published(count: int) -> Callable[[], bool]:
        return lambda: len(returned) >= count

    def delivered_up_to(count: int) -> Callable[[], bool]:
        return lambda: returned[count - 1] in recorder.records

    async with anyio.create_task_group() as tg:
        tg.start_soon(publish_forever)
        for _ in range(6):
            await eventually(published(len(returned) + 40))
            # The pub/sub session, the pools, and the publisher's own publish connection.
            names = (
                subscriber._pubsub.name,
                subscriber._client_name,
                publisher._client_name,
                f"{publisher._client_name}-pub",
            )
            assert await kill_clients(redis_url, *names) >= 1
            mark = len(returned) + 20
            await eventually(published(mark))
            await recorder.wait(delivered_up_to(mark))
        done.set()

    last = returned[-1]
    await recorder.wait(lambda: last in recorder.records, limit=10)
    delivered = recorder.seqs
    assert delivered == sorted(set(delivered)), "a seq was delivered twice or out of order"
    assert {r.seq for r in returned} <= set(delivered)
    assert relevant(recorder.records, "u1") == recorder.records
    assert recorder.controls == []  # every gap could be fetched: no resync
    assert "restored" in caplog.text


async def test_missed_events_are_fetched_after_a_reconnect(
    redis_factory: Factory, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    publisher, _ = await redis_factory()
    subscriber, recorder = await redis_factory()
    await subscriber.subscribe("u1")
    first = await publisher.publish("u1", head(0))
    await recorder.wait(lambda: first in recorder.records)
    gate = gate_reconnects(subscriber, monkeypatch)
    assert await kill_clients(redis_url, subscriber._pubsub.name) == 1
    await eventually(lambda: not subscriber.connected)
    missed = [
        await publisher.publish("u1", head(1)),
        await publisher.publish(None, head(2)),
        await publisher.publish("u2", head(3)),
        await publisher.publish("u1", head(4)),
    ]
    gate.set()
    after = await publish_retrying(publisher, "u1", 5)
    await recorder.wait(lambda: after in recorder.records)
    assert recorder.records == [first, *relevant(missed, "u1"), after]
    assert recorder.controls == []
    assert subscriber.connected


async def test_history_trimmed_while_disconnected_asks_for_a_resync(
    redis_factory: Factory, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    publisher, _ = await redis_factory(history_size=2)
    subscriber, recorder = await redis_factory(history_size=2)
    await subscriber.subscribe("u1")
    gate = gate_reconnects(subscriber, monkeypatch)
    assert await kill_clients(redis_url, subscriber._pubsub.name) == 1
    await eventually(lambda: not subscriber.connected)
    for n in range(250):
        await publisher.publish("u1", head(n))
    gate.set()
    await recorder.wait(lambda: resynced(recorder, "history_unavailable"))
    assert recorder.records == []  # never a partial replay
    after = await publisher.publish("u1", head(999))
    await recorder.wait(lambda: after in recorder.records)
    assert recorder.records == [after]


async def test_data_lost_while_disconnected_asks_for_a_resync(
    redis_factory: Factory, redis_url: str, key_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from .conftest import delete_prefix

    publisher, _ = await redis_factory()
    subscriber, recorder = await redis_factory()
    await subscriber.subscribe("u1")
    old = await publisher.publish("u1", head(1))
    await recorder.wait(lambda: old in recorder.records)
    gate = gate_reconnects(subscriber, monkeypatch)
    assert await kill_clients(redis_url, subscriber._pubsub.name) == 1
    await eventually(lambda: not subscriber.connected)
    await delete_prefix(redis_url, key_prefix)  # what a flush does to this backend's keys
    new = await publisher.publish("u1", head(2))
    assert new.epoch != old.epoch
    assert new.seq == 1
    gate.set()
    await recorder.wait(lambda: resynced(recorder, "new_epoch"))
    after = await publisher.publish("u1", head(3))
    await recorder.wait(lambda: after in recorder.records)
    assert recorder.records == [old, after]


async def test_flushdb_starts_a_new_epoch(
    redis_server_factory: Callable[..., RedisServer], redis_factory: Factory
) -> None:
    server = redis_server_factory()
    server.start()
    publisher, _ = await redis_factory(url=server.url)
    subscriber, recorder = await redis_factory(url=server.url)
    await subscriber.subscribe("u1")
    since = await publisher.position()
    old = await publisher.publish("u1", head(1))
    assert (await subscriber.history("u1", since)).records == [old]
    admin = aioredis.Redis.from_url(server.url)
    await admin.flushdb()
    await admin.aclose()
    history = await subscriber.history("u1", since)
    assert not history.complete
    assert history.position.epoch != since.epoch
    assert not (await subscriber.history("u1", Position(old.epoch, old.seq))).complete
    new = await publisher.publish("u1", head(2))
    assert (new.epoch, new.seq) == (history.position.epoch, 1)
    # The pub/sub connection stayed up, so nothing was missed: live delivery goes on.
    await recorder.wait(lambda: new in recorder.records)
    assert recorder.records == [old, new]
    assert recorder.controls == []


async def test_concurrent_publishers_get_unique_increasing_seqs(redis_factory: Factory) -> None:
    a, _ = await redis_factory()
    b, _ = await redis_factory()
    _, recorder = await redis_factory()
    start = await a.position()
    results: dict[str, list[Record]] = {"a": [], "b": []}

    async def burst(name: str, backend: RedisBackend) -> None:
        for n in range(150):
            results[name].append(await backend.publish(None, head(n)))

    async with anyio.create_task_group() as tg:
        for _ in range(3):  # several publishers per node, too
            tg.start_soon(burst, "a", a)
            tg.start_soon(burst, "b", b)
    seqs = [r.seq for r in results["a"] + results["b"]]
    assert sorted(seqs) == list(range(start.seq + 1, start.seq + 1 + 900))
    assert {r.epoch for r in results["a"] + results["b"]} == {start.epoch}
    await recorder.wait(lambda: len(recorder.records) == 900)
    assert recorder.seqs == sorted(seqs)


async def test_expired_entries_leave_an_active_stream(redis_factory: Factory, redis_url: str, key_prefix: str) -> None:
    """An active stream keeps what is still replayable, not `history_size` entries of any age."""
    backend, _ = await redis_factory(history_ttl=0.3)
    old = [await backend.publish("u1", head(n)) for n in range(5)]
    with anyio.fail_after(3):
        await anyio.sleep(0.4)  # past the TTL of `old`
    fresh = await backend.publish("u1", head(5))
    admin = aioredis.Redis.from_url(redis_url)
    try:
        assert await admin.xlen(f"{key_prefix}{fresh.epoch}:u:u1") == 1
    finally:
        await admin.aclose()
    assert not (await backend.history("u1", Position(fresh.epoch, old[-2].seq))).complete
    resumed = await backend.history("u1", Position(fresh.epoch, old[-1].seq))
    assert resumed.complete
    assert list(resumed.records) == [fresh]


async def test_unsubscribe_stops_delivery(redis_factory: Factory) -> None:
    publisher, _ = await redis_factory()
    subscriber, recorder = await redis_factory()
    await subscriber.subscribe("u1")
    await subscriber.subscribe("u2")
    await subscriber.unsubscribe("u1")
    await subscriber.subscribe("u1")
    await subscriber.unsubscribe("u1")
    gone = await publisher.publish("u1", head(1))
    kept = await publisher.publish("u2", head(2))
    last = await publisher.publish(None, head(3))
    await recorder.wait(lambda: last in recorder.records)
    assert gone not in recorder.records
    assert recorder.records == [kept, last]


async def test_crashed_node_presence_expires(redis_factory: Factory) -> None:
    crashing, _ = await redis_factory(presence_ttl=0.6)
    graceful, _ = await redis_factory()
    observer, _ = await redis_factory()
    assert await crashing.add_presence("node-crash", "u1", "c1") == 1
    assert await graceful.add_presence("node-ok", "u1", "c2") == 2
    assert await observer.cluster_total_count() == 2
    with anyio.fail_after(3):  # the refresh keeps a live node's entries beyond their TTL
        await anyio.sleep(1.5)
    assert await observer.cluster_user_count("u1") == 2
    crashing._presence.local.clear()  # a crash: no goodbye, the entries stay until their TTL
    await crashing.stop()
    assert await observer.cluster_user_count("u1") == 2
    await eventually(lambda: _equals(observer.cluster_user_count("u1"), 1))
    assert await observer.cluster_total_count() == 1
    await graceful.stop()  # a clean stop forgets at once
    assert await observer.cluster_user_count("u1") == 0


async def test_presence_rewritten_after_a_flush(redis_factory: Factory, redis_url: str, key_prefix: str) -> None:
    from .conftest import delete_prefix

    node, _ = await redis_factory(presence_ttl=0.3)
    await node.add_presence("n1", "u1", "c1")
    await delete_prefix(redis_url, key_prefix)
    assert await node.cluster_user_count("u1") == 0
    await eventually(lambda: _equals(node.cluster_user_count("u1"), 1))


async def test_presence_is_repaired_after_redis_faults(
    redis_server_factory: Callable[..., RedisServer], redis_factory: Factory
) -> None:
    server = redis_server_factory()
    server.start(persist=True)
    node, _ = await redis_factory(url=server.url, presence_ttl=0.6, socket_timeout=0.3)
    assert await node.add_presence("n1", "u1", "c1") == 1
    assert await node.add_presence("n1", "u1", "c2") == 2
    server.stop()
    with anyio.fail_after(5), pytest.raises(BackendUnavailable):
        await node.add_presence("n1", "u1", "c3")  # refused, and so not counted
    await node.remove_presence("n1", "u1", "c1")  # never raises: the refresh repairs it
    server.start(persist=True)  # Redis still counts c1
    await eventually(lambda: _equals(node.cluster_user_count("u1"), 1))
    assert await node.cluster_total_count() == 1


async def test_ready_client_is_used_and_left_open(redis_url: str, key_prefix: str, redis_cleanup: None) -> None:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    backend = RedisBackend(client=client, key_prefix=key_prefix)
    assert repr(backend).startswith("RedisBackend(url='redis://")
    recorder = Recorder()
    await backend.start(recorder.deliver, recorder.control)
    try:
        await backend.subscribe("ü")
        since = await backend.position()
        record = await backend.publish("ü", head(1))
        await recorder.wait(lambda: record in recorder.records)
        assert (await backend.history("ü", since)).records == [record]
    finally:
        await backend.stop()
    assert await client.ping()  # the caller's client stays open
    await client.aclose()


def test_bad_settings_are_configuration_errors() -> None:
    from starlette_pomo_ws.exceptions import ConfigurationError

    with pytest.raises(ConfigurationError, match="backend_url"):
        RedisBackend("redis://:hunter2@127.0.0.1:notaport/0")
    with pytest.raises(ConfigurationError, match="history_size"):
        RedisBackend("redis://127.0.0.1", history_size=0)
    with pytest.raises(ConfigurationError, match="history_ttl"):
        RedisBackend("redis://127.0.0.1", history_ttl=0)
    with pytest.raises(ConfigurationError, match="socket_timeout"):
        RedisBackend("redis://127.0.0.1", socket_timeout=0)
    with pytest.raises(ConfigurationError, match="url"):
        RedisBackend()


@pytest.mark.slow
async def test_a_silent_pubsub_connection_is_replaced(
    redis_server_factory: Callable[..., RedisServer], redis_factory: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    """A connection that stops answering (a half-open socket, a stuck server) is noticed by the heartbeat."""
    server = redis_server_factory()
    server.start()
    publisher, _ = await redis_factory(url=server.url, socket_timeout=0.3)
    subscriber, recorder = await redis_factory(url=server.url, heartbeat_interval=0.2, socket_timeout=0.3)
    subscriber._pubsub._backoff_cap = 0.2
    await subscriber.subscribe("u1")
    admin = aioredis.Redis.from_url(server.url)
    await admin.client_pause(2500, all=True)
    await admin.aclose()
    with anyio.fail_after(3), pytest.raises(BackendUnavailable, match="Cannot publish the event"):
        await publisher.publish("u1", head(0))  # a stuck Redis: the publish gives up, bounded
    await eventually(lambda: "no answer from Redis pub/sub" in caplog.text)
    assert not subscriber.connected
    record = await publish_retrying(publisher, "u1", 1)
    await recorder.wait(lambda: record in recorder.records, limit=10)
    await eventually(lambda: subscriber.connected)
    # The publish that timed out may or may not have been stored; the one that returned arrived.
    assert recorder.records[-1] == record
    assert recorder.seqs == sorted(set(recorder.seqs))


@pytest.mark.slow
async def test_an_unconfirmed_subscription_reconnects(
    redis_server_factory: Callable[..., RedisServer], redis_factory: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    """subscribe() never returns before Redis confirms, and never hangs: it reconnects instead."""
    server = redis_server_factory()
    server.start()
    publisher, _ = await redis_factory(url=server.url)
    subscriber, recorder = await redis_factory(url=server.url, socket_timeout=0.3)
    subscriber._pubsub._backoff_cap = 0.2
    admin = aioredis.Redis.from_url(server.url)
    await admin.client_pause(1500, all=True)
    await admin.aclose()
    with anyio.fail_after(3):
        await subscriber.subscribe("u2")
    assert "did not confirm a subscription" in caplog.text
    record = await publish_retrying(publisher, "u2", 1)
    await recorder.wait(lambda: record in recorder.records, limit=10)


async def test_start_fails_fast_when_redis_is_unreachable(redis_server_factory: Callable[..., RedisServer]) -> None:
    server = redis_server_factory()  # never started: nothing listens on its port
    backend = RedisBackend(f"redis://:hunter2@127.0.0.1:{server.port}/0", socket_timeout=0.5)
    with anyio.fail_after(5), pytest.raises(BackendUnavailable) as exc:
        await backend.start(Recorder().deliver, Recorder().control)
    assert "hunter2" not in str(exc.value)
    assert "hunter2" not in repr(backend)
    assert not backend.connected


async def test_stop_ends_the_pubsub_session_even_when_its_cancellation_is_lost(redis_factory: Factory) -> None:
    """`wait_for` on Python 3.10 and 3.11 drops a cancellation that arrives as the awaited call completes.
    The pub/sub session must still end when the backend stops: a session that kept running held a
    backend's stop() (and a test teardown under CI) forever."""
    backend, _ = await redis_factory()
    pubsub = backend._pubsub
    runner = pubsub._runner
    assert runner is not None and backend.connected
    pubsub._runner = None  # stop() does not cancel it: as if its cancellation had been lost
    with anyio.fail_after(5):
        await backend.stop()
        await asyncio.wait({runner})
    assert not runner.cancelled() and runner.exception() is None
    assert not backend.connected


async def test_a_heartbeat_whose_cancellation_is_lost_ends_with_its_connection(redis_factory: Factory) -> None:
    """The session's `finally` awaits its heartbeat after cancelling it; a heartbeat that missed the
    cancellation (as its position read completed) must still end, or the session never ends."""
    backend, _ = await redis_factory(heartbeat_interval=0.05)
    pubsub = backend._pubsub
    line = pubsub._line
    assert line is not None
    beat = asyncio.ensure_future(pubsub._heartbeat(line))  # a heartbeat that nobody will cancel
    await backend.stop()
    with anyio.fail_after(5):
        await asyncio.wait({beat})
    assert not beat.cancelled() and beat.exception() is None


@pytest.mark.slow
async def test_restart_with_aof_loses_nothing_and_without_persistence_resyncs(
    redis_server_factory: Callable[..., RedisServer], redis_factory: Factory
) -> None:
    server = redis_server_factory()
    server.start(persist=True)
    publisher, _ = await redis_factory(url=server.url, socket_timeout=0.5)
    subscriber, recorder = await redis_factory(url=server.url, socket_timeout=0.5)
    subscriber._pubsub._backoff_cap = 0.3
    await subscriber.subscribe("u1")
    start = await publisher.position()
    returned = [await publisher.publish("u1", head(n)) for n in range(10)]
    await recorder.wait(lambda: returned[-1] in recorder.records)

    server.kill()  # a crash, not a shutdown: with appendfsync always, every acknowledged event is on disk
    with anyio.fail_after(5), pytest.raises(BackendUnavailable, match=re.escape("Redis at redis://127.0.0.1")):
        await publisher.publish("u1", head(10))
    await eventually(lambda: not subscriber.connected)
    server.start(persist=True)
    returned.append(await publish_retrying(publisher, "u1", 11))
    await recorder.wait(lambda: returned[-1] in recorder.records, limit=10)
    await eventually(lambda: subscriber.connected)
    assert recorder.records == returned
    assert recorder.controls == []
    history = await subscriber.history("u1", start)
    assert history.complete
    assert list(history.records) == returned

    server.stop()
    server.wipe_persistence()
    server.start(persist=False)
    await recorder.wait(lambda: resynced(recorder, "new_epoch"), limit=10)
    assert not (await subscriber.history("u1", start)).complete
    fresh = await publish_retrying(publisher, "u1", 12)
    assert fresh.epoch != start.epoch
    await recorder.wait(lambda: fresh in recorder.records)


def _make_certificates(directory: pathlib.Path) -> None:
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    # Python 3.13 verifies strictly (VERIFY_X509_STRICT): the CA needs keyUsage and key identifiers,
    # the server certificate its SAN, key usages and the CA's key identifier.
    (directory / "ca.ext").write_text(
        "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\nsubjectKeyIdentifier=hash\n"
    )
    (directory / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n"
    )
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.csr", "-subj", "/CN=pomo-ws test CA")
    run(
        "x509", "-req", "-in", "ca.csr", "-signkey", "ca.key", "-out", "ca.crt", "-days", "1",
        "-extfile", "ca.ext",
    )  # fmt: skip
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    run(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.crt", "-days", "1", "-extfile", "server.ext",
    )  # fmt: skip


async def test_rediss_with_a_password(
    redis_server_factory: Callable[..., RedisServer], redis_factory: Factory, tmp_path: pathlib.Path
) -> None:
    certs = tmp_path / "certs"
    certs.mkdir()
    _make_certificates(certs)
    server = redis_server_factory(
        "--port", "0",
        "--tls-cert-file", str(certs / "server.crt"),
        "--tls-key-file", str(certs / "server.key"),
        "--tls-ca-cert-file", str(certs / "ca.crt"),
        "--tls-auth-clients", "no",
        "--requirepass", "s3cret",
    )  # fmt: skip
    server.start(port_option="--tls-port")
    url = f"rediss://:s3cret@127.0.0.1:{server.port}/0?ssl_ca_certs={certs / 'ca.crt'}"
    backend, recorder = await redis_factory(url=url)
    assert "s3cret" not in repr(backend)
    assert repr(backend).startswith("RedisBackend(url='rediss://***@127.0.0.1")
    await backend.subscribe("u1")
    since = await backend.position()
    record = await backend.publish("u1", head(1))
    await recorder.wait(lambda: record in recorder.records)
    assert (await backend.history("u1", since)).records == [record]
    assert backend.connected

    wrong = RedisBackend(url.replace("s3cret", "wrong-pass"), socket_timeout=1)
    with anyio.fail_after(5), pytest.raises(BackendUnavailable) as exc:
        await wrong.start(Recorder().deliver, Recorder().control)
    assert "wrong-pass" not in str(exc.value)
    plain = RedisBackend(f"redis://:s3cret@127.0.0.1:{server.port}/0", socket_timeout=0.5)
    with anyio.fail_after(5), pytest.raises(BackendUnavailable):
        await plain.start(Recorder().deliver, Recorder().control)


async def test_heartbeat_advances_the_position_of_an_idle_node(
    redis_factory: Factory, redis_url: str, key_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node that hears nothing still learns that nothing was missed, even across a flush."""
    from .conftest import delete_prefix

    publisher, _ = await redis_factory()
    idle, recorder = await redis_factory(heartbeat_interval=0.05)
    for n in range(3):
        await publisher.publish("someone-else", head(n))
    now = await publisher.position()
    await eventually(lambda: idle._pubsub.tracked == now)
    await delete_prefix(redis_url, key_prefix)  # a flush while connected, with no event for this node
    await eventually(lambda: idle._pubsub.tracked is not None and idle._pubsub.tracked.epoch != now.epoch)
    gate = gate_reconnects(idle, monkeypatch)
    assert await kill_clients(redis_url, idle._pubsub.name) == 1
    await eventually(lambda: not idle.connected)
    gate.set()
    await eventually(lambda: idle.connected)
    assert recorder.controls == []  # the node knew it missed nothing: no resync


async def test_catch_up_covers_many_users(
    redis_factory: Factory, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    publisher, _ = await redis_factory()
    subscriber, recorder = await redis_factory()
    users = [f"user-{n}" for n in range(450)]  # more than one catch-up batch
    for user in users:
        await subscriber.subscribe(user)
    gate = gate_reconnects(subscriber, monkeypatch)
    assert await kill_clients(redis_url, subscriber._pubsub.name) == 1
    await eventually(lambda: not subscriber.connected)
    await subscriber.subscribe("late")  # while disconnected: returns at once, caught up later
    missed = [await publisher.publish(user, head(n)) for n, user in enumerate([*users[::50], "late", users[-1]])]
    gate.set()
    await recorder.wait(lambda: missed[-1] in recorder.records)
    assert recorder.records == missed
    assert recorder.controls == []


async def test_control_messages_reach_other_nodes(redis_factory: Factory) -> None:
    a, a_recorder = await redis_factory()
    _, b_recorder = await redis_factory()
    await a.send_control("disconnect_user", {"user_id": "u1\nx", "reason": "Logged out"})
    await b_recorder.wait(
        lambda: b_recorder.controls == [("disconnect_user", {"user_id": "u1\nx", "reason": "Logged out"})]
    )
    assert a_recorder.controls == [("disconnect_user", {"user_id": "u1\nx", "reason": "Logged out"})]


async def test_garbage_on_the_channels_and_failing_callbacks_are_survived(
    redis_factory: Factory, redis_url: str, key_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    publisher, _ = await redis_factory()
    subscriber, recorder = await redis_factory()
    await subscriber.subscribe("u1")
    admin = aioredis.Redis.from_url(redis_url)
    try:
        await admin.publish(f"{key_prefix}u:u1", "not a record")
        await admin.publish(f"{key_prefix}ctl", "not json")
    finally:
        await admin.aclose()
    failing = [True]

    def deliver(record: Record) -> None:
        if failing.pop() if failing else False:
            raise RuntimeError("core bug")
        recorder.deliver(record)

    def control(kind: str, argument: str) -> None:
        raise RuntimeError("core bug")

    subscriber._pubsub._deliver, subscriber._pubsub._control = deliver, control
    lost = await publisher.publish("u1", head(1))
    await publisher.send_control("disconnect_user", {"user_id": "u1"})
    kept = await publisher.publish("u1", head(2))
    await recorder.wait(lambda: kept in recorder.records)
    assert lost not in recorder.records
    assert "Ignored a malformed message" in caplog.text
    assert "Ignored a malformed control message" in caplog.text
    assert "Delivering an event from Redis failed" in caplog.text
    assert "Handling the control message 'disconnect_user' failed" in caplog.text


async def test_start_is_idempotent_and_repr_of_a_unix_client(redis_factory: Factory) -> None:
    backend, recorder = await redis_factory()
    await backend.start(recorder.deliver, recorder.control)  # a second start changes nothing
    assert backend.connected
    unix = RedisBackend(client=aioredis.Redis(unix_socket_path="/run/redis.sock", password="pw"))
    assert repr(unix).startswith("RedisBackend(url='unix:///run/redis.sock'")
    tls = RedisBackend(client=aioredis.Redis(host="redis.internal", port=6380, ssl=True, password="pw"))
    assert repr(tls).startswith("RedisBackend(url='rediss://redis.internal:6380/0'")
    assert "pw" not in repr(unix) + repr(tls)


async def test_a_server_that_never_answers_fails_start_in_bounded_time() -> None:
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()  # the kernel completes handshakes; nobody ever answers
        port = listener.getsockname()[1]
        backend = RedisBackend(f"redis://127.0.0.1:{port}/0", socket_timeout=0.2)
        with anyio.fail_after(3), pytest.raises(BackendUnavailable):
            await backend.start(Recorder().deliver, Recorder().control)


@pytest.mark.parametrize(
    "url",
    ["redis://pomo:s3cret-pw@127.0.0.1:6379/0", "rediss://:s3cret-pw@127.0.0.1:6380/1"],
    ids=["user-and-password", "password-only"],
)
async def test_repr_hides_the_password(url: str) -> None:
    backend = RedisBackend(url, socket_timeout=0.2)
    try:
        assert "s3cret-pw" not in repr(backend)
        assert "127.0.0.1" in repr(backend)
    finally:
        await backend.stop()


class Relay:
    """A TCP relay to a Redis server that can hold back what the server sends: a replica's replication
    link on a slow network."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Relay:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        for source, sink, gate in ((reader, upstream_writer, None), (upstream_reader, writer, self.flowing)):
            task = asyncio.create_task(self._pump(source, sink, gate))
            self._tasks.add(task)

    @staticmethod
    async def _pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter, gate: asyncio.Event | None) -> None:
        try:
            while data := await source.read(65536):
                if gate is not None:
                    await gate.wait()
                sink.write(data)
                await sink.drain()
        finally:
            sink.close()


async def commands_run(url: str, command: str) -> int:
    admin = aioredis.Redis.from_url(url, socket_timeout=2)
    try:
        stats: dict[str, Any] = await admin.info("commandstats")
    finally:
        await admin.aclose()
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


async def test_a_pubsub_connection_on_a_lagging_replica_misses_nothing(
    redis_server_factory: Callable[..., RedisServer], redis_factory: Factory
) -> None:
    """The heartbeat's barrier holds whatever server the pub/sub connection reached: here a replica whose
    replication lags (after a failover, Sentinel may hand a reconnecting node the old primary just as it
    becomes a replica), while positions are read on the primary."""
    primary = redis_server_factory()
    primary.start()
    async with Relay(primary.port) as link:
        replica = redis_server_factory("--replicaof", "127.0.0.1", str(link.port))
        replica.start()
        await replica_in_sync(replica)
        publisher, _ = await redis_factory(url=primary.url)
        subscriber = RedisBackend(primary.url, key_prefix=publisher.key_prefix, heartbeat_interval=0.05)
        subscriber._pubsub._client = aioredis.Redis.from_url(replica.url)  # pub/sub on the replica
        recorder = Recorder()
        await subscriber.start(recorder.deliver, recorder.control)
        try:
            await subscriber.subscribe("u1")
            first = await publisher.publish("u1", head(0))
            await recorder.wait(lambda: first in recorder.records)
            link.flowing.clear()  # the replica falls behind
            lagging = [await publisher.publish("u1", head(n)) for n in range(1, 6)]
            # Several heartbeats pass while those events are stored on the primary but not yet here.
            heartbeats = await commands_run(primary.url, "evalsha")
            await eventually(lambda: _equals_at_least(commands_run(primary.url, "evalsha"), heartbeats + 4))
            link.flowing.set()
            await recorder.wait(lambda: lagging[-1] in recorder.records)
            assert recorder.records == [first, *lagging]
            assert recorder.controls == []
        finally:
            await subscriber.stop()
            await subscriber._pubsub._client.aclose()


async def _equals_at_least(value: Awaitable[int], expected: int) -> bool:
    return await value >= expected


async def test_a_pubsub_connection_on_a_server_that_does_not_follow_the_primary_is_replaced(
    redis_server_factory: Callable[..., RedisServer], redis_factory: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    """A pub/sub connection that reached another server than the primary (an old primary that Sentinel
    has not demoted yet) never hears its heartbeat's markers: it is replaced, and the next connection
    catches up with what was published meanwhile, never skipping it."""
    primary = redis_server_factory()
    primary.start()
    elsewhere = redis_server_factory()
    elsewhere.start()
    publisher, _ = await redis_factory(url=primary.url)
    subscriber = RedisBackend(primary.url, key_prefix=publisher.key_prefix, heartbeat_interval=0.05, socket_timeout=0.3)
    reaches_primary = subscriber._pubsub._client
    reaches_elsewhere = subscriber._pubsub._client = aioredis.Redis.from_url(elsewhere.url)
    recorder = Recorder()
    await subscriber.start(recorder.deliver, recorder.control)
    try:
        await subscriber.subscribe("u1")
        subscriber._pubsub._client = reaches_primary  # what its next connection reaches
        missed = [await publisher.publish("u1", head(n)) for n in range(3)]
        await recorder.wait(lambda: missed[-1] in recorder.records)
        assert "no answer from Redis pub/sub" in caplog.text
        assert recorder.records == missed
        assert recorder.controls == []
    finally:
        await subscriber.stop()
        await reaches_elsewhere.aclose()
