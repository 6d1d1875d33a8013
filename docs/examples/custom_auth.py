"""Replace the JWT check: look up an opaque session token, and return a `Principal`."""

from __future__ import annotations

import time

from starlette.applications import Starlette
from starlette.requests import HTTPConnection

from starlette_pomo_ws import AuthenticationError, PomoWS, Principal, Settings

# A stand-in for your session store: token -> (user id, expiry as a Unix time).
SESSIONS: dict[str, tuple[str, float]] = {}


def session_token(connection: HTTPConnection) -> str | None:
    authorization = connection.headers.get("authorization", "")
    if authorization.lower().startswith("bearer "):  # non-browser clients, and REFRESH_TOKEN
        return authorization[len("bearer ") :]
    return connection.query_params.get("session")  # browsers: ws://HOST/ws?session=...


async def authenticate(connection: HTTPConnection) -> Principal:
    token = session_token(connection)
    if token is None:
        raise AuthenticationError("No authentication token provided")  # becomes the 1008 close reason
    session = SESSIONS.get(token)
    if session is None:
        raise AuthenticationError("Invalid authentication token")
    user_id, expires_at = session
    if expires_at <= time.time():
        raise AuthenticationError("Authentication token expired")
    # `expires_at` drives TOKEN_EXPIRING and the close at expiry, as a JWT's `exp` does.
    return Principal(user_id=user_id, expires_at=expires_at, claims={"session": "cookie-less"})


# No jwt_secret is needed when `authenticate` replaces the JWT check.
pomo = PomoWS(Settings(allowed_origins=("https://app.example.com",)), authenticate=authenticate)
app = Starlette(lifespan=pomo.lifespan)
app.mount("/ws", pomo)
