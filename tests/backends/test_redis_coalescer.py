"""The coalescer alone, with a fake round trip: batching, deadlines, callers that give up, and stopping."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import anyio
import pytest

from starlette_pomo_ws.exceptions import BackendUnavailable

pytest.importorskip("redis")
from starlette_pomo_ws.backends.redis._batch import Coalescer, Settle  # after the skip: an optional extra

pytestmark = pytest.mark.anyio


class Trips:
    """A fake round trip: answered in the next step of the event loop once released, or failing with
    `TimeoutError` at its deadline."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.released = True
        self.held: list[Callable[[], None]] = []
        self.fail: Exception | None = None

    def send(self, items: list[int], seconds: float, settle: Settle[int]) -> None:
        self.batches.append(items)
        loop = asyncio.get_running_loop()
        timer = loop.call_later(seconds, settle, asyncio.TimeoutError())

        def answer() -> None:
            timer.cancel()
            settle(self.fail if self.fail is not None else [item * 10 for item in items])

        if self.released:
            loop.call_soon(answer)
        else:
            self.held.append(answer)

    def release(self) -> None:
        self.released = True
        held, self.held = self.held, []
        for answer in held:
            answer()


async def test_calls_in_the_same_moment_share_a_round_trip_and_later_ones_the_next() -> None:
    trips = Trips()
    coalescer: Coalescer[int, int] = Coalescer(trips.send, what="test", timeout=1, limit=3)
    trips.released = False
    first = [asyncio.ensure_future(coalescer(n)) for n in range(5)]
    await asyncio.sleep(0)  # the sender takes the first batch (of at most 3) and waits for its answer
    await asyncio.sleep(0)
    later = asyncio.ensure_future(coalescer(5))
    trips.release()
    assert await asyncio.gather(*first, later) == [0, 10, 20, 30, 40, 50]
    assert trips.batches == [[0, 1, 2], [3, 4, 5]]


async def test_a_call_that_waited_past_its_deadline_fails_without_a_round_trip() -> None:
    trips = Trips()
    trips.released = False
    coalescer: Coalescer[int, int] = Coalescer(trips.send, what="test", timeout=0.2, limit=1)
    calls = [asyncio.ensure_future(coalescer(n)) for n in range(2)]
    with anyio.fail_after(2):
        results = await asyncio.gather(*calls, return_exceptions=True)
    assert [type(r) for r in results] == [asyncio.TimeoutError, BackendUnavailable]  # builtin TimeoutError from 3.11
    assert "did not answer within 0.2s" in str(results[1])
    assert trips.batches == [[0]]  # the second never went out: its time was up


async def test_failures_reach_every_caller_and_callers_that_gave_up_are_skipped() -> None:
    trips = Trips()
    trips.fail = BackendUnavailable("down")
    coalescer: Coalescer[int, int] = Coalescer(trips.send, what="test", timeout=1, limit=10)
    gave_up = asyncio.ensure_future(coalescer(1))
    gave_up.cancel()
    calls = [asyncio.ensure_future(coalescer(n)) for n in (2, 3)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert [str(r) for r in results] == ["down", "down"]
    assert results[0] is not results[1]  # one exception per caller
    assert trips.batches == [[2, 3]]


async def test_closing_fails_the_waiting_callers() -> None:
    trips = Trips()
    trips.released = False
    coalescer: Coalescer[int, int] = Coalescer(trips.send, what="publish the event", timeout=5, limit=1)
    calls = [asyncio.ensure_future(coalescer(n)) for n in range(3)]
    await asyncio.sleep(0.01)
    await coalescer.close()
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(r, BackendUnavailable) and "stopped" in str(r) for r in results)
    await coalescer.close()  # safe twice


async def test_a_pause_waits_for_the_batch_in_flight_and_holds_the_next_until_it_ends() -> None:
    trips = Trips()
    trips.released = False
    coalescer: Coalescer[int, int] = Coalescer(trips.send, what="test", timeout=5, limit=10)
    first = asyncio.ensure_future(coalescer(1))
    await asyncio.sleep(0)  # [1] is in flight
    order: list[str] = []

    async def refresh() -> None:
        async with coalescer.paused():
            order.append("refresh")
            await asyncio.sleep(0.05)  # a batch sent now would interleave with the refresh's writes
            assert trips.batches == [[1]]
            order.append("refresh done")

    pausing = asyncio.ensure_future(refresh())
    await asyncio.sleep(0.01)
    assert order == []  # the pause waits for the batch in flight
    second = asyncio.ensure_future(coalescer(2))
    trips.release()
    assert await first == 10
    await pausing
    assert await second == 20
    assert order == ["refresh", "refresh done"]
    assert trips.batches == [[1], [2]]
