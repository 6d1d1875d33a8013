"""A small Python reference client: an async iterator of events that reconnects and resumes.

```python
from starlette_pomo_ws.client import PomoClient

async for event in PomoClient("ws://127.0.0.1:8000/ws", token=token):
    print(event["type"], event["data"])
```

It sends the token in an `Authorization: Bearer` header (never in the URL), reconnects with
full-jitter exponential backoff as the close code asks, resumes with `?last_event_id=`, drops
events it has already yielded (by `id`) and answers `TOKEN_EXPIRING` with `REFRESH_TOKEN` when it
has a token provider. Liveness uses WebSocket ping frames, which the server answers by itself.

It keeps a set of channels (`channels=`, `subscribe()`, `unsubscribe()`) and resumes them all with
its one cursor on every reconnect (`?last_event_id=..&channels=a,b`). It needs the `websockets` package.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import random
import re
import urllib.parse
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

from .exceptions import PomoWSError

__all__ = ["AUTH_REASONS", "FATAL_REASONS", "ConnectionRefused", "PomoClient", "TokenProvider"]

logger = logging.getLogger("starlette_pomo_ws")

#: 1008 close reasons that a fresh token can fix.
AUTH_REASONS = frozenset(
    {
        "No authentication token provided",
        "Invalid authentication token",
        "Authentication token expired",
        "Token is for another user",
    }
)
#: 1008 close reasons after which reconnecting cannot help.
FATAL_REASONS = frozenset({"Origin not allowed", "Too many connections for this user"})

#: `async (refresh: bool) -> str`: returns a token; `refresh=True` asks for a new one.
TokenProvider = Callable[[bool], Awaitable[str]]
StatusCallback = Callable[[str, dict[str, Any]], None]

_CURSOR_TYPES = frozenset({"CONNECTION_ESTABLISHED", "RESYNC_REQUIRED"})
#: `ERROR` codes that refuse a channel for good: the client forgets the channel (`data.channel`).
_CHANNEL_REFUSALS = frozenset({"forbidden", "invalid_channel", "too_many_channels"})
_CHANNEL_NAME = re.compile(r"[A-Za-z0-9_\-.:@=]{1,200}")


def _check_channel(channel: str) -> str:
    """`channel` if it is a valid name (1 to 200 of `A-Z a-z 0-9 _ - . : @ =`), else `ValueError`."""
    if not isinstance(channel, str) or not _CHANNEL_NAME.fullmatch(channel):
        raise ValueError(
            f"Invalid channel name {channel!r}: use 1 to 200 characters from A-Z a-z 0-9 _ - . : @ = (e.g. 'team:42')."
        )
    return channel


class ConnectionRefused(PomoWSError):
    """The server closed the connection for a reason that reconnecting cannot fix.

    Attributes:
        code: the close code (1008, 1009, ...).
        reason: the close reason, e.g. `"Origin not allowed"`.
    """

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"The server closed the connection: {code} {reason}".strip())
        self.code = code
        self.reason = reason


class PomoClient:
    """Iterate over the events of one user, across reconnects.

    Args:
        url: the WebSocket URL, e.g. `ws://127.0.0.1:8000/ws` (`http(s)://` is accepted too).
        token: a fixed token.
        token_provider: `async (refresh) -> token`; called for every connection, with
            `refresh=True` after an authentication close or a `TOKEN_EXPIRING` warning.
        last_event_id: a stored cursor to resume from.
        min_delay: the base of the exponential backoff, in seconds.
        max_delay: the cap of the backoff, in seconds.
        throttled_delay: the least wait after `Too many messages`, in seconds.
        max_retries: give up after this many failed attempts in a row (`None`: never).
        max_auth_failures: authentication closes in a row before giving up.
        open_timeout: seconds for the handshake.
        ping_interval: seconds between WebSocket pings (`None` turns them off).
        on_status: called with `("connecting" | "open" | "reconnecting" | "closed", detail)`.
        channels: channels to subscribe to on every connection, e.g. `["team:42"]` (the URL's own
            `?channels=a,b` is added to them).

    Channels: the client keeps a set of channels and sends it with every handshake
    (`?channels=a,b`), so a reconnect resumes them all from its one cursor, exactly once. A
    retained event (`"retained": true`, no `id`) and the `id` of `SUBSCRIBED` never move the
    cursor. A channel that the server refuses (`ERROR` `forbidden`, `invalid_channel`,
    `too_many_channels` with `data.channel`) or revokes (`UNSUBSCRIBED`) leaves the set. Every
    message is still yielded, so the app sees them too.

    The iterator ends when the server closes with 1000 or `close()` is called. It raises
    `ConnectionRefused` for closes that reconnecting cannot fix (a refused origin, too many
    connections, 1009, repeated authentication failures).
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        token_provider: TokenProvider | None = None,
        last_event_id: str | None = None,
        min_delay: float = 0.5,
        max_delay: float = 30.0,
        throttled_delay: float = 60.0,
        max_retries: int | None = None,
        max_auth_failures: int = 3,
        open_timeout: float = 10.0,
        ping_interval: float | None = 20.0,
        on_status: StatusCallback | None = None,
        dedup_size: int = 2000,
        channels: Iterable[str] = (),
    ) -> None:
        if token is None and token_provider is None:
            raise ValueError("PomoClient needs a token or a token_provider.")
        self.url = url
        self._token = token
        self._provider = token_provider
        self.last_event_id = last_event_id
        self.min_delay = min_delay
        self.max_delay = max_delay
        self.throttled_delay = throttled_delay
        self.max_retries = max_retries
        self.max_auth_failures = max_auth_failures
        self.open_timeout = open_timeout
        self.ping_interval = ping_interval
        self.on_status = on_status
        self.close_code: int | None = None
        self.close_reason: str = ""
        self._seen: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._dedup_size = dedup_size
        self._ws: Any = None
        self._closing = False
        self._random = random.Random()
        if isinstance(channels, str):
            raise TypeError("channels= takes a list of channel names, e.g. ['team:42'], not one string.")
        query = urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query, keep_blank_values=True)
        in_url = [name for key, value in query if key == "channels" for name in value.split(",") if name]
        # Insertion-ordered: the handshake lists the channels in the order they were subscribed.
        self._channels: dict[str, None] = {_check_channel(name): None for name in [*in_url, *channels]}
        self._since: dict[str, str] = {}  # SUBSCRIBE with `since`, to send once connected
        self._requested: set[str] = set()  # the channels asked for on the current connection
        self._unsubscribing: collections.Counter[str] = collections.Counter()  # our UNSUBSCRIBEs not yet answered

    def __repr__(self) -> str:
        channels = f", channels={self.channels!r}" if self._channels else ""
        return f"PomoClient(url={_strip_query(self.url)!r}, last_event_id={self.last_event_id!r}{channels})"

    @property
    def channels(self) -> tuple[str, ...]:
        """The channels this client subscribes to (and resumes on every reconnect), in subscription order."""
        return tuple(self._channels)

    @property
    def closing(self) -> bool:
        """Whether `close()` was called."""
        return self._closing

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self.events()

    async def close(self) -> None:
        """Stop: close the socket with 1000 and end the iterator."""
        self._closing = True
        if self._ws is not None:
            await self._ws.close()

    async def send(self, type: str, data: Any = None) -> None:
        """Send `{"type", "data"}` on the current connection (for example `PING`)."""
        if self._ws is None:
            raise ConnectionError("Not connected.")
        message: dict[str, Any] = {"type": type} if data is None else {"type": type, "data": data}
        await self._ws.send(json.dumps(message))

    async def subscribe(self, channel: str, since: str | None = None) -> None:
        """Add `channel` to the set: subscribe now if connected, and again on every reconnect.

        The answer (`SUBSCRIBED`, or `ERROR` `forbidden`) comes through the iterator.

        Args:
            channel: the channel name, e.g. `"team:42"`.
            since: an event id after which the channel's events should be replayed, sent in a
                `SUBSCRIBE` once connected. Without it a new subscription starts with the channel's
                retained event, then live events. Either way, reconnects resume it from the cursor.

        Raises:
            ValueError: the name is not a valid channel name.
        """
        _check_channel(channel)
        self._channels[channel] = None
        if since is not None:
            self._since[channel] = since
        if self._ws is not None:
            self._requested.add(channel)
            await self._send_quietly(_subscribe_message(channel, since))
        # Not connected: the next handshake carries it (with `since`: a SUBSCRIBE after CONNECTION_ESTABLISHED).

    async def unsubscribe(self, channel: str) -> None:
        """Remove `channel` from the set, and unsubscribe now if connected (also from a channel the server added)."""
        self._channels.pop(channel, None)
        self._since.pop(channel, None)
        self._requested.discard(channel)
        if self._ws is not None:
            self._unsubscribing[channel] += 1
            await self._send_quietly({"type": "UNSUBSCRIBE", "data": {"channel": channel}})

    async def _send_quietly(self, message: dict[str, Any]) -> None:
        # A connection that drops meanwhile is not an error: the next handshake carries the channel set.
        from websockets.exceptions import ConnectionClosed

        try:
            await self._ws.send(json.dumps(message))
        except ConnectionClosed:
            logger.debug("pomo-ws client: the connection closed before %s was sent", message["type"])

    def connect_url(self) -> str:
        """The URL of the next attempt: `http(s)` mapped to `ws(s)`, plus `last_event_id` and `channels`."""
        parts = urllib.parse.urlsplit(self.url)
        scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
        query = [
            (k, v)
            for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
            if k not in ("last_event_id", "channels")
        ]
        if self.last_event_id:
            query.append(("last_event_id", self.last_event_id))
        resumed = self._resumed_channels()
        if resumed:
            query.append(("channels", ",".join(resumed)))
        # `:` and `,` are common in channel names and safe in a query: keep the URL readable.
        encoded = urllib.parse.urlencode(query, safe=":,@")
        return urllib.parse.urlunsplit((scheme, parts.netloc, parts.path, encoded, ""))

    def _resumed_channels(self) -> list[str]:
        # The channels of the handshake; those with a `since` follow as SUBSCRIBE messages.
        return [name for name in self._channels if name not in self._since]

    def _status(self, status: str, **detail: Any) -> None:
        if self.on_status is not None:
            self.on_status(status, detail)

    async def _get_token(self, refresh: bool) -> str:
        if self._provider is not None and (refresh or self._token is None):
            self._token = await self._provider(refresh)
        assert self._token is not None
        return self._token

    def _delay(self, attempt: int) -> float:
        # Full jitter: uniform between zero and the exponential ceiling.
        return self._random.uniform(0, min(self.max_delay, self.min_delay * 2**attempt))

    async def events(self) -> AsyncGenerator[dict[str, Any], None]:
        """Yield every server message (deduplicated by `id`), reconnecting as needed."""
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed, InvalidHandshake

        attempt = 0
        auth_failures = 0
        refresh = False
        self._closing = False
        while not self._closing:
            self._status("reconnecting" if attempt or self.close_code is not None else "connecting")
            code, reason = 1006, ""
            established = False
            try:
                token = await self._get_token(refresh)
                refresh = False
                self._unsubscribing.clear()
                self._requested = set(self._resumed_channels())
                async with connect(
                    self.connect_url(),
                    additional_headers={"Authorization": f"Bearer {token}"},
                    compression=None,
                    open_timeout=self.open_timeout,
                    ping_interval=self.ping_interval,
                    max_size=None,
                ) as ws:
                    self._ws = ws
                    try:
                        while True:
                            raw = await ws.recv()
                            event = self._parse(raw)
                            if event is None:
                                continue
                            kind = event["type"]
                            if kind == "CONNECTION_ESTABLISHED":
                                established = True
                                attempt = 0
                                auth_failures = 0
                                self._status("open")
                                # Channels added while this handshake was under way, and those with a `since`.
                                for channel in [name for name in self._channels if name not in self._requested]:
                                    self._requested.add(channel)
                                    await ws.send(json.dumps(_subscribe_message(channel, self._since.get(channel))))
                            elif kind == "TOKEN_EXPIRING" and self._provider is not None:
                                fresh = await self._get_token(True)
                                await ws.send(json.dumps({"type": "REFRESH_TOKEN", "data": {"token": fresh}}))
                            else:
                                self._track_channels(event)
                            if not self._accept(event):
                                continue
                            yield event
                    except ConnectionClosed as exc:
                        if exc.rcvd is not None:
                            code, reason = exc.rcvd.code, exc.rcvd.reason
                        elif self.closing:
                            code = 1000
                    finally:
                        self._ws = None
            except (OSError, InvalidHandshake, TimeoutError) as exc:
                logger.debug("pomo-ws client: connection attempt failed: %s", type(exc).__name__)
                reason = f"{type(exc).__name__}: {exc}"
            self.close_code, self.close_reason = code, reason
            if 4000 <= code < 5000:  # daphne allows only 1000 and 3000-4999: 1008 arrives there as 4008
                code -= 3000
            if self._closing or code == 1000:
                break
            minimum = 0.0
            if code == 1009 or (code == 1008 and reason in FATAL_REASONS):
                self._status("closed", code=code, reason=reason)
                raise ConnectionRefused(code, reason)
            if code == 1008 and reason == "Too many messages":
                minimum = self.throttled_delay
            elif code == 1008:
                auth_failures += 1
                if self._provider is None or auth_failures > self.max_auth_failures:
                    self._status("closed", code=code, reason=reason)
                    raise ConnectionRefused(code, reason)
                refresh = True
            if not established:
                if self.max_retries is not None and attempt >= self.max_retries:
                    self._status("closed", code=code, reason=reason)
                    raise ConnectionRefused(code, reason or "Could not connect")
            delay = max(minimum, self._delay(attempt))
            attempt += 1
            self._status("reconnecting", code=code, reason=reason, delay=delay)
            await asyncio.sleep(delay)
        self._status("closed", code=self.close_code, reason=self.close_reason)

    def _parse(self, raw: str | bytes) -> dict[str, Any] | None:
        try:
            event = json.loads(raw)
        except ValueError:
            logger.warning("pomo-ws client: ignored a frame that is not JSON")
            return None
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            return None
        return event

    def _track_channels(self, event: dict[str, Any]) -> None:
        """Keep the channel set in step with what the server says about it."""
        kind = event["type"]
        data = event.get("data")
        if not isinstance(data, dict) or not isinstance(data.get("channel"), str):
            return
        channel: str = data["channel"]
        if kind == "SUBSCRIBED":
            self._since.pop(channel, None)  # answered: later reconnects resume it from the cursor
            if channel not in self._channels and not self._unsubscribing[channel]:
                self._channels[channel] = None  # added by the server (`subscribe_user`): resume it too
        elif kind == "UNSUBSCRIBED":
            if self._unsubscribing[channel] > 0 and "reason" not in data:
                self._unsubscribing[channel] -= 1  # the answer to our own UNSUBSCRIBE: the set already says so
            else:
                self._forget(channel)  # revoked by the server (`unsubscribe_user`)
        elif kind == "ERROR" and data.get("code") in _CHANNEL_REFUSALS:
            self._forget(channel)

    def _forget(self, channel: str) -> None:
        if channel in self._channels:
            logger.info("pomo-ws client: no longer subscribed to channel %r", channel)
        self._channels.pop(channel, None)
        self._since.pop(channel, None)

    def _accept(self, event: dict[str, Any]) -> bool:
        """Track the cursor; false for an event already yielded."""
        event_id = event.get("id")
        if not isinstance(event_id, str) or not event_id or event.get("retained") is True:
            return True  # retained state is not a position: it never moves the cursor
        if event["type"] == "SUBSCRIBED" or (event["type"] == "RESYNC_REQUIRED" and _channel_of(event) is not None):
            # Positions of one channel, possibly ahead of user events still in flight: not a cursor.
            return True
        if event["type"] in _CURSOR_TYPES:
            if event["type"] == "RESYNC_REQUIRED":
                self._seen.clear()
            self.last_event_id = event_id
            return True
        if event_id in self._seen:
            return False
        self._seen[event_id] = None
        while len(self._seen) > self._dedup_size:
            self._seen.popitem(last=False)
        self.last_event_id = event_id
        return True


def _subscribe_message(channel: str, since: str | None) -> dict[str, Any]:
    data = {"channel": channel} if since is None else {"channel": channel, "since": since}
    return {"type": "SUBSCRIBE", "data": data}


def _channel_of(event: dict[str, Any]) -> str | None:
    data = event.get("data")
    channel = data.get("channel") if isinstance(data, dict) else None
    return channel if isinstance(channel, str) else None


def _strip_query(url: str) -> str:
    # The query may hold a token (`?token=`): never show it.
    return url.split("?", 1)[0]
