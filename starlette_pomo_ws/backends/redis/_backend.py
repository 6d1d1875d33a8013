"""`RedisBackend`: publishing, history and commands; pub/sub and presence live in their own modules."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import secrets
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError, RedisError

if sys.version_info >= (3, 11):
    from asyncio import timeout as time_limit
else:  # a dependency of redis-py before Python 3.11.3
    from async_timeout import timeout as time_limit

from ..._events import Position
from ..._settings import redact_url
from ...exceptions import BackendUnavailable, ConfigurationError
from ..base import Backend, Control, Deliver, History, Record
from ._batch import Coalescer, Settle
from ._connection import Direct, raise_first_error
from ._members import Change, Members
from ._presence import Presence
from ._pubsub import PubSub
from ._scripts import Script, text
from ._sentinel import SCHEMES, describe, sentinel_client

__all__ = ["RedisBackend"]

logger = logging.getLogger("starlette_pomo_ws")

_T = TypeVar("_T")

_BATCH = 200  # user streams per catch-up script call
_PUBLISH_BATCH = 128  # events per publish script call
_RETAINED_BATCH = 500  # channels per read of their retained state

# The kinds of stream the publish script knows: the broadcast stream, a user's, a channel's, and a
# channel's with the event kept as its retained state.
_BROADCAST, _USER, _CHANNEL, _RETAIN = "0", "1", "2", "3"
# One event to publish: its stream's kind, its stream's name (a user id or a channel; "" for the
# broadcast stream), and its head.
_Publish = tuple[str, str, str]


class RedisBackend(Backend):
    """Events, history and presence in one Redis primary, for many workers and hosts.

    Publishing is one Lua script: it takes the next seq of the one total order, appends to the
    stream and publishes on the stream's channel. Pub/sub is at-most-once, so the node checks its
    position against Redis on every heartbeat and, after any reconnect, fetches what it missed from
    the streams before it delivers anything live; when that is impossible it asks the core to
    resync (`control("resync", "")`).

    Args:
        url: `redis://[[user]:password@]host[:port][/db]` or `rediss://...` for TLS. Query
            arguments go to redis-py (`?ssl_ca_certs=/path/ca.pem`).
        client: a ready `redis.asyncio.Redis` to use instead of `url`. The backend never closes it.
            Its own retry policy applies to publishes: give it `retry=Retry(NoBackoff(), 0)` so that a
            publish whose answer was lost is never stored twice.
        history_size: events kept per stream for resume (trimmed with `MAXLEN ~`, so a few more).
        history_ttl: seconds an event stays replayable.
        key_prefix: the prefix of every key and channel.
        socket_timeout: seconds one Redis operation may take; a publish fails within about twice
            this when Redis cannot be reached.
        presence_ttl: seconds after which a crashed node's connections leave the cluster counts.
        heartbeat_interval: seconds between checks of the pub/sub connection.
        marker_ttl: seconds a stream's last-seq marker is kept; a client idle for less than this
            while none of its events happened resumes cleanly. Defaults to a day.

    Raises:
        ConfigurationError: a contradictory or missing setting.
    """

    kind = "redis"

    def __init__(
        self,
        url: str | None = None,
        *,
        client: aioredis.Redis | None = None,
        history_size: int = 1000,
        history_ttl: float = 120,
        key_prefix: str = "pomo-ws:",
        socket_timeout: float = 2.0,
        presence_ttl: float = 30.0,
        heartbeat_interval: float = 5.0,
        marker_ttl: float | None = None,
        sentinel: Sentinel | None = None,
        service_name: str = "mymaster",
        min_replicas: int = 0,
    ) -> None:
        if sum(x is not None and x != "" for x in (url, client, sentinel)) != 1:
            raise ConfigurationError(
                "RedisBackend needs exactly one of a 'url' (redis://host:port/db or "
                "redis+sentinel://host:26379,host:26380/mymaster/0), a ready 'client', or a 'sentinel'."
            )
        if isinstance(min_replicas, bool) or not isinstance(min_replicas, int) or min_replicas < 0:
            raise ConfigurationError(f"Setting 'redis_min_replicas' must be 0 or more, not {min_replicas!r}.")
        if history_size < 1:
            raise ConfigurationError(f"Setting 'history_size' must be at least 1, not {history_size!r}.")
        if history_ttl <= 0:
            raise ConfigurationError(f"Setting 'history_ttl' must be positive, not {history_ttl!r}.")
        if socket_timeout <= 0 or presence_ttl <= 0 or heartbeat_interval <= 0:
            raise ConfigurationError("RedisBackend timeouts ('socket_timeout', 'presence_ttl', ...) must be positive.")
        self.history_size = history_size
        self.history_ttl = history_ttl
        self.key_prefix = key_prefix
        self._socket_timeout = socket_timeout
        self._op_timeout = 2 * socket_timeout + 0.5  # a connect plus a command
        self._presence_ttl = presence_ttl
        self._heartbeat_interval = heartbeat_interval
        self._marker_ttl = max(int(marker_ttl if marker_ttl is not None else 86400), int(history_ttl) + 1)
        self._clock_bucket = max(1, self._marker_ttl // 256)
        self._instance = secrets.token_hex(6)
        self._client_name = f"pomo-ws-{self._instance}"  # in CLIENT LIST, for operators (and the fault tests)
        self._owns_client = client is None
        self._owns_sentinel = url is not None  # a Sentinel the caller passed stays theirs
        self._min_replicas = min_replicas
        # A candidate epoch starting with '=' tells the scripts that acknowledged events are on replicas.
        self._epoch_mark = "=" if min_replicas else ""
        connection: dict[str, Any] = {
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": socket_timeout,
            # Never resend a command after a failure: a publish must not be stored twice.
            "retry": Retry(NoBackoff(), 0),
            "client_name": self._client_name,
        }
        if sentinel is not None:
            client = sentinel.master_for(service_name, **connection)
            self._url = describe(
                [_address(s.connection_pool) for s in sentinel.sentinels],
                service_name,
                int(client.connection_pool.connection_kwargs.get("db", 0)),
            )
        elif client is None:
            assert url is not None
            try:
                if url.split(":", 1)[0] in SCHEMES:
                    client, self._url = sentinel_client(url, **connection)
                else:
                    self._url = url
                    client = aioredis.Redis.from_url(url, **connection)
            except ValueError as exc:
                raise ConfigurationError(
                    f"Setting 'backend_url' is not a usable Redis URL ({redact_url(url)!r}): {exc}; "
                    "use 'redis://[:password@]host:port/db' or 'rediss://...'."
                ) from exc
        else:
            self._url = _describe(client)
        self._client = client
        self._publish_script = Script(client, "publish")
        self._position_script = Script(client, "position")
        self._history_script = Script(client, "history")
        self._meta_key = f"{key_prefix}meta"
        self._command_ok = False
        self._control: Control | None = None
        self._presence_task: asyncio.Task[None] | None = None
        self._members_task: asyncio.Task[None] | None = None
        self._pubsub = PubSub(
            client,
            url=self._url,
            name=f"{self._client_name}-sub",
            key_prefix=key_prefix,
            socket_timeout=socket_timeout,
            op_timeout=self._op_timeout,
            heartbeat_interval=heartbeat_interval,
            position=self.position,
            read_since=self._read_since,
            barrier=self._barrier,
        )
        self._publish_line = Direct(client, name=f"{self._client_name}-pub", connect_timeout=socket_timeout)
        self._position_line = Direct(client, name=f"{self._client_name}-pos", connect_timeout=socket_timeout)
        self._publishes: Coalescer[_Publish, Record] = Coalescer(
            self._publish_batch, what="publish the event", timeout=self._op_timeout, limit=_PUBLISH_BATCH
        )
        self._positions: Coalescer[None, Position] = Coalescer(
            self._position_batch, what="read the position", timeout=self._op_timeout, limit=10_000
        )
        # Every SUBSCRIBE reads its channel's retained state: a subscribe storm shares round trips and one
        # connection, instead of taking a pooled connection each.
        self._retained_line = Direct(client, name=f"{self._client_name}-retained", connect_timeout=socket_timeout)
        self._retained: Coalescer[str, Record | None] = Coalescer(
            self._retained_batch, what="read the retained events", timeout=self._op_timeout, limit=_RETAINED_BATCH
        )
        self._presence = Presence(
            client,
            key_prefix=key_prefix,
            ttl=presence_ttl,
            meta_key=self._meta_key,
            candidate=self._candidate,
            command=lambda operation, what, timeout: self._command(operation, what, timeout=timeout),
            answer=self._answer,
            bounded=self._bounded,
            timeout=self._op_timeout,
            line=Direct(client, name=f"{self._client_name}-presence", connect_timeout=socket_timeout),
        )
        self._members = Members(
            client,
            key_prefix=key_prefix,
            ttl=presence_ttl,
            command=lambda operation, what, timeout: self._command(operation, what, timeout=timeout),
            answer=self._answer,
            timeout=self._op_timeout,
            line=Direct(client, name=f"{self._client_name}-members", connect_timeout=socket_timeout),
            changed=self._members_changed,
        )

    def _candidate(self) -> str:
        """The epoch a script starts if it finds none (see `epoch.lua`)."""
        return self._epoch_mark + secrets.token_hex(6)

    def __repr__(self) -> str:
        return (
            f"RedisBackend(url={redact_url(self._url)!r}, history_size={self.history_size}, "
            f"history_ttl={self.history_ttl}, key_prefix={self.key_prefix!r})"
        )

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self, deliver: Deliver, control: Control) -> None:
        """Connect, subscribe to the broadcast and control channels, and start the background tasks.

        Raises:
            BackendUnavailable: Redis cannot be reached (or refuses the credentials).
        """
        if self._pubsub.started:
            return
        self._control = control
        await self._pubsub.start(deliver, control, instance=self._instance)
        self._presence.running = self._members.running = True
        self._presence_task = asyncio.create_task(self._presence.refresh_forever(), name="pomo-ws redis presence")
        self._members_task = asyncio.create_task(self._members.refresh_forever(), name="pomo-ws redis members")

    async def stop(self) -> None:
        """Unsubscribe, forget this node's presence, and close what the backend opened. Safe twice."""
        self._control = None
        tasks = {task for task in (self._presence_task, self._members_task) if task is not None}
        self._presence_task = self._members_task = None
        self._presence.running = self._members.running = False
        for task in tasks:
            task.cancel()
        if tasks:
            # Unlike awaiting them, this lets a cancellation of stop() through; and it is bounded, so a
            # refresh whose cancellation was lost cannot hold stop() up (its loop ends by itself).
            await asyncio.wait(tasks, timeout=self._op_timeout)
        await self._pubsub.stop()
        await self._publishes.close()
        await self._publish_line.close()
        await self._positions.close()
        await self._position_line.close()
        await self._retained.close()
        await self._retained_line.close()
        await self._presence.stop()
        await self._members.stop()
        self._command_ok = False
        if self._owns_client:
            with contextlib.suppress(Exception):
                await self._client.aclose()
            pool = self._client.connection_pool
            if isinstance(pool, SentinelConnectionPool) and self._owns_sentinel:
                for sentinel in pool.sentinel_manager.sentinels:
                    with contextlib.suppress(Exception):
                        await sentinel.aclose()

    @property
    def connected(self) -> bool:
        return self._pubsub.live and self._command_ok

    # -- publishing ---------------------------------------------------------------------------

    async def publish(self, user_id: str | None, head: str) -> Record:
        if self._control is None:
            raise BackendUnavailable("The Redis backend is not started; the event was not published.")
        return await self._publishes((_BROADCAST, "", head) if user_id is None else (_USER, user_id, head))

    async def publish_to_channel(self, channel: str, head: str, retain: bool) -> Record:
        """Store the event in the channel's stream (and as its retained state), in the same total order as
        `publish` and in the same coalesced script calls.

        Raises:
            BackendUnavailable: the event was not stored.
        """
        if self._control is None:
            raise BackendUnavailable("The Redis backend is not started; the event was not published.")
        return await self._publishes((_RETAIN if retain else _CHANNEL, channel, head))

    def _publish_batch(self, events: list[_Publish], timeout: float, settle: Settle[Record]) -> None:
        """One script call stores and publishes the whole batch, in order, with consecutive seqs. With
        `redis_min_replicas`, `WAIT` goes in the same write: it counts the replicas that have this
        connection's writes."""
        args: list[str | int] = [
            self._candidate(),
            self.key_prefix,
            self.history_size,
            int(self.history_ttl * 1000),
            self._marker_ttl,
            self._clock_bucket,
        ]
        for kind, name, head in events:
            args += (name, kind, head)
        # WAIT's own timeout leaves room for its answer within the batch's.
        wait_ms = max(1, int(min(timeout, self._socket_timeout) * 800))
        after = [("WAIT", self._min_replicas, wait_ms)] if self._min_replicas else []

        def records(replies: list[Any]) -> list[Record]:
            reply = replies[0]
            if self._min_replicas and int(replies[1]) < self._min_replicas:
                raise RedisError(
                    f"only {int(replies[1])} of {self._min_replicas} replicas (redis_min_replicas) confirmed the "
                    f"event within {wait_ms} ms; it is stored on the primary and may still be delivered"
                )
            epoch, first, published_at = text(reply[0]), int(reply[1]), int(reply[2]) / 1000
            return [
                Record(epoch, first + i, name if kind == _USER else None, head, published_at, _channel(kind, name))
                for i, (kind, name, head) in enumerate(events)
            ]

        self._publish_line.submit_script(
            self._publish_script,
            [self._meta_key],
            args,
            *after,
            timeout=timeout,
            done=self._answer("publish the event", records, settle),
        )

    def _answer(
        self, what: str, decode: Callable[[list[Any]], Sequence[_T]], settle: Settle[_T]
    ) -> Callable[[list[Any] | BaseException], None]:
        """Where a batch's replies go: decoded for its callers, or as `BackendUnavailable` (an error reply
        included), the backend's health following."""

        def done(outcome: list[Any] | BaseException) -> None:
            try:
                if isinstance(outcome, BaseException):
                    raise outcome
                results = decode(raise_first_error(outcome))
            except Exception as exc:
                settle(self._unavailable(what, exc))
            else:
                self._command_ok = True
                settle(results)

        return done

    async def send_control(self, kind: str, arguments: Mapping[str, Any]) -> None:
        """Act on this node at once, then publish to the others.

        Raises:
            BackendUnavailable: the other nodes could not be reached (this one has acted).
        """
        control = self._control
        if control is None:
            raise BackendUnavailable("The Redis backend is not started.")
        # This node acts at once, whatever happens to pub/sub; the others hear it from Redis.
        control(kind, arguments)
        message = json.dumps([self._instance, kind, dict(arguments)])
        await self._command(
            lambda: self._client.publish(self._pubsub.ctl_channel, message), "reach the other nodes", idempotent=False
        )

    # -- history ------------------------------------------------------------------------------

    async def position(self) -> Position:
        # Every caller waiting at once shares one read, sent after each of them asked.
        return await self._positions(None)

    def _position_batch(self, callers: list[None], timeout: float, settle: Settle[Position]) -> None:
        def positions(replies: list[Any]) -> list[Position]:
            reply = replies[0]
            return [Position(text(reply[0]), int(reply[1]))] * len(callers)

        self._position_line.submit_script(
            self._position_script,
            [self._meta_key],
            [self._candidate()],
            timeout=timeout,
            done=self._answer("read the position", positions, settle),
            retry=True,
        )

    async def _barrier(self, channel: str, token: str) -> None:
        """Publish `token|epoch|seq` on `channel` behind every event published so far (the pub/sub heartbeat)."""
        arguments = [self._candidate(), channel, token]
        await self._command(lambda: self._position_script([self._meta_key], arguments), "read the position")

    async def history(self, user_id: str | None, since: Position, channels: Sequence[str] = ()) -> History:
        """The user's, the broadcast and the channels' events after `since`, read by one script, so that the
        streams meet exactly at the returned position."""
        users = () if user_id is None else (user_id,)
        complete, records, position = await self._read(since, users, channels, broadcast=user_id is not None, until=0)
        return History(complete, records, position)

    async def _read(
        self, since: Position, users: Sequence[str], channels: Sequence[str], *, broadcast: bool, until: int
    ) -> tuple[bool, list[Record], Position]:
        args: list[str | int | float] = [
            self._candidate(),
            self.key_prefix,
            since.epoch,
            since.seq,
            until,
            int(self.history_ttl * 1000),
            self._marker_ttl,
            self._clock_bucket + 2,  # margin for the checkpoints' granularity and clock steps
            "1" if broadcast else "0",
            len(users),
            *users,
            *channels,
        ]
        reply = await self._command(lambda: self._history_script(keys=[self._meta_key], args=args), "read the history")
        position = Position(text(reply[0]), int(reply[1]))
        if not int(reply[2]):
            return False, [], position
        streams: list[tuple[str | None, str | None]] = [(None, None)] if broadcast else []
        streams.extend((user, None) for user in users)
        streams.extend((None, channel) for channel in channels)
        records: list[Record] = []
        runs = 0
        epoch = position.epoch
        for (user, channel), flat in zip(streams, reply[3:], strict=True):
            if flat:
                runs += 1
                records.extend(
                    Record(epoch, int(flat[i]), user, text(flat[i + 1]), int(flat[i + 2]) / 1000, channel)
                    for i in range(0, len(flat), 3)
                )
        if runs > 1:
            records.sort(key=lambda r: r.seq)  # merges sorted runs in linear time
        return True, records, position

    async def _read_since(
        self, since: Position, users: Sequence[str], channels: Sequence[str] = ()
    ) -> tuple[bool, list[Record], Position]:
        """Everything after `since` on the broadcast stream and the streams of `users` and `channels`, for the
        catch-up."""
        complete, records, position = await self._read(
            since, users[:_BATCH], channels[: max(0, _BATCH - len(users))], broadcast=True, until=0
        )
        # Later batches stop at the first one's position: later events arrive live.
        for start in range(_BATCH, len(users) + len(channels), _BATCH):
            if not complete:
                break
            more_complete, more, later = await self._read(
                since,
                users[start : start + _BATCH],
                channels[max(0, start - len(users)) : max(0, start + _BATCH - len(users))],
                broadcast=False,
                until=position.seq,
            )
            complete = more_complete and later.epoch == position.epoch
            records.extend(more)
        records.sort(key=lambda r: r.seq)
        return complete, records, position

    # -- subscriptions ------------------------------------------------------------------------

    async def subscribe(self, user_id: str) -> None:
        await self._pubsub.subscribe(user_id)

    async def unsubscribe(self, user_id: str) -> None:
        await self._pubsub.unsubscribe(user_id)

    async def subscribe_channel(self, channel: str) -> None:
        await self._pubsub.subscribe_channel(channel)

    async def unsubscribe_channel(self, channel: str) -> None:
        await self._pubsub.unsubscribe_channel(channel)

    # -- channels' state ----------------------------------------------------------------------

    async def retained(self, channels: Sequence[str]) -> dict[str, Record]:
        """The retained event of each channel that has one. The reads of every caller in the same moment
        share round trips (up to 500 channels each) on the backend's own connection."""
        records = await self._retained.many(channels)
        return {channel: record for channel, record in zip(channels, records, strict=True) if record is not None}

    def _retained_batch(self, channels: list[str], timeout: float, settle: Settle[Record | None]) -> None:
        fields = ("e", "s", "t", "h")
        commands = [("HMGET", f"{self.key_prefix}retained:{channel}", *fields) for channel in channels]

        def records(replies: list[Any]) -> list[Record | None]:
            return [
                None if head is None else Record(text(epoch), int(seq), None, text(head), int(stamp) / 1000, channel)
                for channel, (epoch, seq, stamp, head) in zip(channels, replies, strict=True)
            ]

        # An error reply (a key of another type) becomes BackendUnavailable.
        self._retained_line.submit(
            commands, timeout, self._answer("read the retained events", records, settle), retry=True
        )

    # -- presence -----------------------------------------------------------------------------

    async def add_presence(self, node_id: str, user_id: str, connection_id: str) -> int:
        """Count a connection cluster-wide and return its user's count.

        Raises:
            BackendUnavailable: Redis cannot be reached; the connection is then not counted.
        """
        count, _ = await self._presence.add(node_id, user_id, connection_id)
        return count

    async def add_presence_with_position(self, node_id: str, user_id: str, connection_id: str) -> tuple[int, Position]:
        """`add_presence`, and the position read by the same script call.

        Raises:
            BackendUnavailable: Redis cannot be reached; the connection is then not counted.
        """
        return await self._presence.add(node_id, user_id, connection_id)

    async def remove_presence(self, node_id: str, user_id: str, connection_id: str) -> None:
        """Forget a connection. A Redis fault is not raised: the periodic refresh repairs the counts."""
        await self._presence.remove(node_id, user_id, connection_id)

    async def join_channel(self, node_id: str, channel: str, user_id: str) -> tuple[int, int]:
        """Count a connection in the channel, cluster-wide; coalesced with the joins and leaves of the same moment.

        Raises:
            BackendUnavailable: Redis cannot be reached; the connection is then not counted.
        """
        return await self._members.join(node_id, channel, user_id)

    async def leave_channel(self, node_id: str, channel: str, user_id: str) -> tuple[int, int]:
        """Count one connection less.

        Raises:
            BackendUnavailable: Redis cannot be reached; this node has forgotten the connection, and its
                next refresh writes that to Redis.
        """
        return await self._members.leave(node_id, channel, user_id)

    async def channel_members(self, channel: str) -> dict[str, int]:
        return await self._members.members(channel)

    async def channel_subscriber_count(self, channel: str) -> int:
        return await self._members.subscriber_count(channel)

    async def _members_changed(self, joined: list[Change], left: list[Change]) -> None:
        """Announce to every node the users whose membership changed without a join or leave: the members
        of a dead node, forgotten here (or of a node forgotten as dead that came back). `users` is the
        channel's number of users after the change, for the `presence_max_members` rule."""
        messages = [
            {"channel": channel, "user_id": user_id, "joined": was_joined, "users": users}
            for was_joined, changes in ((True, joined), (False, left))
            for channel, user_id, users in changes
        ]
        control = self._control
        if control is not None:
            for arguments in messages:
                control("presence", arguments)
        channel_name = self._pubsub.ctl_channel
        for start in range(0, len(messages), 1000):
            payloads = [json.dumps([self._instance, "presence", m]) for m in messages[start : start + 1000]]
            await self._command(
                functools.partial(self._publish_all, channel_name, payloads),
                "reach the other nodes",
                idempotent=False,
            )

    async def _publish_all(self, channel: bytes, payloads: list[str]) -> None:
        async with self._client.pipeline(transaction=False) as pipe:
            for payload in payloads:
                _ = pipe.publish(channel, payload)
            await pipe.execute()

    async def cluster_user_count(self, user_id: str) -> int:
        return await self._presence.user_count(user_id)

    async def cluster_total_count(self) -> int:
        return await self._presence.total_count()

    # -- plumbing -----------------------------------------------------------------------------

    async def _bounded(self, operation: Awaitable[_T]) -> _T:
        async with time_limit(self._op_timeout):
            return await operation

    async def _command(
        self,
        operation: Callable[[], Awaitable[_T]],
        what: str,
        *,
        idempotent: bool = True,
        timeout: float | None = None,
    ) -> _T:
        """Run one Redis operation within `timeout` (default `_op_timeout`), as `BackendUnavailable` when it fails.

        An idempotent operation is tried once more on a dropped connection (a pooled connection that
        Redis closed while idle); a publish never is, so that it cannot be stored twice.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self._op_timeout if timeout is None else timeout)
        attempts = 2 if idempotent else 1
        while True:
            attempts -= 1
            try:
                async with time_limit(max(0.05, deadline - loop.time())):
                    result = await operation()
            except RedisConnectionError as exc:
                if attempts > 0 and loop.time() < deadline:
                    continue
                failure: BaseException = exc
            except (RedisError, OSError, asyncio.TimeoutError) as exc:
                failure = exc
            else:
                self._command_ok = True
                return result
            raise self._unavailable(what, failure) from failure

    def _unavailable(self, what: str, failure: BaseException) -> BackendUnavailable:
        """Why `what` failed, for its caller; the backend's health follows."""
        self._command_ok = False
        detail = str(failure) or type(failure).__name__
        if isinstance(failure, asyncio.TimeoutError):
            detail = f"no answer within {self._op_timeout:.1f}s"
        error = BackendUnavailable(f"Cannot {what}: Redis at {redact_url(self._url)} failed ({detail}).")
        error.__cause__ = failure
        return error


def _channel(kind: str, name: str) -> str | None:
    return name if kind in (_CHANNEL, _RETAIN) else None


def _address(pool: Any) -> tuple[str, int]:
    kwargs = pool.connection_kwargs
    return str(kwargs.get("host", "localhost")), int(kwargs.get("port", 26379))


def _describe(client: aioredis.Redis) -> str:
    pool = client.connection_pool
    if isinstance(pool, SentinelConnectionPool):
        sentinels = [_address(s.connection_pool) for s in pool.sentinel_manager.sentinels]
        return describe(sentinels, pool.service_name, int(pool.connection_kwargs.get("db", 0)))
    kwargs = pool.connection_kwargs
    if "path" in kwargs:
        return f"unix://{kwargs['path']}"
    scheme = "rediss" if "ssl" in client.connection_pool.connection_class.__name__.lower() else "redis"
    return f"{scheme}://{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"
