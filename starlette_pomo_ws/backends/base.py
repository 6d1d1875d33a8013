"""The contract every backend keeps. Payloads are strings encoded once upstream."""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from .._events import Position

__all__ = ["Backend", "Deliver", "History", "Record"]


class Record(NamedTuple):
    """One stored event: its place in the total order, its stream (a user id, or `None` for everyone),
    and the envelope without its closing brace (see `_events.envelope_head`)."""

    epoch: str
    seq: int
    user_id: str | None
    head: str
    published_at: float = 0.0  # Unix time of the publish, where the backend carries it (for the lag metric)
    channel: str | None = None  # the channel of a `broadcast_to_channel` event (then `user_id` is None)


class History(NamedTuple):
    """The answer to a resume: the events after a position, or `complete=False` when some may be missing."""

    complete: bool
    records: Sequence[Record]
    position: Position


# Called by the backend, in seq order, for every live event of a subscribed stream (and every
# broadcast). It must not block: it only hands the event to the sockets.
Deliver = Callable[[Record], None]
# Called by the backend for control messages that reach every node (e.g. disconnect_user): a kind
# and its arguments as a JSON-compatible mapping, never a string to split.
Control = Callable[[str, Mapping[str, Any]], None]


class Backend(abc.ABC):
    """Stores events for resume and carries them to every node that has a subscriber."""

    kind: str = "abstract"
    #: Whether other processes share this backend: then a node subscribes per user (and per channel),
    #: and counts and limits are cluster-wide. `False` means every event is published in this process.
    shared: bool = True

    @abc.abstractmethod
    async def start(self, deliver: Deliver, control: Control) -> None:
        """Connect, and from now on call `deliver` for every live event of a subscribed stream."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Disconnect and release every resource. Safe to call twice."""

    @property
    @abc.abstractmethod
    def connected(self) -> bool:
        """Whether the backend can publish right now (for `/ws/health`)."""

    @abc.abstractmethod
    async def publish(self, user_id: str | None, head: str) -> Record:
        """Append the event to its stream and fan it out; return once it is durable.

        Raises:
            BackendUnavailable: the event was not stored.
        """

    @abc.abstractmethod
    async def subscribe(self, user_id: str) -> None:
        """Start receiving `user_id`'s live events on this node (called for its first local connection)."""

    @abc.abstractmethod
    async def unsubscribe(self, user_id: str) -> None:
        """Stop receiving `user_id`'s events (called when its last local connection closes)."""

    @abc.abstractmethod
    async def position(self) -> Position:
        """The current position of the total order: the last seq given out, in the current epoch."""

    @abc.abstractmethod
    async def history(self, user_id: str | None, since: Position, channels: Sequence[str] = ()) -> History:
        """The events after `since` of `user_id`'s stream, the broadcast stream and each of `channels`,
        merged in seq order. `user_id=None` reads only the channels (a SUBSCRIBE with `since`).

        `complete` is False when any event after `since` may be missing from any of those streams
        (other epoch, trimmed by `history_size` or `history_ttl`); the caller then sends
        `RESYNC_REQUIRED`. `position` is the current position of the total order.
        """

    # -- channels ---------------------------------------------------------------------------------------

    @abc.abstractmethod
    async def publish_to_channel(self, channel: str, head: str, retain: bool) -> Record:
        """Append the event to the channel's stream (its history, for resume) and fan it out to the
        nodes subscribed to the channel; with `retain`, also keep it as the channel's state (replacing
        the previous one). Return once it is durable. The seq comes from the same total order as
        `publish`.

        Raises:
            BackendUnavailable: the event was not stored.
        """

    @abc.abstractmethod
    async def subscribe_channel(self, channel: str) -> None:
        """Start receiving the channel's live events on this node (called for its first local subscriber)."""

    @abc.abstractmethod
    async def unsubscribe_channel(self, channel: str) -> None:
        """Stop receiving the channel's events (called when its last local subscriber leaves)."""

    @abc.abstractmethod
    async def retained(self, channels: Sequence[str]) -> dict[str, Record]:
        """The retained event of each channel that has one."""

    @abc.abstractmethod
    async def join_channel(self, node_id: str, channel: str, user_id: str) -> tuple[int, int]:
        """Count one more connection of `user_id` in `channel` on `node_id`, cluster-wide.

        Returns the user's connections in the channel across the cluster after the join, and the
        number of distinct users in the channel.
        """

    @abc.abstractmethod
    async def leave_channel(self, node_id: str, channel: str, user_id: str) -> tuple[int, int]:
        """Count one connection of `user_id` in `channel` on `node_id` less; returns what `join_channel` does.

        A shared backend also forgets the members of a node that stopped refreshing itself for
        `presence_ttl` seconds (it died), and for each user that left a channel that way it sends the
        control message `("presence", {"channel", "user_id", "joined": False})` to every node.
        """

    @abc.abstractmethod
    async def channel_members(self, channel: str) -> dict[str, int]:
        """User id to connection count in `channel`, across the cluster."""

    @abc.abstractmethod
    async def channel_subscriber_count(self, channel: str) -> int:
        """Connections subscribed to `channel`, across the cluster."""

    @abc.abstractmethod
    async def send_control(self, kind: str, arguments: Mapping[str, Any]) -> None:
        """Send a control message (such as `disconnect_user`) with JSON-compatible arguments to every node,
        this one included."""

    @abc.abstractmethod
    async def add_presence(self, node_id: str, user_id: str, connection_id: str) -> int:
        """Record a connection in the cluster-wide view; return the user's connections across the cluster."""

    async def add_presence_with_position(self, node_id: str, user_id: str, connection_id: str) -> tuple[int, Position]:
        """`add_presence`, then `position()`, read after it: what a handshake needs.

        The node calls it once the user's subscription is in place, so every event after that position
        reaches it. A shared backend should answer both in one round trip; this default makes two.
        """
        count = await self.add_presence(node_id, user_id, connection_id)
        return count, await self.position()

    @abc.abstractmethod
    async def remove_presence(self, node_id: str, user_id: str, connection_id: str) -> None:
        """Forget a connection in the cluster-wide view."""

    @abc.abstractmethod
    async def cluster_user_count(self, user_id: str) -> int:
        """Connections of `user_id` across the cluster."""

    @abc.abstractmethod
    async def cluster_total_count(self) -> int:
        """Connections across the cluster."""
