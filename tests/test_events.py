from __future__ import annotations

import datetime

from hypothesis import given, strategies as st

from starlette_pomo_ws import EventType
from starlette_pomo_ws._events import CursorSigner, iso_timestamp


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
    import json

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
