"""Backends: `memory://` (the embedded default) and `redis://` (many workers and hosts)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Backend
from .memory import MemoryBackend

if TYPE_CHECKING:
    from .._settings import Settings
    from .redis import RedisBackend

__all__ = ["Backend", "MemoryBackend", "RedisBackend", "create_backend"]


def create_backend(settings: Settings) -> Backend:
    """Build the backend that `settings.backend_url` names.

    Raises:
        ConfigurationError: the URL's scheme is not supported, or its extra is not installed.
    """
    from .._settings import redact_url
    from ..exceptions import ConfigurationError

    url = settings.backend_url
    scheme = url.split(":", 1)[0]
    if scheme == "memory":
        return MemoryBackend(history_size=settings.history_size, history_ttl=settings.history_ttl)
    if scheme in ("redis", "rediss", "redis+sentinel", "rediss+sentinel"):
        try:
            from .redis import RedisBackend
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ConfigurationError(
                "Setting 'backend_url' names Redis, but redis-py is not installed: "
                "pip install 'starlette-pomo-ws[redis]'."
            ) from exc
        return RedisBackend(
            url,
            history_size=settings.history_size,
            history_ttl=settings.history_ttl,
            min_replicas=settings.redis_min_replicas,
            presence_ttl=settings.presence_ttl,
        )
    raise ConfigurationError(
        f"Setting 'backend_url': unsupported backend {redact_url(url)!r}; use memory:// (one process), "
        "redis://host:port/db, rediss://host:port/db or redis+sentinel://host:port,host:port/service/db."
    )


def __getattr__(name: str) -> object:
    if name == "RedisBackend":
        from .redis import RedisBackend

        return RedisBackend
    raise AttributeError(name)
