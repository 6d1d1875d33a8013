"""Connections of the backend's own, outside redis-py's pool: the pub/sub session's, and the batches'.

They are made like the pool's (same host or Sentinel-resolved primary, credentials, TLS), but speak
RESP2 without decoding, with no socket timeout of their own: each call carries its deadline.

`Direct` carries the batches of one `Coalescer` (publishes, positions, presence, channel
members, retained state).
Through `Redis.execute_command` a script call costs about 190 µs of a node's CPU on our 2-core
machine (the pool, a retry wrapper, a task per socket write on Python 3.11, argument encoding); on
a connection of its own, packed by hand, about 110 µs. A coalescer sends one batch at a time, so
one connection serves all its batches, in order.

Once redis-py has connected one (TLS, AUTH, SELECT, CLIENT SETNAME), `open_line()` takes its
transport over with a `Line`: replies are parsed as they arrive (by hiredis when it is installed,
else by `Resp2Reader`) and go in that same step to the submitter's callback, or to the pub/sub
session's handler: no stream reader, no read loop, no task and no timeout per call.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis._parsers.base import BaseParser
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError, InvalidResponse, NoScriptError

from ._scripts import Script

if sys.version_info >= (3, 11):
    from asyncio import timeout as time_limit
else:  # a dependency of redis-py before Python 3.11.3
    from async_timeout import timeout as time_limit

# hiredis's reply parser, in C; the `redis` extra installs it. Without it, `Resp2Reader` below.
HIREDIS_READER: Any = None
try:
    import hiredis

    HIREDIS_READER = hiredis.Reader
except ImportError:  # pragma: no cover - tested by setting HIREDIS_READER to None
    pass

__all__ = ["Direct", "Line", "Resp2Reader", "open_line", "own_connection", "pack", "raise_first_error"]

Command = Sequence[str | int | bytes]


def own_connection(client: aioredis.Redis, *, name: str, connect_timeout: float) -> AbstractConnection:
    """A new, unconnected connection to where `client`'s pool connects."""
    pool = client.connection_pool
    # Maintenance notifications need RESP3, and these connections speak RESP2.
    kwargs = {k: v for k, v in pool.connection_kwargs.items() if "maint_notifications" not in k}
    kwargs.update(
        socket_timeout=None,  # every read and write is bounded by its caller
        socket_connect_timeout=connect_timeout,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
        protocol=2,
        decode_responses=False,
        client_name=name,
    )
    connection: AbstractConnection = pool.connection_class(**kwargs)
    return connection


def pack(commands: Sequence[Command]) -> bytes:
    """The commands in RESP, as one write: `*<count>` then `$<length>` and the bytes of each part."""
    out: list[bytes] = []
    for command in commands:
        out.append(b"*%d\r\n" % len(command))
        for part in command:
            data = part if isinstance(part, bytes) else part.encode() if isinstance(part, str) else b"%d" % part
            out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def reply_error(message: str) -> Exception:
    """The exception redis-py gives an error reply (`NOSCRIPT` -> `NoScriptError`, `READONLY` -> ...)."""
    error: Exception = BaseParser.parse_error(message)  # type: ignore[no-untyped-call]
    return error


class _Incomplete(Exception):
    pass


class Resp2Reader:
    """RESP2 replies from the bytes fed so far, for when hiredis is missing; `gets()` returns the next
    reply, or False until it is complete. Error replies are returned (not raised), as by hiredis."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def gets(self) -> Any:
        try:
            reply, end = self._parse(0)
        except _Incomplete:
            return False
        del self._buffer[:end]
        return reply

    def _parse(self, start: int) -> tuple[Any, int]:
        buffer = self._buffer
        newline = buffer.find(b"\r\n", start)
        if newline < 0:
            raise _Incomplete
        kind, line, at = buffer[start], bytes(buffer[start + 1 : newline]), newline + 2
        if kind == 43:  # +simple string
            return line, at
        if kind == 45:  # -error
            return reply_error(line.decode(errors="replace")), at
        if kind == 58:  # :integer
            return int(line), at
        if kind == 36:  # $bulk string, -1 for nil
            size = int(line)
            if size < 0:
                return None, at
            if len(buffer) < at + size + 2:
                raise _Incomplete
            return bytes(buffer[at : at + size]), at + size + 2
        if kind == 42:  # *array, -1 for nil
            count = int(line)
            if count < 0:
                return None, at
            items: list[Any] = []
            for _ in range(count):
                item, at = self._parse(at)
                items.append(item)
            return items, at
        raise InvalidResponse(f"Protocol error, got {bytes([kind])!r} as reply type byte")


def _reader() -> Any:
    if HIREDIS_READER is not None:
        return HIREDIS_READER(protocolError=InvalidResponse, replyError=reply_error)
    return Resp2Reader()


# What a submitted call gets back: its replies (an error reply as its exception, in place), or why the
# connection failed.
Done = Callable[[list[Any] | BaseException], None]


class Line(asyncio.Protocol):
    """The protocol of a connected transport. Replies are parsed as they arrive: each goes to `on_reply`
    when there is one (pub/sub); or else `submit(commands, done, deadline)` writes the commands, and
    `done` gets their replies in the same step as the last of them is parsed. Calls are answered in the
    order they were written. If the connection ends first, every call still waiting gets the reason;
    a call still waiting at its deadline ends the connection (its reply may yet come: out of step).
    An exception from `on_reply` ends the connection."""

    def __init__(
        self, transport: asyncio.Transport, keep: object = None, on_reply: Callable[[Any], None] | None = None
    ) -> None:
        self.transport = transport
        self._keep = keep  # the StreamWriter it came from, which closes the transport when collected
        self._on_reply = on_reply
        self._reader = _reader()
        # The calls waiting, oldest first: (how many replies, the replies so far, where they go, deadline).
        self._waiting: collections.deque[tuple[int, list[Any], Done, float]] = collections.deque()
        # One timer for the deadlines, not one per call: it is left running when a call is answered, and
        # when it fires it looks at the oldest call still waiting.
        self._timer: asyncio.TimerHandle | None = None
        self.error: Exception | None = None  # why it is closed, or closing
        self.ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()  # done once closed

    @property
    def lost(self) -> bool:
        """Closed, or closing."""
        return self.error is not None

    def submit(self, commands: Sequence[Command], done: Done, deadline: float = math.inf) -> None:
        """Write the commands; `done` gets their replies, or why the connection ended first (at `deadline`,
        in the event loop's time, at the latest)."""
        if self.error is not None:
            done(self.error)
            return
        self._waiting.append((len(commands), [], done, deadline))
        timer = self._timer
        if deadline != math.inf and (timer is None or deadline < timer.when()):
            if timer is not None:
                timer.cancel()
            self._timer = asyncio.get_running_loop().call_at(deadline, self._check_deadline)
        self.transport.write(pack(commands))

    def write(self, commands: Sequence[Command]) -> None:
        """Write commands whose replies go to `on_reply` (pub/sub)."""
        self.transport.write(pack(commands))

    def data_received(self, data: bytes) -> None:
        try:
            self._reader.feed(data)
            while (reply := self._reader.gets()) is not False:
                if self._on_reply is not None:
                    self._on_reply(reply)
                    continue
                if not self._waiting:
                    raise InvalidResponse("Redis sent a reply nobody asked for")
                count, replies, done, _ = self._waiting[0]
                replies.append(reply)
                if len(replies) == count:
                    self._waiting.popleft()
                    done(replies)
        except Exception as exc:  # out of step for good: a protocol error, or an error reply to pub/sub
            self._end(exc)

    def eof_received(self) -> bool:
        return False  # close: Redis ended the connection

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(RedisConnectionError(f"Connection to Redis lost: {exc}" if exc else "Redis closed the connection"))
        if not self.ended.done():
            self.ended.set_result(None)

    def close(self) -> None:
        self._end(RedisConnectionError("Connection to Redis closed by this process"))

    def _check_deadline(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        deadline = min((entry[3] for entry in self._waiting), default=math.inf)
        if deadline == math.inf:
            return
        if deadline <= loop.time() + 0.001:  # the loop runs a timer up to its clock's resolution early
            self._end(asyncio.TimeoutError())  # its reply may still come: out of step for good
        else:
            self._timer = loop.call_at(deadline, self._check_deadline)

    def _end(self, error: Exception) -> None:
        if self.error is None:
            self.error = error
        self.transport.close()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiting = self._waiting
        while waiting:
            waiting.popleft()[2](self.error)


async def open_line(
    client: aioredis.Redis, *, name: str, connect_timeout: float, on_reply: Callable[[Any], None] | None = None
) -> Line:
    """Connect as `client`'s pool would (TLS, AUTH, SELECT, CLIENT SETNAME), then take the transport over."""
    conn = own_connection(client, name=name, connect_timeout=connect_timeout)
    try:
        await conn.connect()  # type: ignore[no-untyped-call]
    except BaseException:  # a cancelled connect (the caller's timeout) leaves no socket behind
        with contextlib.suppress(Exception):
            await conn.disconnect(nowait=True)
        raise
    writer = conn._writer
    assert writer is not None
    # The transport is the line's from here on: redis-py must neither read it nor close it.
    conn._reader = conn._writer = None
    transport: asyncio.Transport = writer.transport  # type: ignore[assignment]
    line = Line(transport, keep=writer, on_reply=on_reply)
    transport.set_protocol(line)
    return line


def raise_first_error(replies: list[Any]) -> list[Any]:
    """The replies, once none of them is an error reply; else the first error is raised."""
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return replies


class Direct:
    """One connection for one caller at a time (a coalescer sends its batches one by one).

    `submit(commands, timeout, done)` writes the commands at once; `done` gets one reply per command (an
    error reply as its `ResponseError`, in place: the connection stays in step) in the same step as the
    last of them is parsed, or else the exception: the connection failed, or `timeout` passed first.
    Such a failure drops the connection, whose state is then unknown; the next call connects again.
    Only connecting (the first call, or the first after a failure) takes a task.

    `await direct(command, ...)` does the same for a caller that awaits, and bounds the call itself; a
    cancelled call drops the connection too.
    """

    def __init__(self, client: aioredis.Redis, *, name: str, connect_timeout: float) -> None:
        self._client = client
        self._name = name
        self._connect_timeout = connect_timeout
        self._line: Line | None = None
        self._connecting: asyncio.Task[None] | None = None

    def submit(self, commands: Sequence[Command], timeout: float | None, done: Done, *, retry: bool = False) -> None:
        """With `retry`, a call whose connection was lost (Redis closed an idle one, say) is sent once more on a
        new one, if it has time left; a call that must not run twice (a publish) goes without."""
        loop = asyncio.get_running_loop()
        deadline = math.inf if timeout is None else loop.time() + timeout
        line = self._line
        if line is not None and not line.lost:
            self._write(line, commands, deadline, done, retry)
        else:
            self._line = None
            self._connecting = loop.create_task(self._connect_then(commands, deadline, done))

    def submit_script(
        self,
        script: Script,
        keys: Sequence[str],
        args: Sequence[str | int],
        *after: Command,
        timeout: float | None,
        done: Done,
        retry: bool = False,
    ) -> None:
        """Run `script`, then the commands `after` in the same write. A server that does not know the script
        yet (restarted, or promoted) runs nothing and answers `NOSCRIPT`: the script is then loaded and
        everything sent again, in one write."""
        loop = asyncio.get_running_loop()
        deadline = math.inf if timeout is None else loop.time() + timeout
        commands = [("EVALSHA", script.sha, len(keys), *keys, *args), *after]

        def replied(outcome: list[Any] | BaseException) -> None:
            if isinstance(outcome, BaseException) or not isinstance(outcome[0], NoScriptError):
                done(outcome)
                return
            left = deadline - loop.time()
            if left <= 0:
                done(asyncio.TimeoutError())
                return
            again = [("SCRIPT", "LOAD", script.source), *commands]
            self.submit(again, left, lambda o: done(o if isinstance(o, BaseException) else o[1:]), retry=retry)

        self.submit(commands, timeout, replied, retry=retry)

    def _write(self, line: Line, commands: Sequence[Command], deadline: float, done: Done, retry: bool) -> None:
        loop = asyncio.get_running_loop()

        def replied(outcome: list[Any] | BaseException) -> None:
            if isinstance(outcome, BaseException):  # the connection ended (or this call's deadline passed)
                if self._line is line:
                    self._line = None
                if retry and isinstance(outcome, RedisConnectionError) and deadline > loop.time():
                    self.submit(commands, deadline - loop.time(), done)
                    return
            done(outcome)

        line.submit(commands, replied, deadline)

    async def _connect_then(self, commands: Sequence[Command], deadline: float, done: Done) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with time_limit(None if deadline == math.inf else max(0.0, deadline - loop.time())):
                line = await open_line(self._client, name=self._name, connect_timeout=self._connect_timeout)
        except asyncio.CancelledError:
            done(RedisConnectionError("Connection to Redis closed by this process"))
            raise
        except Exception as exc:
            done(exc)
            return
        finally:
            self._connecting = None
        self._line = line
        self._write(line, commands, deadline, done, retry=False)  # a new connection: nothing to retry

    async def __call__(self, *commands: Command) -> list[Any]:
        return await self._await(lambda done: self.submit(commands, None, done))

    async def _await(self, submit: Callable[[Done], None]) -> list[Any]:
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()

        def done(outcome: list[Any] | BaseException) -> None:
            if future.done():
                return
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

        submit(done)
        try:
            return await future
        except asyncio.CancelledError:
            self._drop()  # its reply may still come: the connection is out of step
            raise

    def _drop(self) -> None:
        line, self._line = self._line, None
        if line is not None:
            line.close()
        connecting, self._connecting = self._connecting, None
        if connecting is not None:
            connecting.cancel()

    async def close(self) -> None:
        connecting = self._connecting
        self._drop()
        if connecting is not None:
            await asyncio.wait({connecting})
