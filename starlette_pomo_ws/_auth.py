from __future__ import annotations

import dataclasses
import fnmatch
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

import jwt

from ._settings import Settings
from .exceptions import AuthenticationError

if TYPE_CHECKING:
    from starlette.requests import HTTPConnection

__all__ = ["Authenticate", "JWTAuthenticator", "Principal"]

logger = logging.getLogger("starlette_pomo_ws")

NO_TOKEN = "No authentication token provided"
INVALID_TOKEN = "Invalid authentication token"
EXPIRED_TOKEN = "Authentication token expired"
OTHER_USER = "Token is for another user"
_MAX_TOKEN_LENGTH = 8192


@dataclasses.dataclass(frozen=True)
class Principal:
    """Who a connection belongs to.

    Attributes:
        user_id: always a string; a numeric claim is converted with `str()`.
        expires_at: the token's `exp` as a Unix time, or `None` when it never expires.
        claims: the token's claims (or whatever your `authenticate` callable puts there).
    """

    user_id: str
    expires_at: float | None = None
    claims: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        user_id: Any = self.user_id
        if not isinstance(user_id, str):
            object.__setattr__(self, "user_id", str(user_id))


class Authenticate(Protocol):
    """An async callable that checks a handshake and returns its `Principal`.

    Raise `AuthenticationError(reason)` to refuse; the reason becomes the 1008 close reason.
    """

    async def __call__(self, connection: HTTPConnection, /) -> Principal: ...  # pragma: no cover


def bearer_subprotocol(subprotocols: list[str]) -> str | None:
    """The token of a `["bearer", token]` subprotocol pair, if the client offered one."""
    for index, name in enumerate(subprotocols[:-1]):
        if name.strip().lower() == "bearer":
            # Some clients split the header on "," without stripping; a token never has spaces.
            return subprotocols[index + 1].strip()
    return None


def raw_header(scope: Mapping[str, Any], name: bytes) -> str | None:
    """One request header, read straight from the ASGI scope (`name` in lower case).

    A handshake needs two or three headers; building Starlette's `Headers` for them costs more.
    """
    for key, value in scope.get("headers") or ():
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


def find_token(connection: HTTPConnection, settings: Settings) -> str | None:
    """The token of a handshake, from the subprotocol pair, `Authorization: Bearer`, the query or a cookie."""
    token = bearer_subprotocol(list(connection.scope.get("subprotocols") or ()))
    if token:
        return token
    authorization = raw_header(connection.scope, b"authorization")
    if authorization:
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            return credentials.strip()
    if settings.token_query_param is not None:
        token = connection.query_params.get(settings.token_query_param)
        if token:
            return token
    if settings.token_cookie is not None:
        token = connection.cookies.get(settings.token_cookie)
        if token:
            return token
    return None


class JWTAuthenticator:
    """The default `authenticate`: checks a JWT with PyJWT, as the settings say."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._jwt = jwt.PyJWT()
        self._algorithms = list(settings.jwt_algorithms)
        self._options: dict[str, Any] = {"require": ["exp"] if settings.jwt_require_exp else []}
        key: Any = settings.jwt_secret or ""
        if "-----BEGIN" in key:
            from cryptography.hazmat.primitives.serialization import load_pem_public_key

            key = load_pem_public_key(key.encode())
        self._key = key

    def __repr__(self) -> str:
        return f"JWTAuthenticator(algorithms={self._algorithms!r}, user_id_claim={self.settings.user_id_claim!r})"

    async def __call__(self, connection: HTTPConnection, /) -> Principal:
        token = find_token(connection, self.settings)
        if not token:
            raise AuthenticationError(NO_TOKEN)
        return self.decode(token)

    def decode(self, token: str) -> Principal:
        """Check a token and return its principal.

        Raises:
            AuthenticationError: with the close reason for the client.
        """
        if len(token) > _MAX_TOKEN_LENGTH:
            raise AuthenticationError(INVALID_TOKEN)
        settings = self.settings
        try:
            claims = self._jwt.decode(
                token,
                self._key,
                algorithms=self._algorithms,
                audience=settings.jwt_audience,
                issuer=settings.jwt_issuer,
                leeway=settings.jwt_leeway,
                options=self._options,  # type: ignore[arg-type]
            )
        except jwt.ExpiredSignatureError:
            raise AuthenticationError(EXPIRED_TOKEN) from None
        except (jwt.InvalidTokenError, ValueError, TypeError) as exc:
            logger.info("Refused a token: %s", type(exc).__name__)
            raise AuthenticationError(INVALID_TOKEN) from None
        user_id = claims.get(settings.user_id_claim)
        if isinstance(user_id, bool) or not isinstance(user_id, str | int) or user_id == "":
            logger.info("Refused a token without a usable %r claim", settings.user_id_claim)
            raise AuthenticationError(INVALID_TOKEN)
        exp = claims.get("exp")
        expires_at = float(exp) if isinstance(exp, int | float) else None
        return Principal(str(user_id), expires_at, claims)


def origin_allowed(origin: str | None, allowed: tuple[str, ...] | None, *, cookie_auth: bool) -> bool:
    """Whether a handshake's `Origin` passes `allowed_origins` (exact origins or `*.example.com` wildcards)."""
    if allowed is None:
        return origin != "null"
    if origin is None:
        return not cookie_auth
    if origin == "null":
        return False
    origin = origin.lower().rstrip("/")
    for pattern in allowed:
        pattern = pattern.lower().rstrip("/")
        if pattern == origin or ("*" in pattern and _wildcard_match(origin, pattern)):
            return True
    return False


def _wildcard_match(origin: str, pattern: str) -> bool:
    scheme, _, host = origin.partition("://")
    p_scheme, _, p_host = pattern.partition("://")
    if scheme != p_scheme or not p_host.startswith("*."):
        return False
    # "*.example.com" matches "a.example.com" and "a.b.example.com", never "example.com" or "evil-example.com".
    return host.endswith(p_host[1:]) and fnmatch.fnmatchcase(host, p_host) and len(host) > len(p_host) - 1
