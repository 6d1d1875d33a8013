"""Channels: named streams that connections subscribe to (a team, a board, a room), and their presence.

A channel's events share the one total order with the users' events and the broadcasts, so one
cursor resumes all of a tab's streams. This module holds everything about channels on this node:
names and who may subscribe, the subscribe seam (live events wait while a subscriber's replay is
read), leaving, and presence. The fan-out itself is the broadcaster's, the same loop as every event's.

Subscribing, for one connection and one channel:

1. authorize (`authorize_channel`, or the token's `channels` claim);
2. count the connection in the channel's membership (cluster-wide on a shared backend);
3. hold the channel's live events for this connection, subscribe this node to the channel, and
   read the channel's position, with its replay (`since`) or its retained state;
4. in one synchronous step: join the fan-out, then send `SUBSCRIBED`, the replay or the retained
   event, the presence, and the held events that came after the position read.
"""

from __future__ import annotations

import contextvars
import logging
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ._events import EventType, Position, dumps, envelope_head, iso_timestamp, protocol_message, wire_size, with_id
from ._outbox import ALWAYS
from ._subscriptions import Subscriptions
from ._types import Message
from .backends.base import Record
from .exceptions import BackendUnavailable

if TYPE_CHECKING:
    from ._auth import Principal
    from ._broadcaster import Broadcaster
    from ._connection import Connection

__all__ = ["AuthorizeChannel", "Channels", "channel_pattern_problem", "channel_problem", "pattern_matches"]

logger = logging.getLogger("starlette_pomo_ws")

#: `async (principal, channel) -> bool`: whether the principal may subscribe to the channel.
AuthorizeChannel = Callable[["Principal", str], Awaitable[bool]]

_NAME = re.compile(r"[A-Za-z0-9_\-.:@=]{1,200}")
_RULE = "1 to 200 characters from A-Z a-z 0-9 _ - . : @ ="
_Held = list[tuple[Message, int, int]]


def channel_problem(name: object) -> str | None:
    """Why `name` is not a channel name, or `None` when it is one."""
    if not isinstance(name, str):
        return "a channel name must be a string"
    if _NAME.fullmatch(name) is None:
        return f"channel names are {_RULE}"
    return None


def channel_pattern_problem(pattern: str) -> str | None:
    """Why `pattern` is neither a channel name nor a prefix pattern (`team:42:*`, or `*` for all)."""
    if pattern == "*":
        return None
    return channel_problem(pattern[:-1] if pattern.endswith("*") else pattern)


def pattern_matches(patterns: Iterable[str], channel: str) -> bool:
    """Whether `channel` is one of `patterns`, or starts with the prefix of one that ends in `*`."""
    for pattern in patterns:
        if pattern.endswith("*"):
            if channel.startswith(pattern[:-1]):
                return True
        elif pattern == channel:
            return True
    return False


def _channel_text(type_: str, channel: str, data: Any) -> str:
    """A message about a channel for all its subscribers: `userId` null, the channel in the envelope, no id."""
    return envelope_head(type_, None, dumps(data), iso_timestamp(), channel) + "}"


def _message(text: str) -> tuple[Message, int]:
    return {"type": "websocket.send", "text": text}, wire_size(text)


class Channels:
    """This node's channels: who may subscribe, the subscribe seam, leaving, and presence."""

    def __init__(self, broadcaster: Broadcaster, authorize: AuthorizeChannel | None) -> None:
        self._broadcaster = broadcaster
        self.authorize = authorize
        settings = broadcaster.settings
        self._presence_patterns = settings.presence_channels
        self._max_members = settings.presence_max_members
        self._limit = settings.max_channels_per_connection
        # Channel -> the connections whose subscribe is being read, each with the live events held for it.
        self.joining: dict[str, dict[Connection, _Held]] = {}
        self._names: dict[str, str] = {}  # the channels held or being joined here, each name once
        backend = broadcaster.backend
        self.streams = Subscriptions(backend.subscribe_channel, backend.unsubscribe_channel, broadcaster.spawn)

    def is_presence(self, channel: str) -> bool:
        return pattern_matches(self._presence_patterns, channel)

    async def allowed(self, principal: Principal, channel: str) -> bool:
        """The app's decision, made on every subscribe and every resume."""
        if self.authorize is not None:
            try:
                return bool(await self.authorize(principal, channel))
            except Exception:
                logger.exception("authorize_channel failed for user %r and channel %r", principal.user_id, channel)
                return False
        claim = principal.claims.get("channels")
        if isinstance(claim, str):
            claim = [claim]
        if not isinstance(claim, list | tuple):
            return False
        return pattern_matches((p for p in claim if isinstance(p, str)), channel)

    def hold(self, channel: str, message: Message, size: int, seq: int) -> None:
        """Keep a live event for the connections whose subscribe to `channel` is still being read."""
        for held in self.joining[channel].values():
            held.append((message, size, seq))

    # -- subscribing --------------------------------------------------------------------------------------

    async def refusal(self, principal: Principal, channel: Any, *, held: int) -> tuple[str, str] | None:
        """Why `principal` may not subscribe to `channel`, as an ERROR's code and message; or None.

        `held` is how many channels the connection holds or is joining.
        """
        if problem := channel_problem(channel):
            return "invalid_channel", f"Invalid channel name: {problem}."
        if held >= self._limit:
            return "too_many_channels", f"Too many channels; a connection may hold {self._limit}."
        if not await self.allowed(principal, channel):
            return "forbidden", f"Not allowed to subscribe to {channel!r}."
        return None

    def counted(self, channel: str) -> bool:
        """Whether the backend counts the channel's members: on a shared backend every channel (the counts
        are cluster-wide), otherwise only presence channels (the registry counts the others)."""
        return self._broadcaster.shared or self.is_presence(channel)

    async def count_in(self, connection: Connection, channel: str) -> tuple[int, int]:
        """Step 2: count the connection in the channel's membership."""
        if not self.counted(channel):
            return 0, 0
        broadcaster = self._broadcaster
        return await broadcaster.backend.join_channel(broadcaster.node_id, channel, connection.user_id)

    async def subscribe(self, connection: Connection, name: Any, since: Any, *, authorized: bool = False) -> None:
        """Handle one SUBSCRIBE (or a server's `subscribe_user`) for a live connection."""
        broadcaster = self._broadcaster
        if isinstance(name, str) and name in connection.channels:
            position = await broadcaster.backend.position()
            text = protocol_message(
                EventType.SUBSCRIBED, connection.user_id, self._subscribed(name), broadcaster.position_id(position)
            )
            connection.send_all([_message(text)])
            return
        if isinstance(name, str) and name in self.joining and connection in self.joining[name]:
            return  # that subscribe answers
        if since is not None and not isinstance(since, str):
            _error(connection, "invalid_message", "SUBSCRIBE's data.since must be an event id.", name)
            return
        held = len(connection.channels) + connection.joining
        if authorized:
            if channel_problem(name) is not None:
                return
        elif refused := await self.refusal(connection.principal, name, held=held):
            _error(connection, *refused, name)
            return
        if connection.released():
            return
        channel = self._name(name)
        connection.joining += 1
        try:
            counts = await self.count_in(connection, channel)
        except BackendUnavailable:
            connection.joining -= 1
            _error(connection, "unavailable", "The server cannot subscribe right now; try again.", channel)
            return
        waiting = self.joining.setdefault(channel, {})
        held_events: _Held = []
        waiting[connection] = held_events
        try:
            if broadcaster.shared:
                await self.streams.acquire(channel)
            opening = await self._opening(connection, channel, since, counts)
        except BaseException as exc:
            self._stop_holding(connection, channel)
            self._undo(connection, channel)
            if isinstance(exc, BackendUnavailable):
                _error(connection, "unavailable", "The server cannot subscribe right now; try again.", channel)
                return
            raise
        self._stop_holding(connection, channel)
        if connection.released():
            self._undo(connection, channel)
            return
        # One synchronous step: from here on the fan-out reaches this connection.
        broadcaster.registry.join(channel, connection)
        connection.channels += (channel,)
        upto = opening.upto
        opening.messages += [(message, size) for message, size, seq in held_events if seq > upto]
        connection.send_all(opening.messages)
        self._announce(connection, channel, counts)

    def _stop_holding(self, connection: Connection, channel: str) -> None:
        connection.joining -= 1
        waiting = self.joining[channel]
        del waiting[connection]
        if not waiting:
            del self.joining[channel]

    async def _opening(
        self, connection: Connection, channel: str, since: str | None, counts: tuple[int, int]
    ) -> _Opening:
        """Step 3: what a new subscriber gets before the live events, read while those are held."""
        broadcaster = self._broadcaster
        backend = broadcaster.backend
        user_id = connection.user_id
        opening = _Opening()
        resync: str | None = None
        replay: Sequence[Record] = ()
        if since is not None:
            cursor = broadcaster.verify(since, user_id)
            if cursor is None:
                resync, position = "unknown_cursor", await backend.position()
            else:
                history = await backend.history(None, cursor, (channel,))
                position = history.position
                if history.complete:
                    replay = history.records
                else:
                    resync = "history_unavailable" if cursor.epoch == position.epoch else "new_epoch"
        else:
            position = await backend.position()
        opening.add(
            protocol_message(
                EventType.SUBSCRIBED, user_id, self._subscribed(channel), broadcaster.position_id(position)
            )
        )
        opening.upto = position.seq
        if resync is not None:
            data = {"reason": resync, "channel": channel}
            opening.add(protocol_message(EventType.RESYNC_REQUIRED, user_id, data, broadcaster.position_id(position)))
        if since is None or resync is not None:
            retained = (await backend.retained((channel,))).get(channel)
            if retained is not None and retained.epoch == position.epoch and retained.seq <= position.seq:
                opening.add(retained.head + ',"retained":true}')
        if self.is_presence(channel):
            opening.add(_channel_text(EventType.PRESENCE, channel, await self.presence_data(channel)))
        for record in replay:
            opening.add(with_id(record.head, broadcaster.sign(record)))
            opening.upto = max(opening.upto, record.seq)
        return opening

    def _subscribed(self, channel: str) -> dict[str, Any]:
        return {"channel": channel, "presence": self.is_presence(channel)}

    def _undo(self, connection: Connection, channel: str) -> None:
        """A subscribe that did not complete: uncount the connection; unsubscribe the node if nobody reads."""
        broadcaster = self._broadcaster
        if broadcaster.running:
            _ = broadcaster.spawn(self._uncount(connection.user_id, channel))
        self._release_stream(channel)

    def _name(self, name: str) -> str:
        """One string per channel for every connection that holds it (not `sys.intern`: since Python 3.12
        interned strings live forever, and channel names come and go)."""
        return self._names.setdefault(name, name)

    def _release_stream(self, channel: str) -> None:
        """The channel may have no reader left here: forget its name, and unsubscribe the node."""
        broadcaster = self._broadcaster
        if broadcaster.registry.of_channel(channel) or self.joining.get(channel):
            return
        self._names.pop(channel, None)
        if broadcaster.shared and broadcaster.running:
            self.streams.release(channel)

    # -- resume: the handshake's channels -----------------------------------------------------------------

    async def resume(self, connection: Connection, names: Sequence[str]) -> _Resumed:
        """Authorize and count in the handshake's `channels=`, before its history is read.

        The channels joined get their live events in the connection's outbox, with their seq, until
        it starts; the others get an ERROR, in the order asked.
        """
        resumed = _Resumed()
        user_id = connection.user_id
        seen: set[str] = set()
        for name in names:
            if name in seen:
                continue
            seen.add(name)
            if refused := await self.refusal(connection.principal, name, held=len(resumed.joined)):
                resumed.refuse(_error_text(user_id, *refused, name))
            else:
                channel = self._name(name)
                if connection.released():
                    break
                counts = await self.count_in(connection, channel)
                self._broadcaster.registry.join(channel, connection)
                connection.channels += (channel,)
                resumed.join(channel, counts)
        if self._broadcaster.shared:
            for channel in resumed.joined:
                await self.streams.acquire(channel)
        return resumed

    async def resumed_opening(
        self, connection: Connection, resumed: _Resumed, position: Position, fresh: bool
    ) -> list[str]:
        """What a handshake's channels get before the replay, in the order asked: `SUBSCRIBED` (then the
        retained state when the connection is `fresh`, not resumed cleanly, and the presence) or an ERROR.
        Their events follow `position`."""
        broadcaster = self._broadcaster
        retained = await broadcaster.backend.retained(resumed.joined) if fresh else {}
        texts: list[str] = []
        user_id = connection.user_id
        for channel, refusal in resumed.order:
            if refusal is not None:
                texts.append(refusal)
                continue
            subscribed = self._subscribed(channel)
            texts.append(protocol_message(EventType.SUBSCRIBED, user_id, subscribed, broadcaster.position_id(position)))
            record = retained.get(channel)
            # A newer retained event is live, after the position: it comes with the live events.
            if record is not None and record.epoch == position.epoch and record.seq <= position.seq:
                texts.append(record.head + ',"retained":true}')
            if self.is_presence(channel):
                texts.append(_channel_text(EventType.PRESENCE, channel, await self.presence_data(channel)))
        return texts

    def announce_all(self, connection: Connection, resumed: _Resumed) -> None:
        for channel, counts in zip(resumed.joined, resumed.counts, strict=True):
            self._announce(connection, channel, counts)

    # -- leaving ------------------------------------------------------------------------------------------

    def unsubscribe(self, connection: Connection, name: Any) -> None:
        """A client's UNSUBSCRIBE: answered `UNSUBSCRIBED` even for a channel it does not hold."""
        if problem := channel_problem(name):
            _error(connection, "invalid_channel", f"Invalid channel name: {problem}.", name)
        else:
            self.leave(connection, name, None)

    def leave(self, connection: Connection, channel: str, reason: str | None, *, notify: bool = True) -> None:
        """Unsubscribe a connection from a channel now (UNSUBSCRIBE, `unsubscribe_user`, or its close)."""
        if channel in connection.channels:
            connection.channels = tuple(held for held in connection.channels if held != channel)
            self._broadcaster.registry.leave(channel, connection)
            self._undo(connection, channel)
        if notify:
            data: dict[str, Any] = {"channel": channel}
            if reason:
                data["reason"] = reason
            connection.notify(EventType.UNSUBSCRIBED, data)

    def forget(self, connection: Connection) -> None:
        """A closed connection leaves every channel it held."""
        for channel in connection.channels:
            self.leave(connection, channel, None, notify=False)

    async def _uncount(self, user_id: str, channel: str) -> None:
        if not self.counted(channel):
            return
        broadcaster = self._broadcaster
        connections, users = await broadcaster.backend.leave_channel(broadcaster.node_id, channel, user_id)
        if connections or not self.is_presence(channel):
            return
        if users < self._max_members:
            await broadcaster.backend.send_control(
                "presence", {"channel": channel, "user_id": user_id, "joined": False}
            )
        elif users == self._max_members:  # back within the limit: the members get the list again
            await broadcaster.backend.send_control(
                "presence", {"channel": channel, "snapshot": await self.presence_data(channel)}
            )

    # -- presence -----------------------------------------------------------------------------------------

    def _announce(self, connection: Connection, channel: str, counts: tuple[int, int]) -> None:
        """After a join: PRESENCE_JOIN for a user's first connection in a presence channel."""
        connections, users = counts
        if connections != 1 or not self.is_presence(channel):
            return
        broadcaster = self._broadcaster
        if users <= self._max_members:
            arguments: dict[str, Any] = {"channel": channel, "user_id": connection.user_id, "joined": True}
        elif users == self._max_members + 1:  # over the limit: from now on, counts only
            arguments = {"channel": channel, "snapshot": {"channel": channel, "count": users, "truncated": True}}
        else:
            return
        _ = broadcaster.spawn(broadcaster.backend.send_control("presence", arguments))

    async def presence_data(self, channel: str) -> dict[str, Any]:
        """The PRESENCE answer's data: the members and their connection counts, or the count alone."""
        members = await self._broadcaster.backend.channel_members(channel)
        if len(members) > self._max_members:
            return {"channel": channel, "count": len(members), "truncated": True}
        users = [{"userId": user, "connections": count} for user, count in sorted(members.items())]
        return {"channel": channel, "users": users, "count": len(members)}

    async def answer_presence(self, connection: Connection, name: Any) -> None:
        """A client's PRESENCE request."""
        if channel_problem(name) is not None:
            _error(connection, "invalid_channel", f"Invalid channel name: {channel_problem(name)}.", name)
        elif name not in connection.channels:
            _error(connection, "forbidden", f"Subscribe to {name!r} to see its presence.", name)
        elif not self.is_presence(name):
            _error(connection, "not_presence_channel", f"{name!r} is not a presence channel.", name)
        else:
            data = await self.presence_data(name)
            connection.send_all([_message(_channel_text(EventType.PRESENCE, name, data))])

    def on_presence(self, arguments: Mapping[str, Any]) -> None:
        """A presence change from any node: tell this node's subscribers of the channel."""
        channel = arguments.get("channel")
        if not isinstance(channel, str) or not self.is_presence(channel):
            return  # a shared backend reports every channel's departures; only presence channels tell them
        connections = self._broadcaster.registry.of_channel(channel)
        if not connections:
            return
        snapshot = arguments.get("snapshot")
        who = None
        if isinstance(snapshot, dict):
            text = _channel_text(EventType.PRESENCE, channel, snapshot)
        else:
            who = arguments.get("user_id")
            if not isinstance(who, str):
                return
            joined = bool(arguments.get("joined"))
            users = arguments.get("users")
            # A backend's own announcement (the members of a dead node) carries the channel's users after
            # it: the same presence_max_members rule as for a join or leave made here.
            if isinstance(users, int) and (users > self._max_members if joined else users >= self._max_members):
                return
            kind = EventType.PRESENCE_JOIN if joined else EventType.PRESENCE_LEAVE
            text = _channel_text(kind, channel, {"channel": channel, "userId": who})
        message, size = _message(text)
        context = contextvars.copy_context()
        for connection in connections:
            # A user who joins knows it (its PRESENCE answer lists it): the others are told.
            if connection.user_id != who and context.run(connection.put, message, size, ALWAYS, context):
                connection.count(size)


class _Opening:
    """The messages a new subscriber gets before the live ones (with their sizes), and the seq they reach."""

    __slots__ = ("messages", "upto")

    def __init__(self) -> None:
        self.messages: list[tuple[Message, int]] = []
        self.upto = 0

    def add(self, text: str) -> None:
        self.messages.append(_message(text))


class _Resumed:
    """The outcome of a handshake's `channels=`: the channels joined, with their membership counts, and
    each name asked for in order, with its refusal (an ERROR's text) or `None`."""

    __slots__ = ("counts", "joined", "order")

    def __init__(self) -> None:
        self.joined: list[str] = []
        self.counts: list[tuple[int, int]] = []
        self.order: list[tuple[str, str | None]] = []

    def join(self, channel: str, counts: tuple[int, int]) -> None:
        self.joined.append(channel)
        self.counts.append(counts)
        self.order.append((channel, None))

    def refuse(self, text: str) -> None:
        self.order.append(("", text))


def _error(connection: Connection, code: str, message: str, channel: Any) -> None:
    data: dict[str, Any] = {"code": code, "message": message}
    if isinstance(channel, str):
        data["channel"] = channel[:200]
    connection.notify(EventType.ERROR, data)


def _error_text(user_id: str, code: str, message: str, channel: str) -> str:
    return protocol_message(EventType.ERROR, user_id, {"code": code, "message": message, "channel": channel[:200]})
