from __future__ import annotations

import asyncio
import collections
import functools
import itertools
import logging
import sys
import time
from collections.abc import Coroutine, Generator, Iterable
from typing import TYPE_CHECKING, Any

from ._events import protocol_message
from ._types import Message, Scope, Send

if TYPE_CHECKING:
    from ._auth import Principal
    from ._broadcaster import Broadcaster

__all__ = ["Connection"]

logger = logging.getLogger("starlette_pomo_ws")

# Modes. FAST is 0 so that the fan-out loop tests it with one truth check.
FAST = 0  # the socket keeps up: fan-out writes straight through, no queue, no task
GUARDED = 1  # like FAST, but drops events at or below `skip_upto` (the seam after a resume)
QUEUED = 2  # the socket is backed up, or still sending its replay: events wait in `backlog`
RESUMING = 3  # not yet established: live events wait in `pending` until the replay is known
CLOSED = 4

_DONE: Any = object()
# A send in progress that was stepped by hand: a coroutine's __await__ iterator, or a coroutine.
_Steppable = Generator[Any, None, None] | Coroutine[Any, Any, None]
_ids = itertools.count(1)


class Connection:
    """One accepted WebSocket: its principal, its outgoing path and its limits.

    The common case costs nothing extra: fan-out calls the ASGI `send` and steps its coroutine once.
    When that step does not finish (the server's flow control paused the socket), the unfinished send
    moves to a writer task, and later events wait in a bounded `backlog` until the socket drains.
    `on_message` handlers receive this object: use `user_id`, `principal` and `await send(type, data)`.

    Attributes:
        user_id: the authenticated user (always a string).
        principal: the `Principal` from the handshake, or from the last `REFRESH_TOKEN`.
        id: this connection's id, `<node>-<n>`, as the logs show it.
        scope: the ASGI scope of the handshake.
    """

    __slots__ = (
        "_broadcaster",
        "_closing",
        "_dead",
        "_reader",
        "_send",
        "_woken",
        "_writer",
        "accepted",
        "backlog",
        "blocked_since",
        "bucket",
        "bucket_time",
        "close_code",
        "close_reason",
        "expires_at",
        "expiry_token",
        "id",
        "last_sent",
        "mode",
        "pending",
        "principal",
        "scope",
        "skip_upto",
        "strikes",
        "user_id",
    )

    def __init__(self, broadcaster: Broadcaster, principal: Principal, send: Send, scope: Scope) -> None:
        self._broadcaster = broadcaster
        self._send = send
        self.scope = scope
        self.principal = principal
        self.user_id = principal.user_id
        self.id = f"{broadcaster.node_id}-{next(_ids)}"
        self.mode = RESUMING
        self.backlog: collections.deque[Message] | None = None
        self.pending: list[tuple[int, Message]] = []
        self.skip_upto = 0
        self.blocked_since = 0.0
        self.last_sent = time.monotonic()
        self.expires_at = principal.expires_at
        self.expiry_token = -1
        self.close_code = 1006  # until a close says otherwise: the peer vanished
        self.close_reason = ""
        self.accepted = False
        settings = broadcaster.settings
        self.bucket = float(settings.client_message_burst)
        self.bucket_time = self.last_sent
        self.strikes = 0
        self._writer: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[Any] | None = None
        self._closing = False
        self._dead = False  # the transport is gone: the reader must stop waiting on receive()
        self._woken = False  # we cancelled the reader's receive() ourselves

    def __repr__(self) -> str:
        return f"<Connection id={self.id!r} user_id={self.user_id!r}>"

    # -- public, for on_message handlers ------------------------------------------------------------

    async def send(self, type: str, data: Any = None) -> None:
        """Send one protocol message (no `id`) to this connection only. Never waits on the socket."""
        self.notify(type, data)

    def notify(self, type: str, data: Any = None) -> None:
        """`send()` for code that is not async: the server's own protocol messages (PONG, ERROR, ...)."""
        self.push({"type": "websocket.send", "text": protocol_message(type, self.user_id, data)})

    # -- the outgoing path ------------------------------------------------------------------------------

    def deliver(self, message: Message, seq: int) -> None:
        """Hand a fanned-out event to a connection that is not FAST (the fan-out loop does FAST itself)."""
        # The fan-out counted this delivery as sent; push() or the writer counts it again if it is.
        self._broadcaster.stats.messages_sent -= 1
        self._broadcaster.stats.bytes_sent -= len(message["text"])
        mode = self.mode
        if mode == GUARDED:
            if seq <= self.skip_upto:
                return
            self.mode = FAST
            self.push(message)
        elif mode == QUEUED:
            if seq > self.skip_upto:
                self._enqueue(message)
        elif mode == RESUMING:
            pending = self.pending
            if len(pending) >= self._broadcaster.settings.send_queue_size:
                self.abort(1013, "Client too slow")
            else:
                pending.append((seq, message))

    def push(self, message: Message) -> None:
        """Send now if the socket keeps up, else queue behind what is waiting."""
        mode = self.mode
        if mode == QUEUED:
            self._enqueue(message)
            return
        if mode == CLOSED:
            return
        self.last_sent = time.monotonic()
        self._step(message)

    def _step(self, message: Message) -> bool | None:
        """Send one message at once: True when it went out, False when the transport failed, None when
        the server paused the socket mid-send (the unfinished send then belongs to a new writer task)."""
        stats = self._broadcaster.stats
        stats.messages_sent += 1
        stats.bytes_sent += len(message["text"])
        try:
            awaitable = self._send(message).__await__()
            yielded = next(awaitable, _DONE)
        except Exception as exc:
            self.failed(exc)
            return False
        if yielded is _DONE:
            return True
        self.stalled(awaitable, yielded)
        return None

    def _enqueue(self, message: Message) -> None:
        backlog = self.backlog
        assert backlog is not None
        if len(backlog) >= self._broadcaster.settings.send_queue_size:
            self.abort(1013, "Client too slow")
            return
        backlog.append(message)

    def start_queue(self, messages: Iterable[Message], skip_upto: int) -> None:
        """Leave RESUMING: send `messages` (CONNECTION_ESTABLISHED, the replay), then live events after `skip_upto`."""
        self.skip_upto = skip_upto
        backlog = self.backlog = collections.deque(messages)
        for seq, message in self.pending:
            if seq > skip_upto:
                backlog.append(message)
                skip_upto = seq
        self.pending = []
        self.skip_upto = skip_upto
        self.mode = QUEUED
        if len(backlog) > self._broadcaster.settings.send_queue_size:
            self.abort(1013, "Client too slow")
            return
        # Send what is waiting right away while the socket keeps up; only a paused socket gets a task.
        while backlog:
            if not self._step(backlog.popleft()):
                return  # failed, or paused: the writer task sends the rest
        self.backlog = None
        self.mode = GUARDED if self.skip_upto else FAST

    def stalled(self, awaitable: _Steppable, yielded: Any) -> None:
        """The server paused this socket mid-send: finish that send in a writer task, queue the rest."""
        self.mode = QUEUED
        if self.backlog is None:
            self.backlog = collections.deque()
        self._start_writer(awaitable, yielded)

    def _start_writer(self, awaitable: _Steppable | None, yielded: Any) -> None:
        self.blocked_since = time.monotonic()
        self._broadcaster._queued[self] = None
        self._writer = asyncio.ensure_future(self._drain(awaitable, yielded))

    async def _drain(self, awaitable: _Steppable | None, yielded: Any) -> None:
        try:
            if awaitable is not None:
                await _finish(awaitable, yielded)
                awaitable = None
            send = self._send
            backlog = self.backlog
            stats = self._broadcaster.stats
            while backlog:
                self.blocked_since = time.monotonic()
                message = backlog.popleft()
                await send(message)
                stats.messages_sent += 1
                stats.bytes_sent += len(message["text"])
            if self.mode == QUEUED:
                self.backlog = None
                self.mode = GUARDED if self.skip_upto else FAST
                self.last_sent = time.monotonic()
        except asyncio.CancelledError:
            if awaitable is not None:
                awaitable.close()
        except Exception as exc:
            self.failed(exc)
        finally:
            self._writer = None
            self._broadcaster._queued.pop(self, None)

    # -- closing ------------------------------------------------------------------------------------------

    def failed(self, exc: BaseException) -> None:
        """The transport failed under a send: the peer is gone. Release it without a close frame."""
        if self.mode == CLOSED:
            return
        logger.debug("Send failed on connection %s (user %r): %r", self.id, self.user_id, exc)
        self.release()
        self._wake_reader()

    def abort(self, code: int, reason: str) -> None:
        """Release the connection now, then try a close frame with a bounded wait (never blocks the caller)."""
        if self.mode == CLOSED or self._closing:
            return
        self._closing = True
        self.close_code = code
        self.close_reason = reason
        if code == 1013:
            self._broadcaster.stats.slow_closes += 1
            logger.warning("Closing connection %s (user %r): client too slow", self.id, self.user_id)
        else:
            logger.info("Closing connection %s (user %r) with %d: %s", self.id, self.user_id, code, reason)
        self.release()
        if not self.accepted:
            return  # still in the handshake: the handler sends this close once it has accepted
        task = asyncio.ensure_future(self._close(code, reason))
        self._broadcaster._closers.add(task)
        task.add_done_callback(self._broadcaster._closers.discard)

    async def close_after_accept(self) -> None:
        """Send the close that `abort()` decided during the handshake, now that the socket is accepted."""
        self.accepted = True
        if self.mode == CLOSED and self._closing:
            await self._close(self.close_code, self.close_reason)

    async def _close(self, code: int, reason: str) -> None:
        timeout = self._broadcaster.settings.send_timeout
        try:
            await asyncio.wait_for(self._send({"type": "websocket.close", "code": code, "reason": reason}), timeout)
        except Exception as exc:
            logger.debug("Close frame not sent to %s: %r", self.id, exc)
            self._wake_reader()

    def release(self) -> None:
        """Leave the registry and free the queue at once; idempotent."""
        if self.mode == CLOSED:
            return
        self.mode = CLOSED
        self.backlog = None
        self.pending = []
        writer = self._writer
        if writer is not None and writer is not asyncio.current_task():
            writer.cancel()
        self._broadcaster._release(self)

    @property
    def dead(self) -> bool:
        """Whether the transport failed, so that the reader should return rather than receive."""
        return self._dead

    def _wake_reader(self) -> None:
        # The reader waits in the server's receive(); when no close frame can reach the peer, cancel
        # that wait so the handler returns and the server drops the transport. When the reader itself
        # found the failure, the flag alone stops it before its next receive().
        self._dead = True
        reader = self._reader
        if reader is not None and reader is not asyncio.current_task() and not reader.done():
            self._closing = True
            self._woken = True
            reader.cancel()

    def reader_cancelled(self) -> bool:
        """Whether a CancelledError in the reader came from `_wake_reader` (then the handler just returns).

        Any other cancellation (the server's, a timeout's) is not ours to swallow.
        """
        if not self._woken:
            return False
        self._woken = False
        reader = self._reader
        if reader is not None and sys.version_info >= (3, 11):
            reader.uncancel()
        return True

    def bind_reader(self) -> None:
        self._reader = asyncio.current_task()

    # -- client message rate ----------------------------------------------------------------------------

    def take_token(self, now: float) -> bool:
        settings = self._broadcaster.settings
        burst = settings.client_message_burst
        bucket = min(burst, self.bucket + (now - self.bucket_time) * settings.client_message_rate)
        self.bucket_time = now
        if bucket >= 1:
            self.bucket = bucket - 1
            self.strikes = 0
            return True
        self.bucket = bucket
        self.strikes += 1
        return False


async def _finish(awaitable: _Steppable, yielded: Any) -> None:
    """Drive a send coroutine that was stepped by hand and paused: wait on what it yielded, then step on.

    The coroutine yielded a future to us rather than to a task, so we must not `await` that future
    again (asyncio refuses a second await on a future that is still marked as yielded); we wait for it
    to complete through a callback instead, as a task would, and then resume the coroutine.
    """
    loop = asyncio.get_running_loop()
    while True:
        if yielded is None:  # a bare `yield` (asyncio.sleep(0)): just let the loop run once
            await asyncio.sleep(0)
        else:
            done = loop.create_future()
            yielded.add_done_callback(functools.partial(_wake, done))
            await done
        try:
            yielded = awaitable.send(None)
        except StopIteration:
            return


def _wake(waiter: asyncio.Future[None], _: object) -> None:
    if not waiter.done():
        waiter.set_result(None)
