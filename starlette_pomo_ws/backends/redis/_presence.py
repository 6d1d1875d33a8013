"""Cluster-wide connection counts: each node writes its own hash of per-user counts, refreshed on a timer,
so that a crashed node's connections leave the counts after `presence_ttl`.

The script that writes them also reads the position of the total order: a handshake gets its count and
its starting position from one round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from ..._events import Position
from ...exceptions import BackendUnavailable
from ._batch import Answer, Coalescer, Settle
from ._connection import Direct
from ._scripts import Script, text

__all__ = ["Presence"]

logger = logging.getLogger("starlette_pomo_ws")

_T = TypeVar("_T")
# Runs one Redis operation within a number of seconds, as BackendUnavailable when it fails.
Command = Callable[[Callable[[], Awaitable[Any]], str, float], Awaitable[Any]]


class Presence:
    """This process's connections per node and user, mirrored into Redis as absolute values."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        key_prefix: str,
        ttl: float,
        meta_key: str,
        candidate: Callable[[], str],
        command: Command,
        answer: Answer,
        bounded: Callable[[Awaitable[Any]], Awaitable[Any]],
        timeout: float,
        line: Direct,
    ) -> None:
        self._client = client
        self._line = line  # the batches' own connection
        self._key_prefix = key_prefix
        self._ttl = ttl
        self._meta_key = meta_key
        self._candidate = candidate  # the epoch the script starts if it finds none
        self._command = command
        self._answer = answer
        self._bounded = bounded
        self._script = Script(client, "presence")
        self._touch = Script(client, "touch")
        self._nodes_key = f"{key_prefix}nodes"
        self.local: dict[str, dict[str, set[str]]] = {}  # node id -> user id -> connection ids
        self._totals: dict[str, int] = {}  # node id -> its connections (a sum over `local` costs O(users) per write)
        # Cleared by the backend's stop: the refresh loop ends even if a cancellation is lost on the way
        # (Python 3.11's wait_for drops one that arrives as the awaited call completes).
        self.running = False
        self._dirty: set[str] = set()
        self._timeout = timeout
        # (node id, user id, +1 for a new connection or -1 for a closed one) -> the user's cluster count (or 0),
        # and the position after the batch
        self._batches: Coalescer[tuple[str, str, int], tuple[int, Position]] = Coalescer(
            self._send, what="update the connection counts", timeout=timeout, limit=1000
        )

    async def add(self, node_id: str, user_id: str, connection_id: str) -> tuple[int, Position]:
        """Count a connection; return its user's count across the cluster, and the position after it."""
        users = self.local.setdefault(node_id, {})
        connections = users.setdefault(user_id, set())
        if connection_id in connections:
            return await self._count(f"u:{user_id}")
        connections.add(connection_id)
        self._totals[node_id] = self._totals.get(node_id, 0) + 1
        try:
            return await self._write(node_id, user_id)
        except BackendUnavailable:
            self._forget_locally(node_id, user_id, connection_id)
            raise

    async def remove(self, node_id: str, user_id: str, connection_id: str) -> None:
        if not self._forget_locally(node_id, user_id, connection_id):
            return
        with contextlib.suppress(BackendUnavailable):
            await self._write_quietly(node_id, user_id)

    def _forget_locally(self, node_id: str, user_id: str, connection_id: str) -> bool:
        users = self.local.get(node_id)
        connections = users.get(user_id) if users is not None else None
        if users is None or connections is None or connection_id not in connections:
            return False
        connections.discard(connection_id)
        self._totals[node_id] -= 1
        if not connections:
            del users[user_id]
        return True

    async def _write(self, node_id: str, user_id: str) -> tuple[int, Position]:
        return await self._batches((node_id, user_id, 1))

    async def _write_quietly(self, node_id: str, user_id: str) -> None:
        await self._batches((node_id, user_id, -1))

    def _send(self, updates: list[tuple[str, str, int]], timeout: float, settle: Settle[tuple[int, Position]]) -> None:
        """One script call writes every node and user in the batch, as absolute values, counts, and reads
        the position.

        A refresh pauses the batches, so the two never interleave; a failed write is repaired by a later
        one or by the refresh.
        """
        written: dict[str, set[str]] = {}
        for node_id, user_id, _ in updates:
            written.setdefault(node_id, set()).add(user_id)
        args: list[str | int] = [self._candidate(), self._key_prefix, int(self._ttl * 1000), len(written)]
        for node_id, user_ids in written.items():
            users = self.local.get(node_id, {})
            args += (node_id, self._totals.get(node_id, 0), len(user_ids))
            for user_id in user_ids:
                args += (f"u:{user_id}", len(users.get(user_id, ())))
        asked = sorted({user_id for _, user_id, change in updates if change > 0})
        args += [f"u:{user_id}" for user_id in asked]

        def answers(replies: list[Any]) -> list[tuple[int, Position]]:
            # The script counted every change of the batch; each addition gets the count as of its own
            # turn, as if the batch had gone one by one: the changes after it are taken back out.
            counts, epoch, seq = replies[0]
            position = Position(text(epoch), int(seq))
            totals = {user_id: int(count) for user_id, count in zip(asked, counts, strict=True)}
            out = [(0, position)] * len(updates)
            for index in range(len(updates) - 1, -1, -1):
                _, user_id, change = updates[index]
                if user_id in totals:
                    if change > 0:
                        out[index] = (totals[user_id], position)
                    totals[user_id] -= change
            return out

        def settled(outcome: Sequence[tuple[int, Position]] | BaseException) -> None:
            if isinstance(outcome, BaseException):
                self._dirty.update(written)
            settle(outcome)

        done = self._answer("update the connection counts", answers, settled)
        keys = [self._meta_key, self._nodes_key]
        self._line.submit_script(self._script, keys, args, timeout=timeout, done=done, retry=True)

    async def user_count(self, user_id: str) -> int:
        count, _ = await self._count(f"u:{user_id}")
        return count

    async def total_count(self) -> int:
        count, _ = await self._count("t")
        return count

    async def _count(self, field: str) -> tuple[int, Position]:
        args = (self._candidate(), self._key_prefix, int(self._ttl * 1000), 0, field)
        keys = [self._meta_key, self._nodes_key]
        reply = await self._command(lambda: self._script(keys=keys, args=args), "count connections", self._timeout)
        counts, epoch, seq = reply
        return int(counts[0]), Position(text(epoch), int(seq))

    def _node_key(self, node_id: str) -> str:
        return f"{self._key_prefix}node:{node_id}"

    async def refresh_forever(self) -> None:
        """Every third of the TTL, extend this process's nodes, and rewrite any hash that was lost."""
        while self.running:
            await asyncio.sleep(self._ttl / 3)
            for node_id in list(self.local):
                try:
                    async with self._batches.paused():
                        await self._bounded(self._refresh_node(node_id))
                except (BackendUnavailable, RedisError, OSError, asyncio.TimeoutError) as exc:
                    self._dirty.add(node_id)
                    logger.debug("Refreshing presence in Redis failed: %s", exc)

    async def _refresh_node(self, node_id: str) -> None:
        key = self._node_key(node_id)
        ttl = int(self._ttl * 1000)
        alive = await self._touch(keys=[self._nodes_key, key], args=[node_id, ttl])
        if alive and node_id not in self._dirty:
            return
        # The hash was lost (a flush) or a write failed: write this node's view again.
        users = self.local.get(node_id, {})
        fields: dict[str, int] = {f"u:{u}": len(c) for u, c in users.items()}
        fields["t"] = sum(fields.values())
        async with self._client.pipeline(transaction=True) as pipe:
            # A pipeline queues the commands; their results come from execute().
            _ = pipe.delete(key)
            _ = pipe.hset(key, mapping=fields)  # type: ignore[arg-type]  # redis-py wants dict[str | bytes, ...]
            _ = pipe.pexpire(key, ttl)
            await pipe.execute()
        self._dirty.discard(node_id)

    async def stop(self) -> None:
        """Remove this process's nodes from Redis (on a graceful stop); failures are left to the TTL."""
        await self._batches.close()
        await self._line.close()
        if not self.local:
            return
        nodes: Iterable[str] = list(self.local)
        self.local.clear()
        self._totals.clear()
        with contextlib.suppress(Exception):
            await self._bounded(self._forget_nodes(nodes))

    async def _forget_nodes(self, nodes: Iterable[str]) -> None:
        async with self._client.pipeline(transaction=True) as pipe:
            for node_id in nodes:
                _ = pipe.delete(self._node_key(node_id))
                _ = pipe.zrem(self._nodes_key, node_id)
            await pipe.execute()
