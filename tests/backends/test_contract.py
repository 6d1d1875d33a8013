"""The backend contract, run over `memory://` and `redis://` alike."""

from __future__ import annotations

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
