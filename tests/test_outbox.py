"""The send primitive, with the awaitables real servers return: coroutines, futures, and future-likes."""

from __future__ import annotations

import asyncio
import contextvars
import json
import time
from collections.abc import Generator
from typing import Any

import anyio
import pytest
from starlette.applications import Starlette

from starlette_pomo_ws import PomoWS
from starlette_pomo_ws._metrics import Stats
from starlette_pomo_ws._outbox import Outbox
from starlette_pomo_ws._types import ASGIApp, Message, Receive, Scope, Send

from .conftest import make_app, make_settings, run_server, wait_until
from .e2e.test_uvicorn import raw_client, read_frames

pytestmark = pytest.mark.anyio


class FutureLike:
    """What granian's `send` returns: an awaitable that is its own iterator, with no `send`/`throw`, which
    yields itself (an asyncio future-alike) until another thread completes it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, delay: float | None = 0.001) -> None:
        self._future: asyncio.Future[None] = loop.create_future()
        if delay is not None:  # else it completes on complete()
            loop.call_later(delay, self.complete)
        self._asyncio_future_blocking = False

    def complete(self) -> None:
        if not self._future.done():
            self._future.set_result(None)

    def fail(self, exc: Exception) -> None:
        self._future.set_exception(exc)

    def __await__(self) -> FutureLike:
        return self

    def __next__(self) -> Any:
        if self._future.done():
            self._future.result()  # a failed send raises here, as the server's would
            raise StopIteration
        self._asyncio_future_blocking = True
        return self

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._future.get_loop()

    def add_done_callback(self, callback: Any, *, context: contextvars.Context | None = None) -> None:
        self._future.add_done_callback(lambda _: callback(self), context=context)

    def done(self) -> bool:
        return self._future.done()

    def result(self) -> None:
        return None

    def cancel(self, msg: Any = None) -> bool:
        return False


class Recording(Outbox):
    """An outbox that records what its connection would act on."""

    def __init__(self, send: Any, limit: int, stats: Stats, backed_up: dict[Outbox, None]) -> None:
        super().__init__(send, limit, stats, backed_up)
        self.failures: list[BaseException] = []
        self.too_slow = 0

    def _failed(self, exc: BaseException) -> None:
        self.failures.append(exc)

    def _too_slow(self) -> None:
        self.too_slow += 1


def bare_yield() -> Generator[None, None, None]:
    yield None  # what `asyncio.sleep(0)` yields: "run me again soon"


@pytest.mark.parametrize("kind", ["coroutine", "future-like", "bare-yield"])
async def test_any_awaitable_delivers_every_message_in_order_and_counts_bytes(kind: str) -> None:
    loop = asyncio.get_running_loop()
    written: list[str] = []

    def send(message: Message) -> Any:
        written.append(message["text"])
        if kind == "future-like":
            return FutureLike(loop)
        if kind == "bare-yield":

            class Once:
                def __await__(self) -> Generator[None, None, None]:
                    return bare_yield()

            return Once()

        async def done() -> None:
            return None

        return done()

    stats = Stats()
    backed_up: dict[Outbox, None] = {}
    outbox = Recording(send, 100, stats, backed_up)
    context = contextvars.copy_context()
    context.run(outbox.start, [], 0, context)
    texts = [f"message {n} é" for n in range(20)]
    at_once = sum(
        context.run(outbox.put, {"type": "websocket.send", "text": t}, len(t.encode()), n + 1, context)
        for n, t in enumerate(texts)
    )
    for t in texts[:at_once]:
        outbox.count(len(t.encode()))
    await wait_until(lambda: not outbox.backed_up, what="the writer to drain")
    assert written == texts
    assert outbox.failures == [] and outbox.too_slow == 0
    assert not backed_up
    assert (stats.messages_sent, stats.bytes_sent) == (20, sum(len(t.encode()) for t in texts))
    assert at_once == (20 if kind == "coroutine" else 0)


async def test_a_full_backlog_calls_too_slow_and_nothing_more_is_sent() -> None:
    loop = asyncio.get_running_loop()
    written: list[str] = []

    def send(message: Message) -> Any:
        written.append(message["text"])
        return FutureLike(loop)

    outbox = Recording(send, 3, Stats(), {})
    context = contextvars.copy_context()
    context.run(outbox.start, [], 0, context)
    for n in range(5):
        context.run(outbox.put, {"type": "websocket.send", "text": str(n)}, 1, n + 1, context)
    assert outbox.too_slow == 1  # the first is in flight, three wait, the fifth overflows
    outbox.stop()
    await asyncio.sleep(0.01)
    assert written == ["0"]


def held_sends(loop: asyncio.AbstractEventLoop) -> tuple[list[str], list[FutureLike], Any]:
    """A server `send` whose futures complete only when the test says so: (written, futures, send)."""
    written: list[str] = []
    futures: list[FutureLike] = []

    def send(message: Message) -> FutureLike:
        written.append(message["text"])
        futures.append(FutureLike(loop, delay=None))
        return futures[-1]

    return written, futures, send


def put(outbox: Outbox, context: contextvars.Context, text: str, seq: int) -> bool:
    sent: bool = context.run(outbox.put, {"type": "websocket.send", "text": text}, len(text), seq, context)
    return sent


def started(send: Any, backed_up: dict[Outbox, None] | None = None) -> tuple[Recording, Stats, contextvars.Context]:
    """An outbox past its handshake, with its stats and the context a fan-out would put into it in."""
    stats = Stats()
    outbox = Recording(send, 100, stats, {} if backed_up is None else backed_up)
    context = contextvars.copy_context()
    context.run(outbox.start, [], 0, context)
    return outbox, stats, context


async def test_a_send_the_server_completes_by_itself_costs_no_task_and_the_next_message_finishes_it() -> None:
    """granian completes sends on its own threads: waiting on each would cost a task and a wake-up of the
    loop per socket. The send stays under way until the socket's next message (or the ticker) finds it done."""
    loop = asyncio.get_running_loop()
    written, futures, send = held_sends(loop)
    backed_up: dict[Outbox, None] = {}
    outbox, stats, context = started(send, backed_up)
    tasks = len(asyncio.all_tasks())

    assert not put(outbox, context, "one", 1)
    assert written == ["one"] and len(asyncio.all_tasks()) == tasks and not outbox.backed_up
    assert outbox in backed_up and stats.messages_sent == 0  # under way: counted once it is done

    futures[0].complete()
    assert not put(outbox, context, "two", 2)
    assert written == ["one", "two"] and len(asyncio.all_tasks()) == tasks
    assert (stats.messages_sent, stats.bytes_sent) == (1, 3)

    outbox.check(time.monotonic(), 10.0)  # the ticker: "two" is not done yet, and not late
    assert stats.messages_sent == 1 and outbox in backed_up and outbox.too_slow == 0
    futures[1].complete()
    outbox.check(time.monotonic(), 10.0)  # now the ticker finishes it, with no message after it
    assert (stats.messages_sent, stats.bytes_sent) == (2, 6)
    assert not backed_up and outbox.failures == []


async def test_a_message_behind_a_send_still_under_way_waits_for_it_in_order() -> None:
    loop = asyncio.get_running_loop()
    written, futures, send = held_sends(loop)
    outbox, stats, context = started(send)
    put(outbox, context, "one", 1)
    writer_after_one = outbox.backed_up
    assert not writer_after_one  # under way, and nothing waits on it yet
    put(outbox, context, "two", 2)
    put(outbox, context, "three", 3)
    assert written == ["one"] and outbox.backed_up  # the writer owns the socket until "one" is done
    for n in range(3):
        futures[n].complete()
        await wait_until(lambda: len(futures) > n + 1 or not outbox.backed_up, what="the next send")  # noqa: B023
    assert written == ["one", "two", "three"] and stats.messages_sent == 3 and outbox.failures == []


async def test_a_send_under_way_that_never_completes_marks_the_client_too_slow() -> None:
    loop = asyncio.get_running_loop()
    _, _, send = held_sends(loop)
    outbox, _, context = started(send)
    put(outbox, context, "one", 1)
    outbox.check(time.monotonic() + 5, 10.0)
    assert outbox.too_slow == 0
    outbox.check(time.monotonic() + 11, 10.0)  # the ticker, more than send_timeout later
    assert outbox.too_slow == 1


async def test_a_send_under_way_that_the_server_failed_reports_the_failure_and_counts_nothing() -> None:
    loop = asyncio.get_running_loop()
    written, futures, send = held_sends(loop)
    outbox, stats, context = started(send)
    put(outbox, context, "one", 1)
    lost = ConnectionResetError("the peer went away")
    futures[0].fail(lost)
    outbox.check(time.monotonic(), 10.0)
    assert outbox.failures == [lost] and stats.messages_sent == 0 and written == ["one"]


async def test_a_send_that_waits_again_after_the_servers_future_goes_on_in_the_writer() -> None:
    """A wrapper that awaits the server twice (two frames, say): once the first future is done, the rest
    of the send is the writer's, and the socket is free once it has finished."""
    loop = asyncio.get_running_loop()
    written, futures, server_send = held_sends(loop)

    async def twice(message: Message) -> None:
        await server_send(message)
        await server_send({**message, "text": message["text"] + " again"})

    outbox, stats, context = started(twice)
    put(outbox, context, "one", 1)
    futures[0].complete()
    outbox.check(time.monotonic(), 10.0)
    assert outbox.backed_up and written == ["one", "one again"]
    futures[1].complete()
    await wait_until(lambda: not outbox.backed_up, what="the writer to finish the send")
    assert stats.messages_sent == 1 and outbox.failures == []


span: contextvars.ContextVar[str | None] = contextvars.ContextVar("span", default=None)


async def test_a_wrapper_around_a_send_under_way_finishes_in_its_own_context() -> None:
    """A tracing wrapper around granian's `send` (its span set before the await, reset after): the rest of
    the wrapper runs in its own context when the ticker or a stop finishes it, never in the caller's."""
    loop = asyncio.get_running_loop()
    _, futures, server_send = held_sends(loop)
    unwound: list[str] = []

    async def traced(message: Message) -> None:
        token = span.set(f"send {message['text']}")
        try:
            await server_send(message)
        finally:
            span.reset(token)  # raises ValueError if this runs in another context than the set()
            unwound.append(message["text"])

    outbox, _, context = started(traced)
    put(outbox, context, "finished", 1)
    assert span.get() is None and unwound == []
    futures[0].complete()
    outbox.check(time.monotonic(), 10.0)  # the ticker, in a context of its own
    assert unwound == ["finished"] and outbox.failures == []
    put(outbox, contextvars.copy_context(), "stopped", 2)
    assert len(futures) == 2 and unwound == ["finished"]
    outbox.stop()  # closes the wrapper still waiting, in its own context
    assert unwound == ["finished", "stopped"] and outbox.failures == [] and span.get() is None


class Tracing:
    """An OpenTelemetry-style middleware: a span is current for the duration of every `send`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def traced(message: Message) -> None:
            token = span.set(f"send {message['type']}")
            try:
                await send(message)
            finally:
                span.reset(token)  # raises ValueError if this runs in another context than the set()

        await self.app(scope, receive, traced)


async def test_a_send_wrapper_that_sets_a_context_variable_leaves_the_publisher_clean() -> None:
    """The publisher fans out into a socket that the server pauses: the wrapper's span stays with that
    send, never in the publisher's context, and the send finishes in its own context, in order."""
    pomo = PomoWS(make_settings(send_queue_size=5000, send_timeout=30))
    app: Starlette = make_app(pomo)
    async with run_server(Tracing(app)) as server:
        sock = await raw_client(server.port, "pauser")
        await wait_until(lambda: pomo.broadcaster.user_connection_count("pauser") == 1, what="connected")
        blob = "y" * 16384
        published = 0
        with anyio.fail_after(30):
            while published < 3000 and not pomo.broadcaster.backed_up:
                await pomo.broadcaster.broadcast_to_user("pauser", "BULK", {"n": published, "blob": blob})
                published += 1
                assert span.get() is None, "a paused send left its span in the publisher's context"
            assert pomo.broadcaster.backed_up, "the server never paused the socket"
            for _ in range(20):
                await pomo.broadcaster.broadcast_to_user("pauser", "BULK", {"n": published, "blob": blob})
                published += 1
            assert span.get() is None
            seen = []
            async for opcode, payload in read_frames(sock):
                assert opcode == 0x1
                event = json.loads(payload)
                if event["type"] == "BULK":
                    seen.append(event["data"]["n"])
                    if len(seen) == published:
                        break
        sock.close()
        assert seen == list(range(published))
