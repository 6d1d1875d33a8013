"""The `redis://` backend: one Redis primary carries every node's events, history and presence.

Layout in Redis (`P` is `key_prefix`, `E` the current epoch):

- `Pmeta` (hash): `epoch`, the one `seq` of the total order, and the current clock `bucket`.
  When it is lost (a flush, a restart without persistence, an eviction), the next script starts
  a new random epoch, so every old cursor gets `RESYNC_REQUIRED` and never a stale replay.
- `PE:u:<user>` and `PE:all` (streams): the history, entry id `<seq>-0`, fields `h` (the envelope
  head), `t` (milliseconds) and `p` (the seq of the previous entry of the same stream). The `p` of
  the oldest retained entry is the newest entry that was trimmed, which makes trimming exact.
- `PE:l:<user>` and `PE:lall` (strings): the last seq of a stream. They outlive the stream, so a
  stream that expired whole is told apart from one that never had an event after a cursor.
- `PE:clock` (sorted set): checkpoints `(time, seq)` that bound how far back those markers reach.
- `Pnode:<node id>` (hash) and `Pnodes` (sorted set): presence, refreshed by each node.

Channels: `Pu:<user>`, `Pall` and `Pctl`. A message is `<epoch>|<seq>|<user id length>|<user id><head>`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import logging
import random
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError, RedisError

from .._events import Position
from .._settings import redact_url
from ..exceptions import BackendUnavailable, ConfigurationError
from .base import Backend, Control, Deliver, History, Record

__all__ = ["RedisBackend"]

logger = logging.getLogger("starlette_pomo_ws")

_T = TypeVar("_T")

# Lua shared by the scripts: find the epoch, starting a new one when the metadata is gone.
_EPOCH = """
local meta = KEYS[1]
local epoch = redis.call('HGET', meta, 'epoch')
if not epoch then
  epoch = ARGV[1]
  redis.call('HSET', meta, 'epoch', epoch, 'seq', 0, 'bucket', -1)
end
"""

# ARGV: candidate epoch, prefix, user id, is user ('1'/'0'), head, history size, history ttl (ms),
# marker ttl (s), clock bucket (s).
_PUBLISH = (
    _EPOCH
    + """
local prefix = ARGV[2]
local seq = redis.call('HINCRBY', meta, 'seq', 1)
local clock = redis.call('TIME')
local now = tonumber(clock[1])
local now_ms = now * 1000 + math.floor(tonumber(clock[2]) / 1000)
local marker_ttl = tonumber(ARGV[8])
local bucket = math.floor(now / tonumber(ARGV[9]))
if tonumber(redis.call('HGET', meta, 'bucket') or -1) ~= bucket then
  -- every seq up to seq - 1 was given out before now
  local checkpoints = prefix .. epoch .. ':clock'
  redis.call('HSET', meta, 'bucket', bucket)
  redis.call('ZADD', checkpoints, now, seq - 1)
  redis.call('ZREMRANGEBYSCORE', checkpoints, '-inf', '(' .. (now - marker_ttl))
  redis.call('EXPIRE', checkpoints, marker_ttl + 2 * tonumber(ARGV[9]))
end
local uid = ARGV[3]
local stream, last, channel, ulen
if ARGV[4] == '1' then
  stream = prefix .. epoch .. ':u:' .. uid
  last = prefix .. epoch .. ':l:' .. uid
  channel = prefix .. 'u:' .. uid
  ulen = string.len(uid)
else
  stream = prefix .. epoch .. ':all'
  last = prefix .. epoch .. ':lall'
  channel = prefix .. 'all'
  ulen = -1
end
-- Drop entries older than the history TTL (a few per publish), so an active stream keeps only
-- what can still be replayed. The `p` of the first kept entry then names the last one dropped.
local horizon = now_ms - tonumber(ARGV[7])
local function stamp(fields)
  for i = 1, #fields, 2 do
    if fields[i] == 't' then return tonumber(fields[i + 1]) end
  end
  return 0
end
local oldest = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)
if oldest[1] and stamp(oldest[1][2]) < horizon then
  local cut
  for _, entry in ipairs(redis.call('XRANGE', stream, '-', '+', 'COUNT', 32)) do
    if stamp(entry[2]) >= horizon then
      cut = entry[1]
      break
    end
    cut = (tonumber(string.sub(entry[1], 1, -3)) + 1) .. '-0'
  end
  redis.call('XTRIM', stream, 'MINID', cut)
end
local prev = redis.call('GET', last) or '0'
redis.call('XADD', stream, 'MAXLEN', '~', ARGV[6], seq .. '-0', 'h', ARGV[5], 'p', prev, 't', now_ms)
redis.call('PEXPIRE', stream, ARGV[7])
redis.call('SET', last, seq, 'EX', marker_ttl)
redis.call('PUBLISH', channel, epoch .. '|' .. seq .. '|' .. ulen .. '|' .. uid .. ARGV[5])
return {epoch, seq}
"""
)

_POSITION = (
    _EPOCH
    + """
return {epoch, tonumber(redis.call('HGET', meta, 'seq'))}
"""
)

# ARGV: candidate epoch, prefix, since epoch, since seq, until seq (0: now), history ttl (ms),
# marker ttl (s), clock margin (s), include the broadcast stream ('1'/'0'), user ids...
# Returns {epoch, seq, complete, {seq, head, ...} per stream (broadcast first)}.
_HISTORY = (
    _EPOCH
    + """
local prefix = ARGV[2]
local seq = tonumber(redis.call('HGET', meta, 'seq'))
local since = tonumber(ARGV[4])
if ARGV[3] ~= epoch or since > seq then
  return {epoch, seq, 0}
end
local upto = tonumber(ARGV[5])
if upto <= 0 or upto > seq then
  upto = seq
end
local clock = redis.call('TIME')
local now = tonumber(clock[1])
local horizon = now * 1000 + math.floor(tonumber(clock[2]) / 1000) - tonumber(ARGV[6])
local watermark = nil
local function lowest_known()
  -- Markers of streams whose last event is above this seq have not expired yet.
  if watermark == nil then
    local young = redis.call('ZRANGEBYSCORE', prefix .. epoch .. ':clock',
      '(' .. (now - tonumber(ARGV[7]) + tonumber(ARGV[8])), '+inf', 'LIMIT', 0, 1)
    if young[1] then watermark = tonumber(young[1]) else watermark = seq end
  end
  return watermark
end
local function read(stream, last)
  local first = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)
  if first[1] == nil then
    local newest = redis.call('GET', last)
    if newest then
      if tonumber(newest) > since then return nil end
    elseif since < lowest_known() then
      return nil
    end
    return {}
  end
  local fields = first[1][2]
  for i = 1, #fields, 2 do
    if fields[i] == 'p' and tonumber(fields[i + 1]) > since then return nil end
  end
  local out = {}
  if since >= upto then return out end
  for _, entry in ipairs(redis.call('XRANGE', stream, '(' .. since .. '-0', upto .. '-0')) do
    local head, stamp
    local f = entry[2]
    for i = 1, #f, 2 do
      if f[i] == 'h' then head = f[i + 1] elseif f[i] == 't' then stamp = tonumber(f[i + 1]) end
    end
    if stamp < horizon then return nil end
    out[#out + 1] = string.sub(entry[1], 1, -3)
    out[#out + 1] = head
  end
  return out
end
local result = {epoch, upto, 1}
if ARGV[9] == '1' then
  local records = read(prefix .. epoch .. ':all', prefix .. epoch .. ':lall')
  if records == nil then return {epoch, seq, 0} end
  result[#result + 1] = records
end
for i = 10, #ARGV do
  local records = read(prefix .. epoch .. ':u:' .. ARGV[i], prefix .. epoch .. ':l:' .. ARGV[i])
  if records == nil then return {epoch, seq, 0} end
  result[#result + 1] = records
end
return result
"""
)

# Presence. KEYS: the node set, this node's hash. ARGV: node id, prefix, ttl (ms), user field or '',
# its count, this node's total, and the user field to count across the cluster.
_PRESENCE = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local ttl = tonumber(ARGV[3])
if ARGV[4] ~= '' then
  if tonumber(ARGV[5]) > 0 then
    redis.call('HSET', KEYS[2], ARGV[4], ARGV[5])
  else
    redis.call('HDEL', KEYS[2], ARGV[4])
  end
end
if ARGV[6] ~= '' then
  redis.call('HSET', KEYS[2], 't', ARGV[6])
  redis.call('PEXPIRE', KEYS[2], ttl)
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
end
if ARGV[7] == '' then return 0 end
local total = 0
for _, node in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')) do
  local count = redis.call('HGET', ARGV[2] .. 'node:' .. node, ARGV[7])
  if count then total = total + tonumber(count) end
end
return total
"""

# KEYS: the node set, this node's hash. ARGV: node id, ttl (ms). Returns 0 when the hash was lost.
_TOUCH = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. now)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
return redis.call('PEXPIRE', KEYS[2], ARGV[2])
"""

_BATCH = 200  # user streams per catch-up script call
_CHANNELS_PER_SUBSCRIBE = 500


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


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

    _backoff_base = 0.05
    _backoff_cap = 5.0

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
    ) -> None:
        if client is None and not url:
            raise ConfigurationError("RedisBackend needs a 'url' (redis://host:port/db) or a ready 'client'.")
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
        if client is None:
            assert url is not None
            self._url = url
            try:
                client = aioredis.Redis.from_url(
                    url,
                    socket_timeout=socket_timeout,
                    socket_connect_timeout=socket_timeout,
                    # Never resend a command after a failure: a publish must not be stored twice.
                    retry=Retry(NoBackoff(), 0),
                    client_name=self._client_name,
                )
            except ValueError as exc:
                raise ConfigurationError(
                    f"Setting 'backend_url' is not a usable Redis URL ({redact_url(url)!r}): {exc}; "
                    "use 'redis://[:password@]host:port/db' or 'rediss://...'."
                ) from exc
        else:
            self._url = _describe(client)
        self._client = client
        self._publish_script = client.register_script(_PUBLISH)
        self._position_script = client.register_script(_POSITION)
        self._history_script = client.register_script(_HISTORY)
        self._presence_script = client.register_script(_PRESENCE)
        self._touch_script = client.register_script(_TOUCH)
        self._meta_key = f"{key_prefix}meta"
        self._nodes_key = f"{key_prefix}nodes"
        self._ctl_channel = f"{key_prefix}ctl".encode()
        self._all_channel = f"{key_prefix}all".encode()
        self._user_channel = f"{key_prefix}u:".encode()

        self._deliver: Deliver | None = None
        self._control: Control | None = None
        self._stopping = False
        self._runner: asyncio.Task[None] | None = None
        self._presence_task: asyncio.Task[None] | None = None
        # pub/sub state, owned by the runner task
        self._conn: AbstractConnection | None = None
        self._write_lock: asyncio.Lock | None = None
        self._waiters: dict[bytes, collections.deque[asyncio.Future[None]]] = {}
        self._users: set[str] = set()
        self._tracked: Position | None = None  # the last (epoch, seq) this node is sure it has delivered
        self._epoch_switches = 0
        self._barriers: dict[bytes, tuple[Position | None, int]] = {}
        self._ping_ids = itertools.count(1)
        self._last_heard = 0.0
        self._live = False
        self._was_live = False
        self._command_ok = False
        self._pubsub_name = f"{self._client_name}-sub"
        # presence: node id -> user id -> connection ids
        self._presence: dict[str, dict[str, set[str]]] = {}
        self._presence_lock: asyncio.Lock | None = None
        self._presence_dirty: set[str] = set()

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
        if self._runner is not None:
            return
        self._deliver = deliver
        self._control = control
        self._stopping = False
        self._write_lock = asyncio.Lock()
        self._presence_lock = asyncio.Lock()
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
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
        self._presence_task = asyncio.create_task(self._refresh_presence(), name="pomo-ws redis presence")

    async def stop(self) -> None:
        """Unsubscribe, forget this node's presence, and close what the backend opened. Safe twice."""
        self._stopping = True
        tasks = [t for t in (self._runner, self._presence_task) if t is not None]
        self._runner = self._presence_task = None
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)  # unlike awaiting them, this lets a cancellation of stop() through
        if self._presence:
            nodes = list(self._presence)
            self._presence.clear()
            with contextlib.suppress(Exception):
                await self._bounded(self._forget_nodes(nodes))
        self._deliver = None
        self._control = None
        self._command_ok = False
        if self._owns_client:
            with contextlib.suppress(Exception):
                await self._client.aclose()

    @property
    def connected(self) -> bool:
        return self._live and self._command_ok

    # -- publishing ---------------------------------------------------------------------------

    async def publish(self, user_id: str | None, head: str) -> Record:
        if self._deliver is None:
            raise BackendUnavailable("The Redis backend is not started; the event was not published.")
        args = (
            secrets.token_hex(6),
            self.key_prefix,
            user_id or "",
            "0" if user_id is None else "1",
            head,
            self.history_size,
            int(self.history_ttl * 1000),
            self._marker_ttl,
            self._clock_bucket,
        )
        reply = await self._command(
            lambda: self._publish_script(keys=[self._meta_key], args=args), "publish the event", idempotent=False
        )
        return Record(_text(reply[0]), int(reply[1]), user_id, head)

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
            lambda: self._client.publish(self._ctl_channel, message), "reach the other nodes", idempotent=False
        )

    # -- history ------------------------------------------------------------------------------

    async def position(self) -> Position:
        reply = await self._command(
            lambda: self._position_script(keys=[self._meta_key], args=[secrets.token_hex(6)]), "read the position"
        )
        return Position(_text(reply[0]), int(reply[1]))

    async def history(self, user_id: str, since: Position) -> History:
        complete, records, position = await self._read(since, [user_id], broadcast=True, until=0)
        return History(complete, records, position)

    async def _read(
        self, since: Position, users: Sequence[str], *, broadcast: bool, until: int
    ) -> tuple[bool, list[Record], Position]:
        args: list[str | int | float] = [
            secrets.token_hex(6),
            self.key_prefix,
            since.epoch,
            since.seq,
            until,
            int(self.history_ttl * 1000),
            self._marker_ttl,
            self._clock_bucket + 2,  # margin for the checkpoints' granularity and clock steps
            "1" if broadcast else "0",
            *users,
        ]
        reply = await self._command(lambda: self._history_script(keys=[self._meta_key], args=args), "read the history")
        position = Position(_text(reply[0]), int(reply[1]))
        if not int(reply[2]):
            return False, [], position
        streams: list[str | None] = [None] if broadcast else []
        streams.extend(users)
        records: list[Record] = []
        runs = 0
        for stream_user, flat in zip(streams, reply[3:], strict=True):
            if flat:
                runs += 1
                records.extend(
                    Record(position.epoch, int(flat[i]), stream_user, _text(flat[i + 1]))
                    for i in range(0, len(flat), 2)
                )
        if runs > 1:
            records.sort(key=lambda r: r.seq)  # merges sorted runs in linear time
        return True, records, position

    # -- subscriptions ------------------------------------------------------------------------

    async def subscribe(self, user_id: str) -> None:
        self._users.add(user_id)
        conn = self._conn
        if conn is None:
            return  # the next connection subscribes it, and catches up from this node's position
        try:
            await asyncio.wait_for(self._confirmed(conn, self._user_channel + user_id.encode()), self._op_timeout)
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            # Returning unconfirmed could lose events after the caller's history read: start over instead,
            # and the next connection catches up.
            logger.warning("Redis pub/sub did not confirm a subscription (%s); reconnecting", str(exc) or "timeout")
            await self._drop(conn)

    async def _confirmed(self, conn: AbstractConnection, channel: bytes) -> None:
        # Only once Redis confirms are later events sure to arrive; history() may then be read.
        waiters = await self._send(conn, "SUBSCRIBE", [channel])
        await waiters[0]

    async def unsubscribe(self, user_id: str) -> None:
        self._users.discard(user_id)
        conn = self._conn
        if conn is not None:
            with contextlib.suppress(RedisError, OSError):
                await self._send(conn, "UNSUBSCRIBE", [self._user_channel + user_id.encode()], wait=False)

    async def _send(
        self, conn: AbstractConnection, command: str, args: Sequence[bytes], *, wait: bool = True
    ) -> list[asyncio.Future[None]]:
        assert self._write_lock is not None
        waiters: list[asyncio.Future[None]] = []
        async with self._write_lock:
            if conn is not self._conn:
                return [_done()]
            if wait:
                loop = asyncio.get_running_loop()
                for channel in args:
                    waiter: asyncio.Future[None] = loop.create_future()
                    self._waiters.setdefault(channel, collections.deque()).append(waiter)
                    waiters.append(waiter)
            await conn.send_command(command, *args, check_health=False)
        return waiters

    async def _drop(self, conn: AbstractConnection) -> None:
        if conn is self._conn:
            with contextlib.suppress(Exception):
                await conn.disconnect(nowait=True)

    # -- the pub/sub connection ---------------------------------------------------------------

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

    def _connection(self) -> AbstractConnection:
        pool = self._client.connection_pool
        # Maintenance notifications need RESP3, and this connection speaks RESP2 pub/sub.
        kwargs = {k: v for k, v in pool.connection_kwargs.items() if "maint_notifications" not in k}
        kwargs.update(
            # Our own reads wait for messages; the heartbeat bounds them.
            socket_timeout=None,
            socket_connect_timeout=self._socket_timeout,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
            protocol=2,
            decode_responses=False,
            client_name=self._pubsub_name,
        )
        connection: AbstractConnection = pool.connection_class(**kwargs)
        return connection

    async def _session(self, ready: asyncio.Future[None]) -> None:
        conn = self._connection()
        heartbeat: asyncio.Task[None] | None = None
        try:
            await asyncio.wait_for(conn.connect(), self._op_timeout)  # type: ignore[no-untyped-call]
            self._last_heard = time.monotonic()
            # From here on subscribe() sends its own SUBSCRIBE, so no user can fall between the two.
            self._conn = conn
            channels = [self._ctl_channel, self._all_channel]
            channels.extend(self._user_channel + user.encode() for user in list(self._users))
            pending: list[asyncio.Future[None]] = []
            for start in range(0, len(channels), _CHANNELS_PER_SUBSCRIBE):
                pending += await self._send(conn, "SUBSCRIBE", channels[start : start + _CHANNELS_PER_SUBSCRIBE])
            buffered: list[Record] = []
            deadline = time.monotonic() + self._op_timeout
            while not all(w.done() for w in pending):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("Redis did not confirm the subscriptions")
                message = await conn.read_response(timeout=remaining)
                if message is not None:
                    self._handle(message, buffered)
            await self._catch_up(buffered)
            self._live = self._was_live = True
            self._command_ok = True
            if not ready.done():
                ready.set_result(None)
            else:
                logger.info("Redis pub/sub connection to %s restored", redact_url(self._url))
            heartbeat = asyncio.create_task(self._heartbeat(conn), name="pomo-ws redis heartbeat")
            silence = 2 * self._heartbeat_interval + self._op_timeout
            while True:
                message = await conn.read_response(timeout=self._heartbeat_interval)
                if message is not None:
                    self._handle(message, None)
                elif time.monotonic() - self._last_heard > silence:
                    raise TimeoutError(f"no answer from Redis pub/sub for {silence:.1f}s")
        finally:
            self._live = False
            if self._conn is conn:
                self._conn = None
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
            with contextlib.suppress(Exception):
                await conn.disconnect(nowait=True)

    async def _catch_up(self, buffered: list[Record]) -> None:
        tracked = self._tracked
        if tracked is None:
            self._tracked = await self.position()
        else:
            complete, records, position = await self._read_since(tracked)
            if position.epoch != tracked.epoch or not complete:
                logger.warning(
                    "Events published while Redis pub/sub was down can no longer be fetched (%s); "
                    "resyncing local connections",
                    "Redis lost its data" if position.epoch != tracked.epoch else "history trimmed",
                )
                self._tracked = position
                self._signal("resync", {})
            else:
                if records:
                    logger.info("Redis pub/sub caught up %d missed events", len(records))
                for record in records:
                    if record.seq > tracked.seq:
                        self._emit(record)
                self._tracked = position
        for record in buffered:
            self._accept(record)

    async def _read_since(self, since: Position) -> tuple[bool, list[Record], Position]:
        users = list(self._users)
        complete, records, position = await self._read(since, users[:_BATCH], broadcast=True, until=0)
        # Later batches stop at the first one's position: later events arrive live.
        for start in range(_BATCH, len(users), _BATCH):
            if not complete:
                break
            more_complete, more, later = await self._read(
                since, users[start : start + _BATCH], broadcast=False, until=position.seq
            )
            complete = more_complete and later.epoch == position.epoch
            records.extend(more)
        records.sort(key=lambda r: r.seq)
        return complete, records, position

    async def _heartbeat(self, conn: AbstractConnection) -> None:
        while True:
            await asyncio.sleep(self._heartbeat_interval)
            barrier: Position | None = None
            try:
                barrier = await self.position()
            except BackendUnavailable as exc:
                logger.debug("Redis heartbeat could not read the position: %s", exc)
            token = str(next(self._ping_ids)).encode()
            self._barriers[token] = (barrier, self._epoch_switches)
            try:
                await self._send(conn, "PING", [token], wait=False)
            except (RedisError, OSError):
                return  # the reader notices

    def _handle(self, message: Any, buffered: list[Record] | None) -> None:
        self._last_heard = time.monotonic()
        if not isinstance(message, list) or not message:
            return
        kind = message[0]
        if kind == b"message":
            channel, data = message[1], _bytes(message[2])
            if channel == self._ctl_channel:
                self._on_control(data)
                return
            record = _parse(data)
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
        elif kind == b"pong" and len(message) > 1:
            barrier, switches = self._barriers.pop(_bytes(message[1]), (None, 0))
            tracked = self._tracked
            if barrier is None or tracked is None or buffered is not None:
                return
            # Every event published before the barrier was read reached this connection before the pong.
            if barrier.epoch == tracked.epoch:
                if barrier.seq > tracked.seq:
                    self._tracked = barrier
            elif switches == self._epoch_switches:
                self._tracked = barrier  # a new epoch began with no event for this node yet

    def _accept(self, record: Record) -> None:
        tracked = self._tracked
        assert tracked is not None
        if record.epoch != tracked.epoch:
            # Redis lost or flushed its data while this connection stayed up: nothing was missed here,
            # and old cursors get RESYNC_REQUIRED from history().
            self._epoch_switches += 1
        elif record.seq <= tracked.seq:
            return  # already delivered (fetched while catching up)
        self._tracked = Position(record.epoch, record.seq)
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

    # -- presence -----------------------------------------------------------------------------

    async def add_presence(self, node_id: str, user_id: str, connection_id: str) -> int:
        """Count a connection cluster-wide and return its user's count.

        Raises:
            BackendUnavailable: Redis cannot be reached; the connection is then not counted.
        """
        users = self._presence.setdefault(node_id, {})
        connections = users.setdefault(user_id, set())
        if connection_id in connections:
            return await self.cluster_user_count(user_id)
        connections.add(connection_id)
        try:
            return await self._write_presence(node_id, user_id)
        except BackendUnavailable:
            self._forget_locally(node_id, user_id, connection_id)
            raise

    async def remove_presence(self, node_id: str, user_id: str, connection_id: str) -> None:
        """Forget a connection. A Redis fault is not raised: the periodic refresh repairs the counts."""
        if not self._forget_locally(node_id, user_id, connection_id):
            return
        with contextlib.suppress(BackendUnavailable):
            await self._write_presence(node_id, user_id)

    def _forget_locally(self, node_id: str, user_id: str, connection_id: str) -> bool:
        users = self._presence.get(node_id)
        connections = users.get(user_id) if users is not None else None
        if users is None or connections is None or connection_id not in connections:
            return False
        connections.discard(connection_id)
        if not connections:
            del users[user_id]
        return True

    async def _write_presence(self, node_id: str, user_id: str) -> int:
        assert self._presence_lock is not None, "start() the backend first"
        # Absolute values under a lock: a failed write is repaired by the next one or the refresh.
        async with self._presence_lock:
            users = self._presence.get(node_id, {})
            field = f"u:{user_id}"
            args = (
                node_id,
                self.key_prefix,
                int(self._presence_ttl * 1000),
                field,
                len(users.get(user_id, ())),
                sum(len(c) for c in users.values()),
                field,
            )
            try:
                count = await self._command(
                    lambda: self._presence_script(keys=[self._nodes_key, self._node_key(node_id)], args=args),
                    "update the connection counts",
                )
            except BackendUnavailable:
                self._presence_dirty.add(node_id)
                raise
            return int(count)

    async def cluster_user_count(self, user_id: str) -> int:
        return await self._count(f"u:{user_id}")

    async def cluster_total_count(self) -> int:
        return await self._count("t")

    async def _count(self, field: str) -> int:
        args = ("", self.key_prefix, int(self._presence_ttl * 1000), "", 0, "", field)
        count = await self._command(
            lambda: self._presence_script(keys=[self._nodes_key, self._node_key("")], args=args), "count connections"
        )
        return int(count)

    def _node_key(self, node_id: str) -> str:
        return f"{self.key_prefix}node:{node_id}"

    async def _refresh_presence(self) -> None:
        assert self._presence_lock is not None
        while True:
            await asyncio.sleep(self._presence_ttl / 3)
            for node_id in list(self._presence):
                try:
                    async with self._presence_lock:
                        await self._bounded(self._refresh_node(node_id))
                except (BackendUnavailable, RedisError, OSError, asyncio.TimeoutError) as exc:
                    self._presence_dirty.add(node_id)
                    logger.debug("Refreshing presence in Redis failed: %s", exc)

    async def _refresh_node(self, node_id: str) -> None:
        key = self._node_key(node_id)
        ttl = int(self._presence_ttl * 1000)
        alive = await self._touch_script(keys=[self._nodes_key, key], args=[node_id, ttl])
        if alive and node_id not in self._presence_dirty:
            return
        # The hash was lost (a flush) or a write failed: write this node's view again.
        users = self._presence.get(node_id, {})
        fields: dict[str, int] = {f"u:{u}": len(c) for u, c in users.items()}
        fields["t"] = sum(fields.values())
        async with self._client.pipeline(transaction=True) as pipe:
            # A pipeline queues the commands; their results come from execute().
            _ = pipe.delete(key)
            _ = pipe.hset(key, mapping=fields)  # type: ignore[arg-type]  # redis-py wants dict[str | bytes, ...]
            _ = pipe.pexpire(key, ttl)
            await pipe.execute()
        self._presence_dirty.discard(node_id)

    async def _forget_nodes(self, nodes: Iterable[str]) -> None:
        async with self._client.pipeline(transaction=True) as pipe:
            for node_id in nodes:
                _ = pipe.delete(self._node_key(node_id))
                _ = pipe.zrem(self._nodes_key, node_id)
            await pipe.execute()

    # -- plumbing -----------------------------------------------------------------------------

    async def _bounded(self, operation: Awaitable[_T]) -> _T:
        return await asyncio.wait_for(operation, self._op_timeout)

    async def _command(self, operation: Callable[[], Awaitable[_T]], what: str, *, idempotent: bool = True) -> _T:
        """Run one Redis operation within `_op_timeout`, as `BackendUnavailable` when it fails.

        An idempotent operation is tried once more on a dropped connection (a pooled connection that
        Redis closed while idle); a publish never is, so that it cannot be stored twice.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._op_timeout
        attempts = 2 if idempotent else 1
        while True:
            attempts -= 1
            try:
                result = await asyncio.wait_for(operation(), max(0.05, deadline - loop.time()))
            except RedisConnectionError as exc:
                if attempts > 0 and loop.time() < deadline:
                    continue
                failure: BaseException = exc
            except (RedisError, OSError, asyncio.TimeoutError) as exc:
                failure = exc
            else:
                self._command_ok = True
                return result
            self._command_ok = False
            detail = str(failure) or type(failure).__name__
            if isinstance(failure, asyncio.TimeoutError):
                detail = f"no answer within {self._op_timeout:.1f}s"
            raise BackendUnavailable(f"Cannot {what}: Redis at {redact_url(self._url)} failed ({detail}).") from failure


def _parse(data: bytes) -> Record | None:
    try:
        epoch, seq, length, rest = data.split(b"|", 3)
        size = int(length)
        if size < 0:
            return Record(epoch.decode(), int(seq), None, rest.decode())
        return Record(epoch.decode(), int(seq), rest[:size].decode(), rest[size:].decode())
    except (ValueError, UnicodeDecodeError):
        return None


def _done() -> asyncio.Future[None]:
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    future.set_result(None)
    return future


def _describe(client: aioredis.Redis) -> str:
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return f"unix://{kwargs['path']}"
    scheme = "rediss" if "ssl" in client.connection_pool.connection_class.__name__.lower() else "redis"
    return f"{scheme}://{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"
