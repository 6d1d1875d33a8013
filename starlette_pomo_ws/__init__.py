"""Authenticated real-time fan-out over WebSockets for Starlette, FastAPI and Litestar."""

from __future__ import annotations

from ._app import OnMessage, PomoWS
from ._auth import Authenticate, JWTAuthenticator, Principal
from ._broadcaster import Broadcaster
from ._connection import Connection
from ._events import Event, EventType, Position
from ._lifespan import get_broadcaster
from ._settings import Settings
from .exceptions import AuthenticationError, BackendUnavailable, ConfigurationError, NotStartedError, PomoWSError

__version__ = "0.1.0"

__all__ = [
    "Authenticate",
    "AuthenticationError",
    "BackendUnavailable",
    "Broadcaster",
    "ConfigurationError",
    "Connection",
    "Event",
    "EventType",
    "JWTAuthenticator",
    "NotStartedError",
    "OnMessage",
    "PomoWS",
    "PomoWSError",
    "Position",
    "Principal",
    "Settings",
    "get_broadcaster",
]
