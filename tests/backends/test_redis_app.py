"""The app on Redis while Redis fails: sockets stay up, broadcasts raise, health degrades, and it all heals."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import anyio
import httpx
import pytest
from websockets.asyncio.client import connect

from starlette_pomo_ws import BackendUnavailable, PomoWS
from starlette_pomo_ws.backends.redis import RedisBackend

from ..conftest import make_app, make_settings, make_token, recv, run_server
from .conftest import RedisServer

pytestmark = [pytest.mark.anyio, pytest.mark.redis]


async def health_becomes(http: httpx.AsyncClient, status: str, within: float = 10) -> None:
    """Poll /ws/health (bounded) until it reports `status`: the backend notices an outage on its own time."""
    with anyio.fail_after(within):
        for _ in range(int(within * 20)):
            if (await http.get("/ws/health")).json()["status"] == status:
                return
            await anyio.sleep(0.05)
    raise AssertionError(f"/ws/health never became {status!r}")


async def test_a_redis_outage_degrades_without_dropping_sockets_or_events(
    redis_server_factory: Callable[..., RedisServer],
) -> None:
    redis_server = redis_server_factory()
    redis_server.start(persist=True)  # AOF on: a restart keeps the history
    backend = RedisBackend(redis_server.url, socket_timeout=0.5, heartbeat_interval=0.5)
    pomo = PomoWS(make_settings(cursor_secret="shared-by-every-node-0123456789abcdef"), backend=backend)
    async with run_server(make_app(pomo)) as server, httpx.AsyncClient(base_url=server.http) as http:
        async with connect(server.url(f"/ws?token={make_token('u1')}")) as ws:
            assert (await recv(ws))["type"] == "CONNECTION_ESTABLISHED"
            before = await pomo.broadcaster.broadcast_to_user("u1", "TASK_CREATED", {"n": 1})
            assert (await recv(ws))["id"] == before.id
            assert (await http.get("/ws/health")).json()["status"] == "ok"

            redis_server.stop()
            with anyio.fail_after(5), pytest.raises(BackendUnavailable, match="Redis"):
                await pomo.broadcaster.broadcast_to_user("u1", "TASK_CREATED", {"n": 2})
            await health_becomes(http, "degraded")
            health = await http.get("/ws/health")
            assert health.status_code == 200, "a degraded node still serves its sockets"
            assert health.json()["backend"] == {"kind": "redis", "connected": False}
            assert "redis://" not in health.text
            # The socket is still up: the protocol answers without the backend.
            await ws.send(json.dumps({"type": "PING"}))
            assert (await recv(ws))["type"] == "PONG"

            redis_server.start(persist=True)
            await health_becomes(http, "ok", within=20)
            after = None
            with anyio.fail_after(10):
                while after is None:  # the command connection may need one more reconnect
                    try:
                        after = await pomo.broadcaster.broadcast_to_user("u1", "TASK_UPDATED", {"n": 3})
                    except BackendUnavailable:
                        await anyio.sleep(0.1)
            event = await recv(ws, within=10)
            while event["type"] == "HEARTBEAT":
                event = await recv(ws, within=10)
            assert (event["type"], event["id"]) == ("TASK_UPDATED", after.id)
        # The event before the outage is still in the history after the restart (AOF).
        async with connect(server.url(f"/ws?token={make_token('u1')}&last_event_id={before.id}")) as ws:
            established = await recv(ws)
            assert established["data"]["resumed"] is True
            assert (await recv(ws))["id"] == after.id


async def test_pubsub_lag_is_measured_on_redis(redis_url: str, key_prefix: str, redis_cleanup: None) -> None:
    """`pomo_ws_pubsub_lag_seconds` counts every event that reached this node through Redis pub/sub."""
    from ..test_metrics import metric

    backend = RedisBackend(redis_url, key_prefix=key_prefix)
    pomo = PomoWS(make_settings(metrics=True), backend=backend)
    async with run_server(make_app(pomo)) as server, httpx.AsyncClient(base_url=server.http) as http:
        async with connect(server.url(f"/ws?token={make_token('u1')}")) as ws:
            assert (await recv(ws))["type"] == "CONNECTION_ESTABLISHED"
            before = time.time()
            for n in range(3):
                await pomo.broadcaster.broadcast_to_user("u1", "TASK_CREATED", {"n": n})
            for _ in range(3):
                assert (await recv(ws))["type"] == "TASK_CREATED"
            text = (await http.get("/ws/metrics")).text
    assert metric(text, "pomo_ws_pubsub_lag_seconds_count") == 3
    lag_sum = metric(text, "pomo_ws_pubsub_lag_seconds_sum")
    assert 0 <= lag_sum <= 3 * (time.time() - before)  # Redis's clock and ours are the same clock here


async def test_records_carry_the_publish_time(redis_factory: Any) -> None:
    publisher, _ = await redis_factory()
    subscriber, recorder = await redis_factory()
    await subscriber.subscribe("u1")
    before = time.time()
    stored = await publisher.publish("u1", '{"type":"X"')
    await recorder.wait(lambda: len(recorder.records) == 1)
    after = time.time()
    live = recorder.records[0]
    assert live.seq == stored.seq
    # Redis's TIME, in milliseconds: within the publish call's span, give or take that rounding.
    assert before - 0.002 <= stored.published_at <= after + 0.002
    assert live.published_at == stored.published_at


async def test_a_dead_nodes_members_leave_the_presence_of_every_other_node(
    redis_url: str, key_prefix: str, redis_cleanup: None
) -> None:
    """Two nodes share a presence channel. One dies without a goodbye (its refresher stops while its
    socket stays open, as a frozen process looks to Redis): after `presence_ttl` the watcher on the
    other node gets `PRESENCE_LEAVE` for the users whose last connection was there, and the counts forget them."""
    settings = make_settings(presence_channels=("team:*",), cursor_secret="shared-by-every-node-0123456789abcdef")
    backends = [RedisBackend(redis_url, key_prefix=key_prefix, presence_ttl=0.9) for _ in range(2)]
    nodes = [PomoWS(settings, backend=backend) for backend in backends]
    token = {user: make_token(user, channels=["team:*", "room:*"]) for user in ("watcher", "alice")}
    async with run_server(make_app(nodes[0])) as dying, run_server(make_app(nodes[1])) as surviving:
        async with connect(surviving.url(f"/ws?token={token['watcher']}&channels=team:1,room:1")) as watcher:
            seen = [(await recv(watcher))["type"] for _ in range(4)]
            assert seen == ["CONNECTION_ESTABLISHED", "SUBSCRIBED", "PRESENCE", "SUBSCRIBED"]
            # room:1 is not a presence channel: its members leave silently.
            alice = await connect(dying.url(f"/ws?token={token['alice']}&channels=team:1,room:1"))
            assert (await recv(alice))["type"] == "CONNECTION_ESTABLISHED"
            message = await next_of(watcher, "PRESENCE_JOIN")
            assert message["data"] == {"channel": "team:1", "userId": "alice"}
            assert await nodes[1].broadcaster.presence("team:1") == {"watcher": 1, "alice": 1}
            task = backends[0]._members_task
            assert task is not None
            task.cancel()  # node A stops refreshing: to Redis it is dead
            started = time.monotonic()
            left = await next_of(watcher, "PRESENCE_LEAVE", within=10)
            assert left["data"] == {"channel": "team:1", "userId": "alice"}
            assert left["channel"] == "team:1"
            assert time.monotonic() - started < 0.9 + 2
            await watcher.send(json.dumps({"type": "PING"}))
            rest = await next_of(watcher, "PONG", seen=(seen := []))
            assert rest["type"] == "PONG"
            assert [m for m in seen if m["type"].startswith("PRESENCE")] == []
            assert await nodes[1].broadcaster.channel_subscriber_count("room:1") == 1
            assert await nodes[1].broadcaster.presence("team:1") == {"watcher": 1}
            assert await nodes[1].broadcaster.channel_subscriber_count("team:1") == 1
            await alice.close()


async def next_of(ws: Any, kind: str, within: float = 5, seen: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The next message of `kind`; the ones before it go to `seen`."""
    with anyio.fail_after(within):
        while True:
            message = await recv(ws, within=within)
            if message["type"] == kind:
                return message
            if seen is not None:
                seen.append(message)
