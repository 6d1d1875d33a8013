"""The Pomofocus demo app: `pomo-ws demo`, or `create_app()` under any ASGI server."""

from __future__ import annotations

from .app import create_app

__all__ = ["create_app"]
