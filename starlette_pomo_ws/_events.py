from __future__ import annotations

import base64
import dataclasses
import datetime
import decimal
import enum
import hashlib
import hmac
import json
import time
import uuid
from typing import Any, NamedTuple

__all__ = ["Event", "EventType", "Position"]


class EventType(str, enum.Enum):
    """The original guide's event types, and the protocol's own. `broadcast_*` accepts any string."""

    # The guide's types.
    CONNECTION_ESTABLISHED = "CONNECTION_ESTABLISHED"
    TASK_CREATED = "TASK_CREATED"
    TASK_UPDATED = "TASK_UPDATED"
    TASK_DELETED = "TASK_DELETED"
    TASK_STATUS_CHANGED = "TASK_STATUS_CHANGED"
    SESSION_START = "SESSION_START"
    SESSION_END = "SESSION_END"
    NOTIFICATION = "NOTIFICATION"
    SETTINGS_UPDATED = "SETTINGS_UPDATED"
    # The protocol's types.
    PING = "PING"
    PONG = "PONG"
    HEARTBEAT = "HEARTBEAT"
    ERROR = "ERROR"
    RESYNC_REQUIRED = "RESYNC_REQUIRED"
    TOKEN_EXPIRING = "TOKEN_EXPIRING"
    REFRESH_TOKEN = "REFRESH_TOKEN"
    TOKEN_REFRESHED = "TOKEN_REFRESHED"
    # Channels and presence.
    SUBSCRIBE = "SUBSCRIBE"
    SUBSCRIBED = "SUBSCRIBED"
    UNSUBSCRIBE = "UNSUBSCRIBE"
    UNSUBSCRIBED = "UNSUBSCRIBED"
    PRESENCE = "PRESENCE"
    PRESENCE_JOIN = "PRESENCE_JOIN"
    PRESENCE_LEAVE = "PRESENCE_LEAVE"

    def __str__(self) -> str:
        return self.value


@dataclasses.dataclass(frozen=True)
class Event:
    """One fanned-out event, as `broadcast_*` returns it.

    Attributes:
        type: the event type, e.g. `"TASK_CREATED"`.
        user_id: the target user, or `None` for `broadcast_to_all` and `broadcast_to_channel`.
        data: the payload as given by the caller.
        timestamp: when it was published, in the wire format (`2025-01-06T12:00:00.000Z`).
        id: the opaque resume cursor that clients see as `id`.
        channel: the channel of a `broadcast_to_channel` event, else `None`.
    """

    type: str
    user_id: str | None
    data: Any
    timestamp: str
    id: str
    channel: str | None = None


class Position(NamedTuple):
    """A place in the one total order of events: an epoch and a sequence number."""

    epoch: str
    seq: int


_second_cache: list[Any] = [-1, ""]  # the last whole second formatted, and its text


def iso_timestamp(now: float | None = None) -> str:
    """UTC with milliseconds and a `Z`, as JavaScript's `toISOString()` writes it.

    Formatting a date is slow, and every event needs one: the text up to the second is cached.
    """
    seconds = time.time() if now is None else now
    whole = int(seconds // 1)
    micro = round((seconds - whole) * 1_000_000)  # rounded to the microsecond first, as datetime does
    if micro >= 1_000_000:
        whole += 1
        micro -= 1_000_000
    cache = _second_cache
    if cache[0] != whole:
        cache[1] = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(whole))
        cache[0] = whole
    return f"{cache[1]}{micro // 1000:03d}Z"


_UTC = datetime.timezone.utc


def _datetime(value: datetime.datetime) -> str:
    """The wire timestamp's form: UTC, milliseconds, a `Z`; a naive datetime is taken to be UTC already."""
    if value.tzinfo is not None and value.utcoffset() is not None:
        value = value.astimezone(_UTC)
    return value.replace(tzinfo=None).isoformat(timespec="milliseconds") + "Z"


def _decimal(value: decimal.Decimal) -> int | float:
    # As FastAPI's jsonable_encoder: an integral Decimal is an int, any other a float.
    exponent = value.as_tuple().exponent
    return int(value) if isinstance(exponent, int) and exponent >= 0 else float(value)


def _known(value: Any) -> tuple[bool, Any]:
    """Convert the non-JSON types that every payload may hold; `(False, None)` for any other type."""
    if isinstance(value, datetime.datetime):
        return True, _datetime(value)
    if isinstance(value, datetime.date):
        return True, value.isoformat()
    if isinstance(value, datetime.time):
        return True, value.isoformat(timespec="milliseconds")
    if isinstance(value, datetime.timedelta):
        return True, value.total_seconds()
    if isinstance(value, uuid.UUID):
        return True, str(value)
    if isinstance(value, decimal.Decimal):
        return True, _decimal(value)
    if isinstance(value, enum.Enum):
        return True, value.value
    if isinstance(value, set | frozenset):
        try:
            return True, sorted(value)
        except TypeError:  # mixed types: no order, but still a list
            return True, list(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return True, dataclasses.asdict(value)
    if isinstance(value, type):  # a class, not an instance: never data
        return False, None
    dump = getattr(value, "model_dump", None)  # pydantic v2
    if callable(dump) and hasattr(type(value), "model_fields"):
        # The Python form, so that datetimes inside a model get the same form as anywhere else; the
        # aliases, as FastAPI's responses use them.
        return True, _from_model(dump(mode="python", by_alias=True))
    legacy = getattr(value, "dict", None)  # pydantic v1 (and pydantic.v1 models)
    if (
        callable(legacy)
        and not isinstance(value, type)
        and not hasattr(type(value), "model_fields")
        and hasattr(value, "__fields__")
    ):
        return True, _from_model(legacy())
    return False, None


def _from_model(value: Any) -> Any:
    """A model's dump: our conversions, and pydantic's own JSON form for its types (URLs, secrets, bytes, ...)."""
    if isinstance(value, dict):
        return {key: _from_model(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_from_model(item) for item in value]
    if value is None or isinstance(value, str | int | float):
        return value
    known, converted = _known(value)
    if known:
        return _from_model(converted)
    from pydantic_core import to_jsonable_python

    return to_jsonable_python(value)


def _default(value: Any) -> Any:
    known, converted = _known(value)
    if known:
        return converted
    raise TypeError(
        f"Object of type {type(value).__name__} is not JSON serializable; event data may hold dicts, lists, "
        "strings, numbers, booleans, None, datetime, date, time, timedelta, UUID, Decimal, Enum, set, "
        "dataclasses and pydantic models (see the Quickstart's 'Broadcasting')."
    )


_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=_default, allow_nan=False)


def dumps(value: Any) -> str:
    """Encode to compact JSON; raises `TypeError` for what cannot be encoded."""
    if value is None:  # heartbeats and data-less events
        return "null"
    try:
        return _encoder.encode(value)
    except ValueError as exc:  # NaN or Infinity, or a circular reference
        raise TypeError(f"Event data is not valid JSON: {exc}") from exc


def _json_string(value: str | None) -> str:
    """A JSON string literal; plain printable ASCII (event types, most user ids) skips the encoder."""
    if value is None:
        return "null"
    if value.isascii() and value.isprintable() and '"' not in value and "\\" not in value:
        return f'"{value}"'
    return _encoder.encode(value)


def envelope_head(type_: str, user_id: str | None, data_json: str, timestamp: str, channel: str | None = None) -> str:
    """The envelope without its closing brace, so that a node can append the `id` once per event.

    A channel's events add `"channel"` (channel names need no escaping).
    """
    head = (
        f'{{"type":{_json_string(type_)},"userId":{_json_string(user_id)},"data":{data_json},"timestamp":"{timestamp}"'
    )
    return head if channel is None else f'{head},"channel":"{channel}"'


def wire_size(text: str) -> int:
    """The size of a text frame's payload: its UTF-8 bytes (ASCII text, the common case, skips encoding)."""
    return len(text) if text.isascii() else len(text.encode())


def with_id(head: str, event_id: str) -> str:
    return f'{head},"id":"{event_id}"}}'


def protocol_message(type_: str, user_id: str | None, data: Any = None, event_id: str | None = None) -> str:
    if isinstance(type_, EventType):
        type_ = type_.value  # formatting an enum member costs more than the rest of the envelope
    head = envelope_head(type_, user_id, dumps(data), iso_timestamp())
    return with_id(head, event_id) if event_id is not None else head + "}"


class CursorSigner:
    """Signs and checks the opaque `id` cursors: `<epoch>.<seq hex>.<signature>`.

    A user event's cursor is bound to its user; a broadcast event's cursor is valid for everyone.
    """

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        self._key = key

    def _sig(self, epoch: str, seq: int, user_id: str) -> str:
        # Keyed BLAKE2b is a MAC in its own right, and about twice as fast as HMAC-SHA256.
        # Length-prefixed fields: ("x", 1, "2:bob") and ("x:1", 2, "bob") must not sign the same text.
        text = f"{len(epoch)}:{epoch}{seq:x}:{len(user_id)}:{user_id}"
        mac = hashlib.blake2b(text.encode(), key=self._key, digest_size=15).digest()
        return base64.urlsafe_b64encode(mac).decode()

    def sign(self, epoch: str, seq: int, user_id: str | None) -> str:
        return f"{epoch}.{seq:x}.{self._sig(epoch, seq, user_id or '')}"

    def verify(self, cursor: str, user_id: str) -> Position | None:
        """Return the position a cursor stands for, or `None` if it is malformed, forged or another user's."""
        if len(cursor) > 200:
            return None
        parts = cursor.split(".")
        if len(parts) != 3:
            return None
        epoch, seq_hex, sig = parts
        if not epoch or not seq_hex or len(seq_hex) > 16 or not all(c in "0123456789abcdef" for c in seq_hex):
            return None
        seq = int(seq_hex, 16)
        for who in (user_id, ""):
            if hmac.compare_digest(sig.encode(), self._sig(epoch, seq, who).encode()):
                return Position(epoch, seq)
        return None
