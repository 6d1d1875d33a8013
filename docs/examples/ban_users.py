"""Ban a user: a deny-list in front of the JWT check, and `disconnect_user` for the open sockets."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import HTTPConnection

from starlette_pomo_ws import AuthenticationError, JWTAuthenticator, PomoWS, Principal, Settings

# Short-lived tokens: a connection never outlives its token, and REFRESH_TOKEN runs `authenticate` again.
settings = Settings.from_env(token_expiry_warning=30)
check_jwt = JWTAuthenticator(settings)
BANNED: set[str] = set()  # a stand-in: in production, a Redis set or a table every node reads


async def authenticate(connection: HTTPConnection) -> Principal:
    principal = await check_jwt(connection)  # the handshake and every REFRESH_TOKEN come through here
    if principal.user_id in BANNED:
        # The client sees the documented reason; the log line says why.
        raise AuthenticationError("Invalid authentication token", detail=f"user {principal.user_id!r} is banned")
    return principal


pomo = PomoWS(settings, authenticate=authenticate)
app = Starlette(lifespan=pomo.lifespan)
app.mount("/ws", pomo)


async def ban(user_id: str) -> None:
    BANNED.add(user_id)  # first, so that a reconnect with the same token is refused
    await pomo.broadcaster.disconnect_user(user_id, reason="Banned")  # then close every open socket, on every node
