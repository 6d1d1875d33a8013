"""Coalescing: the calls that many handlers make in the same moment go to Redis as one round trip.

There is no timer. The first call starts a sender task; it runs once the event loop has finished
what it is doing now, so every call made in that same moment is in its batch. Calls that arrive
while a round trip is in flight wait for it and go together in the next one. Batches go one at a
time and in order, so the calls of one stream keep their order.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from ...exceptions import BackendUnavailable

__all__ = ["Coalescer"]

_T = TypeVar("_T")
_R = TypeVar("_R")

# Sends a batch within the given number of seconds; returns one result per item, in order.
Send = Callable[[list[_T], float], Awaitable[Sequence[_R]]]


class Coalescer(Generic[_T, _R]):
    """`await coalescer(item)` returns this item's result from one round trip shared with its batch.

    Every call fails within `timeout` of its own start, even when it waited behind a round trip
    that hung: the batch it joins gets only the time its oldest call has left.
    """

    def __init__(self, send: Send[_T, _R], *, what: str, timeout: float, limit: int) -> None:
        self._send = send
        self._what = what
        self._timeout = timeout
        self._limit = limit
        self._queue: collections.deque[tuple[_T, asyncio.Future[_R], float]] = collections.deque()
        self._sender: asyncio.Task[None] | None = None
        self.round_trips = 0  # for tests and the docs' measurements

    async def __call__(self, item: _T) -> _R:
        return await self._enqueue(item)

    async def many(self, items: Sequence[_T]) -> list[_R]:
        """Several items' results, in order: they join the same batches as everyone else's, with no task each."""
        futures = [self._enqueue(item) for item in items]
        return [await future for future in futures]

    def _enqueue(self, item: _T) -> asyncio.Future[_R]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_R] = loop.create_future()
        self._queue.append((item, future, loop.time()))
        if self._sender is None:
            self._sender = loop.create_task(self._run(), name=f"pomo-ws redis: {self._what}")
        return future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        batch: list[tuple[_T, asyncio.Future[_R], float]] = []
        try:
            while self._queue:
                batch = [self._queue.popleft() for _ in range(min(self._limit, len(self._queue)))]
                live = [entry for entry in batch if not entry[1].done()]  # drop callers that gave up
                if not live:
                    continue
                remaining = live[0][2] + self._timeout - loop.time()
                if remaining <= 0:
                    error = BackendUnavailable(
                        f"Cannot {self._what}: Redis did not answer within {self._timeout:.1f}s."
                    )
                    _fail(live, error)
                    continue
                self.round_trips += 1
                try:
                    results = await self._send([item for item, _, _ in live], remaining)
                except Exception as exc:
                    _fail(live, exc)
                    continue
                for (_, future, _), result in zip(live, results, strict=True):
                    if not future.done():
                        future.set_result(result)
        except BaseException:
            # Cancelled (the backend stops): nobody may wait forever.
            error = BackendUnavailable(f"Cannot {self._what}: the Redis backend stopped.")
            _fail(batch, error)
            _fail(list(self._queue), error)
            self._queue.clear()
            raise
        finally:
            self._sender = None

    async def close(self) -> None:
        """Stop the sender; its callers get `BackendUnavailable`."""
        sender = self._sender
        if sender is not None:
            sender.cancel()
            await asyncio.wait({sender})


def _fail(entries: Sequence[tuple[object, asyncio.Future[_R], float]], error: Exception) -> None:
    for _, future, _ in entries:
        if not future.done():
            # One exception object per caller: raised in many tasks, a shared one would pile up tracebacks.
            own = BackendUnavailable(str(error)) if isinstance(error, BackendUnavailable) else error
            own.__cause__ = error.__cause__
            future.set_exception(own)
            future.exception()  # retrieved: a caller that gave up is not logged as a lost error
