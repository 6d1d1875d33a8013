from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

# Copied from starlette.types so that only `_app.py` depends on Starlette's classes.
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
