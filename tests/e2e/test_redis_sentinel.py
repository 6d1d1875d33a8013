"""Sentinel failover with real processes on 127.0.0.1: one primary, one replica, three sentinels, and a node
that publishes continuously while the primary is killed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import pathlib
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from starlette_pomo_ws import BackendUnavailable, PomoWS
from starlette_pomo_ws.backends import create_backend

from ..backends.conftest import RedisServer, free_port, redis_server_factory, replica_in_sync  # noqa: F401  # a fixture
from ..conftest import make_app, make_settings, make_token, run_server

redis = pytest.importorskip("redis")
import redis.asyncio as aioredis  # noqa: E402  # after the skip: redis is an optional extra

from starlette_pomo_ws.backends.redis import RedisBackend  # noqa: E402

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

SERVICE = "mymaster"


class Sentinels:
    """Three `redis-server --sentinel` processes watching one primary (quorum 2, down after 1 s)."""

    def __init__(self, directory: pathlib.Path, primary_port: int) -> None:
        self.ports = [free_port() for _ in range(3)]
        self.processes: list[subprocess.Popen[bytes]] = []
        for port in self.ports:
            conf = directory / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {directory}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {primary_port} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                f"sentinel failover-timeout {SERVICE} 10000\n"
            )
            self.processes.append(
                subprocess.Popen(
                    ["redis-server", str(conf), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                )
            )

    @property
    def url(self) -> str:
        return f"redis+sentinel://{','.join(f'127.0.0.1:{p}' for p in self.ports)}/{SERVICE}/0"

    async def ready(self, limit: float = 20) -> None:
        """Until every sentinel knows the replica and the two other sentinels (else no failover can happen)."""
        with anyio.fail_after(limit):
            for port in self.ports:
                client = aioredis.Redis(host="127.0.0.1", port=port, socket_timeout=1, decode_responses=True)
                try:
                    while True:
                        with contextlib.suppress(redis.RedisError, OSError):
                            state: Any = await client.sentinel_master(SERVICE)
                            if int(state["num-slaves"]) >= 1 and int(state["num-other-sentinels"]) >= 2:
                                break
                        await anyio.sleep(0.1)
                finally:
                    await client.aclose()

    async def failed_over(self, old_port: int) -> None:
        """Until a sentinel names another primary than the one on `old_port`."""
        client = aioredis.Redis(host="127.0.0.1", port=self.ports[0], socket_timeout=1, decode_responses=True)
        try:
            while True:
                with contextlib.suppress(redis.RedisError, OSError):
                    address: Any = await client.sentinel_get_master_addr_by_name(SERVICE)
                    _, port = address
                    if int(port) != old_port:
                        return
                await anyio.sleep(0.1)
        finally:
            await client.aclose()

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
                process.wait(10)


@pytest.fixture
def cluster(redis_server_factory: Callable[..., RedisServer], tmp_path: pathlib.Path) -> Iterator[Any]:  # noqa: F811
    primary = redis_server_factory()
    primary.start()
    replica = redis_server_factory("--replicaof", "127.0.0.1", str(primary.port))
    replica.start()
    sentinels = Sentinels(tmp_path, primary.port)
    try:
        yield primary, replica, sentinels
    finally:
        sentinels.stop()


class Reader:
    """A client that reads everything (its user's events, the broadcasts and the channel `team:1`), and on a
    close resumes from the last id it has, with its channel, as the reference client does."""

    def __init__(self, url: Callable[[str], str], user: str) -> None:
        self.url = url
        self.user = user
        self.numbers: list[int] = []
        self.resyncs = 0
        self.reconnects = 0
        self.last_id: str | None = None
        self.ws: ClientConnection | None = None
        self.seen = asyncio.Event()
        self.opened = asyncio.Event()

    async def run(self) -> None:
        while True:
            query = f"token={make_token(self.user, channels=['team:*'])}&channels=team:1"
            if self.last_id is not None:
                query += f"&last_event_id={self.last_id}"
            try:
                async with connect(self.url(f"/ws?{query}")) as ws:
                    self.ws = ws
                    async for raw in ws:
                        event = json.loads(raw)
                        if event["type"] == "CONNECTION_ESTABLISHED":
                            # Its id is the position after which this connection gets every event: what is
                            # published before it is not this connection's, so publishing starts after.
                            self.opened.set()
                        elif event["type"] == "RESYNC_REQUIRED":
                            self.resyncs += 1
                        elif event["type"] == "TASK_UPDATED":
                            self.numbers.append(event["data"]["n"])
                            self.seen.set()
                        # A SUBSCRIBED id is informational, never a cursor.
                        if "id" in event and event["type"] not in ("HEARTBEAT", "SUBSCRIBED"):
                            self.last_id = event["id"]
            except ConnectionClosed as closed:
                assert closed.rcvd is not None and closed.rcvd.code == 1012, f"closed with {closed.rcvd}"
                self.reconnects += 1


async def until(predicate: Callable[[], bool], changed: asyncio.Event, limit: float) -> None:
    with anyio.fail_after(limit):
        while not predicate():
            changed.clear()
            await changed.wait()


async def health(http: httpx.AsyncClient) -> str:
    status: str = (await http.get("/ws/health")).json()["status"]
    return status


@pytest.mark.parametrize("min_replicas", [0, 1], ids=["async-replication", "min-replicas-1"])
async def test_a_failover_keeps_sockets_and_every_acknowledged_event_or_resyncs(
    cluster: Any, min_replicas: int
) -> None:
    primary, replica, sentinels = cluster
    await replica_in_sync(replica)
    await sentinels.ready()
    backend = RedisBackend(sentinels.url, socket_timeout=0.5, heartbeat_interval=0.5, min_replicas=min_replicas)
    timeout = backend._op_timeout
    pomo = PomoWS(make_settings(cursor_secret="shared-by-every-node-0123456789abcdef"), backend=backend)
    async with run_server(make_app(pomo)) as server, httpx.AsyncClient(base_url=server.http) as http:
        readers = {user: Reader(server.url, user) for user in ("u1", "u2")}
        returned: dict[str | None, list[int]] = {"u1": [], "u2": [], None: [], "team:1": []}
        attempted: set[int] = set()
        failures: list[float] = []
        errors: list[str] = []
        statuses: list[str] = []
        stop = anyio.Event()
        progress = asyncio.Event()

        async def publish_continuously() -> None:
            n = 0
            while not stop.is_set():
                n += 1
                target = ("u1", "u2", None, "team:1")[n % 4]
                attempted.add(n)
                started = time.monotonic()
                try:
                    with anyio.fail_after(timeout + 2):
                        if target is None:
                            await pomo.broadcaster.broadcast_to_all("TASK_UPDATED", {"n": n})
                        elif target == "team:1":
                            await pomo.broadcaster.broadcast_to_channel(target, "TASK_UPDATED", {"n": n})
                        else:
                            await pomo.broadcaster.broadcast_to_user(target, "TASK_UPDATED", {"n": n})
                    returned[target].append(n)
                    progress.set()
                    await anyio.sleep(0.01)
                except BackendUnavailable as exc:
                    errors.append(str(exc))
                    failures.append(time.monotonic() - started)
                    await anyio.sleep(0.05)

        async with anyio.create_task_group() as tg:
            for reader in readers.values():
                tg.start_soon(reader.run)
            with anyio.fail_after(10):
                for reader in readers.values():
                    await reader.opened.wait()
            tg.start_soon(publish_continuously)
            await until(lambda: len(returned["u1"]) >= 10, progress, 10)
            assert primary.process is not None
            primary.process.kill()  # no goodbye: whatever was not replicated yet is lost
            primary.process.wait(5)
            with anyio.fail_after(30):
                while not statuses or statuses[-1] != "degraded":
                    statuses.append(await health(http))
                    await anyio.sleep(0.05)
                # Its supervisor restarts the old primary, empty: Sentinel makes it a replica of the new one
                # (with redis_min_replicas=1, publishing needs a replica again).
                await sentinels.failed_over(primary.port)
                primary.process = None
                primary.start()
                while statuses[-1] != "ok":
                    statuses.append(await health(http))
                    await anyio.sleep(0.05)
                mark = len(returned["u1"])
                try:
                    await until(lambda: len(returned["u1"]) >= mark + 10, progress, 20)
                except TimeoutError:
                    raise AssertionError(f"no publish succeeds after the failover: {errors[-3:]}") from None
            stop.set()
            # A last event to each, and wait until each has everything it can get.
            final = {
                user: await pomo.broadcaster.broadcast_to_user(user, "TASK_UPDATED", {"n": -1}) for user in readers
            }
            assert all(final.values())
            with anyio.fail_after(15):
                for reader in readers.values():
                    while -1 not in reader.numbers:
                        reader.seen.clear()
                        await reader.seen.wait()
            tg.cancel_scope.cancel()

    assert failures, "publishes during the switch must fail, not wait for the new primary"
    assert max(failures) <= timeout + 0.5, f"a broadcast hung for {max(failures):.2f}s during the failover"
    for user, reader in readers.items():
        # A resync is in band: the socket stays up through the failover either way.
        assert reader.reconnects == 0, f"{user}'s socket was closed during the failover"
        got = [n for n in reader.numbers if n != -1]
        mine = returned[user] + returned[None] + returned["team:1"]
        assert len(got) == len(set(got)), f"{user} got an event twice"
        assert set(got) <= attempted
        missing = set(mine) - set(got)
        if min_replicas:
            # Every acknowledged event is on the replica that took over: nothing lost.
            assert not missing, f"{user} lost acknowledged events {sorted(missing)}"
            # (A node that reaches the old primary in the moment after its restart, empty, before Sentinel
            # makes it a replica, sees a new epoch and resyncs its sockets in band: safe, never a gap, and
            # rare, once in about ten runs under load.)
        else:
            # Replication is asynchronous: the promoted replica starts a new epoch, and every client
            # learns it may have missed something. Never a silent gap.
            assert reader.resyncs >= 1, f"{user} missed {sorted(missing)} without RESYNC_REQUIRED"


def test_a_sentinel_url_builds_a_sentinel_backend() -> None:
    settings = make_settings(
        backend_url="redis+sentinel://:s3cret@127.0.0.1:26379,127.0.0.1:26380/mymaster/2", redis_min_replicas=1
    )
    backend = create_backend(settings)
    assert isinstance(backend, RedisBackend)
    assert "redis+sentinel://127.0.0.1:26379,127.0.0.1:26380/mymaster/2" in repr(backend)
    assert "s3cret" not in repr(backend)
    assert backend._min_replicas == 1


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+sentinel://127.0.0.1:26379", "must name the Sentinel service"),
        ("redis+sentinel://127.0.0.1:26379/mymaster/x", "must name the Sentinel service"),
        ("redis+sentinel://127.0.0.1:port/mymaster", "sentinel address '127.0.0.1:port'"),
        ("redis+sentinel://127.0.0.1:26379/mymaster?ssl_cert_reqs=none", "unsupported Sentinel URL options"),
    ],
)
def test_bad_sentinel_urls_are_configuration_errors(url: str, message: str) -> None:
    from starlette_pomo_ws import ConfigurationError

    with pytest.raises(ConfigurationError, match=re.escape(message)):
        RedisBackend(url)


async def test_a_ready_sentinel_is_used_and_left_open() -> None:
    from redis.asyncio.sentinel import Sentinel

    from starlette_pomo_ws import ConfigurationError

    sentinel = Sentinel([("127.0.0.1", 26379), ("127.0.0.1", 26380)])  # type: ignore[no-untyped-call,unused-ignore]  # redis-py < 8.2
    backend = RedisBackend(sentinel=sentinel, service_name="cache", min_replicas=2)
    assert repr(backend).startswith("RedisBackend(url='redis+sentinel://127.0.0.1:26379,127.0.0.1:26380/cache/0'")
    await backend.stop()
    client = sentinel.master_for("cache")
    assert "redis+sentinel://127.0.0.1:26379,127.0.0.1:26380/cache/0" in repr(RedisBackend(client=client))
    with pytest.raises(ConfigurationError, match="exactly one of"):
        RedisBackend("redis://127.0.0.1/0", sentinel=sentinel)
    with pytest.raises(ConfigurationError, match="'redis_min_replicas' must be 0 or more"):
        RedisBackend("redis://127.0.0.1/0", min_replicas=-1)
    await client.aclose()


def test_redis_min_replicas_setting() -> None:
    from starlette_pomo_ws import ConfigurationError, Settings

    settings = Settings.from_env({"POMO_WS_JWT_SECRET": "x" * 32, "POMO_WS_REDIS_MIN_REPLICAS": "2"})
    assert settings.redis_min_replicas == 2
    assert Settings(jwt_secret="x" * 32).redis_min_replicas == 0
    for bad in (-1, 1.5):
        with pytest.raises(ConfigurationError, match="redis_min_replicas"):
            Settings(jwt_secret="x" * 32, redis_min_replicas=bad)  # type: ignore[arg-type]
