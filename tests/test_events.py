from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import json
import uuid

import pydantic
import pytest
from hypothesis import given, strategies as st

from starlette_pomo_ws import EventType
from starlette_pomo_ws._events import CursorSigner, dumps, iso_timestamp


@given(st.floats(min_value=0, max_value=4_000_000_000, allow_nan=False))
def test_timestamps_match_javascripts_to_iso_string(seconds: float) -> None:
    """The cached formatter writes exactly what datetime would: UTC, milliseconds, a Z."""
    moment = datetime.datetime.fromtimestamp(seconds, tz=datetime.timezone.utc)
    assert iso_timestamp(seconds) == moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def test_cursors_are_bound_to_their_user_and_key() -> None:
    signer = CursorSigner(b"k" * 32)
    mine = signer.sign("ep0ch", 42, "alice")
    everyone = signer.sign("ep0ch", 43, None)
    assert signer.verify(mine, "alice") == ("ep0ch", 42)
    assert signer.verify(mine, "bob") is None
    assert signer.verify(everyone, "bob") == ("ep0ch", 43)
    assert CursorSigner(b"x" * 32).verify(mine, "alice") is None


def test_event_types_are_strings() -> None:
    assert EventType.TASK_CREATED == "TASK_CREATED"
    assert str(EventType.RESYNC_REQUIRED) == "RESYNC_REQUIRED"


@given(st.text(max_size=40), st.one_of(st.none(), st.text(max_size=40)))
def test_the_envelope_is_valid_json_for_any_type_and_user(type_: str, user_id: str | None) -> None:
    from starlette_pomo_ws._events import envelope_head, with_id

    text = with_id(envelope_head(type_, user_id, '{"a":1}', "2025-01-06T12:00:00.000Z"), "e.1.sig")
    assert json.loads(text) == {
        "type": type_,
        "userId": user_id,
        "data": {"a": 1},
        "timestamp": "2025-01-06T12:00:00.000Z",
        "id": "e.1.sig",
    }


def test_cursor_fields_are_length_prefixed_so_they_cannot_run_into_each_other() -> None:
    """Without a length prefix, ("x", 1, "2:bob") and ("x:1", 2, "bob") signed the same text."""
    signer = CursorSigner(b"k" * 32)
    one = signer.sign("x", 1, "2:bob").rsplit(".", 1)[1]
    two = signer.sign("x:1", 2, "bob").rsplit(".", 1)[1]
    assert one != two
    assert signer.verify(signer.sign("x", 1, "2:bob"), "2:bob") is not None


# -- event data: what a FastAPI user expects, and one datetime form everywhere -----------------------------


INSTANT = datetime.datetime(2025, 1, 6, 12, 0, 0, 123456, tzinfo=datetime.timezone.utc)
WIRE = "2025-01-06T12:00:00.123Z"


class Colour(enum.Enum):
    RED = "red"


class Level(enum.IntEnum):
    HIGH = 3


@dataclasses.dataclass
class Session:
    started: datetime.datetime
    minutes: int


class Task(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(populate_by_name=True)

    id: uuid.UUID
    due: datetime.datetime
    estimate: decimal.Decimal
    tags: set[str]
    colour: Colour
    done_by: datetime.date
    link: pydantic.AnyUrl | None = None
    owner_id: str = pydantic.Field(default="u1", alias="ownerId")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (INSTANT, WIRE),
        (INSTANT.replace(tzinfo=None), WIRE),  # naive: taken to be UTC
        (INSTANT.astimezone(datetime.timezone(datetime.timedelta(hours=2))), WIRE),  # converted to UTC
        (datetime.datetime(2025, 1, 6), "2025-01-06T00:00:00.000Z"),
        (datetime.date(2025, 1, 6), "2025-01-06"),
        (datetime.time(9, 30), "09:30:00.000"),
        (datetime.timedelta(minutes=25), 1500.0),
        (uuid.UUID("12345678-1234-5678-1234-567812345678"), "12345678-1234-5678-1234-567812345678"),
        (decimal.Decimal("25"), 25),
        (decimal.Decimal("2.5"), 2.5),
        (Colour.RED, "red"),
        (Level.HIGH, 3),
        ({"b", "a"}, ["a", "b"]),
        (frozenset({2, 1}), [1, 2]),
        (Session(INSTANT, 25), {"started": WIRE, "minutes": 25}),
    ],
    ids=lambda v: type(v).__name__,
)
def test_event_data_types_are_converted_as_fastapi_does(value: object, expected: object) -> None:
    assert json.loads(dumps({"v": value})) == {"v": expected}


def test_a_set_of_mixed_types_is_still_a_list() -> None:
    assert sorted(json.loads(dumps({1, "a"})), key=str) == [1, "a"]


def test_pydantic_models_use_the_same_datetime_form_and_their_aliases() -> None:
    task = Task(
        id=uuid.UUID(int=1),
        due=INSTANT,
        estimate=decimal.Decimal("1.5"),
        tags={"y", "x"},
        colour=Colour.RED,
        done_by=datetime.date(2025, 1, 7),
        link=pydantic.AnyUrl("https://example.com/t/1"),
    )
    assert json.loads(dumps([task])) == [
        {
            "id": "00000000-0000-0000-0000-000000000001",
            "due": WIRE,
            "estimate": 1.5,
            "tags": ["x", "y"],
            "colour": "red",
            "done_by": "2025-01-07",
            "link": "https://example.com/t/1",
            "ownerId": "u1",
        }
    ]


def test_a_naive_datetime_in_a_model_is_utc_too() -> None:
    class Reminder(pydantic.BaseModel):
        at: datetime.datetime
        nested: list[Session]

    reminder = Reminder(at=INSTANT.replace(tzinfo=None), nested=[Session(INSTANT, 5)])
    assert json.loads(dumps(reminder)) == {"at": WIRE, "nested": [{"started": WIRE, "minutes": 5}]}


@pytest.mark.parametrize("value", [object(), b"bytes", 1 + 2j, Task])
def test_other_types_raise_a_type_error_that_lists_what_is_accepted(value: object) -> None:
    with pytest.raises(TypeError, match=r"is not JSON serializable; event data may hold .*UUID, Decimal"):
        dumps({"v": value})
