"""Connections of the backend's own, outside redis-py's pool: the pub/sub session's, and the batches'.

They are made like the pool's (same host or Sentinel-resolved primary, credentials, TLS), but speak
RESP2 without decoding, with no socket timeout of their own: the caller bounds every wait.

`Direct` carries the batches of one `Coalescer` (publishes, positions, presence, channel members).
Through `Redis.execute_command` a script call costs about 190 µs of a node's CPU on our 2-core
machine (the pool, a retry wrapper, a task per socket write on Python 3.11, argument encoding); on
a connection of its own, packed by hand, about 110 µs. A coalescer sends one batch at a time, so
one connection serves all its batches, in order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, ResponseError

from ._scripts import Script

__all__ = ["Direct", "own_connection", "pack"]

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


class Direct:
    """One connection for one caller at a time: `await direct(command, ...)` writes the commands at once
    and returns one reply per command, an error reply as its `ResponseError` (the connection stays in
    step). Any other failure, a cancellation included, drops the connection, whose state is then
    unknown; the next call connects again. The caller bounds the call's time."""

    def __init__(self, client: aioredis.Redis, *, name: str, connect_timeout: float) -> None:
        self._client = client
        self._name = name
        self._connect_timeout = connect_timeout
        self._conn: AbstractConnection | None = None

    async def __call__(self, *commands: Command) -> list[Any]:
        conn = self._conn
        try:
            if conn is None:
                conn = own_connection(self._client, name=self._name, connect_timeout=self._connect_timeout)
                await conn.connect()  # type: ignore[no-untyped-call]
                self._conn = conn
            await conn.send_packed_command(pack(commands), check_health=False)
            replies: list[Any] = []
            for _ in commands:
                try:
                    replies.append(await conn.read_response())
                except ResponseError as error:
                    replies.append(error)
        except BaseException:
            self._conn = None
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.disconnect(nowait=True)
            raise
        return replies

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
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.disconnect(nowait=True)
