"""Public exceptions. Every failure the package raises derives from `PomoWSError`."""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "BackendUnavailable",
    "ConfigurationError",
    "NotStartedError",
    "PomoWSError",
]


class PomoWSError(Exception):
    """Base class of every exception raised by starlette-pomo-ws."""


class ConfigurationError(PomoWSError, ValueError):
    """A setting is missing, malformed or contradicts another one.

    Raised when the app starts (or when `Settings.from_env()` reads a malformed value), never at the
    first connection. The message names the setting and the likely fix.
    """


class NotStartedError(ConfigurationError, RuntimeError):
    """The broadcaster was used before `pomo.lifespan` started it."""


class AuthenticationError(PomoWSError):
    """Raised by an `authenticate` callable to refuse a handshake.

    The reason becomes the close reason of the 1008 close frame, so keep it short (at most 123 bytes
    of UTF-8) and free of secrets. `detail` goes to the server log only, never to the client: say
    there why the handshake was refused (a missing claim, a wrong audience), never the token.
    """

    def __init__(self, reason: str = "Invalid authentication token", *, detail: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


class BackendUnavailable(PomoWSError, ConnectionError):
    """The backend (for example Redis) cannot be reached, so the event was not stored or published."""
