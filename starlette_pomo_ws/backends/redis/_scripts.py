"""The Lua scripts of the Redis backend, read from the `.lua` files beside this module."""

from __future__ import annotations

from importlib.resources import files

__all__ = ["load"]

# Scripts that begin with the metadata check: KEYS[1] is the metadata hash and ARGV[1] a candidate epoch.
_WITH_EPOCH = frozenset({"publish", "position", "history"})


def load(name: str) -> str:
    """The source of `<name>.lua`, with the shared epoch prelude in front where the script needs it."""
    package = files(__package__)
    source = package.joinpath(f"{name}.lua").read_text(encoding="utf-8")
    if name in _WITH_EPOCH:
        source = package.joinpath("epoch.lua").read_text(encoding="utf-8") + source
    return source
