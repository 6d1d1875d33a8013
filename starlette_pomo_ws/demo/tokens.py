"""The demo's secret and its dev login's safety rails.

The demo's login mints a token for any name, so the demo signs with a secret of its own, made up
for each run: never with `JWT_SECRET` (another app's key, as the original guide names it), and
with `POMO_WS_JWT_SECRET` only when asked to (`pomo-ws demo --use-env-secret`). Tokens are minted
by `starlette_pomo_ws.testing.mint_token`, the package's one minter.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
from collections.abc import Mapping
from typing import Any

from .._settings import Settings
from ..testing import mint_token

__all__ = [
    "LOOPBACK_HOSTS",
    "demo_settings",
    "demo_token",
    "dev_settings",
    "generate_secret",
    "is_loopback",
    "mint_token",
    "team_channel",
    "team_of",
]

logger = logging.getLogger("starlette_pomo_ws")

#: The `Host` names the demo answers by default: a DNS-rebinding page sends its own name and is refused.
LOOPBACK_HOSTS: tuple[str, ...] = ("127.0.0.1", "localhost", "::1")
_SECRET_VARIABLES = ("POMO_WS_JWT_SECRET", "POMO_WS_JWT_SECRET_FILE")


def team_of(user_id: str) -> str | None:
    """The team of a demo user: `alice@focus` is in team `focus`; `alice` is in none."""
    name, _, team = user_id.partition("@")
    return team if name and team else None


def team_channel(team: str) -> str:
    """The team's channel: its timer (retained), its board and its presence."""
    return f"team:{team}"


def demo_token(settings: Settings, user_id: str, *, ttl: float, iat: int | None = None) -> str:
    """A token for a demo user; a team member's carries the `channels` claim of its own team only."""
    claims: dict[str, Any] = {} if iat is None else {"iat": iat}
    team = team_of(user_id)
    if team is not None:
        claims["channels"] = [team_channel(team), team_channel(team) + ":*"]
    return mint_token(settings, user_id, ttl=ttl, **claims)


def generate_secret() -> str:
    """A random HMAC key long enough for HS256, HS384 and HS512 (64 bytes)."""
    return secrets.token_urlsafe(48)


def is_loopback(host: str) -> bool:
    """Whether a host name or address only reaches this machine (`localhost`, `127.0.0.0/8`, `::1`)."""
    name = host.strip("[]").lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def demo_settings(environ: Mapping[str, str] | None = None, *, use_env_secret: bool = False) -> tuple[Settings, bool]:
    """The demo's settings from the environment, with a secret of its own.

    `JWT_SECRET` is never read. `POMO_WS_JWT_SECRET` (or `POMO_WS_JWT_SECRET_FILE`) is read only
    with `use_env_secret=True`; otherwise, and when it is unset, a development secret is generated.

    Returns:
        `(settings, generated)`, as `dev_settings`.
    """
    env = dict(os.environ if environ is None else environ)
    env.pop("JWT_SECRET", None)
    if not use_env_secret:
        for name in _SECRET_VARIABLES:
            env.pop(name, None)
    return dev_settings(Settings.from_env(env))


def dev_settings(settings: Settings | None = None) -> tuple[Settings, bool]:
    """The settings, with a generated development secret when they have none.

    `None` means `demo_settings()`: the environment, without its secrets.

    Returns:
        `(settings, generated)`: `generated` is true when the secret was made up here. Tokens
        signed with it stop working when the process ends.
    """
    if settings is None:
        return demo_settings()
    if settings.jwt_secret:
        return settings, False
    resolved = settings.replace(jwt_secret=generate_secret(), jwt_algorithms=("HS256",))
    logger.warning(
        "Demo: generated a development secret for this run. Tokens signed with it stop working when this process ends."
    )
    return resolved, True
