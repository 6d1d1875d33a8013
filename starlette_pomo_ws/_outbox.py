"""The send primitive: one socket's outgoing path.

`Outbox.put()` is the only way a message leaves the package. It calls the server's ASGI `send` at
once and steps the awaitable it returns by one step:

- When that step finishes the send (the socket keeps up: the common case), the message is out, at
  the cost of no task and no task switch.
- When that step yields a future of the server's own (not an asyncio one: the server completes the
  send on another thread, as granian does), the send is *under way*. Nothing waits on it: no task,
  and no wake-up of the event loop per socket when the server's thread completes it. The next
  message for that socket, or the ticker within a second, finishes it (the rest of the send runs
  then), and the socket is free again.
- Otherwise (the server's flow control paused the socket), or when the next message comes while
  a send is still under way, the rest of that send, and every message after it, belongs to one
  writer task, and waits in a bounded backlog. A full backlog, or a send that makes no progress
  for `send_timeout`, marks the client as too slow (the connection then closes with 1013).

Any awaitable works: a coroutine, an asyncio future, or a server's own future-like object. Nothing
here looks inside it: the writer task waits on whatever the first step yielded, exactly as it would
had it awaited the send itself, and steps the rest inside the same `contextvars.Context` as the
first step, so that a wrapper around `send` which sets a context variable (a tracing span) and
resets it after its `await` finds its own context again, and never leaks into the caller's.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import logging
import time
import types
from collections.abc import Awaitable, Generator, Iterator
from typing import Any

from ._metrics import Stats
from ._types import Message, Send

__all__ = ["ALWAYS", "Outbox", "send_close"]

logger = logging.getLogger("starlette_pomo_ws")

_DONE: Any = object()
ALWAYS = 1 << 62  # the seq of the server's own messages: never below a resume's replay


class Outbox:
    """Sends one socket's messages in order, without ever making the caller wait.

    `Connection` is an `Outbox` with a user: the fan-out calls `put()` on each connection directly.
    Until `start()`, messages wait (the connection is still being established); `seq` numbers at or
    below the `start()` position were in the replay of a resume, and are not sent twice.

    Args:
        send: the server's ASGI `send` for this socket.
        limit: how many messages may wait behind a paused send before the client counts as too slow.
        stats: where messages and bytes that go out later are counted (`put()`'s caller counts the rest).
        backed_up: the outboxes with a send in progress (a writer task, or a send under way); the
            ticker finishes the sends under way that the server has completed, and checks that the
            others make progress.
    """

    __slots__ = (
        "_backed_up",
        "_backlog",
        "_floor",
        "_limit",
        "_open",
        "_send",
        "_stats",
        "_underway",
        "_writer",
        "blocked_since",
    )

    def __init__(self, send: Send, limit: int, stats: Stats, backed_up: dict[Outbox, None]) -> None:
        self._send = send
        self._limit = limit
        self._stats = stats
        self._backed_up = backed_up
        # None while the socket keeps up. A deque while messages wait: before start(), behind a paused
        # send (then a writer task owns the socket), or (empty) once stopped.
        self._backlog: collections.deque[tuple[Message, int, int]] | None = collections.deque()
        self._floor = 0  # messages with a seq at or below this went out in the replay
        self._open = True
        self._writer: asyncio.Task[None] | None = None
        # A send the server completes by itself, that nobody waits on: (its iterator, the server's
        # future it yielded, its context, its size).
        self._underway: tuple[Iterator[Any], Any, contextvars.Context, int] | None = None
        self.blocked_since = 0.0  # when the send in progress started

    # Overridden by Connection.
    def _failed(self, exc: BaseException) -> None:
        """The transport failed under a send."""

    def _too_slow(self) -> None:
        """The backlog is full, or a send waited longer than `send_timeout` (the ticker calls this)."""

    @property
    def backed_up(self) -> bool:
        """Whether a writer task owns the socket (a send is paused, or messages wait behind one)."""
        return self._writer is not None

    def put(self, message: Message, size: int, seq: int, context: contextvars.Context) -> bool:
        """Send `message` now if the socket keeps up, else queue it behind the writer. Never waits.

        The caller runs this inside `context` (a fan-out runs its whole loop in one copy); a send
        that does not finish at once goes on in that same context.

        Args:
            message: the ASGI `websocket.send` message (the same dict for every socket of a fan-out).
            size: its size on the wire, in bytes of UTF-8.
            seq: the event's place in the total order (`ALWAYS` for the server's own messages).
            context: the context this call runs in.

        Returns:
            True when the message went out at once: the caller counts those (a fan-out adds them up
            once per event). The writer counts the messages that go out later.
        """
        if seq <= self._floor:
            return False  # already sent, in the replay of a resume
        underway = self._underway
        if underway is not None and not self._finish_underway(underway, context):
            self._start_writer(*underway)  # still under way: this message waits behind it
        backlog = self._backlog
        if backlog is not None:
            if self._open:
                if len(backlog) >= self._limit:
                    self._too_slow()
                else:
                    backlog.append((message, size, seq))
            return False
        try:
            sending = self._send(message).__await__()
            yielded = next(sending, _DONE)
        except Exception as exc:
            self._failed(exc)
            return False
        if yielded is _DONE:
            return True
        self.blocked_since = time.monotonic()
        if _servers_own_future(yielded):
            self._underway = (sending, yielded, context, size)
            self._backed_up[self] = None
        else:
            self._start_writer(sending, yielded, context, size)
        return False

    def _finish_underway(
        self, underway: tuple[Iterator[Any], Any, contextvars.Context, int], current: contextvars.Context | None
    ) -> bool:
        """Finish the send under way once the server has completed it; False while it has not.

        The rest of the send (a wrapper's code after its `await`) runs in the send's context, which may
        be `current`, the one the caller runs in (a context cannot be entered twice).
        """
        sending, future, context, size = underway
        if not future.done():
            return False
        self._underway = None
        self._backed_up.pop(self, None)
        try:
            yielded = next(sending, _DONE) if context is current else context.run(next, sending, _DONE)
        except Exception as exc:
            self._failed(exc)
            return True
        if yielded is _DONE:
            self.count(size)
        else:
            self._start_writer(sending, yielded, context, size)  # it waits on something else now
        return True

    def _start_writer(self, sending: Iterator[Any], yielded: Any, context: contextvars.Context, size: int) -> None:
        """Hand the rest of a send that did not finish to the writer task, which then sends what queues up."""
        self._underway = None
        self._backlog = collections.deque()
        self._backed_up[self] = None
        self._writer = asyncio.ensure_future(self._write(_rest_of(context, sending, yielded), size))

    def start(self, messages: list[tuple[Message, int]], upto: int, context: contextvars.Context) -> None:
        """Send `messages` (the handshake's, and a resume's replay up to seq `upto`), then what waited.

        The caller runs this inside `context`.
        """
        waiting, self._backlog = self._backlog, None
        if not self._open or waiting is None:
            self._backlog = collections.deque()
            return
        for message, size in messages:
            if self.put(message, size, ALWAYS, context):
                self.count(size)
        for message, size, seq in waiting:
            if seq > upto:  # events that were not in the replay, and the server's own messages
                if self.put(message, size, ALWAYS, context):
                    self.count(size)
                if seq != ALWAYS:
                    upto = seq
        self._floor = upto

    def rebase(self, seq: int) -> None:
        """Live events continue after `seq` (a new epoch numbers its events anew): only those go out."""
        self._floor = seq

    def check(self, now: float, limit: float) -> None:
        """The ticker's look at a send in progress: finish it if the server has completed it, and mark the
        client as too slow when it has waited more than `limit` seconds."""
        underway = self._underway
        if underway is not None and self._finish_underway(underway, None):
            return
        if now - self.blocked_since > limit:
            self._too_slow()

    def count(self, size: int) -> None:
        stats = self._stats
        stats.messages_sent += 1
        stats.bytes_sent += size

    async def _write(self, paused: Awaitable[None], size: int) -> None:
        """The writer task: finish the paused send, then drain the backlog; then the socket is free again."""
        try:
            await paused
            self.count(size)
            backlog = self._backlog
            send = self._send
            while backlog:
                message, size, _ = backlog.popleft()
                self.blocked_since = time.monotonic()
                await send(message)
                self.count(size)
            if self._open:
                self._backlog = None  # caught up: from now on put() sends at once again
        except asyncio.CancelledError:
            pass  # cancelled by stop(): the connection is closing
        except Exception as exc:
            self._failed(exc)
        finally:
            self._writer = None
            self._backed_up.pop(self, None)

    def stop(self) -> None:
        """Send nothing more: drop what waits, and stop the writer's paused send (safe: it wrote nothing yet)."""
        self._open = False
        self._backlog = collections.deque()  # never None again: put() drops everything
        underway, self._underway = self._underway, None
        if underway is not None:
            # The server has the message: let it finish, and unwind what waits on it (a wrapper) in its context.
            sending, _, context, _ = underway
            close = getattr(sending, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    context.run(close)
        # Here, not only in the writer's `finally`: a writer cancelled before its first step never runs.
        self._backed_up.pop(self, None)
        writer = self._writer
        if writer is not None and writer is not asyncio.current_task():
            writer.cancel()

    async def close_frame(self, code: int, reason: str, timeout: float) -> bool:
        """Stop, then send the close frame once the socket takes it, within `timeout` seconds in all.

        What was already written (the server's and the kernel's buffers) reaches a client that reads
        again within `timeout`, followed by the close frame. Returns whether the frame was handed over.
        """
        self.stop()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        writer = self._writer
        try:
            if writer is not None and writer is not asyncio.current_task():
                # The cancelled send unwinds; a server that completes sends elsewhere (granian) first
                # finishes the one it was given, so that the close frame follows it.
                await asyncio.wait({writer}, timeout=timeout)
            await asyncio.wait_for(send_close(self._send, code, reason), max(0.0, deadline - loop.time()))
        except Exception as exc:
            logger.debug("Close frame %d not sent: %r", code, exc)
            return False
        return True


async def send_close(send: Send, code: int, reason: str) -> None:
    """Send a close frame; where the server refuses the code, send its private-use twin, 4000 + (code - 1000).

    daphne (through autobahn) lets an application close only with 1000 or 3000-4999, and drops the
    reason: there 1008 becomes 4008, 1013 becomes 4013, and so on. Every other server sends the code as is.
    """
    try:
        await send({"type": "websocket.close", "code": code, "reason": reason})
    except Exception:
        if not 1000 < code < 2000:
            raise
        logger.debug("The server refused close code %d; sending %d", code, code + 3000)
        await send({"type": "websocket.close", "code": code + 3000, "reason": reason})


def _servers_own_future(yielded: Any) -> bool:
    """Whether a send's step yielded a future that the server completes by itself (granian's, from its own
    threads), rather than an asyncio future, which the loop's own code completes, or a bare yield."""
    if isinstance(yielded, asyncio.Future):
        return False
    return hasattr(yielded, "done") and hasattr(yielded, "add_done_callback")


@types.coroutine
def _rest_of(context: contextvars.Context, sending: Iterator[Any], yielded: Any) -> Generator[Any, None, None]:
    """The rest of a send whose first step was taken by hand, for the writer task to await.

    The task receives what that step yielded (a future, or None for "run me again soon"), as if it
    had yielded it itself; each further step runs in the send's own context.
    """
    while True:
        try:
            yield yielded
        except BaseException as exc:  # the writer is cancelled: pass it into the send, if it can take it
            throw = getattr(sending, "throw", None)
            if throw is None:
                raise
            try:
                yielded = context.run(throw, exc)
            except StopIteration:
                return
            continue
        yielded = context.run(next, sending, _DONE)
        if yielded is _DONE:
            return
