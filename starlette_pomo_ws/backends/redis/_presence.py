"""Cluster-wide connection counts: each node writes its own hash of per-user counts, refreshed on a timer,
so that a crashed node's connections leave the counts after `presence_ttl`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from ...exceptions import BackendUnavailable
from ._scripts import load

__all__ = ["Presence"]

logger = logging.getLogger("starlette_pomo_ws")

_T = TypeVar("_T")
# Runs one Redis operation within the backend's timeout, as BackendUnavailable when it fails.
Command = Callable[[Callable[[], Awaitable[Any]], str], Awaitable[Any]]


class Presence:
    """This process's connections per node and user, mirrored into Redis as absolute values."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        key_prefix: str,
        ttl: float,
        command: Command,
        bounded: Callable[[Awaitable[Any]], Awaitable[Any]],
    ) -> None:
        self._client = client
        self._key_prefix = key_prefix
        self._ttl = ttl
        self._command = command
        self._bounded = bounded
        self._script = client.register_script(load("presence"))
        self._touch = client.register_script(load("touch"))
        self._nodes_key = f"{key_prefix}nodes"
        self.local: dict[str, dict[str, set[str]]] = {}  # node id -> user id -> connection ids
        self._lock = asyncio.Lock()
        self._dirty: set[str] = set()

    async def add(self, node_id: str, user_id: str, connection_id: str) -> int:
        users = self.local.setdefault(node_id, {})
        connections = users.setdefault(user_id, set())
        if connection_id in connections:
            return await self.user_count(user_id)
        connections.add(connection_id)
        try:
            return await self._write(node_id, user_id)
        except BackendUnavailable:
            self._forget_locally(node_id, user_id, connection_id)
            raise

    async def remove(self, node_id: str, user_id: str, connection_id: str) -> None:
        if not self._forget_locally(node_id, user_id, connection_id):
            return
        with contextlib.suppress(BackendUnavailable):
            await self._write(node_id, user_id)

    def _forget_locally(self, node_id: str, user_id: str, connection_id: str) -> bool:
        users = self.local.get(node_id)
        connections = users.get(user_id) if users is not None else None
        if users is None or connections is None or connection_id not in connections:
            return False
        connections.discard(connection_id)
        if not connections:
            del users[user_id]
        return True

    async def _write(self, node_id: str, user_id: str) -> int:
        # Absolute values under a lock: a failed write is repaired by the next one or the refresh.
        async with self._lock:
            users = self.local.get(node_id, {})
            field = f"u:{user_id}"
            args = (
                node_id,
                self._key_prefix,
                int(self._ttl * 1000),
                field,
                len(users.get(user_id, ())),
                sum(len(c) for c in users.values()),
                field,
            )
            try:
                count = await self._command(
                    lambda: self._script(keys=[self._nodes_key, self._node_key(node_id)], args=args),
                    "update the connection counts",
                )
            except BackendUnavailable:
                self._dirty.add(node_id)
                raise
            return int(count)

    async def user_count(self, user_id: str) -> int:
        return await self._count(f"u:{user_id}")

    async def total_count(self) -> int:
        return await self._count("t")

    async def _count(self, field: str) -> int:
        args = ("", self._key_prefix, int(self._ttl * 1000), "", 0, "", field)
        count = await self._command(
            lambda: self._script(keys=[self._nodes_key, self._node_key("")], args=args), "count connections"
        )
        return int(count)

    def _node_key(self, node_id: str) -> str:
        return f"{self._key_prefix}node:{node_id}"

    async def refresh_forever(self) -> None:
        """Every third of the TTL, extend this process's nodes, and rewrite any hash that was lost."""
        while True:
            await asyncio.sleep(self._ttl / 3)
            for node_id in list(self.local):
                try:
                    async with self._lock:
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

    async def forget_all(self) -> None:
        """Remove this process's nodes from Redis (on a graceful stop); failures are left to the TTL."""
        if not self.local:
            return
        nodes: Iterable[str] = list(self.local)
        self.local.clear()
        with contextlib.suppress(Exception):
            await self._bounded(self._forget_nodes(nodes))

    async def _forget_nodes(self, nodes: Iterable[str]) -> None:
        async with self._client.pipeline(transaction=True) as pipe:
            for node_id in nodes:
                _ = pipe.delete(self._node_key(node_id))
                _ = pipe.zrem(self._nodes_key, node_id)
            await pipe.execute()
