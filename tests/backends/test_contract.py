"""The backend contract, run over `memory://` and `redis://` alike."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import anyio
import pytest

from starlette_pomo_ws._events import Position
from starlette_pomo_ws.backends.base import Backend
from starlette_pomo_ws.exceptions import BackendUnavailable

from .conftest import Recorder

pytestmark = pytest.mark.anyio

Started = tuple[Backend, Recorder]


def head(n: int) -> str:
    return f'{{"type":"E","userId":null,"data":{n},"timestamp":"2025-01-06T12:00:00.000Z"'


async def test_publish_gives_increasing_seqs_in_the_current_epoch(started: Started) -> None:
    backend, _ = started
    before = await backend.position()
    records = [await backend.publish("u1", head(1)), await backend.publish(None, head(2))]
    assert [r.seq for r in records] == [before.seq + 1, before.seq + 2]
    assert {r.epoch for r in records} == {before.epoch}
    assert records[0][:4] == (before.epoch, before.seq + 1, "u1", head(1))
    assert records[1].user_id is None
    assert await backend.position() == Position(before.epoch, before.seq + 2)


async def test_deliver_gets_subscribed_and_broadcast_events_in_order(started: Started) -> None:
    backend, recorder = started
    await backend.subscribe("u1")
    published = [
        await backend.publish("u1", head(1)),
        await backend.publish(None, head(2)),
        await backend.publish("u2", head(3)),  # nobody here holds u2
        await backend.publish("u1", head(4)),
    ]
    wanted = [r for r in published if r.user_id in ("u1", None)]
    await recorder.wait(lambda: wanted[-1] in recorder.records)
    relevant = [r for r in recorder.records if r.user_id in ("u1", None)]
    assert relevant == wanted
    assert recorder.seqs == sorted(set(recorder.seqs))


async def test_history_merges_the_users_and_the_broadcast_stream(started: Started) -> None:
    backend, _ = started
    since = await backend.position()
    a = await backend.publish("u1", head(1))
    await backend.publish("u2", head(2))
    b = await backend.publish(None, head(3))
    c = await backend.publish("u1", head(4))
    history = await backend.history("u1", since)
    assert history.complete
    assert list(history.records) == [a, b, c]
    assert history.position == Position(since.epoch, c.seq)
    later = await backend.history("u1", Position(since.epoch, a.seq))
    assert list(later.records) == [b, c]


async def test_an_idle_client_resumes_cleanly(started: Started) -> None:
    """Nothing happened for this user since its cursor: complete, even after other users' events."""
    backend, _ = started
    await backend.publish("u1", head(1))
    since = await backend.position()
    now = await backend.history("u1", since)
    assert (now.complete, list(now.records), now.position) == (True, [], since)
    await backend.publish("u2", head(2))
    history = await backend.history("u1", since)
    assert history.complete
    assert list(history.records) == []
    assert history.position.seq == since.seq + 1


@pytest.mark.parametrize("since", [Position("another-epoch", 0), Position("<current>", 10**9)])
async def test_history_from_an_unknown_position_is_incomplete(started: Started, since: Position) -> None:
    backend, _ = started
    await backend.publish("u1", head(1))
    current = await backend.position()
    if since.epoch == "<current>":
        since = Position(current.epoch, since.seq)
    history = await backend.history("u1", since)
    assert not history.complete
    assert list(history.records) == []
    assert history.position == current


async def test_history_trimmed_by_size_is_incomplete(backend_factory: Callable[..., Any]) -> None:
    backend, _ = await backend_factory(history_size=2)
    start = await backend.position()
    # Redis trims with `MAXLEN ~`, whole blocks of 100 entries at a time: publish past a block.
    records = [await backend.publish("u1", head(n)) for n in range(250)]
    assert not (await backend.history("u1", start)).complete
    recent = await backend.history("u1", Position(start.epoch, records[-2].seq))
    assert recent.complete
    assert list(recent.records) == [records[-1]]


async def test_history_expired_by_ttl_is_incomplete(backend_factory: Callable[..., Any]) -> None:
    backend, _ = await backend_factory(history_ttl=0.5)
    start = await backend.position()
    first = await backend.publish("u1", head(1))
    assert (await backend.history("u1", start)).records == [first]
    seen = Position(start.epoch, first.seq)
    with anyio.fail_after(5):
        while True:  # expiry announces nothing: poll, bounded
            if not (await backend.history("u1", start)).complete:
                break
            await anyio.sleep(0.05)
    # The client that saw the event before it expired still resumes cleanly.
    history = await backend.history("u1", seen)
    assert history.complete
    assert list(history.records) == []


async def test_send_control_reaches_this_node_once(started: Started) -> None:
    backend, recorder = started
    await backend.send_control("disconnect_user", {"user_id": "u1"})
    assert recorder.controls == [("disconnect_user", {"user_id": "u1"})]
    await backend.publish(None, head(1))  # anything still coming would arrive before this event
    await recorder.wait(lambda: len(recorder.records) == 1)
    assert recorder.controls == [("disconnect_user", {"user_id": "u1"})]


async def test_presence_counts(started: Started) -> None:
    backend, _ = started
    assert await backend.add_presence("node-a", "u1", "c1") == 1
    assert await backend.add_presence("node-a", "u1", "c2") == 2
    assert await backend.add_presence("node-a", "u2", "c3") == 1
    assert await backend.add_presence("node-a", "u1", "c2") == 2  # idempotent
    assert await backend.cluster_user_count("u1") == 2
    assert await backend.cluster_total_count() == 3
    await backend.remove_presence("node-a", "u1", "c1")
    await backend.remove_presence("node-a", "u1", "c1")  # idempotent
    await backend.remove_presence("node-a", "nobody", "c9")
    assert await backend.cluster_user_count("u1") == 1
    assert await backend.cluster_user_count("nobody") == 0
    assert await backend.cluster_total_count() == 2
    await backend.remove_presence("node-a", "u2", "c3")
    assert await backend.cluster_user_count("u2") == 0
    assert await backend.cluster_total_count() == 1


async def test_unsubscribe_is_harmless(started: Started) -> None:
    backend, recorder = started
    await backend.subscribe("u1")
    await backend.unsubscribe("u1")
    await backend.unsubscribe("never-subscribed")
    last = await backend.publish(None, head(1))
    await recorder.wait(lambda: last in recorder.records)


async def test_stop_is_idempotent_and_publish_after_stop_raises(backend_factory: Callable[..., Any]) -> None:
    backend, _ = await backend_factory()
    await backend.stop()
    await backend.stop()
    assert not backend.connected
    with pytest.raises(BackendUnavailable):
        await backend.publish("u1", head(1))
    with pytest.raises(BackendUnavailable):
        await backend.send_control("disconnect_user", {"user_id": "u1"})


async def test_connected_while_running(started: Started) -> None:
    backend, _ = started
    assert backend.connected


# -- channels ---------------------------------------------------------------------------------------------


async def test_channel_events_share_the_total_order(started: Started) -> None:
    backend, recorder = started
    await backend.subscribe_channel("team:42")
    before = await backend.position()
    a = await backend.publish("u1", head(1))
    b = await backend.publish_to_channel("team:42", head(2), False)
    c = await backend.publish(None, head(3))
    assert [r.seq for r in (a, b, c)] == [before.seq + 1, before.seq + 2, before.seq + 3]
    assert b[:4] == (before.epoch, before.seq + 2, None, head(2))
    assert b.channel == "team:42"
    assert a.channel is None and c.channel is None
    await recorder.wait(lambda: c in recorder.records)
    assert b in recorder.records
    delivered = [r for r in recorder.records if r.channel == "team:42"]
    assert delivered == [b]
    assert await backend.position() == Position(before.epoch, c.seq)


async def test_history_merges_user_broadcast_and_channel_streams(started: Started) -> None:
    backend, _ = started
    since = await backend.position()
    a = await backend.publish_to_channel("team:42", head(1), False)
    b = await backend.publish("u1", head(2))
    await backend.publish_to_channel("team:43", head(3), False)  # not asked for
    await backend.publish("u2", head(4))
    c = await backend.publish(None, head(5))
    d = await backend.publish_to_channel("board:7:tasks", head(6), True)
    history = await backend.history("u1", since, ["team:42", "board:7:tasks"])
    assert history.complete
    assert list(history.records) == [a, b, c, d]
    assert history.position == Position(since.epoch, d.seq)
    # Without a user, only the channels (a SUBSCRIBE with `since`).
    only = await backend.history(None, since, ["team:42", "board:7:tasks"])
    assert (only.complete, list(only.records)) == (True, [a, d])
    later = await backend.history(None, Position(since.epoch, a.seq), ["team:42"])
    assert (later.complete, list(later.records), later.position) == (True, [], history.position)


async def test_an_idle_channel_resumes_cleanly(started: Started) -> None:
    backend, _ = started
    await backend.publish_to_channel("team:42", head(1), False)
    since = await backend.position()
    await backend.publish_to_channel("team:43", head(2), False)
    await backend.publish("u1", head(3))
    history = await backend.history(None, since, ["team:42", "never-used"])
    assert (history.complete, list(history.records)) == (True, [])
    assert history.position.seq == since.seq + 2


@pytest.mark.parametrize("since", [Position("another-epoch", 0), Position("<current>", 10**9)])
async def test_channel_history_from_an_unknown_position_is_incomplete(started: Started, since: Position) -> None:
    backend, _ = started
    await backend.publish_to_channel("team:42", head(1), False)
    current = await backend.position()
    if since.epoch == "<current>":
        since = Position(current.epoch, since.seq)
    history = await backend.history(None, since, ["team:42"])
    assert (history.complete, list(history.records), history.position) == (False, [], current)


async def test_channel_history_trimmed_by_size_is_incomplete(backend_factory: Callable[..., Any]) -> None:
    backend, _ = await backend_factory(history_size=2)
    start = await backend.position()
    records = [await backend.publish_to_channel("team:42", head(n), False) for n in range(250)]
    assert not (await backend.history(None, start, ["team:42"])).complete
    # A trimmed channel makes a whole resume incomplete, however complete the user's stream is.
    assert not (await backend.history("u1", start, ["team:42"])).complete
    assert (await backend.history("u1", start)).complete
    recent = await backend.history(None, Position(start.epoch, records[-2].seq), ["team:42"])
    assert (recent.complete, list(recent.records)) == (True, [records[-1]])


async def test_channel_history_expired_by_ttl_is_incomplete_but_retained_state_stays(
    backend_factory: Callable[..., Any],
) -> None:
    backend, _ = await backend_factory(history_ttl=0.5)
    start = await backend.position()
    kept = await backend.publish_to_channel("team:42", head(1), True)
    seen = Position(start.epoch, kept.seq)
    with anyio.fail_after(5):
        while True:  # expiry announces nothing: poll, bounded
            if not (await backend.history(None, start, ["team:42"])).complete:
                break
            await anyio.sleep(0.05)
    assert (await backend.history(None, seen, ["team:42"])).complete
    assert await backend.retained(["team:42"]) == {"team:42": kept}


async def test_retained_state_is_replaced_only_by_a_retained_event(started: Started) -> None:
    backend, _ = started
    assert await backend.retained(["team:42", "team:43"]) == {}
    first = await backend.publish_to_channel("team:42", head(1), True)
    await backend.publish_to_channel("team:42", head(2), False)
    other = await backend.publish_to_channel("team:43", head(3), True)
    assert await backend.retained(["team:42", "team:43", "nothing"]) == {"team:42": first, "team:43": other}
    second = await backend.publish_to_channel("team:42", head(4), True)
    kept = await backend.retained(["team:42"])
    assert kept == {"team:42": second}
    assert kept["team:42"][:4] == (second.epoch, second.seq, None, head(4))
    assert kept["team:42"].channel == "team:42"


async def test_channel_membership_counts(started: Started) -> None:
    backend, _ = started
    assert await backend.join_channel("node-a", "team:42", "u1") == (1, 1)
    assert await backend.join_channel("node-a", "team:42", "u1") == (2, 1)
    assert await backend.join_channel("node-b", "team:42", "u2") == (1, 2)
    assert await backend.join_channel("node-b", "team:43", "u1") == (1, 1)
    assert await backend.channel_members("team:42") == {"u1": 2, "u2": 1}
    assert await backend.channel_subscriber_count("team:42") == 3
    assert await backend.leave_channel("node-a", "team:42", "u1") == (1, 2)
    assert await backend.leave_channel("node-a", "team:42", "u1") == (0, 1)
    assert (await backend.leave_channel("node-a", "team:42", "u1"))[0] == 0  # not a member: harmless
    assert await backend.channel_members("team:42") == {"u2": 1}
    assert await backend.leave_channel("node-b", "team:42", "u2") == (0, 0)
    assert await backend.channel_members("team:42") == {}
    assert await backend.channel_subscriber_count("team:42") == 0
    assert await backend.channel_members("team:43") == {"u1": 1}
    assert await backend.channel_members("nobody-here") == {}
    assert await backend.channel_subscriber_count("nobody-here") == 0


async def test_concurrent_joins_each_get_their_own_turn(started: Started) -> None:
    """Joins made in the same moment (the Redis backend sends them in one round trip) answer as if one by one."""
    backend, _ = started
    answers = await asyncio.gather(*(backend.join_channel("node-a", "room:1", f"u{n % 3}") for n in range(9)))
    assert [users for _, users in answers] == [1, 2, 3, 3, 3, 3, 3, 3, 3]
    assert [connections for connections, _ in answers] == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    leaves = await asyncio.gather(*(backend.leave_channel("node-a", "room:1", f"u{n % 3}") for n in range(9)))
    assert leaves[-3:] == [(0, 2), (0, 1), (0, 0)]
    assert await backend.channel_subscriber_count("room:1") == 0


async def test_channel_unsubscribe_is_harmless(started: Started) -> None:
    backend, recorder = started
    await backend.subscribe_channel("team:42")
    await backend.unsubscribe_channel("team:42")
    await backend.unsubscribe_channel("never-subscribed")
    last = await backend.publish(None, head(1))
    await recorder.wait(lambda: last in recorder.records)


async def test_publish_to_channel_after_stop_raises(backend_factory: Callable[..., Any]) -> None:
    backend, _ = await backend_factory()
    await backend.stop()
    with pytest.raises(BackendUnavailable):
        await backend.publish_to_channel("team:42", head(1), True)
