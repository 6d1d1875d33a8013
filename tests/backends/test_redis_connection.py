"""The backend's own connections (`Direct`): replies stay in step through errors, cancellations and kills."""

from __future__ import annotations

import uuid
from typing import Any

import anyio
import pytest

redis = pytest.importorskip("redis")
import redis.asyncio as aioredis  # noqa: E402  # after the skip: redis is an optional extra
from redis.exceptions import ResponseError  # noqa: E402

from starlette_pomo_ws.backends.redis._connection import Direct, pack  # noqa: E402

from .test_redis_faults import head, kill_clients  # noqa: E402

pytestmark = pytest.mark.anyio

Factory = Any


def test_pack_is_resp() -> None:
    assert pack([("SET", "k", "é"), ("INCRBY", "n", 5)]) == (
        b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\n\xc3\xa9\r\n*3\r\n$6\r\nINCRBY\r\n$1\r\nn\r\n$1\r\n5\r\n"
    )


async def test_an_error_reply_is_returned_in_place_and_the_next_replies_stay_in_step(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    line = Direct(client, name=f"pomo-ws-test-{uuid.uuid4().hex[:8]}", connect_timeout=2)
    key = f"pomo-ws-test:{uuid.uuid4().hex}"
    try:
        replies = await line(("SET", key, "x"), ("INCR", key), ("GET", key))
        assert replies[0] == b"OK" and replies[2] == b"x"
        assert isinstance(replies[1], ResponseError)
        assert await line(("ECHO", "next")) == [b"next"]
    finally:
        await line.close()
        await client.delete(key)
        await client.aclose()


async def test_a_cancelled_call_drops_its_connection_so_a_late_reply_reaches_nobody(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    line = Direct(client, name=f"pomo-ws-test-{uuid.uuid4().hex[:8]}", connect_timeout=2)
    key = f"pomo-ws-test:{uuid.uuid4().hex}"
    try:
        with anyio.move_on_after(0.3) as scope:
            await line(("BLPOP", key, 5))
        assert scope.cancelled_caught
        # The cancelled BLPOP's connection is gone: its reply can never be read as the next call's.
        await client.rpush(key, "late")
        assert await line(("ECHO", "after")) == [b"after"]
        assert await client.lrange(key, 0, -1) == [b"late"]  # nobody popped it
    finally:
        await line.close()
        await client.delete(key)
        await client.aclose()


async def test_a_killed_connection_is_replaced_by_the_next_call(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    name = f"pomo-ws-test-{uuid.uuid4().hex[:8]}"
    line = Direct(client, name=name, connect_timeout=2)
    try:
        assert await line(("PING",)) == [b"PONG"]
        assert await kill_clients(redis_url, name) == 1
        try:
            await line(("PING",))  # may fail: the kill is seen on this call
        except (redis.RedisError, OSError):
            pass
        assert await line(("ECHO", "again")) == [b"again"]
    finally:
        await line.close()
        await client.aclose()


async def test_publishes_survive_a_script_flush(redis_factory: Factory, redis_url: str) -> None:
    """A server without the script (restarted, promoted, or flushed) answers NOSCRIPT: it is loaded and sent again,
    and the events keep consecutive seqs."""
    backend, recorder = await redis_factory()
    await backend.subscribe("u1")
    first = await backend.publish("u1", head(1))
    admin = aioredis.Redis.from_url(redis_url)
    try:
        await admin.script_flush()
    finally:
        await admin.aclose()
    second = await backend.publish("u1", head(2))
    assert (second.epoch, second.seq) == (first.epoch, first.seq + 1)
    await recorder.wait(lambda: second in recorder.records)
