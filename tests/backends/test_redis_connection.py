"""The backend's own connections (`Direct`): replies stay in step through errors, cancellations and kills."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
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


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def line(client: aioredis.Redis) -> AsyncIterator[Direct]:
    line = Direct(client, name=f"pomo-ws-test-{uuid.uuid4().hex[:8]}", connect_timeout=2)
    yield line
    await line.close()


@pytest.fixture
async def key(client: aioredis.Redis) -> AsyncIterator[str]:
    key = f"pomo-ws-test:{uuid.uuid4().hex}"
    yield key
    await client.delete(key)


async def test_an_error_reply_is_returned_in_place_and_the_next_replies_stay_in_step(line: Direct, key: str) -> None:
    replies = await line(("SET", key, "x"), ("INCR", key), ("GET", key))
    assert replies[0] == b"OK" and replies[2] == b"x"
    assert isinstance(replies[1], ResponseError)
    assert await line(("ECHO", "next")) == [b"next"]


async def test_a_cancelled_call_drops_its_connection_so_a_late_reply_reaches_nobody(
    client: aioredis.Redis, line: Direct, key: str
) -> None:
    with anyio.move_on_after(0.3) as scope:
        await line(("BLPOP", key, 5))
    assert scope.cancelled_caught
    # The cancelled BLPOP's connection is gone: its reply can never be read as the next call's.
    await client.rpush(key, "late")
    assert await line(("ECHO", "after")) == [b"after"]
    assert await client.lrange(key, 0, -1) == [b"late"]  # nobody popped it


async def test_a_killed_connection_is_replaced_by_the_next_call(redis_url: str, line: Direct) -> None:
    assert await line(("PING",)) == [b"PONG"]
    assert await kill_clients(redis_url, line._name) == 1
    try:
        await line(("PING",))  # may fail: the kill is seen on this call
    except (redis.RedisError, OSError):
        pass
    assert await line(("ECHO", "again")) == [b"again"]


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
