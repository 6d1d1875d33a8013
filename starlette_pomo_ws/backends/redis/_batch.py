"""Coalescing: the calls that many handlers make in the same moment go to Redis as one round trip.

There is no timer. The first call schedules a flush; it runs once the event loop has finished what it
is doing now, so every call made in that same moment is in its batch. Calls that arrive while a
round trip is in flight wait for it, and go together the moment its reply arrives. Batches go one at
a time and in order, so the calls of one stream keep their order.

No task runs a batch: `send` writes it and returns, and its callback hands each caller its result in
the same step as the reply is parsed (see `Direct.submit`). A refresh that rewrites what the batches
write (presence, channel members) pauses them instead of taking a lock.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Generic, Protocol, TypeVar

from ...exceptions import BackendUnavailable
from ._connection import Done

__all__ = ["Answer", "Coalescer", "Settle"]

_T = TypeVar("_T")
_R = TypeVar("_R")

# What a batch gets back: one result per item, in order, or why it failed.
Settle = Callable[[Sequence[_R] | BaseException], None]
# Sends a batch that has the given number of seconds left, and calls `settle` once, when it is answered.
Send = Callable[[list[_T], float, Settle[_R]], None]
_Entry = tuple[_T, asyncio.Future[_R], float]


class Answer(Protocol):
    """Where a batch's replies go (`RedisBackend._answer`): decoded for its callers, or as `BackendUnavailable`
    (an error reply included); the backend's health follows."""

    def __call__(self, what: str, decode: Callable[[list[Any]], Sequence[_R]], settle: Settle[_R]) -> Done: ...


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
        self._queue: collections.deque[_Entry[_T, _R]] = collections.deque()
        self._scheduled = False
        self._in_flight: list[_Entry[_T, _R]] | None = None
        self._flushing = False
        self._pauses = 0
        self._idle: asyncio.Future[None] | None = None  # set when the batch in flight is answered
        self.round_trips = 0  # for tests and the docs' measurements

    def __call__(self, item: _T) -> Awaitable[_R]:
        return self._enqueue(item)

    async def many(self, items: Sequence[_T]) -> list[_R]:
        """Several items' results, in order: they join the same batches as everyone else's, with no task each."""
        futures = [self._enqueue(item) for item in items]
        return [await future for future in futures]

    def _enqueue(self, item: _T) -> asyncio.Future[_R]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_R] = loop.create_future()
        self._queue.append((item, future, loop.time()))
        if not self._scheduled and self._in_flight is None:
            self._scheduled = True
            loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        """Send the next batch, unless one is in flight: then its answer sends the next."""
        self._scheduled = False
        if self._flushing:  # a send that settled at once, inside this loop: the loop goes on
            return
        self._flushing = True
        try:
            while self._queue and self._in_flight is None and not self._pauses:
                self._send_next()
        finally:
            self._flushing = False

    def _send_next(self) -> None:
        queue = self._queue
        batch = [queue.popleft() for _ in range(min(self._limit, len(queue)))]
        live = [entry for entry in batch if not entry[1].done()]  # drop callers that gave up
        if not live:
            return
        remaining = live[0][2] + self._timeout - asyncio.get_running_loop().time()
        if remaining <= 0:
            _fail(live, BackendUnavailable(f"Cannot {self._what}: Redis did not answer within {self._timeout:.1f}s."))
            return
        self._in_flight = live
        self.round_trips += 1
        try:
            self._send([item for item, _, _ in live], remaining, functools.partial(self._settle, live))
        except Exception as exc:  # a send that failed before it went out
            self._settle(live, exc)

    def _settle(self, live: list[_Entry[_T, _R]], outcome: Sequence[_R] | BaseException) -> None:
        if self._in_flight is not live:
            return  # closed meanwhile: its callers were failed then
        self._in_flight = None
        idle, self._idle = self._idle, None
        if idle is not None and not idle.done():
            idle.set_result(None)
        if isinstance(outcome, BaseException):
            _fail(live, outcome)
        else:
            for (_, future, _), result in zip(live, outcome, strict=True):
                if not future.done():
                    future.set_result(result)
        if self._queue:
            self._flush()  # the calls that waited go at once, in this same step

    @contextlib.asynccontextmanager
    async def paused(self) -> AsyncIterator[None]:
        """No batch is in flight inside: it waits for the one in flight, and the next waits for it."""
        self._pauses += 1
        try:
            while self._in_flight is not None:
                if self._idle is None:
                    self._idle = asyncio.get_running_loop().create_future()
                await asyncio.shield(self._idle)
            yield
        finally:
            self._pauses -= 1
            if not self._pauses and self._queue:
                self._flush()

    async def close(self) -> None:
        """Stop sending: the waiting callers get `BackendUnavailable`."""
        error = BackendUnavailable(f"Cannot {self._what}: the Redis backend stopped.")
        live, self._in_flight = self._in_flight, None
        idle, self._idle = self._idle, None
        if idle is not None and not idle.done():
            idle.set_result(None)
        _fail(live or [], error)
        _fail(list(self._queue), error)
        self._queue.clear()


def _fail(entries: Sequence[tuple[object, asyncio.Future[_R], float]], error: BaseException) -> None:
    for _, future, _ in entries:
        if not future.done():
            # One exception object per caller: raised in many tasks, a shared one would pile up tracebacks.
            own = BackendUnavailable(str(error)) if isinstance(error, BackendUnavailable) else error
            own.__cause__ = error.__cause__
            future.set_exception(own)
            future.exception()  # retrieved: a caller that gave up is not logged as a lost error
