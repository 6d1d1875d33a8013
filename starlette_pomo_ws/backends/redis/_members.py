"""Channel membership across the cluster: each node writes its own counts, the scripts keep cluster-wide
totals, and a surviving node forgets the members of a node that stopped refreshing itself.

Keys (`P` is `key_prefix`): `Pmembers:<node>` (hash `<channel>|<user>` -> this node's connections, and `#`
once the hash holds the node's whole view), `Pmember-nodes` (sorted set: node -> when it expires),
`Pcm:<channel>` (hash user -> connections across the cluster) and `Pcs` (hash channel -> connections).
A channel name never holds `|`, so the field splits at its first one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from ...exceptions import BackendUnavailable
from ._batch import Answer, Coalescer, Settle
from ._connection import Direct
from ._scripts import Script, text

__all__ = ["Members"]

logger = logging.getLogger("starlette_pomo_ws")

# Runs one Redis operation within a number of seconds, as BackendUnavailable when it fails.
Command = Callable[[Callable[[], Awaitable[Any]], str, float], Awaitable[Any]]
# (channel, user id, users in the channel after the change)
Change = tuple[str, str, int]
# Told, on this node, of the users that joined (a node forgotten as dead came back) and left (with a dead node).
Changed = Callable[[list[Change], list[Change]], Awaitable[None]]

_REAP_NODES = 16  # dead nodes forgotten per script call


class Members:
    """This process's channel members per node, mirrored into Redis as absolute counts."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        key_prefix: str,
        ttl: float,
        command: Command,
        answer: Answer,
        timeout: float,
        line: Direct,
        changed: Changed,
    ) -> None:
        self._client = client
        self._line = line  # the batches' own connection
        self._key_prefix = key_prefix
        self._ttl = ttl
        self._command = command
        self._answer = answer
        self._timeout = timeout
        self._changed = changed
        self._script = Script(client, "members")
        self._reap = Script(client, "reap")
        self._touch = Script(client, "touch_members")
        self._nodes_key = f"{key_prefix}member-nodes"
        # node id -> channel -> user id -> connections. Nested rather than keyed by (channel, user) pairs: a
        # tuple per pair cost about 110 B a pair; nested, about 27 B (`python -m benchmarks channel-memory --redis`).
        self.local: dict[str, dict[str, dict[str, int]]] = {}
        # Cleared by the backend's stop: the refresh loop ends even if a cancellation is lost on the way
        # (Python 3.11's wait_for drops one that arrives as the awaited call completes).
        self.running = False
        self._dirty: set[str] = set()
        # (node id, channel, user id, +1 join / -1 leave / 0 count only) -> (user's connections, users)
        self._batches: Coalescer[tuple[str, str, str, int], tuple[int, int]] = Coalescer(
            self._send, what="update the channel members", timeout=timeout, limit=1000
        )

    async def join(self, node_id: str, channel: str, user_id: str) -> tuple[int, int]:
        users = self.local.setdefault(node_id, {}).setdefault(channel, {})
        users[user_id] = users.get(user_id, 0) + 1
        try:
            return await self._batches((node_id, channel, user_id, 1))
        except BackendUnavailable:
            self._forget_locally(node_id, channel, user_id)
            self._dirty.add(node_id)
            raise

    async def leave(self, node_id: str, channel: str, user_id: str) -> tuple[int, int]:
        if not self._forget_locally(node_id, channel, user_id):
            return await self.counts(channel, user_id)
        try:
            return await self._batches((node_id, channel, user_id, -1))
        except BackendUnavailable:
            self._dirty.add(node_id)  # the refresh writes the node's view again
            raise

    async def counts(self, channel: str, user_id: str) -> tuple[int, int]:
        return await self._batches(("", channel, user_id, 0))

    def _forget_locally(self, node_id: str, channel: str, user_id: str) -> bool:
        count = self._count(node_id, channel, user_id)
        if not count:
            return False
        channels = self.local[node_id]
        users = channels[channel]
        if count > 1:
            users[user_id] = count - 1
        elif len(users) > 1:
            del users[user_id]
        else:
            del channels[channel]
        return True

    def _count(self, node_id: str, channel: str, user_id: str) -> int:
        """This node's connections of `user_id` in `channel`, as the mirror has them."""
        return self.local.get(node_id, {}).get(channel, {}).get(user_id, 0)

    def _send(self, updates: list[tuple[str, str, str, int]], timeout: float, settle: Settle[tuple[int, int]]) -> None:
        """One script call writes every (node, channel, user) of the batch as absolute values, and counts.

        Each answer is the count as of its own turn, as if the batch had gone one by one. A refresh pauses
        the batches, so the two never interleave.
        """
        written: dict[str, set[tuple[str, str]]] = {}
        for node_id, channel, user_id, change in updates:
            if change:
                written.setdefault(node_id, set()).add((channel, user_id))
        args: list[str | int] = [self._key_prefix, int(self._ttl * 1000), len(written)]
        for node_id, pairs in written.items():
            args += (node_id, "0", len(pairs))
            for channel, user_id in pairs:
                args += (channel, user_id, self._count(node_id, channel, user_id))
        asked = sorted({(channel, user_id) for _, channel, user_id, _ in updates})
        for channel, user_id in asked:
            args += (channel, user_id)

        def answers(replies: list[Any]) -> list[tuple[int, int]]:
            counts = replies[0][0]
            users: dict[str, int] = {}
            connections: dict[tuple[str, str], int] = {}
            for index, pair in enumerate(asked):
                connections[pair] = int(counts[2 * index])
                users[pair[0]] = int(counts[2 * index + 1])
            # Take the later changes of the batch back out, newest first.
            out = [(0, 0)] * len(updates)
            for index in range(len(updates) - 1, -1, -1):
                _, channel, user_id, change = updates[index]
                pair = (channel, user_id)
                after = connections[pair]
                out[index] = (after, users[channel])
                before = after - change
                connections[pair] = before
                if before <= 0 < after:
                    users[channel] -= 1
                elif after <= 0 < before:
                    users[channel] += 1
            return out

        def settled(outcome: Sequence[tuple[int, int]] | BaseException) -> None:
            if isinstance(outcome, BaseException):
                self._dirty.update(written)
            settle(outcome)

        done = self._answer("update the channel members", answers, settled)
        self._line.submit_script(self._script, [self._nodes_key], args, timeout=timeout, done=done, retry=True)

    async def members(self, channel: str) -> dict[str, int]:
        key = f"{self._key_prefix}cm:{channel}"
        flat = await self._command(lambda: self._client.hgetall(key), "read the channel members", self._timeout)
        return {text(user): int(count) for user, count in flat.items() if int(count) > 0}

    async def subscriber_count(self, channel: str) -> int:
        key = f"{self._key_prefix}cs"
        count = await self._command(lambda: self._client.hget(key, channel), "count the subscribers", self._timeout)
        return max(0, int(count or 0))

    # -- the timer ------------------------------------------------------------------------------

    async def refresh_forever(self) -> None:
        """Extend this process's nodes, write again any view that was lost, and forget dead nodes.

        Every third of the TTL, and at least every second, so a dead node's members leave within
        about the TTL.
        """
        while self.running:
            await asyncio.sleep(min(self._ttl / 3, 1.0))
            try:
                await self.refresh()
            except (BackendUnavailable, RedisError, OSError, asyncio.TimeoutError) as exc:
                logger.debug("Refreshing channel members in Redis failed: %s", exc)

    async def refresh(self) -> None:
        for node_id in list(self.local):
            try:
                await self._refresh_node(node_id)
            except BaseException:
                self._dirty.add(node_id)
                raise
        await self.reap()

    async def _refresh_node(self, node_id: str) -> None:
        ttl = int(self._ttl * 1000)
        key = f"{self._key_prefix}members:{node_id}"
        async with self._batches.paused():
            whole = await self._command(
                lambda: self._touch(keys=[self._nodes_key, key], args=[node_id, ttl]),
                "refresh the channel members",
                self._timeout,
            )
            if whole and node_id not in self._dirty:
                return
            # Forgotten as dead (a pause longer than the TTL), flushed, or a write failed: write it whole.
            channels = self.local.get(node_id, {})
            args: list[str | int] = [self._key_prefix, ttl, 1, node_id, "1", sum(len(u) for u in channels.values())]
            for channel, users in channels.items():
                for user_id, count in users.items():
                    args += (channel, user_id, count)
            reply = await self._command(
                lambda: self._script(keys=[self._nodes_key], args=args), "write the channel members", self._timeout
            )
            self._dirty.discard(node_id)
        changes = reply[1]
        joined: list[Change] = []
        left: list[Change] = []
        for i in range(0, len(changes), 4):
            change = (text(changes[i]), text(changes[i + 1]), int(changes[i + 3]))
            (joined if text(changes[i + 2]) == "1" else left).append(change)
        if joined or left:
            await self._changed(joined, left)

    async def reap(self, nodes: tuple[str, ...] = ()) -> None:
        """Forget the members of dead nodes (or of `nodes`), and announce the users that left that way."""
        args: list[str | int] = [self._key_prefix, _REAP_NODES, *nodes]
        while True:
            flat = await self._command(
                lambda: self._reap(keys=[self._nodes_key], args=args), "forget dead nodes' members", self._timeout
            )
            left = [(text(flat[i]), text(flat[i + 1]), int(flat[i + 2])) for i in range(0, len(flat), 3)]
            if left:
                await self._changed([], left)
            if nodes or not flat:
                return

    async def stop(self) -> None:
        """Forget this process's members in Redis (on a graceful stop); on failure the TTL does it."""
        await self._batches.close()
        await self._line.close()
        nodes = tuple(self.local)
        self.local.clear()
        if nodes:
            with contextlib.suppress(Exception):
                await self.reap(nodes)
