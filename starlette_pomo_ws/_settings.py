from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
import types
import typing
import urllib.parse
from collections.abc import Mapping
from typing import Any

from ._channels import channel_pattern_problem
from .exceptions import ConfigurationError

__all__ = ["Settings"]

_ENV_PREFIX = "POMO_WS_"
_HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
_PUBLIC_KEY_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES256K", "ES384", "ES512", "EdDSA"}
)
_MIN_HMAC_KEY_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
_MIN_CURSOR_SECRET_BYTES = 32
_SECRET_FIELDS = frozenset({"jwt_secret", "cursor_secret"})


@dataclasses.dataclass(frozen=True, repr=False)
class Settings:
    """Every setting of the package, in one immutable object.

    Only `jwt_secret` has no default (unless an `authenticate` callable replaces the JWT check).
    Values are checked for type and range here; the key and settings that contradict each other are
    checked when the app starts, by `pomo.lifespan`, so that a misconfigured app never serves.
    """

    jwt_secret: str | None = None
    jwt_algorithms: tuple[str, ...] = ("HS256",)
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    jwt_leeway: float = 0
    jwt_require_exp: bool = True
    user_id_claim: str = "userId"
    token_query_param: str | None = "token"
    token_cookie: str | None = None
    allowed_origins: tuple[str, ...] | None = None
    cursor_secret: str | None = None
    backend_url: str = "memory://"
    heartbeat_interval: float = 30
    token_expiry_warning: float = 30
    history_size: int = 1000
    history_ttl: float = 120
    redis_min_replicas: int = 0
    send_queue_size: int = 1000
    send_timeout: float = 5
    max_connections_per_user: int = 32
    max_message_size: int = 65536
    client_message_rate: float = 20
    client_message_burst: int = 40
    max_channels_per_connection: int = 64
    presence_channels: tuple[str, ...] = ()
    presence_ttl: float = 30
    presence_max_members: int = 100
    metrics: bool = False
    health_details: bool = True

    def __post_init__(self) -> None:
        for name in ("jwt_algorithms", "allowed_origins", "presence_channels"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise ConfigurationError(f"Setting '{name}' must be a tuple of strings, not the string {value!r}.")
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))
        non_negative = ("jwt_leeway", "heartbeat_interval", "token_expiry_warning", "redis_min_replicas")
        positive = (
            "history_size",
            "history_ttl",
            "send_queue_size",
            "send_timeout",
            "max_connections_per_user",
            "max_message_size",
            "client_message_rate",
            "client_message_burst",
            "max_channels_per_connection",
            "presence_ttl",
            "presence_max_members",
        )
        for name in non_negative + positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigurationError(f"Setting '{name}' must be a number, not {value!r}.")
            if value < 0 or (value == 0 and name in positive):
                bound = "zero or more" if name in non_negative else "more than zero"
                raise ConfigurationError(f"Setting '{name}' has value {value!r}; it must be {bound}.")
        if not isinstance(self.redis_min_replicas, int):
            raise ConfigurationError(
                f"Setting 'redis_min_replicas' must be a whole number, not {self.redis_min_replicas!r}."
            )
        for pattern in self.presence_channels:
            if not isinstance(pattern, str) or channel_pattern_problem(pattern):
                raise ConfigurationError(
                    f"Setting 'presence_channels' has {pattern!r}; write channel names or prefix patterns such as "
                    "'team:*' (letters, digits and _ - . : @ =, with an optional '*' at the end)."
                )
        if not self.jwt_algorithms:
            raise ConfigurationError("Setting 'jwt_algorithms' is empty; name at least one algorithm, e.g. ('HS256',).")
        if not self.user_id_claim:
            raise ConfigurationError("Setting 'user_id_claim' must name a claim, e.g. 'userId' or 'sub'.")

    def __repr__(self) -> str:
        parts = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name in _SECRET_FIELDS and value is not None:
                value = "**********"
            elif field.name == "backend_url":
                value = redact_url(value)
            parts.append(f"{field.name}={value!r}")
        return f"Settings({', '.join(parts)})"

    def replace(self, **changes: Any) -> Settings:
        """Return a copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read every field from `POMO_WS_<FIELD>` environment variables.

        `JWT_SECRET` is the fallback for `POMO_WS_JWT_SECRET`, as in the original guide, and
        `POMO_WS_JWT_SECRET_FILE` / `POMO_WS_CURSOR_SECRET_FILE` read a key from a file (for PEM keys).
        Numbers parse as numbers, booleans as `true`/`false`/`1`/`0`, tuples as comma-separated
        values; an empty value or `none` gives `None` where a field accepts it.

        Raises:
            ConfigurationError: a value cannot be parsed; the message names the variable.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            var = _ENV_PREFIX + field.name.upper()
            raw = env.get(var)
            if field.name in _SECRET_FIELDS and raw is None and (path := env.get(var + "_FILE")):
                try:
                    with open(path, encoding="utf-8") as fh:
                        raw = fh.read().strip()
                except OSError as exc:
                    raise ConfigurationError(f"Cannot read {var}_FILE={path!r}: {exc.strerror}.") from exc
            if field.name == "jwt_secret" and raw is None:
                raw = env.get("JWT_SECRET")
            if raw is not None:
                values[field.name] = _parse(var, raw, hints[field.name])
        values.update(overrides)
        return cls(**values)

    # -- checks run when the app starts -------------------------------------------------------------

    def check(self, *, custom_authenticate: bool) -> None:
        """Raise `ConfigurationError` when the settings cannot serve. Called when the app starts."""
        algorithms = set(self.jwt_algorithms)
        if not custom_authenticate:
            if not self.jwt_secret:
                raise ConfigurationError(
                    "Setting 'jwt_secret' is missing. Pass Settings(jwt_secret=...) or set POMO_WS_JWT_SECRET "
                    "(or JWT_SECRET) to the key your tokens are signed with."
                )
            if any(alg.lower() == "none" for alg in algorithms):
                raise ConfigurationError(
                    "Setting 'jwt_algorithms' contains 'none'; unsigned tokens are never accepted."
                )
            unknown = algorithms - _HMAC_ALGORITHMS - _PUBLIC_KEY_ALGORITHMS
            if unknown:
                raise ConfigurationError(f"Setting 'jwt_algorithms' has unknown algorithms {sorted(unknown)}.")
            if algorithms & _HMAC_ALGORITHMS and algorithms & _PUBLIC_KEY_ALGORITHMS:
                raise ConfigurationError(
                    "Setting 'jwt_algorithms' mixes HMAC and public-key algorithms; that invites algorithm "
                    "confusion. Accept one family only."
                )
            if algorithms & _HMAC_ALGORITHMS:
                if "-----BEGIN" in self.jwt_secret:
                    raise ConfigurationError(
                        "Setting 'jwt_secret' holds a PEM key but 'jwt_algorithms' are HMAC; use RS256/ES256/EdDSA "
                        "for public keys."
                    )
                need = max(_MIN_HMAC_KEY_BYTES[a] for a in algorithms)
                have = len(self.jwt_secret.encode())
                if have < need:
                    raise ConfigurationError(
                        f"Setting 'jwt_secret' is {have} bytes long; {'/'.join(sorted(algorithms))} needs at least "
                        f"{need} bytes (RFC 7518 section 3.2). Generate one with "
                        "`python -c 'import secrets; print(secrets.token_urlsafe(48))'`."
                    )
            elif "-----BEGIN" not in self.jwt_secret:
                raise ConfigurationError(
                    "Setting 'jwt_secret' must be a PEM public key for "
                    f"{'/'.join(sorted(algorithms))}; read it with POMO_WS_JWT_SECRET_FILE."
                )
        if self.cursor_secret is not None and len(self.cursor_secret.encode()) < _MIN_CURSOR_SECRET_BYTES:
            raise ConfigurationError(
                f"Setting 'cursor_secret' is {len(self.cursor_secret.encode())} bytes long; it needs at least "
                f"{_MIN_CURSOR_SECRET_BYTES} bytes, as an HMAC key does. Generate one with "
                "`python -c 'import secrets; print(secrets.token_urlsafe(48))'`."
            )
        if self.token_cookie is not None and not self.allowed_origins:
            raise ConfigurationError(
                "Setting 'token_cookie' requires 'allowed_origins': cookie authentication without an origin "
                "allow-list is open to cross-site WebSocket hijacking."
            )
        if self.allowed_origins is not None:
            for origin in self.allowed_origins:
                if origin == "null" or "://" not in origin:
                    raise ConfigurationError(
                        f"Setting 'allowed_origins' has {origin!r}; write origins as 'https://app.example.com' or "
                        "'https://*.example.com'. 'null' is never allowed."
                    )
        if self.backend_url.split(":", 1)[0] not in ("memory", "redis", "rediss", "redis+sentinel", "rediss+sentinel"):
            raise ConfigurationError(
                f"Setting 'backend_url' has unsupported scheme in {redact_url(self.backend_url)!r}; "
                "use 'memory://' or 'redis://host:port/db'."
            )

    def derived_cursor_key(self, *, shared: bool) -> bytes:
        """The key that signs resume cursors.

        It is `cursor_secret` when set, else derived from an HMAC `jwt_secret`. A single-process
        (memory) backend may fall back to a random per-process key, since its history dies with the
        process anyway; a shared backend may not.
        """
        if self.cursor_secret:
            return hashlib.sha256(b"pomo-ws-cursor:" + self.cursor_secret.encode()).digest()
        if self.jwt_secret and set(self.jwt_algorithms) <= _HMAC_ALGORITHMS:
            return hmac.new(self.jwt_secret.encode(), b"starlette-pomo-ws cursor key", hashlib.sha256).digest()
        if shared:
            raise ConfigurationError(
                "Setting 'cursor_secret' is required: 'jwt_secret' is not an HMAC key, and every node of a "
                "cluster must sign resume cursors with the same key."
            )
        return os.urandom(32)


def redact_url(url: str) -> str:
    """Hide the passwords of a URL: in its userinfo (redis://user:secret@host/0) and in `?password=`."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:  # e.g. an unclosed IPv6 bracket: show nothing that might be a secret
        scheme, sep, _ = url.partition("://")
        return f"{scheme}://***" if sep else "***"
    if not parts.scheme:
        return url
    netloc = parts.netloc
    if "@" in netloc:
        creds, _, host = netloc.rpartition("@")
        user, colon, _ = creds.partition(":")
        netloc = f"{user}:***@{host}" if colon and user else f"***@{host}"
    query = "&".join(
        f"{name}=***" if urllib.parse.unquote_plus(name).lower() == "password" else field
        for field in parts.query.split("&")
        for name in (field.partition("=")[0],)
    )
    text = f"{parts.scheme}://{netloc}{parts.path}" if "://" in url else f"{parts.scheme}:{netloc}{parts.path}"
    if query or url.endswith("?"):
        text += f"?{query}"
    if parts.fragment:
        text += f"#{parts.fragment}"
    return text


def _parse(var: str, raw: str, hint: Any) -> Any:
    text = raw.strip()
    args = typing.get_args(hint)
    optional = type(None) in args
    if optional and text.lower() in ("", "none"):
        return None
    base = (
        next((a for a in args if a is not type(None)), hint) if optional or isinstance(hint, types.UnionType) else hint
    )
    origin = typing.get_origin(base)
    try:
        if base is bool:
            lowered = text.lower()
            if lowered in ("true", "1"):
                return True
            if lowered in ("false", "0"):
                return False
            raise ValueError
        if base is int:
            return int(text)
        if base is float:
            return float(text)
        if origin is tuple:
            return tuple(part.strip() for part in text.split(",") if part.strip())
    except ValueError:
        kind = {bool: "a bool (true/false/1/0)", int: "an integer", float: "a number"}[base]
        raise ConfigurationError(f"Environment variable {var} has value {raw!r}, which is not {kind}.") from None
    return raw
