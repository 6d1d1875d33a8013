"""The one pub/sub connection of a node: subscriptions, the catch-up after a reconnect, and the heartbeat.

Pub/sub is at-most-once, so the session checks its position against Redis on every heartbeat (a
barrier published behind every event so far) and, after any reconnect, fetches what it missed from the
streams before it delivers anything live; when that is impossible it asks the core to resync
(`control("resync", {})`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import redis.asyncio as aioredis

from ..._events import Position
from ..._settings import redact_url
from ...exceptions import BackendUnavailable
from ..base import Control, Deliver, Record
from ._connection import Line, open_line

__all__ = ["PubSub", "parse"]

logger = logging.getLogger("starlette_pomo_ws")

_CHANNELS_PER_SUBSCRIBE = 500

# (since, users, channels) -> (complete, records in seq order, position)
ReadSince = Callable[[Position, Sequence[str], Sequence[str]], Awaitable[tuple[bool, list[Record], Position]]]
# (channel, token) -> None, once Redis has published `token|epoch|seq` on the channel, behind every event up to seq
Barrier = Callable[[str, str], Awaitable[None]]
_BARRIERS_KEPT = 16  # markers not heard back yet; an older one whose marker never came is forgotten


class PubSub:
    """Owns the pub/sub connection: a runner task reconnects it with backoff, and every reconnect
    resubscribes and catches up from `tracked`, the last position this node is sure it delivered."""

    _backoff_base = 0.05
    _backoff_cap = 5.0

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        url: str,
        name: str,
        key_prefix: str,
        socket_timeout: float,
        op_timeout: float,
        heartbeat_interval: float,
        position: Callable[[], Awaitable[Position]],
        read_since: ReadSince,
        barrier: Barrier,
    ) -> None:
        self._client = client
        self._url = url
        self.name = name  # the CLIENT SETNAME of the connection, for operators (and the fault tests)
        self._socket_timeout = socket_timeout
        self._op_timeout = op_timeout
        self._heartbeat_interval = heartbeat_interval
        self._position = position
        self._read_since = read_since
        self._barrier = barrier
        self._key_prefix = key_prefix
        self.ctl_channel = f"{key_prefix}ctl".encode()
        self._all_channel = f"{key_prefix}all".encode()
        self._user_channel = f"{key_prefix}u:".encode()
        self._channel_channel = f"{key_prefix}c:".encode()

        self._deliver: Deliver | None = None
        self._control: Control | None = None
        self._instance = ""
        self._stopping = False
        self._runner: asyncio.Task[None] | None = None
        self._line: Line | None = None
        # While the session subscribes and catches up, the live events wait here (None once live).
        self._buffer: list[Record] | None = None
        self._waiters: dict[bytes, collections.deque[asyncio.Future[None]]] = {}
        # (SUBSCRIBE or UNSUBSCRIBE, channel) waiting to be sent, in the order they were asked for
        self._outgoing: collections.deque[tuple[str, bytes]] = collections.deque()
        self._flush_scheduled = False
        self.users: set[str] = set()
        self.channels: set[str] = set()  # the channels (of `broadcast_to_channel`) this node subscribes to
        self.tracked: Position | None = None  # the last (epoch, seq) this node is sure it has delivered
        self._epoch_switches = 0
        self._barrier_channel = b""  # this node's own, for its heartbeat's markers (named at start)
        self._barriers: dict[bytes, int] = {}  # the token of each marker on its way -> _epoch_switches then
        self._barrier_ids = itertools.count(1)
        self._last_heard = 0.0
        self.live = False
        self._was_live = False

    async def start(self, deliver: Deliver, control: Control, *, instance: str) -> None:
        """Connect and subscribe; return once live events flow.

        Raises:
            BackendUnavailable: Redis cannot be reached within the start timeout.
        """
        self._deliver = deliver
        self._control = control
        self._instance = instance
        self._barrier_channel = f"{self._key_prefix}n:{instance}".encode()
        self._stopping = False
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._runner = asyncio.create_task(self._run(ready), name="pomo-ws redis pub/sub")
        try:
            await asyncio.wait_for(asyncio.shield(ready), self._op_timeout * 2)
        except BaseException as exc:
            await self.stop()
            if isinstance(exc, asyncio.TimeoutError):
                raise BackendUnavailable(
                    f"Redis at {redact_url(self._url)} did not answer within {self._op_timeout * 2:.1f}s."
                ) from exc
            raise

    @property
    def started(self) -> bool:
        return self._runner is not None

    async def stop(self) -> None:
        self._stopping = True
        # Closing the connection ends the session even when its cancellation is lost: `wait_for` on
        # Python 3.10 and 3.11 drops one that arrives as the awaited call completes.
        if self._line is not None:
            self._line.close()
        runner, self._runner = self._runner, None
        if runner is not None:
            runner.cancel()
            await asyncio.wait({runner})  # unlike awaiting it, this lets a cancellation of stop() through
        self._deliver = None
        self._control = None

    # -- subscriptions ------------------------------------------------------------------------

    async def subscribe(self, user_id: str) -> None:
        self.users.add(user_id)
        await self._subscribe(self._user_channel + user_id.encode())

    async def subscribe_channel(self, name: str) -> None:
        self.channels.add(name)
        await self._subscribe(self._channel_channel + name.encode())

    async def _subscribe(self, channel: bytes) -> None:
        line = self._line
        if line is None:
            return  # the next connection subscribes it, and catches up from this node's position
        # Only once Redis confirms are later events sure to arrive; history() may then be read.
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.setdefault(channel, collections.deque()).append(waiter)
        self._queue("SUBSCRIBE", channel)
        timer = loop.call_later(self._op_timeout, _expire, waiter)  # cheaper than a wait_for task per call
        try:
            await waiter
        except asyncio.TimeoutError:
            # Returning unconfirmed could lose events after the caller's history read: start over instead,
            # and the next connection catches up.
            logger.warning("Redis pub/sub did not confirm a subscription within %.1fs; reconnecting", self._op_timeout)
            self._drop(line)
        finally:
            timer.cancel()

    def _queue(self, command: str, channel: bytes) -> None:
        # The (un)subscriptions asked for in the same moment go out together, once that moment is over.
        self._outgoing.append((command, channel))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        outgoing = self._outgoing
        line = self._line
        if line is None or line.lost:
            # Lost meanwhile: its end released the waiters, and the next connection subscribes every
            # user and channel still held. (A command meant for a lost connection is harmless on the next.)
            outgoing.clear()
            return
        commands: list[tuple[bytes | str, ...]] = []
        while outgoing:
            command = outgoing[0][0]
            channels: list[bytes] = []
            while outgoing and outgoing[0][0] == command and len(channels) < _CHANNELS_PER_SUBSCRIBE:
                channels.append(outgoing.popleft()[1])
            commands.append((command, *channels))
        line.write(commands)

    async def unsubscribe(self, user_id: str) -> None:
        self.users.discard(user_id)
        if self._line is not None:
            self._queue("UNSUBSCRIBE", self._user_channel + user_id.encode())

    async def unsubscribe_channel(self, name: str) -> None:
        self.channels.discard(name)
        if self._line is not None:
            self._queue("UNSUBSCRIBE", self._channel_channel + name.encode())

    def _send(
        self, line: Line, command: str, args: Sequence[bytes], *, wait: bool = True
    ) -> list[asyncio.Future[None]]:
        if line is not self._line or line.lost:
            return [_done()]
        waiters: list[asyncio.Future[None]] = []
        if wait:
            loop = asyncio.get_running_loop()
            for channel in args:
                waiter: asyncio.Future[None] = loop.create_future()
                self._waiters.setdefault(channel, collections.deque()).append(waiter)
                waiters.append(waiter)
        line.write([(command, *args)])
        return waiters

    def _drop(self, line: Line) -> None:
        if line is self._line:
            line.close()

    # -- the connection -----------------------------------------------------------------------

    async def _run(self, ready: asyncio.Future[None]) -> None:
        attempt = 0
        while not self._stopping:
            started = time.monotonic()
            self._was_live = False
            try:
                await self._session(ready)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not ready.done():
                    ready.set_exception(
                        BackendUnavailable(f"Cannot connect to Redis at {redact_url(self._url)}: {exc}")
                    )
                    return
                if self._is_stopping():
                    return
                # One warning when a working connection is lost; the failed attempts after it at debug level.
                log = logger.warning if self._was_live else logger.debug
                log(
                    "Redis pub/sub connection to %s lost (%s: %s); open sockets stay up, reconnecting",
                    redact_url(self._url),
                    type(exc).__name__,
                    str(exc) or "timed out",
                )
            if time.monotonic() - started > self._backoff_cap:
                attempt = 0  # that session lived: start the backoff again
            delay = random.uniform(0, min(self._backoff_cap, self._backoff_base * 2**attempt))
            attempt += 1
            await asyncio.sleep(delay)

    def _is_stopping(self) -> bool:
        return self._stopping  # a method, since stop() flips the flag while _run() awaits

    async def _session(self, ready: asyncio.Future[None]) -> None:
        line: Line | None = None
        heartbeat: asyncio.Task[None] | None = None
        try:
            connecting = open_line(
                self._client, name=self.name, connect_timeout=self._socket_timeout, on_reply=self._on_reply
            )
            line = await asyncio.wait_for(connecting, self._op_timeout)
            if self._is_stopping():  # stop() came as the connection did, and its cancellation was lost
                return
            self._buffer = []
            # From here on subscribe() sends its own SUBSCRIBE, so no user can fall between the two.
            self._line = line
            channels = [self.ctl_channel, self._all_channel, self._barrier_channel]
            channels.extend(self._user_channel + user.encode() for user in list(self.users))
            channels.extend(self._channel_channel + name.encode() for name in list(self.channels))
            pending: list[asyncio.Future[None]] = []
            for start in range(0, len(channels), _CHANNELS_PER_SUBSCRIBE):
                pending += self._send(line, "SUBSCRIBE", channels[start : start + _CHANNELS_PER_SUBSCRIBE])
            confirmed = asyncio.gather(*pending)
            either: set[asyncio.Future[Any]] = {confirmed, line.ended}
            await asyncio.wait(either, timeout=self._op_timeout, return_when=asyncio.FIRST_COMPLETED)
            if line.error is not None:
                raise line.error
            if not confirmed.done():
                raise TimeoutError("Redis did not confirm the subscriptions")
            await self._catch_up()
            self.live = self._was_live = True
            if not ready.done():
                ready.set_result(None)
            else:
                logger.info("Redis pub/sub connection to %s restored", redact_url(self._url))
            heartbeat = asyncio.create_task(self._heartbeat(line), name="pomo-ws redis heartbeat")
            # Heard is a heartbeat's marker (or pong) coming back: a connection that gets messages but not the
            # markers is on a server that does not follow the primary, and is replaced as a silent one is.
            self._last_heard = time.monotonic()
            silence = 2 * self._heartbeat_interval + self._op_timeout
            while not self._is_stopping():
                # Replies are handled as they arrive (`_on_reply`); this only watches for an end, or silence.
                await asyncio.wait({line.ended}, timeout=self._heartbeat_interval)
                if line.error is not None:
                    raise line.error
                if time.monotonic() - self._last_heard > silence:
                    raise TimeoutError(f"no answer from Redis pub/sub for {silence:.1f}s")
        finally:
            self.live = False
            self._buffer = None
            if line is not None and self._line is line:
                self._line = None
            if heartbeat is not None:
                heartbeat.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await heartbeat
            for waiters in self._waiters.values():
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_result(None)  # the next connection resubscribes and catches up
            self._waiters.clear()
            self._barriers.clear()
            if line is not None:
                line.close()

    async def _catch_up(self) -> None:
        tracked = self.tracked
        if tracked is None:
            self.tracked = await self._position()
        else:
            complete, records, position = await self._read_since(tracked, list(self.users), list(self.channels))
            if position.epoch != tracked.epoch or not complete:
                logger.warning(
                    "Events published while Redis pub/sub was down can no longer be fetched (%s); "
                    "resyncing local connections",
                    "Redis lost its data" if position.epoch != tracked.epoch else "history trimmed",
                )
                self.tracked = position
                reason = "new_epoch" if position.epoch != tracked.epoch else "history_unavailable"
                self._signal("resync", {"epoch": position.epoch, "seq": position.seq, "reason": reason})
            else:
                if records:
                    logger.info("Redis pub/sub caught up %d missed events", len(records))
                for record in records:
                    if record.seq > tracked.seq:
                        self._emit(record)
                self.tracked = position
        buffered, self._buffer = self._buffer or [], None
        for record in buffered:
            self._accept(record)

    async def _heartbeat(self, line: Line) -> None:
        """Every interval, a barrier: the primary publishes a marker with its position on this node's own
        channel, behind every event up to that position. Whichever server this connection is on (the
        primary, or a replica, which relays the primary's messages in the primary's order), those events
        reach it before the marker does, so `tracked` may move up to the marker's position (`_on_marker`).

        A marker that never arrives (this connection reached a server that does not follow the primary:
        an old primary in a failover) moves nothing, and the silence ends the session. A `PING` stands in
        when the marker cannot be published, so that this connection's own silence is still noticed.
        """
        # Until the session lets go of its line: a heartbeat whose cancellation was lost (as the barrier
        # call completed) still ends, and the session's `finally`, which awaits it, does not hang.
        while line is self._line:
            await asyncio.sleep(self._heartbeat_interval)
            token = str(next(self._barrier_ids))
            barriers = self._barriers
            if len(barriers) >= _BARRIERS_KEPT:
                del barriers[next(iter(barriers))]
            barriers[token.encode()] = self._epoch_switches
            try:
                await self._barrier(self._barrier_channel.decode(), token)
            except BackendUnavailable as exc:
                logger.debug("Redis heartbeat could not publish its barrier: %s", exc)
                del barriers[token.encode()]
                self._send(line, "PING", [], wait=False)

    # -- what arrives -------------------------------------------------------------------------

    def _on_reply(self, message: Any) -> None:
        """Each reply of the pub/sub connection, as it is parsed."""
        if isinstance(message, Exception):
            raise message  # an error reply: the connection ends, and the next one starts over
        buffered = self._buffer
        if not isinstance(message, list) or not message:
            return
        kind = message[0]
        if kind == b"message":
            channel, data = message[1], _bytes(message[2])
            if channel == self.ctl_channel:
                self._on_control(data)
                return
            if channel == self._barrier_channel:
                self._on_marker(data)
                return
            record = parse(data)
            if record is None:
                logger.warning("Ignored a malformed message on Redis channel %r", channel)
            elif buffered is not None:
                buffered.append(record)
            else:
                self._accept(record)
        elif kind == b"subscribe":
            waiters = self._waiters.get(message[1])
            if waiters:
                waiter = waiters.popleft()
                if not waiter.done():
                    waiter.set_result(None)
                if not waiters:
                    del self._waiters[message[1]]
        elif kind == b"pong":
            self._last_heard = time.monotonic()

    def _on_marker(self, data: bytes) -> None:
        """A heartbeat's barrier came back: every event up to its position has arrived (see `_heartbeat`)."""
        try:
            token, epoch, seq = data.split(b"|", 2)
            barrier = Position(epoch.decode(), int(seq))
        except (ValueError, UnicodeDecodeError):
            logger.warning("Ignored a malformed heartbeat marker from Redis")
            return
        switches = self._barriers.pop(token, None)
        if switches is None:
            return  # not this session's
        self._last_heard = time.monotonic()
        tracked = self.tracked  # set before the session went live, and so before any heartbeat
        if tracked is None:
            return
        if barrier.epoch == tracked.epoch:
            if barrier.seq > tracked.seq:
                self.tracked = barrier
        elif switches == self._epoch_switches:
            self.tracked = barrier  # a new epoch began with no event for this node yet

    def _accept(self, record: Record) -> None:
        tracked = self.tracked
        assert tracked is not None
        if record.epoch != tracked.epoch:
            # Redis lost or flushed its data while this connection stayed up: nothing was missed here,
            # and old cursors get RESYNC_REQUIRED from history().
            self._epoch_switches += 1
        elif record.seq <= tracked.seq:
            return  # already delivered (fetched while catching up)
        self.tracked = Position(record.epoch, record.seq)
        self._emit(record)

    def _emit(self, record: Record) -> None:
        deliver = self._deliver
        if deliver is None:
            return
        try:
            deliver(record)
        except Exception:
            logger.exception("Delivering an event from Redis failed")

    def _on_control(self, data: bytes) -> None:
        try:
            origin, kind, arguments = json.loads(data)
        except (ValueError, TypeError):
            logger.warning("Ignored a malformed control message from Redis")
            return
        if not isinstance(arguments, dict):
            logger.warning("Ignored a malformed control message from Redis")
            return
        if origin != self._instance:
            self._signal(str(kind), arguments)

    def _signal(self, kind: str, arguments: Mapping[str, Any]) -> None:
        control = self._control
        if control is None:
            return
        try:
            control(kind, arguments)
        except Exception:
            logger.exception("Handling the control message %r failed", kind)


def parse(data: bytes) -> Record | None:
    """A `Record` from a message on a user, broadcast or channel's channel, or None when it is malformed.

    The length field is the user id's, -1 for the broadcast stream, or `c` and the channel name's.
    """
    try:
        epoch, seq, stamp, length, rest = data.split(b"|", 4)
        published_at = int(stamp) / 1000
        if length[:1] == b"c":
            size = int(length[1:])
            return Record(epoch.decode(), int(seq), None, rest[size:].decode(), published_at, rest[:size].decode())
        size = int(length)
        if size < 0:
            return Record(epoch.decode(), int(seq), None, rest.decode(), published_at)
        return Record(epoch.decode(), int(seq), rest[:size].decode(), rest[size:].decode(), published_at)
    except (ValueError, UnicodeDecodeError):
        return None


def _bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(asyncio.TimeoutError())


def _done() -> asyncio.Future[None]:
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    future.set_result(None)
    return future
