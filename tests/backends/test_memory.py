"""What only the memory backend promises: its history costs the garbage collector nothing per event."""

from __future__ import annotations

import gc

import pytest

from starlette_pomo_ws._events import Position
from starlette_pomo_ws.backends.memory import MemoryBackend

pytestmark = pytest.mark.anyio


async def test_kept_events_are_invisible_to_the_garbage_collector() -> None:
    # Every object the cyclic collector tracks is traversed by each full collection, and makes the
    # next one come sooner: a history of 100,000 tracked records would tax every request of the app.
    backend = MemoryBackend(history_size=10_000, history_ttl=600)
    await backend.start(lambda record: None, lambda kind, argument: None)
    users = [f"user-{n}" for n in range(20)]
    start = await backend.position()
    for user in [*users, None]:
        await backend.publish(user, '{"type":"WARM_UP"')
    gc.collect()
    tracked = len(gc.get_objects())
    for n in range(2_000):
        await backend.publish(users[n % len(users)] if n % 5 else None, f'{{"type":"E","data":{n}')
    gc.collect()
    assert len(gc.get_objects()) - tracked < 100  # 2,000 events kept, not 2,000 tracked objects

    history = await backend.history("user-3", start)
    assert history.complete
    assert [record.head for record in history.records][:3] == [
        '{"type":"WARM_UP"',
        '{"type":"WARM_UP"',
        '{"type":"E","data":0',
    ]
    assert all(record.user_id in ("user-3", None) for record in history.records)
    assert len(history.records) == 2 + 100 + 400
    assert [record.seq for record in history.records] == sorted(record.seq for record in history.records)
    resumed = await backend.history("user-3", Position(start.epoch, history.records[-2].seq))
    assert list(resumed.records) == [history.records[-1]]
