"""The send primitive, with the awaitables real servers return: coroutines, futures, and future-likes."""

from __future__ import annotations

import asyncio
import contextvars
import json
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

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._future: asyncio.Future[None] = loop.create_future()
        loop.call_later(0.001, self._future.set_result, None)
        self._asyncio_future_blocking = False

    def __await__(self) -> FutureLike:
        return self

    def __next__(self) -> Any:
        if self._future.done():
            raise StopIteration
        self._asyncio_future_blocking = True
        return self

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._future.get_loop()

    def add_done_callback(self, callback: Any, *, context: contextvars.Context | None = None) -> None:
        self._future.add_done_callback(lambda _: callback(self), context=context)

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


span: contextvars.ContextVar[str | None] = contextvars.ContextVar("span", default=None)


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
