"""The embedded default: one process, no setup. History lives in the process."""

from __future__ import annotations

import collections
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .._events import Position
from ..exceptions import BackendUnavailable
from .base import Backend, Control, Deliver, History, Record

__all__ = ["MemoryBackend"]

# How many fully expired user and channel streams we remember, so that their cursors still get RESYNC_REQUIRED.
_TOMBSTONES = 100_000
# A channel's stream key: no user id holds a control character, so the two never meet.
_CHANNEL = "\x00"


class _Stream:
    """One stream's kept events, as three parallel deques of untracked objects.

    No `Record` is kept: ints, floats and strings are invisible to the cyclic garbage collector,
    whereas a kept tuple subclass per event would be traversed by every full collection, and would
    make those come sooner, for as long as the history holds it.
    """

    __slots__ = ("channel", "evicted_upto", "heads", "key", "seqs", "times", "user_id")

    def __init__(self, key: str | None) -> None:
        self.key = key  # one string per stream, whichever request spelled the user id
        channel = key[1:] if key is not None and key.startswith(_CHANNEL) else None
        self.channel = channel
        self.user_id = key if channel is None else None
        self.seqs: collections.deque[int] = collections.deque()
        self.heads: collections.deque[str] = collections.deque()
        self.times: collections.deque[float] = collections.deque()
        self.evicted_upto = 0  # highest seq that left this stream; a cursor below it has a gap


class MemoryBackend(Backend):
    """Keeps `history_size` events per stream for `history_ttl` seconds, in this process.

    Publishing delivers synchronously, in the same step that appends to the history, so a resume in
    this process needs no de-duplication. After a restart a new epoch begins and every old cursor
    gets `RESYNC_REQUIRED`.
    """

    kind = "memory"
    shared = False

    def __init__(
        self, *, history_size: int = 1000, history_ttl: float = 120, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.history_size = history_size
        self.history_ttl = history_ttl
        self._clock = clock
        self._epoch = ""
        self._seq = 0
        self._streams: dict[str | None, _Stream] = {}
        # Every stored event in seq order, for time-based expiry: its time and its stream's key, in two
        # deques rather than one of pairs, so that an event costs no tuple for as long as it is kept.
        self._by_time: collections.deque[float] = collections.deque()
        self._by_key: collections.deque[str | None] = collections.deque()
        self._tombstones: OrderedDict[str, int] = OrderedDict()
        self._forgotten_upto = 0
        self._deliver: Deliver | None = None
        self._control: Control | None = None
        self._presence: dict[str, set[str]] = {}
        self._retained: dict[str, Record] = {}
        self._members: dict[str, dict[str, int]] = {}  # channel -> user id -> connections

    def __repr__(self) -> str:
        return f"MemoryBackend(history_size={self.history_size}, history_ttl={self.history_ttl})"

    async def start(self, deliver: Deliver, control: Control) -> None:
        self._deliver = deliver
        self._control = control
        if not self._epoch:
            self._epoch = secrets.token_hex(4)

    async def stop(self) -> None:
        self._deliver = None
        self._control = None

    @property
    def connected(self) -> bool:
        return self._deliver is not None

    async def publish(self, user_id: str | None, head: str) -> Record:
        return self._append(user_id, head)

    async def publish_to_channel(self, channel: str, head: str, retain: bool) -> Record:
        record = self._append(_CHANNEL + channel, head)
        if retain:
            self._retained[channel] = record
        return record

    def _append(self, key: str | None, head: str) -> Record:
        """Store the event in its stream, then deliver it, in one synchronous step."""
        deliver = self._deliver
        if deliver is None:
            raise BackendUnavailable("The memory backend is stopped; the event was not published.")
        now = self._clock()
        self._expire(now)
        stream = self._streams.get(key)
        if stream is None:
            stream = self._streams[key] = _Stream(key)
            if key is not None:
                stream.evicted_upto = self._tombstones.pop(key, 0)
        else:
            key = stream.key  # every kept event shares its stream's string
        self._seq = seq = self._seq + 1
        stream.seqs.append(seq)
        stream.heads.append(head)
        stream.times.append(now)
        self._by_time.append(now)
        self._by_key.append(key)
        if len(stream.seqs) > self.history_size:
            stream.evicted_upto = stream.seqs.popleft()
            stream.heads.popleft()
            stream.times.popleft()
        record = Record(self._epoch, seq, stream.user_id, head, 0.0, stream.channel)
        deliver(record)
        return record

    def _expire(self, now: float) -> None:
        horizon = now - self.history_ttl
        by_time = self._by_time
        while by_time and by_time[0] < horizon:
            by_time.popleft()
            key = self._by_key.popleft()
            stream = self._streams.get(key)
            # The stream may have been trimmed by size already; drop its entries older than the horizon.
            while stream is not None and stream.times and stream.times[0] < horizon:
                stream.times.popleft()
                stream.heads.popleft()
                stream.evicted_upto = stream.seqs.popleft()
            if stream is not None and not stream.seqs and key is not None:
                del self._streams[key]
                self._tombstones[key] = stream.evicted_upto
                if len(self._tombstones) > _TOMBSTONES:
                    _, upto = self._tombstones.popitem(last=False)
                    self._forgotten_upto = max(self._forgotten_upto, upto)

    async def subscribe(self, user_id: str) -> None:
        return None  # every event of this process is delivered to this process

    async def unsubscribe(self, user_id: str) -> None:
        return None

    async def position(self) -> Position:
        return Position(self._epoch, self._seq)

    async def history(self, user_id: str | None, since: Position, channels: Sequence[str] = ()) -> History:
        self._expire(self._clock())
        current = Position(self._epoch, self._seq)
        if since.epoch != self._epoch or since.seq > self._seq:
            return History(False, (), current)
        keys: list[str | None] = [_CHANNEL + channel for channel in channels]
        if user_id is not None:
            keys += [user_id, None]
        found: list[Record] = []
        streams = 0
        for key in keys:
            stream = self._streams.get(key)
            if stream is not None:
                floor = stream.evicted_upto
            elif key is None:
                floor = 0
            else:
                floor = self._tombstones.get(key, self._forgotten_upto)
            if since.seq < floor:
                return History(False, (), current)
            records = _after(self._epoch, stream, since.seq)
            if records:
                found += records
                streams += 1
        if streams > 1:
            found.sort(key=lambda r: r.seq)
        return History(True, found, current)

    async def retained(self, channels: Sequence[str]) -> dict[str, Record]:
        kept = self._retained
        return {channel: kept[channel] for channel in channels if channel in kept}

    async def subscribe_channel(self, channel: str) -> None:
        return None  # every event of this process is delivered to this process

    async def unsubscribe_channel(self, channel: str) -> None:
        return None

    async def join_channel(self, node_id: str, channel: str, user_id: str) -> tuple[int, int]:
        members = self._members.get(channel)
        if members is None:
            members = self._members[channel] = {}
        count = members[user_id] = members.get(user_id, 0) + 1
        return count, len(members)

    async def leave_channel(self, node_id: str, channel: str, user_id: str) -> tuple[int, int]:
        members = self._members.get(channel)
        if members is None or user_id not in members:
            return 0, 0 if members is None else len(members)
        count = members[user_id] - 1
        if count:
            members[user_id] = count
        else:
            del members[user_id]
            if not members:
                del self._members[channel]
                return 0, 0
        return count, len(members)

    async def channel_members(self, channel: str) -> dict[str, int]:
        return dict(self._members.get(channel, {}))

    async def channel_subscriber_count(self, channel: str) -> int:
        return sum(self._members.get(channel, {}).values())

    async def send_control(self, kind: str, arguments: Mapping[str, Any]) -> None:
        if self._control is None:
            raise BackendUnavailable("The memory backend is stopped.")
        self._control(kind, arguments)

    async def add_presence(self, node_id: str, user_id: str, connection_id: str) -> int:
        members = self._presence.setdefault(user_id, set())
        members.add(connection_id)
        return len(members)

    async def remove_presence(self, node_id: str, user_id: str, connection_id: str) -> None:
        members = self._presence.get(user_id)
        if members is not None:
            members.discard(connection_id)
            if not members:
                del self._presence[user_id]

    async def cluster_user_count(self, user_id: str) -> int:
        return len(self._presence.get(user_id, ()))

    async def cluster_total_count(self) -> int:
        return sum(len(m) for m in self._presence.values())


def _after(epoch: str, stream: _Stream | None, seq: int) -> list[Record]:
    if stream is None or not stream.seqs or stream.seqs[-1] <= seq:
        return []
    seqs = stream.seqs
    # Seqs are in order: walk back from the newest, the common case being a short gap.
    index = len(seqs)
    while index > 0 and seqs[index - 1] > seq:
        index -= 1
    count = len(seqs) - index
    newest_seqs = collections.deque(seqs, maxlen=count)
    newest_heads = collections.deque(stream.heads, maxlen=count)
    user_id, channel = stream.user_id, stream.channel
    return [Record(epoch, s, user_id, h, 0.0, channel) for s, h in zip(newest_seqs, newest_heads, strict=True)]
