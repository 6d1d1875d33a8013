"""Connections of the backend's own, outside redis-py's pool: the pub/sub session's, and the batches'.

They are made like the pool's (same host or Sentinel-resolved primary, credentials, TLS), but speak
RESP2 without decoding, with no socket timeout of their own: the caller bounds every wait.

`Direct` carries the batches of one `Coalescer` (publishes, positions, presence, channel
members, retained state).
Through `Redis.execute_command` a script call costs about 190 µs of a node's CPU on our 2-core
machine (the pool, a retry wrapper, a task per socket write on Python 3.11, argument encoding); on
a connection of its own, packed by hand, about 110 µs. A coalescer sends one batch at a time, so
one connection serves all its batches, in order.

Once redis-py has connected one (TLS, AUTH, SELECT, CLIENT SETNAME), `open_line()` takes its
transport over with a `Line`: replies are parsed as they arrive (by hiredis when it is installed,
else by `Resp2Reader`) and go in one step to the waiting `Direct` caller, or to the pub/sub
session's handler, with no stream reader, no read loop and no timeout per read.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis._parsers.base import BaseParser
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError, InvalidResponse, NoScriptError

from ._scripts import Script

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


class Line(asyncio.Protocol):
    """The protocol of a connected transport. Replies are parsed as they arrive: each goes to `on_reply`
    when there is one (pub/sub), or else `expect(count)` returns a future of the next `count` replies,
    set as soon as the last one is parsed. An exception from `on_reply` ends the connection."""

    def __init__(
        self, transport: asyncio.Transport, keep: object = None, on_reply: Callable[[Any], None] | None = None
    ) -> None:
        self.transport = transport
        self._keep = keep  # the StreamWriter it came from, which closes the transport when collected
        self._on_reply = on_reply
        self._reader = _reader()
        self._waiter: asyncio.Future[list[Any]] | None = None
        self._expected = 0
        self._replies: list[Any] = []
        self.error: Exception | None = None  # why it is closed, or closing
        self.ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()  # done once closed

    @property
    def lost(self) -> bool:
        """Closed, or closing."""
        return self.error is not None

    def expect(self, count: int) -> asyncio.Future[list[Any]]:
        assert self._waiter is None, "one caller at a time"
        self._waiter = asyncio.get_running_loop().create_future()
        self._expected = count
        self._replies = []
        return self._waiter

    def write(self, commands: Sequence[Command]) -> None:
        self.transport.write(pack(commands))

    def data_received(self, data: bytes) -> None:
        try:
            self._reader.feed(data)
            while (reply := self._reader.gets()) is not False:
                if self._on_reply is not None:
                    self._on_reply(reply)
                    continue
                waiter = self._waiter
                if waiter is None:
                    raise InvalidResponse("Redis sent a reply nobody asked for")
                self._replies.append(reply)
                if len(self._replies) == self._expected:
                    self._waiter = None
                    if not waiter.done():
                        waiter.set_result(self._replies)
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

    def _end(self, error: Exception) -> None:
        if self.error is None:
            self.error = error
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        self.transport.close()


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
    """One connection for one caller at a time: `await direct(command, ...)` writes the commands at once
    and returns one reply per command, an error reply as its `ResponseError` (the connection stays in
    step). Any other failure, a cancellation included, drops the connection, whose state is then
    unknown; the next call connects again. The caller bounds the call's time."""

    def __init__(self, client: aioredis.Redis, *, name: str, connect_timeout: float) -> None:
        self._client = client
        self._name = name
        self._connect_timeout = connect_timeout
        self._line: Line | None = None

    async def __call__(self, *commands: Command) -> list[Any]:
        line = self._line
        if line is not None and line.lost:  # Redis closed it since the last call
            line = self._line = None
        try:
            if line is None:
                line = await open_line(self._client, name=self._name, connect_timeout=self._connect_timeout)
                self._line = line
            replies = line.expect(len(commands))
            line.write(commands)
            return await replies
        except BaseException:
            self._line = None
            if line is not None:
                line.close()
            raise

    async def script(
        self, script: Script, keys: Sequence[str], args: Sequence[str | int], *after: Command
    ) -> list[Any]:
        """Run `script`, then the commands `after` in the same write; return every reply, or raise the first
        error. A server that does not know the script yet (restarted, or promoted) runs nothing and answers
        `NOSCRIPT`: the script is then loaded and everything sent again."""
        commands = [("EVALSHA", script.sha, len(keys), *keys, *args), *after]
        replies = await self(*commands)
        if isinstance(replies[0], NoScriptError):
            await self(("SCRIPT", "LOAD", script.source))
            replies = await self(*commands)
        return raise_first_error(replies)

    async def close(self) -> None:
        line, self._line = self._line, None
        if line is not None:
            line.close()
