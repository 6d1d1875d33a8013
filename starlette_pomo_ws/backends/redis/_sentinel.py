"""`redis+sentinel://` URLs: a client that finds the current primary through Redis Sentinel."""

from __future__ import annotations

from typing import Any, NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit

from ..._settings import redact_url
from ...exceptions import ConfigurationError

__all__ = ["SCHEMES", "SentinelURL", "parse_sentinel_url"]

SCHEMES = ("redis+sentinel", "rediss+sentinel")
_HINT = "use 'redis+sentinel://[[user]:password@]host:26379,host:26380/<service name>[/db]'"


class SentinelURL(NamedTuple):
    sentinels: list[tuple[str, int]]
    service_name: str
    db: int
    username: str | None
    password: str | None  # of the primary; `?sentinel_password=` is the sentinels' own
    ssl: bool
    sentinel_password: str | None


def parse_sentinel_url(url: str) -> SentinelURL:
    """Split `redis+sentinel://[[user]:password@]host:port,host:port/service[/db][?sentinel_password=...]`.

    Raises:
        ConfigurationError: the URL is not of that form.
    """
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES:
        raise ConfigurationError(f"Setting 'backend_url' ({redact_url(url)!r}) is not a Sentinel URL; {_HINT}.")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    username = password = None
    if userinfo:
        user, _, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) or None
    sentinels: list[tuple[str, int]] = []
    for address in hosts.split(","):
        host, _, port = address.rpartition(":") if ":" in address else (address, "", "26379")
        if not host or not port.isdigit():
            raise ConfigurationError(
                f"Setting 'backend_url' ({redact_url(url)!r}) has the sentinel address {address!r}; {_HINT}."
            )
        sentinels.append((host, int(port)))
    path = [segment for segment in parts.path.split("/") if segment]
    if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ConfigurationError(
            f"Setting 'backend_url' ({redact_url(url)!r}) must name the Sentinel service (and the db); {_HINT}."
        )
    query = parse_qs(parts.query)
    unknown = set(query) - {"sentinel_password"}
    if unknown:
        raise ConfigurationError(
            f"Setting 'backend_url' has unsupported Sentinel URL options {sorted(unknown)}; "
            "only 'sentinel_password' is read (pass a ready client for anything else)."
        )
    return SentinelURL(
        sentinels,
        unquote(path[0]),
        int(path[1]) if len(path) == 2 else 0,
        username,
        password,
        parts.scheme == "rediss+sentinel",
        query["sentinel_password"][0] if "sentinel_password" in query else None,
    )


def sentinel_client(url: str, **connection: Any) -> tuple[Any, str]:
    """A `redis.asyncio.Redis` bound to the URL's primary, and a description without secrets."""
    from redis.asyncio.sentinel import Sentinel

    parsed = parse_sentinel_url(url)
    sentinel_kwargs: dict[str, Any] = {
        "socket_timeout": connection["socket_timeout"],
        "socket_connect_timeout": connection["socket_connect_timeout"],
    }
    if parsed.sentinel_password is not None:
        sentinel_kwargs["password"] = parsed.sentinel_password
    sentinel = Sentinel(parsed.sentinels, sentinel_kwargs=sentinel_kwargs)  # type: ignore[no-untyped-call,unused-ignore]  # redis-py < 8.2 leaves it unannotated
    extra: dict[str, Any] = {"db": parsed.db, "username": parsed.username, "password": parsed.password}
    if parsed.ssl:
        extra["ssl"] = True
    client = sentinel.master_for(parsed.service_name, **connection, **extra)
    return client, describe(parsed.sentinels, parsed.service_name, parsed.db, parsed.ssl)


def describe(sentinels: list[tuple[str, int]], service_name: str, db: int, ssl: bool = False) -> str:
    scheme = SCHEMES[1] if ssl else SCHEMES[0]
    return f"{scheme}://{','.join(f'{h}:{p}' for h, p in sentinels)}/{service_name}/{db}"
