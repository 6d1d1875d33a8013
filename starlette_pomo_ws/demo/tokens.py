"""Development tokens: the demo's login and `pomo-ws token` mint HS256 tokens with the configured secret."""

from __future__ import annotations

import logging
import secrets
import time
from typing import Any

import jwt

from .._settings import Settings

__all__ = ["dev_settings", "generate_secret", "mint_token", "verify_token"]

logger = logging.getLogger("starlette_pomo_ws")


def generate_secret() -> str:
    """A random HMAC key long enough for HS256, HS384 and HS512 (64 bytes)."""
    return secrets.token_urlsafe(48)


def dev_settings(settings: Settings | None = None) -> tuple[Settings, bool]:
    """The settings, with a generated development secret when none is configured.

    Returns:
        `(settings, generated)`: `generated` is true when the secret was made up here. Tokens
        signed with it stop working when the process ends.
    """
    resolved = Settings.from_env() if settings is None else settings
    if resolved.jwt_secret:
        return resolved, False
    resolved = resolved.replace(jwt_secret=generate_secret(), jwt_algorithms=("HS256",))
    logger.warning(
        "No JWT secret is configured (POMO_WS_JWT_SECRET or JWT_SECRET); generated a development secret. "
        "Tokens signed with it stop working when this process ends."
    )
    return resolved, True


def mint_token(settings: Settings, user_id: str, *, ttl: float = 3600, claims: dict[str, Any] | None = None) -> str:
    """Sign a token for `user_id` with the settings' HMAC secret.

    The user id goes in `settings.user_id_claim` (the guide's `userId`) and in `sub`; `aud` and
    `iss` follow the settings when they are set.

    Raises:
        ValueError: there is no HMAC secret to sign with.
    """
    algorithm = next((alg for alg in settings.jwt_algorithms if alg.startswith("HS")), None)
    if not settings.jwt_secret or algorithm is None:
        raise ValueError("Minting a token needs an HMAC 'jwt_secret' (HS256/HS384/HS512).")
    now = int(time.time())
    payload: dict[str, Any] = {settings.user_id_claim: user_id, "sub": user_id, "iat": now, "exp": now + int(ttl)}
    if settings.jwt_audience:
        payload["aud"] = settings.jwt_audience
    if settings.jwt_issuer:
        payload["iss"] = settings.jwt_issuer
    payload.update(claims or {})
    return jwt.encode(payload, settings.jwt_secret, algorithm=algorithm)


def verify_token(settings: Settings, token: str) -> str:
    """Check a token as the WebSocket handshake does, and return its user id.

    Raises:
        jwt.InvalidTokenError: the token is invalid, expired or has no user id.
    """
    assert settings.jwt_secret is not None
    claims = jwt.decode(
        token,
        settings.jwt_secret,
        algorithms=list(settings.jwt_algorithms),
        audience=settings.jwt_audience,
        issuer=settings.jwt_issuer,
        leeway=settings.jwt_leeway,
        options={"require": ["exp"] if settings.jwt_require_exp else []},
    )
    user_id = claims.get(settings.user_id_claim)
    if user_id is None or user_id == "":
        raise jwt.InvalidTokenError(f"The token has no '{settings.user_id_claim}' claim.")
    return str(user_id)
