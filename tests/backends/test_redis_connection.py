"""The backend's own connections (`Direct`): replies stay in step through errors, cancellations and kills,
with hiredis and with the pure-Python reader used without it."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

redis = pytest.importorskip("redis")
import redis.asyncio as aioredis  # noqa: E402  # after the skip: redis is an optional extra
from redis.exceptions import InvalidResponse, NoScriptError, ResponseError  # noqa: E402

from starlette_pomo_ws.backends.redis import _connection  # noqa: E402
from starlette_pomo_ws.backends.redis._connection import Direct, Resp2Reader, pack  # noqa: E402

from .test_redis_faults import head, kill_clients  # noqa: E402

pytestmark = pytest.mark.anyio

Factory = Any


def test_pack_is_resp() -> None:
    assert pack([("SET", "k", "é"), ("INCRBY", "n", 5)]) == (
        b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\n\xc3\xa9\r\n*3\r\n$6\r\nINCRBY\r\n$1\r\nn\r\n$1\r\n5\r\n"
    )


# Every RESP2 reply type, nested arrays and nils included, as Redis sends them.
REPLIES = (
    b"+OK\r\n:-42\r\n$5\r\nhe\r\nl\r\n$0\r\n\r\n$-1\r\n*-1\r\n*0\r\n"
    b"*3\r\n$1\r\na\r\n*2\r\n:1\r\n$-1\r\n+x\r\n-NOSCRIPT No matching script\r\n-ERR wrong\r\n"
)


def _all(reader: Any) -> list[Any]:
    out = []
    while (reply := reader.gets()) is not False:
        out.append(reply)
    return out


def test_the_python_reader_parses_every_reply_type_like_hiredis_even_a_byte_at_a_time() -> None:
    reader = Resp2Reader()
    got: list[Any] = []
    for i in range(len(REPLIES)):
        reader.feed(REPLIES[i : i + 1])
        got += _all(reader)
    expected = [b"OK", -42, b"he\r\nl", b"", None, None, [], [b"a", [1, None], b"x"]]
    assert got[:8] == expected
    assert isinstance(got[8], NoScriptError) and isinstance(got[9], ResponseError) and len(got) == 10
    assert "wrong" in str(got[9])
    if _connection.HIREDIS_READER is not None:  # the same replies as the C parser's
        fast = _connection._reader()
        fast.feed(REPLIES)
        both = _all(fast)
        assert both[:8] == expected and [type(e) for e in both[8:]] == [type(e) for e in got[8:]]


def test_the_python_reader_refuses_a_stream_that_is_not_resp() -> None:
    reader = Resp2Reader()
    reader.feed(b"HTTP/1.1 400 Bad Request\r\n")
    with pytest.raises(InvalidResponse, match="reply type byte"):
        reader.gets()


@pytest.fixture(params=["hiredis", "python"])
def reader(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each `Direct` test runs with hiredis's parser and with the pure-Python one (no hiredis installed)."""
    if request.param == "python":
        monkeypatch.setattr(_connection, "HIREDIS_READER", None)
    elif _connection.HIREDIS_READER is None:
        pytest.skip("hiredis is not installed")
    return str(request.param)


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def line(client: aioredis.Redis, reader: str) -> AsyncIterator[Direct]:
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


async def test_a_large_reply_in_many_reads_arrives_whole(line: Direct, key: str) -> None:
    value = b"v" * 300_000  # several socket reads
    assert await line(("SET", key, value), ("GET", key), ("STRLEN", key)) == [b"OK", value, 300_000]


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


async def test_redis_closing_the_connection_fails_the_waiting_call_and_the_next_one_reconnects(
    client: aioredis.Redis, line: Direct, key: str
) -> None:
    assert await line(("PING",)) == [b"PONG"]
    with anyio.fail_after(5), pytest.raises(redis.ConnectionError):
        await line(("QUIT",), ("GET", key))  # Redis answers QUIT's OK, then closes: GET has no reply
    assert await line(("ECHO", "again")) == [b"again"]


async def test_publishes_survive_a_script_flush(redis_factory: Factory, redis_url: str, reader: str) -> None:
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


async def test_an_error_reply_on_the_pub_sub_connection_starts_it_over_and_loses_nothing(
    redis_factory: Factory, reader: str
) -> None:
    backend, recorder = await redis_factory()
    backend._pubsub._backoff_cap = 0.2
    await backend.subscribe("u1")
    before = await backend.publish("u1", head(1))
    await recorder.wait(lambda: before in recorder.records)
    pubsub = backend._pubsub
    line = pubsub._line
    assert line is not None
    # In subscribed mode Redis answers anything but (UN)SUBSCRIBE and PING with an error reply.
    line.write([("GET", "k")])
    with anyio.fail_after(5):
        await line.ended
    assert isinstance(line.error, ResponseError)
    after = await backend.publish("u1", head(2))  # while pub/sub reconnects: it arrives by the catch-up
    await recorder.wait(lambda: after in recorder.records)
    assert [r.seq for r in recorder.records if r.user_id == "u1"] == [before.seq, after.seq]


async def test_a_call_fails_at_its_own_deadline_even_behind_a_call_with_a_later_one(line: Direct, key: str) -> None:
    """The line keeps one timer for its calls' deadlines: a call with an earlier deadline than the one the timer
    was set for still fails on time, and so does everything written on that connection before it."""
    outcomes: dict[str, Any] = {}
    arrived = anyio.Event()

    def keep(name: str) -> Any:
        def done(outcome: Any) -> None:
            outcomes[name] = outcome
            if len(outcomes) == 2:
                arrived.set()

        return done

    assert await line(("PING",)) == [b"PONG"]  # connected: both calls go on this connection at once
    started = anyio.current_time()
    line.submit([("BLPOP", key, 3)], 10, keep("slow"))  # answered only after 3 s
    line.submit([("ECHO", "x")], 0.3, keep("quick"))  # behind it on the connection, due in 0.3 s
    with anyio.fail_after(2):
        await arrived.wait()
    assert anyio.current_time() - started < 1.5
    assert isinstance(outcomes["quick"], asyncio.TimeoutError) and isinstance(outcomes["slow"], asyncio.TimeoutError)
    assert await line(("ECHO", "next")) == [b"next"]  # a new connection, in step
