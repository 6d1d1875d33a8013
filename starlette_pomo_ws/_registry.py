from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._connection import Connection

__all__ = ["Registry"]


class Registry:
    """This process's connections, by user and by channel. Every change happens in one synchronous step.

    Fan-out iterates tuples that are rebuilt only when membership changes, so that a socket closing
    in the middle of a fan-out never disturbs it, and an event costs no copy in the steady state.
    """

    __slots__ = ("_all", "_all_snapshot", "_channel_snapshots", "_channels", "_snapshots", "_users")

    def __init__(self) -> None:
        self._users: dict[str, dict[Connection, None]] = {}
        self._all: dict[Connection, None] = {}
        self._all_snapshot: tuple[Connection, ...] | None = ()
        self._snapshots: dict[str, tuple[Connection, ...]] = {}
        self._channels: dict[str, dict[Connection, None]] = {}
        self._channel_snapshots: dict[str, tuple[Connection, ...]] = {}

    def add(self, connection: Connection) -> bool:
        """Add a connection; return True when it is its user's first on this node."""
        user_id = connection.user_id
        members = self._users.get(user_id)
        first = members is None
        if members is None:
            members = self._users[user_id] = {}
        members[connection] = None
        self._all[connection] = None
        self._all_snapshot = None
        self._snapshots.pop(user_id, None)
        return first

    def remove(self, connection: Connection) -> bool:
        """Remove a connection (idempotent); return True when it was its user's last on this node."""
        if connection not in self._all:
            return False
        del self._all[connection]
        self._all_snapshot = None
        user_id = connection.user_id
        self._snapshots.pop(user_id, None)
        members = self._users[user_id]
        del members[connection]
        if members:
            return False
        del self._users[user_id]
        return True

    def everyone(self) -> tuple[Connection, ...]:
        snapshot = self._all_snapshot
        if snapshot is None:
            snapshot = self._all_snapshot = tuple(self._all)
        return snapshot

    def of_user(self, user_id: str) -> tuple[Connection, ...]:
        snapshot = self._snapshots.get(user_id)
        if snapshot is None:
            members = self._users.get(user_id)
            if members is None:
                return ()
            snapshot = self._snapshots[user_id] = tuple(members)
        return snapshot

    def user_count(self, user_id: str) -> int:
        members = self._users.get(user_id)
        return 0 if members is None else len(members)

    @property
    def total(self) -> int:
        return len(self._all)

    @property
    def users(self) -> int:
        return len(self._users)

    # -- channels -----------------------------------------------------------------------------------------

    def join(self, channel: str, connection: Connection) -> bool:
        """Subscribe a connection to a channel; True when it is the channel's first subscriber here."""
        members = self._channels.get(channel)
        first = members is None
        if members is None:
            members = self._channels[channel] = {}
        members[connection] = None
        self._channel_snapshots.pop(channel, None)
        return first

    def leave(self, channel: str, connection: Connection) -> bool:
        """Unsubscribe a connection from a channel (idempotent); True when it was the channel's last here."""
        members = self._channels.get(channel)
        if members is None or connection not in members:
            return False
        del members[connection]
        self._channel_snapshots.pop(channel, None)
        if members:
            return False
        del self._channels[channel]
        return True

    def of_channel(self, channel: str) -> tuple[Connection, ...]:
        snapshot = self._channel_snapshots.get(channel)
        if snapshot is None:
            members = self._channels.get(channel)
            if members is None:
                return ()
            snapshot = self._channel_snapshots[channel] = tuple(members)
        return snapshot

    @property
    def channels(self) -> int:
        """Channels with at least one subscriber in this process."""
        return len(self._channels)
