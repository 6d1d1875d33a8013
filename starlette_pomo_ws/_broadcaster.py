from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import heapq
import itertools
import logging
import secrets
import time
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ._channels import AuthorizeChannel, Channels, channel_problem
from ._connection import Connection
from ._events import (
    CursorSigner,
    Event,
    EventType,
    Position,
    dumps,
    envelope_head,
    iso_timestamp,
    protocol_message,
    wire_size,
    with_id,
)
from ._metrics import Stats
from ._outbox import Outbox
from ._registry import Registry
from ._subscriptions import Subscriptions
from ._types import Message
from .backends.base import Backend, Record
from .exceptions import BackendUnavailable, NotStartedError

if TYPE_CHECKING:
    from ._settings import Settings

__all__ = ["Broadcaster"]

logger = logging.getLogger("starlette_pomo_ws")

_NOT_STARTED = (
    "The starlette-pomo-ws broadcaster is not running: pomo.lifespan was never started. Mounted apps get no "
    "lifespan events, so wire it on the outer app: `app = Starlette(lifespan=pomo.lifespan)` or "
    "`FastAPI(lifespan=pomo.lifespan)`, or compose it into your own lifespan with `async with pomo.lifespan(app) "
    "as state: yield {**state, ...}`. With Litestar use `plugins=[PomoWSPlugin(pomo)]`. "
    "A server that sends no lifespan events (daphne) needs `application = pomo.wrap(app)`."
)
_WARN, _EXPIRE = 0, 1


class Broadcaster:
    """Publishes events to users' connections, on this node and (through the backend) on every other.

    Get it as `request.state.broadcaster`, `Depends(get_broadcaster)`, or `pomo.broadcaster`.
    """

    def __init__(self, settings: Settings, backend: Backend, authorize_channel: AuthorizeChannel | None = None) -> None:
        self.settings = settings
        self.backend = backend
        self.node_id = secrets.token_hex(4)
        self.registry = Registry()
        self._shared = backend.shared  # events come from other processes: per-user subscriptions
        self._signer: CursorSigner | None = None
        self._running = False
        self._accepting = False
        # The outboxes with a send in progress (a writer task, or a send under way): the ticker finishes the
        # sends the server has completed, and checks that the others make progress.
        self.backed_up: dict[Outbox, None] = {}
        self._closers: set[asyncio.Task[None]] = set()
        # The token timers: (when, token, kind) entries name a token, never a connection, so that a
        # closed connection is freed at once; `_timed` maps the live tokens to their connections.
        self._expiries: list[tuple[float, int, int]] = []
        self._timed: dict[int, Connection] = {}
        self._expiry_ids = itertools.count()
        self._ticker: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # The user streams this node receives from a shared backend (one per user with a local connection).
        self._subscriptions = Subscriptions(backend.subscribe, backend.unsubscribe, self.spawn)
        self.channels = Channels(self, authorize_channel)
        self._last_all = 0.0
        self._user_activity: dict[str, float] = {}
        # The ids of the events fanned out lately, by seq: a publisher whose event came back through
        # the backend (a batch on Redis) takes its id from here instead of signing it again.
        self._recent_ids: dict[int, tuple[str, str]] = {}
        self.stats = Stats()

    def __repr__(self) -> str:
        return f"Broadcaster(backend={self.backend!r}, connections={self.registry.total})"

    # -- lifecycle ------------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether `pomo.lifespan` started the broadcaster (and it has not stopped)."""
        return self._running

    @property
    def shared(self) -> bool:
        """Whether the backend is shared with other processes (then streams are subscribed per node)."""
        return self._shared

    @property
    def accepting(self) -> bool:
        """Whether this node accepts new connections (False before start and while shutting down)."""
        return self._accepting

    async def start(self, signer: CursorSigner) -> None:
        """Start the backend and the shared timers; `signer` signs the resume cursors."""
        self._signer = signer
        await self.backend.start(self._on_record, self._on_control)
        self._running = True
        self._accepting = True
        self._ticker = asyncio.ensure_future(self._tick_forever())

    async def stop(self) -> None:
        """Close every connection with 1001, then stop the backend. Waits a bounded time."""
        self._accepting = False
        for connection in self.registry.everyone():
            connection.abort(1001, "Server shutting down")
        if self._closers:
            await asyncio.wait(set(self._closers), timeout=self.settings.send_timeout + 1)
        for task in (self._ticker, *self._tasks):
            if task is not None:
                task.cancel()
        for task in (self._ticker, *self._tasks):
            if task is not None:
                with contextlib.suppress(BaseException):
                    await task
        self._ticker = None
        self._running = False
        await self.backend.stop()

    def _check_running(self) -> None:
        if not self._running:
            raise NotStartedError(_NOT_STARTED)

    # -- publishing -----------------------------------------------------------------------------------

    async def broadcast_to_user(self, user_id: str, type: str, data: Any = None) -> Event:
        """Send an event to every connection of one user, on every node.

        Returns once the event is stored in the backend (and so in the history used for resume);
        delivery to sockets never waits on a slow client.

        Args:
            user_id: the target user. A non-string id is converted with `str()`.
            type: the event type, e.g. `"TASK_CREATED"` (any string).
            data: JSON-serialisable payload; dataclasses, datetimes and pydantic models are converted.

        Raises:
            TypeError: `data` cannot be encoded as JSON.
            BackendUnavailable: the backend cannot be reached; the event was not published.
            NotStartedError: `pomo.lifespan` was never started.
        """
        return await self._publish(str(user_id), type, data)

    async def broadcast_to_all(self, type: str, data: Any = None) -> Event:
        """Send an event to every connection of every user, on every node (`userId` is `null`).

        Raises:
            TypeError: `data` cannot be encoded as JSON.
            BackendUnavailable: the backend cannot be reached; the event was not published.
            NotStartedError: `pomo.lifespan` was never started.
        """
        return await self._publish(None, type, data)

    async def broadcast_to_channel(self, channel: str, type: str, data: Any = None, *, retain: bool = False) -> Event:
        """Send an event to every connection subscribed to `channel`, on every node (`userId` is `null`,
        and the envelope adds `"channel"`).

        Returns once the event is stored in the channel's history (for resume). Nobody subscribed costs
        one backend write and no fan-out.

        Args:
            channel: the channel, e.g. `"team:42"` (1 to 200 characters from `A-Z a-z 0-9 _ - . : @ =`).
            type: the event type (any string).
            data: JSON-serialisable payload, as for `broadcast_to_user`.
            retain: keep this event as the channel's state: every later subscriber gets it right after
                `SUBSCRIBED` (with `"retained": true`), until another retained event replaces it.

        Raises:
            ValueError: `channel` is not a valid channel name.
            TypeError: `data` cannot be encoded as JSON.
            BackendUnavailable: the backend cannot be reached; the event was not published.
            NotStartedError: `pomo.lifespan` was never started.
        """
        _check_channel(channel)
        return await self._publish(None, type, data, channel, retain)

    async def _publish(
        self, user_id: str | None, type: str, data: Any, channel: str | None = None, retain: bool = False
    ) -> Event:
        self._check_running()
        type = str(type.value if isinstance(type, EventType) else type)
        timestamp = iso_timestamp()
        head = envelope_head(type, user_id, dumps(data), timestamp, channel)
        started = time.perf_counter()
        try:
            if channel is None:
                record = await self.backend.publish(user_id, head)
            else:
                record = await self.backend.publish_to_channel(channel, head, retain)
        except BackendUnavailable:
            self.stats.backend_errors += 1
            raise
        self.stats.broadcast_duration.observe(time.perf_counter() - started)
        recent = self._recent_ids.pop(record.seq, None)
        if recent is not None and recent[0] == record.epoch:
            event_id = recent[1]
        else:
            event_id = self._sign(record.epoch, record.seq, user_id)
        return Event(type, user_id, data, timestamp, event_id, channel)

    def _sign(self, epoch: str, seq: int, user_id: str | None) -> str:
        assert self._signer is not None
        return self._signer.sign(epoch, seq, user_id)

    def _on_record(self, record: Record) -> None:
        """Fan one event out to this node's sockets. Called by the backend, in seq order, never awaiting."""
        seq = record.seq
        user_id = record.user_id
        event_id = self._sign(record.epoch, seq, user_id)
        recent = self._recent_ids
        if len(recent) >= 256:  # ids no publisher of this node waits for: other nodes' events
            recent.clear()
        recent[seq] = (record.epoch, event_id)
        text = with_id(record.head, event_id)
        message = {"type": "websocket.send", "text": text}
        size = wire_size(text)
        if record.published_at:
            self.stats.pubsub_lag.observe(max(0.0, time.time() - record.published_at))
        channel = record.channel
        if channel is not None:
            connections = self.registry.of_channel(channel)
            if channel in self.channels.joining:  # subscribers whose replay is being read
                self.channels.hold(channel, message, size, seq)
            if not connections:
                return
        elif user_id is None:
            self._last_all = time.monotonic()
            connections = self.registry.everyone()
        else:
            connections = self.registry.of_user(user_id)
            if not connections:
                return
            self._user_activity[user_id] = time.monotonic()
        # One context for the whole fan-out: a wrapper around a server's `send` that sets a context
        # variable and is paused in the middle leaves it there, not in the publisher's context.
        context = contextvars.copy_context()
        sent = context.run(_fan_out, connections, message, size, seq, context)
        stats = self.stats
        stats.messages_sent += sent  # the writers of backed-up sockets count their own
        stats.bytes_sent += sent * size

    # -- control --------------------------------------------------------------------------------------

    async def disconnect_user(self, user_id: str, reason: str = "Disconnected by the server") -> None:
        """Close every connection of `user_id`, on every node, with code 1000 (logout, revoked access).

        Args:
            user_id: the user to disconnect.
            reason: the close reason the clients see (cut to the 123 bytes a close frame allows).

        Raises:
            BackendUnavailable: the backend cannot be reached.
            NotStartedError: `pomo.lifespan` was never started.
        """
        self._check_running()
        reason = fit_reason(reason)
        await self.backend.send_control("disconnect_user", {"user_id": str(user_id), "reason": reason})

    def _on_control(self, kind: str, arguments: Mapping[str, Any]) -> None:
        if kind == "disconnect_user":
            user_id, reason = arguments.get("user_id"), arguments.get("reason")
            if not isinstance(user_id, str):
                logger.warning("Ignored a disconnect_user control message without a user id")
                return
            for connection in self.registry.of_user(user_id):
                connection.abort(1000, reason if isinstance(reason, str) and reason else "Disconnected by the server")
        elif kind == "presence":
            self.channels.on_presence(arguments)
        elif kind in ("subscribe_user", "unsubscribe_user"):
            user_id, channel = arguments.get("user_id"), arguments.get("channel")
            if not isinstance(user_id, str) or not isinstance(channel, str) or channel_problem(channel):
                logger.warning("Ignored a %s control message without a user id and a channel", kind)
                return
            for connection in self.registry.of_user(user_id):
                if kind == "subscribe_user":
                    _ = self.spawn(self.channels.subscribe(connection, channel, None, authorized=True))
                else:
                    reason = arguments.get("reason")
                    self.channels.leave(connection, channel, reason if isinstance(reason, str) else None)
        elif kind == "resync":
            self._resync(arguments)

    async def subscribe_user(self, user_id: str, channel: str) -> None:
        """Subscribe every connection of `user_id`, on every node, to `channel` (no authorization check:
        the server decided). Each gets `SUBSCRIBED`, as if it had asked.

        A reconnecting client re-subscribes through its resume, which is authorized as usual: let
        `authorize_channel` (or the token's `channels` claim) agree.

        Raises:
            ValueError: `channel` is not a valid channel name.
            BackendUnavailable: the backend cannot be reached.
            NotStartedError: `pomo.lifespan` was never started.
        """
        self._check_running()
        _check_channel(channel)
        await self.backend.send_control("subscribe_user", {"user_id": str(user_id), "channel": channel})

    async def unsubscribe_user(self, user_id: str, channel: str, reason: str = "Unsubscribed by the server") -> None:
        """Unsubscribe every connection of `user_id`, on every node, from `channel` at once ("removed from
        the team"): each gets `UNSUBSCRIBED` with `data.reason`, and no further event of the channel.

        Raises:
            ValueError: `channel` is not a valid channel name.
            BackendUnavailable: the backend cannot be reached.
            NotStartedError: `pomo.lifespan` was never started.
        """
        self._check_running()
        _check_channel(channel)
        arguments = {"user_id": str(user_id), "channel": channel, "reason": reason}
        await self.backend.send_control("unsubscribe_user", arguments)

    async def channel_subscriber_count(self, channel: str) -> int:
        """Connections subscribed to `channel`, on every node (this process's, on the memory backend)."""
        self._check_running()
        _check_channel(channel)
        if not self._shared:
            return len(self.registry.of_channel(channel))
        return await self.backend.channel_subscriber_count(channel)

    async def presence(self, channel: str) -> dict[str, int]:
        """Who is in `channel`, on every node: user id to connection count."""
        self._check_running()
        _check_channel(channel)
        if not self._shared and not self.channels.is_presence(channel):
            return dict(collections.Counter(connection.user_id for connection in self.registry.of_channel(channel)))
        return await self.backend.channel_members(channel)

    def _resync(self, arguments: Mapping[str, Any]) -> None:
        """The backend lost events it cannot recover (a new epoch, or history trimmed while this node was
        cut off), and live events continue after the position it gives.

        An established socket stays up: it gets RESYNC_REQUIRED with that position, in band, and then the
        events after it (the client refetches its state, which holds everything before). A socket still
        being established (or subscribing) read a position of the old numbering: it is closed with 1012
        "Service restart", reconnects and resumes, and gets RESYNC_REQUIRED then.
        """
        epoch, seq, reason = arguments.get("epoch"), arguments.get("seq"), arguments.get("reason")
        position = Position(epoch, seq) if isinstance(epoch, str) and isinstance(seq, int) else None
        for connection in self.registry.everyone():
            if position is None or not connection.established or connection.joining:
                connection.abort(1012, "Service restart")
                continue
            connection.rebase(position.seq)
            data = {"reason": reason if isinstance(reason, str) else "new_epoch"}
            connection.notify_with_id(EventType.RESYNC_REQUIRED, data, self._position_id(position, connection.user_id))

    # -- counts ---------------------------------------------------------------------------------------

    def user_connection_count(self, user_id: str) -> int:
        """Connections of `user_id` in this process.

        A connection counts from the moment its handshake is admitted (so that `max_connections_per_user`
        holds for concurrent handshakes); it receives the events published after the position its
        CONNECTION_ESTABLISHED carries.
        """
        return self.registry.user_count(str(user_id))

    def total_connection_count(self) -> int:
        """Connections in this process."""
        return self.registry.total

    async def cluster_user_connection_count(self, user_id: str) -> int:
        """Connections of `user_id` on every node (equal to the local count on the memory backend)."""
        self._check_running()
        if not self._shared:
            return self.user_connection_count(user_id)
        return await self.backend.cluster_user_count(str(user_id))

    async def cluster_total_connection_count(self) -> int:
        """Connections on every node (equal to the local count on the memory backend)."""
        self._check_running()
        if not self._shared:
            return self.total_connection_count()
        return await self.backend.cluster_total_count()

    # -- connections (used by the ASGI app) -----------------------------------------------------------

    async def admit(self, connection: Connection) -> bool:
        """Reserve a slot under `max_connections_per_user` (cluster-wide where the backend shares) and
        register the connection; False when the user has no slot left. Once admitted, the caller must
        `release()` it.

        On a shared backend the node also subscribes to the user's stream here, then counts the
        connection and reads its starting position in one call (`connection.admitted_at`).
        """
        user_id = connection.user_id
        limit = self.settings.max_connections_per_user
        if self.registry.user_count(user_id) >= limit:  # this node's alone fill the slots: no round trip
            return False
        # Registered at once, still RESUMING: a concurrent handshake of the same user sees the slot taken,
        # and the events published from now on are kept for it.
        self.registry.add(connection)
        if not self._shared:
            return True
        try:
            # Subscribed before the count, so every event after the position read with it reaches this node.
            await self._subscriptions.acquire(user_id)
            if connection.released():  # closed meanwhile: the handler sends its close
                return True
            count, connection.admitted_at = await self.backend.add_presence_with_position(
                self.node_id, user_id, connection.id
            )
        except BaseException:
            self._unregister(connection)
            # It may be recorded although the call failed (a lost reply, an error after the write):
            # undo it, whatever the error, or it would count against the user until it expires.
            _ = self.spawn(self.backend.remove_presence(self.node_id, user_id, connection.id))
            raise
        if count <= limit or connection.released():
            return True
        self._unregister(connection)
        await self.backend.remove_presence(self.node_id, user_id, connection.id)
        return False

    def _unregister(self, connection: Connection) -> None:
        """Take a connection out of the registry, and unsubscribe from its user's stream after the last."""
        if self.registry.remove(connection):
            self._user_activity.pop(connection.user_id, None)
            if self._running:
                self._subscriptions.release(connection.user_id)

    async def establish(self, connection: Connection, last_event_id: str | None, channels: Sequence[str] = ()) -> None:
        """Send CONNECTION_ESTABLISHED, the replay (or RESYNC_REQUIRED) and live events (the user's stream
        is subscribed by `admit`).

        `channels` are the handshake's `channels=`: each is authorized, then its events join the replay.
        """
        user_id = connection.user_id
        if connection.released():
            return
        # The position read when the connection was counted holds while nothing was subscribed since.
        admitted_at = None if channels else connection.admitted_at
        resumed = None
        joined: list[str] = []
        if channels:
            resumed = await self.channels.resume(connection, channels)
            joined = resumed.joined
            if connection.released():
                return
        resync_reason: str | None = None
        replay: list[Record] = []
        cursor = self.verify(last_event_id, user_id) if last_event_id else None
        if cursor is not None:
            history = await self.backend.history(user_id, cursor, joined)
            position = history.position
            if history.complete:
                replay = list(history.records)
                position = cursor
                self.stats.replayed += len(replay)
            else:
                resync_reason = "history_unavailable" if cursor.epoch == position.epoch else "new_epoch"
        else:
            if last_event_id:
                resync_reason = "unknown_cursor"
            position = admitted_at if admitted_at is not None else await self.backend.position()
        if last_event_id:
            self.stats.resumes["ok" if resync_reason is None else "resync"] += 1
        established = {
            "message": "WebSocket connection established",
            "connectionId": connection.id,
            "resumed": bool(last_event_id) and resync_reason is None,
            "heartbeatInterval": self.settings.heartbeat_interval,
        }
        # A resumed connection starts at its resume point: hand the client's own cursor back.
        start_id = last_event_id if established["resumed"] else self._position_id(position, user_id)
        messages = [_text(protocol_message(EventType.CONNECTION_ESTABLISHED, user_id, established, start_id))]
        skip_upto = position.seq
        if resync_reason is not None:
            messages.append(
                _text(
                    protocol_message(
                        EventType.RESYNC_REQUIRED,
                        user_id,
                        {"reason": resync_reason},
                        self._position_id(position, user_id),
                    )
                )
            )
        if resumed is not None:
            fresh = not established["resumed"]
            texts = await self.channels.resumed_opening(connection, resumed, position, fresh)
            messages += [_text(text) for text in texts]
        for record in replay:
            messages.append(_text(with_id(record.head, self.sign(record))))
            skip_upto = record.seq
        if connection.released():
            return
        if connection.expires_at is not None:
            self.schedule_expiry(connection)
        connection.establish(messages, skip_upto)
        if resumed is not None:
            self.channels.announce_all(connection, resumed)

    def _position_id(self, position: Position, user_id: str) -> str:
        return self._sign(position.epoch, position.seq, user_id)

    def position_id(self, position: Position) -> str:
        """A position's cursor, valid for every user (a position alone reveals nothing)."""
        return self._sign(position.epoch, position.seq, None)

    def sign(self, record: Record) -> str:
        """A stored event's cursor: bound to its user for a user's event, valid for everyone otherwise."""
        return self._sign(record.epoch, record.seq, record.user_id)

    def verify(self, cursor: str, user_id: str) -> Position | None:
        """The position a client's cursor stands for, or `None` when it is forged, malformed or another user's."""
        assert self._signer is not None
        return self._signer.verify(cursor, user_id)

    def forget(self, connection: Connection) -> None:
        """Forget a closed connection (called once, synchronously, by `Connection.release`)."""
        self.stats.disconnects[connection.close_code] += 1
        if connection.expiry_token >= 0:
            self._forget_expiry(connection)
        if connection.channels:
            self.channels.forget(connection)
        self._unregister(connection)
        if self._shared and self._running:
            _ = self.spawn(self.backend.remove_presence(self.node_id, connection.user_id, connection.id))

    def track(self, closing: Coroutine[Any, Any, None]) -> None:
        """Run a connection's close in a task that shutdown waits for (a bounded time)."""
        task = asyncio.ensure_future(closing)
        self._closers.add(task)
        task.add_done_callback(self._closers.discard)

    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run a background backend call; shutdown cancels it, and its failure is logged."""
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.warning("Background backend call failed: %r", task.exception())

    # -- timers: one shared ticker for heartbeats, token expiry and send timeouts ---------------------

    def schedule_expiry(self, connection: Connection) -> None:
        """(Re)arm the TOKEN_EXPIRING warning and the expiry close for the connection's current token."""
        if connection.expiry_token >= 0:  # a refresh: the old token's entries are garbage now
            self._forget_expiry(connection)
        expires_at = connection.expires_at
        if expires_at is None:
            return
        settings = self.settings
        # Convert the token's wall-clock exp to the monotonic clock once.
        deadline = time.monotonic() + (expires_at - time.time())
        warn_at = deadline - settings.token_expiry_warning
        token = next(self._expiry_ids)
        self._timed[token] = connection
        if settings.token_expiry_warning > 0:
            heapq.heappush(self._expiries, (warn_at, token, _WARN))
        heapq.heappush(self._expiries, (deadline + settings.jwt_leeway, token, _EXPIRE))
        connection.expiry_token = token

    def _forget_expiry(self, connection: Connection) -> None:
        """Drop a connection's timers: it is freed now, whatever its token's `exp`.

        The heap keeps the stale entries, three numbers each, until they outnumber the live ones;
        then one pass drops them all, so the heap stays within a few entries per live connection.
        """
        timed = self._timed
        del timed[connection.expiry_token]
        connection.expiry_token = -1
        heap = self._expiries
        if len(heap) > 4 * len(timed) + 64:
            heap[:] = [entry for entry in heap if entry[1] in timed]
            heapq.heapify(heap)

    def _tick_interval(self) -> float:
        settings = self.settings
        candidates = [1.0, settings.send_timeout / 4]
        if settings.heartbeat_interval > 0:
            candidates.append(settings.heartbeat_interval / 4)
        if settings.token_expiry_warning > 0:
            candidates.append(settings.token_expiry_warning / 4)
        return max(0.02, min(candidates))

    async def _tick_forever(self) -> None:
        interval = self._tick_interval()
        next_heartbeat_scan = 0.0
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            try:
                self._check_send_timeouts(now)
                self._check_expiries(now)
                if self.settings.heartbeat_interval > 0 and now >= next_heartbeat_scan:
                    self._send_heartbeats(now)
                    next_heartbeat_scan = now + min(self.settings.heartbeat_interval / 4, 5.0)
            except Exception:  # pragma: no cover - a bug; keep the timers alive
                logger.exception("starlette-pomo-ws ticker failed")

    def _check_send_timeouts(self, now: float) -> None:
        limit = self.settings.send_timeout
        for outbox in tuple(self.backed_up):
            outbox.check(now, limit)

    def _check_expiries(self, now: float) -> None:
        heap = self._expiries
        timed = self._timed
        while heap and heap[0][0] <= now:
            _, token, kind = heapq.heappop(heap)
            connection = timed.get(token)
            if connection is None:  # closed, or its token was refreshed
                continue
            if kind == _WARN:
                expires_at = connection.expires_at or time.time()
                connection.notify(
                    EventType.TOKEN_EXPIRING,
                    {"expiresAt": iso_timestamp(expires_at), "expiresIn": max(0, round(expires_at - time.time(), 3))},
                )
            else:
                connection.abort(1008, "Authentication token expired")

    def _send_heartbeats(self, now: float) -> None:
        interval = self.settings.heartbeat_interval
        if now - self._last_all < interval:
            return
        activity = self._user_activity
        for connection in self.registry.everyone():
            if not connection.established:
                continue
            last = max(connection.last_sent, activity.get(connection.user_id, 0.0))
            if now - last >= interval:
                connection.notify(EventType.HEARTBEAT)

    # -- health -----------------------------------------------------------------------------------------

    def health(self) -> tuple[int, dict[str, Any]]:
        backend_ok = self._running and self.backend.connected
        body = {
            "status": "ok" if backend_ok else "degraded",
            "backend": {"kind": self.backend.kind, "connected": backend_ok},
            "connections": self.registry.total,
            "users": self.registry.users,
        }
        return (200 if self._accepting else 503), body


def _fan_out(
    connections: Iterable[Connection], message: Message, size: int, seq: int, context: contextvars.Context
) -> int:
    """Hand one event to each connection, inside `context`; return how many sent it at once."""
    sent = 0
    for connection in connections:
        if connection.put(message, size, seq, context):
            sent += 1
    return sent


def _check_channel(channel: str) -> None:
    if problem := channel_problem(channel):
        raise ValueError(f"Invalid channel name {channel!r}: {problem}.")


def _text(text: str) -> dict[str, Any]:
    return {"type": "websocket.send", "text": text}


def fit_reason(reason: str) -> str:
    """A close reason may hold at most 123 bytes of UTF-8."""
    encoded = reason.encode()
    if len(encoded) <= 123:
        return reason
    return encoded[:123].decode(errors="ignore")
