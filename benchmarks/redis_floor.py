"""Diagnosis: what a publish costs the node's CPU on Redis, against the memory backend and against the
thinnest Redis client there is.

``python -m benchmarks redis-floor [--n 1000] [--rounds 6] [--calls 2000] [--redis local|URL]`` runs,
in one process pinned to one core, three publishers side by side, in rotating order each round:

* ``memory``: ``broadcast_to_user`` on the memory backend;
* ``redis``: ``broadcast_to_user`` on the Redis backend;
* ``floor``: a hand-written asyncio client with none of the package's guarantees: one ``PUBLISH`` of
  the same envelope per call on one connection, its reply awaited, and the message read on a second,
  subscribed connection. Any Redis fan-out pays at least this: a write, a reply and a pub/sub message
  per event.

Both package apps hold ``--n`` in-process connections (two per user, through the test kit's
``PomoTestClient``), and every call's event reaches both of its user's connections before the burst
ends. Each burst makes ``--calls`` calls, first one at a time (as requests that arrive one by one do),
then from 8 callers at once. It prints the node's CPU per call (``time.process_time``: user and
system, Redis's own CPU excluded), and, per burst, what Redis adds above the memory backend for the
package and for the floor.

By default (``--redis local``) it starts a ``redis-server`` of its own on the other core, as on a
host of its own. The Redis database at a URL is flushed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from benchmarks import _proc

SECRET = "redis-floor-benchmark-secret-0123456789"
CONCURRENCIES = (1, 8)
_MESSAGE = b"$7\r\nmessage\r\n"  # how each pub/sub message starts
# (one call, the events delivered so far, empty the test sockets' queues)
Publisher = tuple[Callable[[int], Awaitable[Any]], Callable[[], int], Callable[[], None]]


class _Replies(asyncio.Protocol):
    """The floor's command connection: each `+`/`:` reply line completes the oldest waiting call."""

    def __init__(self) -> None:
        self.waiting: list[asyncio.Future[None]] = []
        self.transport: asyncio.Transport | None = None
        self._buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\r\n")
        for _ in lines:
            self.waiting.pop(0).set_result(None)


class _Messages(asyncio.Protocol):
    """The floor's subscribed connection: counts the messages it reads."""

    def __init__(self) -> None:
        self.count = 0
        self.transport: asyncio.Transport | None = None
        self.subscribed = asyncio.get_running_loop().create_future()
        self._tail = b""  # the end of the last read, shorter than a marker: a marker split across reads counts once

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        data = self._tail + data
        self.count += data.count(_MESSAGE)
        self._tail = data[-(len(_MESSAGE) - 1) :]
        if not self.subscribed.done() and b"subscribe" in data:
            self.subscribed.set_result(None)


@contextlib.asynccontextmanager
async def floor(url: str) -> AsyncIterator[Publisher]:
    host, port = url.split("//", 1)[1].split("/")[0].rsplit(":", 1)
    loop = asyncio.get_running_loop()
    _, replies = await loop.create_connection(_Replies, host, int(port))
    _, messages = await loop.create_connection(_Messages, host, int(port))
    assert replies.transport is not None and messages.transport is not None
    messages.transport.write(b"*2\r\n$9\r\nSUBSCRIBE\r\n$11\r\nfloor:bench\r\n")
    await asyncio.wait_for(messages.subscribed, 10)
    # The same envelope the package publishes, about 200 bytes.
    head = b'{"type":"T","userId":"u1","data":{"i":1},"timestamp":"2026-12-07T00:00:00.000Z","id":"'
    payload = head + b"x" * 96 + b'"}'
    command = b"*3\r\n$7\r\nPUBLISH\r\n$11\r\nfloor:bench\r\n$%d\r\n%s\r\n" % (len(payload), payload)
    transport = replies.transport

    async def call(i: int) -> None:
        waiter = loop.create_future()
        replies.waiting.append(waiter)
        transport.write(command)
        await waiter

    try:
        yield call, lambda: messages.count, lambda: None
    finally:
        replies.transport.close()
        messages.transport.close()


@contextlib.asynccontextmanager
async def package(url: str, n: int) -> AsyncIterator[Publisher]:
    from starlette.applications import Starlette

    from starlette_pomo_ws import PomoWS, Settings
    from starlette_pomo_ws.testing import PomoTestClient

    pomo = PomoWS(Settings(jwt_secret=SECRET, backend_url=url))
    app = Starlette(lifespan=pomo.lifespan)
    app.mount("/ws", pomo)
    users = max(1, n // 2)
    async with PomoTestClient(app, timeout=30) as client, contextlib.AsyncExitStack() as stack:
        sockets = [await stack.enter_async_context(client.connect(f"u{i % users}")) for i in range(n)]
        broadcaster = client.broadcaster
        sent0 = broadcaster.stats.messages_sent

        async def call(i: int) -> None:
            await broadcaster.broadcast_to_user(f"u{i % users}", "T", {"i": i})

        def drain() -> None:
            for ws in sockets:
                queue = ws._to_client
                while not queue.empty():
                    queue.get_nowait()

        # Each call's event goes to the user's two connections.
        yield call, lambda: (broadcaster.stats.messages_sent - sent0) // 2, drain


async def burst(publisher: Publisher, calls: int, concurrency: int) -> float:
    """The node's CPU per call, in µs, from the first call until every event was delivered."""
    call, delivered, drain = publisher
    target = delivered() + calls

    async def caller(start: int) -> None:
        for i in range(start, calls, concurrency):
            await call(i)

    gc.collect()
    cpu0 = time.process_time()
    await asyncio.gather(*(caller(k) for k in range(concurrency)))
    deadline = time.monotonic() + 30
    while delivered() < target:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {delivered() - target + calls} of {calls} events were delivered within 30 s")
        await asyncio.sleep(0.001)
    cpu = (time.process_time() - cpu0) * 1e6 / calls
    drain()
    return cpu


async def main(n: int, rounds: int, calls: int, url: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.from_url(url)
    await client.flushdb()
    await client.aclose()
    results: dict[tuple[str, int], list[float]] = {}
    async with package("memory://", n) as memory, package(url, n) as redis, floor(url) as hand:
        publishers = {"memory": memory, "redis": redis, "floor": hand}
        names = list(publishers)
        for concurrency in CONCURRENCIES:
            for r in range(rounds):
                order = names[r % 3 :] + names[: r % 3]
                for name in order:
                    results.setdefault((name, concurrency), []).append(
                        await burst(publishers[name], calls, concurrency)
                    )
                cells = ", ".join(f"{name} {results[(name, concurrency)][-1]:.1f}" for name in names)
                print(f"round {r + 1} callers={concurrency}: CPU µs per call: {cells}", flush=True)
    print()
    print("| callers | memory | Redis | Redis adds (per round) | floor: the thinnest Redis client |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for concurrency in CONCURRENCIES:
        memory_us = statistics.median(results[("memory", concurrency)])
        redis_us = statistics.median(results[("redis", concurrency)])
        floor_us = statistics.median(results[("floor", concurrency)])
        # What Redis adds above the memory backend, per round, then the median.
        added = statistics.median(
            r - m for r, m in zip(results[("redis", concurrency)], results[("memory", concurrency)], strict=True)
        )
        print(f"| {concurrency} | {memory_us:.1f} µs | {redis_us:.1f} µs | {added:.1f} µs | {floor_us:.1f} µs |")


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks redis-floor", description=__doc__)
    parser.add_argument("--n", type=int, default=1000, help="connections per package app (default 1,000)")
    parser.add_argument("--rounds", type=int, default=6, help="bursts per publisher and concurrency (default 6)")
    parser.add_argument("--calls", type=int, default=2000, help="calls per burst (default 2,000)")
    parser.add_argument(
        "--redis",
        default="local",
        help="`local` (default): a redis-server of its own on the other core; or a URL (its database is flushed)",
    )
    args = parser.parse_args(argv)
    _proc.pin_self(_proc.SERVER_CPU)
    if args.redis != "local":
        asyncio.run(main(args.n, args.rounds, args.calls, args.redis))
        return 0
    with _proc.own_redis(_proc.CLIENT_CPU) as url:
        asyncio.run(main(args.n, args.rounds, args.calls, url))
    return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
