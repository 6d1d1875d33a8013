from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import logging
import sys
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ._events import Position, protocol_message, wire_size
from ._outbox import ALWAYS, Outbox
from ._types import Message, Scope, Send

if TYPE_CHECKING:
    from ._auth import Principal
    from ._broadcaster import Broadcaster

__all__ = ["Connection"]

logger = logging.getLogger("starlette_pomo_ws")

_ids = itertools.count(1)


class Connection(Outbox):
    """One accepted WebSocket: who it is, where its events go (it is the socket's `Outbox`), and its limits.

    `on_message` handlers receive this object: use `user_id`, `principal`, `id`, `scope` and
    `await send(type, data)`. Everything else is the package's own.

    Attributes:
        user_id: the authenticated user (always a string).
        principal: the `Principal` from the handshake, or from the last `REFRESH_TOKEN`.
        id: this connection's id, `<node>-<n>`, as the logs show it.
        scope: the ASGI scope of the handshake.
    """

    __slots__ = (
        "_accepted",
        "_broadcaster",
        "_bucket",
        "_bucket_time",
        "_close_code",
        "_close_reason",
        "_closing",
        "_dead",
        "_last_sent",
        "_reader",
        "_released",
        "_started",
        "_strikes",
        "_woken",
        "admitted_at",
        "channels",
        "expires_at",
        "expiry_token",
        "id",
        "joining",
        "principal",
        "scope",
        "user_id",
    )

    def __init__(self, broadcaster: Broadcaster, principal: Principal, send: Send, scope: Scope) -> None:
        super().__init__(send, broadcaster.settings.send_queue_size, broadcaster.stats, broadcaster.backed_up)
        self._broadcaster = broadcaster
        settings = broadcaster.settings
        self.scope = scope
        self.principal = principal
        self.user_id = principal.user_id
        self.id = f"{broadcaster.node_id}-{next(_ids)}"
        self.expires_at = principal.expires_at
        self.expiry_token = -1  # the broadcaster's handle on this connection's token timers
        self._started = False
        self._last_sent = time.monotonic()
        self._close_code = 1006  # until a close says otherwise: the peer vanished
        self._close_reason = ""
        self._accepted = False
        self._closing = False
        self._released = False
        self._dead = False  # the transport is gone: the reader must stop waiting on receive()
        self._woken = False  # we cancelled the reader's receive() ourselves
        self._reader: asyncio.Task[Any] | None = None
        self._bucket = float(settings.client_message_burst)
        self._bucket_time = self._last_sent
        self._strikes = 0
        # The channels this connection holds: a tuple, rebuilt on each change (a connection holds a few, and
        # most none: the empty tuple costs nothing).
        self.channels: tuple[str, ...] = ()
        self.joining = 0  # subscribes being read
        # On a shared backend, the position read with this connection's count, once it is subscribed.
        self.admitted_at: Position | None = None

    def __repr__(self) -> str:
        return f"<Connection id={self.id!r} user_id={self.user_id!r}>"

    # -- public, for on_message handlers ------------------------------------------------------------

    async def send(self, type: str, data: Any = None) -> None:
        """Send one protocol message (no `id`) to this connection only. Never waits on the socket."""
        self.notify(type, data)

    # -- for the package --------------------------------------------------------------------------------

    def notify(self, type: str, data: Any = None) -> None:
        """`send()` for code that is not async: the server's own messages (PONG, ERROR, HEARTBEAT, ...)."""
        text = protocol_message(type, self.user_id, data)
        self._last_sent = time.monotonic()
        size = wire_size(text)
        context = contextvars.copy_context()
        if context.run(self.put, {"type": "websocket.send", "text": text}, size, ALWAYS, context):
            self.count(size)

    def notify_with_id(self, type: str, data: Any, event_id: str) -> None:
        """A protocol message that carries a position (RESYNC_REQUIRED): the client stores it as its cursor."""
        text = protocol_message(type, self.user_id, data, event_id)
        self.send_all([({"type": "websocket.send", "text": text}, wire_size(text))])

    def send_all(self, messages: Iterable[tuple[Message, int]]) -> None:
        """Send messages, with their sizes, after everything sent so far (a subscribe's opening)."""
        context = contextvars.copy_context()
        put = self.put
        for message, size in messages:
            if context.run(put, message, size, ALWAYS, context):
                self.count(size)

    def establish(self, messages: Iterable[Message], upto: int) -> None:
        """Send CONNECTION_ESTABLISHED and the replay (events up to seq `upto`), then the live events."""
        self._started = True
        context = contextvars.copy_context()
        context.run(self.start, [(m, wire_size(m["text"])) for m in messages], upto, context)

    @property
    def established(self) -> bool:
        return self._started and not self._released

    def released(self) -> bool:
        """Whether the connection left the registry (a method: it changes across every await)."""
        return self._released

    @property
    def last_sent(self) -> float:
        """When the server last sent this connection one of its own messages (monotonic clock)."""
        return self._last_sent

    @property
    def close_code(self) -> int:
        return self._close_code

    # -- closing ------------------------------------------------------------------------------------------

    def _failed(self, exc: BaseException) -> None:
        """The transport failed under a send: the peer is gone. Release it without a close frame."""
        if self._released:
            return
        logger.debug("Send failed on connection %s (user %r): %r", self.id, self.user_id, exc)
        self.release()
        self._wake_reader()

    def _too_slow(self) -> None:
        self.abort(1013, "Client too slow")

    def abort(self, code: int, reason: str) -> None:
        """Release the connection now, then send the close frame in a task, with a bounded wait."""
        if self._released or self._closing:
            return
        self._closing = True
        self._close_code = code
        self._close_reason = reason
        if code == 1013:
            self._broadcaster.stats.slow_closes += 1
            logger.warning("Closing connection %s (user %r): client too slow", self.id, self.user_id)
        else:
            logger.info("Closing connection %s (user %r) with %d: %s", self.id, self.user_id, code, reason)
        self.release()
        if self._accepted:  # still in the handshake: the handler sends this close once it has accepted
            self._broadcaster.track(self._close())

    async def accepted(self) -> None:
        """The handshake is accepted: the reader is this task; send a close that came during the handshake."""
        self._accepted = True
        self._reader = asyncio.current_task()
        if self._closing:
            await self._close()

    async def going_away(self) -> None:
        """The server is cancelling this connection's handler: close with 1001, waiting at most a second."""
        if self._released or self._closing:
            return
        self._closing = True
        self._close_code, self._close_reason = 1001, "Server shutting down"
        self.release()
        with contextlib.suppress(BaseException):
            await self.close_frame(1001, "Server shutting down", min(1.0, self._broadcaster.settings.send_timeout))

    async def _close(self) -> None:
        sent = await self.close_frame(self._close_code, self._close_reason, self._broadcaster.settings.send_timeout)
        if not sent:
            # The peer does not read: stop waiting on it, so that the server drops the transport.
            self._wake_reader()

    def release(self) -> None:
        """Leave the registry and stop sending at once; idempotent."""
        if self._released:
            return
        self._released = True
        self.stop()
        self._broadcaster.forget(self)

    def disconnected(self, code: int) -> None:
        """The client closed (or vanished): remember its code for the metrics, then release."""
        if not self._released:
            self._close_code = code
        self.release()

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

    # -- client message rate ----------------------------------------------------------------------------

    def take_token(self, now: float) -> bool:
        """Take a token from the client-message bucket; False when the client is over its rate."""
        settings = self._broadcaster.settings
        burst = settings.client_message_burst
        bucket = min(burst, self._bucket + (now - self._bucket_time) * settings.client_message_rate)
        self._bucket_time = now
        if bucket >= 1:
            self._bucket = bucket - 1
            self._strikes = 0
            return True
        self._bucket = bucket
        self._strikes += 1
        return False

    @property
    def strikes(self) -> int:
        """How many messages in a row were over the rate."""
        return self._strikes
