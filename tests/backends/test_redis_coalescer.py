"""The coalescer alone, with a fake round trip: batching, deadlines, callers that give up, and stopping."""

from __future__ import annotations

import asyncio

import anyio
import pytest

from starlette_pomo_ws.exceptions import BackendUnavailable

pytest.importorskip("redis")
from starlette_pomo_ws.backends.redis._batch import Coalescer, in_task  # after the skip: an optional extra

pytestmark = pytest.mark.anyio


class Trips:
    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.release = asyncio.Event()
        self.release.set()
        self.fail: Exception | None = None

    async def send(self, items: list[int], seconds: float) -> list[int]:
        self.batches.append(items)
        await asyncio.wait_for(self.release.wait(), seconds)
        if self.fail is not None:
            raise self.fail
        return [item * 10 for item in items]


async def test_calls_in_the_same_moment_share_a_round_trip_and_later_ones_the_next() -> None:
    trips = Trips()
    coalescer: Coalescer[int, int] = Coalescer(in_task(trips.send), what="test", timeout=1, limit=3)
    trips.release.clear()
    first = [asyncio.ensure_future(coalescer(n)) for n in range(5)]
    await asyncio.sleep(0)  # the sender takes the first batch (of at most 3) and waits for its answer
    await asyncio.sleep(0)
    later = asyncio.ensure_future(coalescer(5))
    trips.release.set()
    assert await asyncio.gather(*first, later) == [0, 10, 20, 30, 40, 50]
    assert trips.batches == [[0, 1, 2], [3, 4, 5]]


async def test_a_call_that_waited_past_its_deadline_fails_without_a_round_trip() -> None:
    trips = Trips()
    trips.release.clear()
    coalescer: Coalescer[int, int] = Coalescer(in_task(trips.send), what="test", timeout=0.2, limit=1)
    calls = [asyncio.ensure_future(coalescer(n)) for n in range(2)]
    with anyio.fail_after(2):
        results = await asyncio.gather(*calls, return_exceptions=True)
    assert [type(r) for r in results] == [asyncio.TimeoutError, BackendUnavailable]  # builtin TimeoutError from 3.11
    assert "did not answer within 0.2s" in str(results[1])
    assert trips.batches == [[0]]  # the second never went out: its time was up


async def test_failures_reach_every_caller_and_callers_that_gave_up_are_skipped() -> None:
    trips = Trips()
    trips.fail = BackendUnavailable("down")
    coalescer: Coalescer[int, int] = Coalescer(in_task(trips.send), what="test", timeout=1, limit=10)
    gave_up = asyncio.ensure_future(coalescer(1))
    gave_up.cancel()
    calls = [asyncio.ensure_future(coalescer(n)) for n in (2, 3)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert [str(r) for r in results] == ["down", "down"]
    assert results[0] is not results[1]  # one exception per caller
    assert trips.batches == [[2, 3]]


async def test_closing_fails_the_waiting_callers() -> None:
    trips = Trips()
    trips.release.clear()
    coalescer: Coalescer[int, int] = Coalescer(in_task(trips.send), what="publish the event", timeout=5, limit=1)
    calls = [asyncio.ensure_future(coalescer(n)) for n in range(3)]
    await asyncio.sleep(0.01)
    await coalescer.close()
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(r, BackendUnavailable) and "stopped" in str(r) for r in results)
    await coalescer.close()  # safe twice
