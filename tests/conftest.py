from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from starlette_pomo_ws import PomoWS, Settings
from starlette_pomo_ws.testing import mint_token

SECRET = "test-secret-0123456789-0123456789-0123456789"
REDIS_URL = os.environ.get("POMO_WS_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
WS_IMPLEMENTATIONS = ["websockets-sansio", "wsproto"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def make_token(user_id: Any = "u1", *, secret: str = SECRET, ttl: float | None = 300, **claims: Any) -> str:
    """`starlette_pomo_ws.testing.mint_token`, the package's one minter, with the suite's secret (`userId` claim)."""
    return mint_token(Settings(jwt_secret=secret), user_id, ttl=ttl, **claims)


def make_settings(**overrides: Any) -> Settings:
    return Settings(jwt_secret=SECRET, **overrides)


def make_app(pomo: PomoWS) -> Starlette:
    """The smallest Starlette app: the two lines, plus an endpoint that broadcasts (to a user, all, a channel)."""

    async def publish(request: Request) -> JSONResponse:
        body = await request.json()
        broadcaster = request.state.broadcaster
        if "channel" in body:
            event = await broadcaster.broadcast_to_channel(body["channel"], body["type"], body.get("data"))
        elif body.get("user") is None:
            event = await broadcaster.broadcast_to_all(body["type"], body.get("data"))
        else:
            event = await broadcaster.broadcast_to_user(body["user"], body["type"], body.get("data"))
        return JSONResponse({"id": event.id})

    app = Starlette(lifespan=pomo.lifespan, routes=[Route("/publish", publish, methods=["POST"])])
    app.mount("/ws", pomo)
    return app


@pytest.fixture
def pomo() -> PomoWS:
    return PomoWS(make_settings())


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


class RunningServer:
    def __init__(self, server: uvicorn.Server, port: int) -> None:
        self.server = server
        self.port = port

    def url(self, path: str = "/ws") -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextlib.asynccontextmanager
async def run_server(app: Any, ws: str = "websockets-sansio", **config: Any) -> AsyncIterator[RunningServer]:
    """Run a real uvicorn server on a free port of 127.0.0.1 in this event loop."""
    sock = free_socket()
    port = sock.getsockname()[1]
    cfg = uvicorn.Config(
        app,
        ws=ws,
        ws_per_message_deflate=False,
        lifespan="on",
        log_level="warning",
        timeout_graceful_shutdown=5,
        **config,
    )
    server = uvicorn.Server(cfg)
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("uvicorn exited before it started")
            assert time.monotonic() < deadline, "uvicorn did not start within 10 s"
            await asyncio.sleep(0.01)
        yield RunningServer(server, port)
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), 15)
        sock.close()


async def wait_until(predicate: Callable[[], bool], within: float = 5.0, what: str = "condition") -> None:
    """Poll a cheap in-process predicate, bounded (for state that has no event to wait on)."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(0.005)


async def settled(tasks: set[asyncio.Task[None]], within: float = 5.0) -> None:
    """Until the background tasks that exist now have finished (bounded); there may be none left already."""
    pending = set(tasks)
    if pending:
        _, unfinished = await asyncio.wait(pending, timeout=within)
        assert not unfinished, f"{len(unfinished)} background tasks still running after {within} s"


async def recv(ws: ClientConnection, within: float = 5) -> dict[str, Any]:
    """The next server message, parsed; bounded."""
    with anyio.fail_after(within):
        message = await ws.recv()
    assert isinstance(message, str), "server messages are text frames"
    result: dict[str, Any] = json.loads(message)
    return result


async def closed_with(ws: ClientConnection, within: float = 5) -> tuple[int, str]:
    """Read until the close frame arrives; return its code and reason."""
    with anyio.fail_after(within):
        try:
            while True:
                await ws.recv()
        except ConnectionClosed as exc:
            assert exc.rcvd is not None, "the server closed without a close frame"
            return exc.rcvd.code, exc.rcvd.reason


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A real Redis; under CI a missing Redis fails, elsewhere it skips."""
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.RedisError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"Redis is required under CI but {REDIS_URL} is unreachable: {exc}")
        pytest.skip(f"Redis unreachable at {REDIS_URL}")
    finally:
        client.close()
    yield REDIS_URL
