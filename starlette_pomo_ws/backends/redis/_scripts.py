"""The Lua scripts of the Redis backend, read from the `.lua` files beside this module."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from importlib.resources import files
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

__all__ = ["Script", "load", "text"]

# Scripts that begin with the metadata check: KEYS[1] is the metadata hash and ARGV[1] a candidate epoch.
_WITH_EPOCH = frozenset({"publish", "position", "history", "presence"})


def load(name: str) -> str:
    """The source of `<name>.lua`, with the shared epoch prelude in front where the script needs it."""
    package = files(__package__)
    source = package.joinpath(f"{name}.lua").read_text(encoding="utf-8")
    if name in _WITH_EPOCH:
        source = package.joinpath("epoch.lua").read_text(encoding="utf-8") + source
    return source


class Script:
    """One script, run by its SHA1 with `EVALSHA`; a server that does not know it yet (a restarted or
    promoted one) answers `NOSCRIPT` without running anything, and the script is then loaded and sent again.

    Called, it runs on redis-py's pool (the occasional reads and refreshes); the batches run it on their
    own connection with `Direct.submit_script`.
    """

    def __init__(self, client: aioredis.Redis, name: str) -> None:
        self._client = client
        self.source = load(name)
        self.sha = hashlib.sha1(self.source.encode(), usedforsecurity=False).hexdigest()

    async def __call__(self, keys: Sequence[str], args: Sequence[str | int | float]) -> Any:
        try:
            return await self._client.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)  # type: ignore[no-untyped-call]
        except NoScriptError:
            await self._client.script_load(self.source)
            return await self._client.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)  # type: ignore[no-untyped-call]


def text(value: Any) -> str:
    """A string from a script's reply (redis-py gives bytes, or str with `decode_responses`)."""
    return value.decode() if isinstance(value, bytes) else str(value)
