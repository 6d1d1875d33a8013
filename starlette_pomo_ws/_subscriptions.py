"""Which streams this node receives from a shared backend (a user's, a channel's).

A node subscribes to a stream for its first local reader and unsubscribes after the last, so that
Redis carries to each node only what it has sockets for. A reader must be subscribed before it
reads the stream's history (the resume seam); an unsubscribe in flight is let through first, so the
backend sees the two in order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

__all__ = ["Subscriptions"]


class Subscriptions:
    """This node's subscriptions to one kind of stream.

    Args:
        subscribe: the backend's subscribe for this kind (e.g. `backend.subscribe_channel`).
        unsubscribe: its unsubscribe.
        spawn: runs a background coroutine that shutdown waits for and whose failure is logged.
    """

    __slots__ = ("_spawn", "_subscribe", "_subscriptions", "_unsubscribe", "_unsubscribing")

    def __init__(
        self,
        subscribe: Callable[[str], Awaitable[None]],
        unsubscribe: Callable[[str], Awaitable[None]],
        spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task[None]],
    ) -> None:
        self._subscribe = subscribe
        self._unsubscribe = unsubscribe
        self._spawn = spawn
        self._subscriptions: dict[str, asyncio.Future[None]] = {}
        self._unsubscribing: dict[str, asyncio.Task[None]] = {}

    def __len__(self) -> int:
        return len(self._subscriptions)

    async def acquire(self, key: str) -> None:
        """Make sure this node receives the stream `key`'s events before its history is read.

        The first reader subscribes; later ones wait for that same subscription (and try themselves if
        its subscriber was cancelled).
        """
        while (subscription := self._subscriptions.get(key)) is not None:
            if not subscription.done():
                await asyncio.wait({subscription})
            if not subscription.cancelled():
                subscription.result()  # raises the subscriber's error, if it had one
                return
        own = self._subscriptions[key] = asyncio.get_running_loop().create_future()
        try:
            unsubscribing = self._unsubscribing.get(key)
            if unsubscribing is not None:  # let the backend see UNSUBSCRIBE before this SUBSCRIBE
                await asyncio.wait({unsubscribing})
            await self._subscribe(key)
        except BaseException as exc:
            if self._subscriptions.get(key) is own:
                del self._subscriptions[key]
            if isinstance(exc, Exception):
                own.set_exception(exc)
                own.exception()  # retrieved: waiters re-raise it, nobody logs it as lost
            else:
                own.cancel()
            raise
        own.set_result(None)

    def release(self, key: str) -> None:
        """The stream's last local reader is gone: unsubscribe (in the background), whatever the
        subscription's outcome, once it has settled."""
        subscription = self._subscriptions.pop(key, None)
        if subscription is not None:
            self._unsubscribing[key] = self._spawn(self._release(key, subscription))

    async def _release(self, key: str, subscription: asyncio.Future[None]) -> None:
        try:
            if not subscription.done():
                await asyncio.wait({subscription})  # whatever its outcome, undo what it may have done
            if key not in self._subscriptions:
                await self._unsubscribe(key)
        finally:
            if self._unsubscribing.get(key) is asyncio.current_task():
                del self._unsubscribing[key]
