"""Fixtures for the backend suites: a recorder for `deliver`/`control`, started backends, private Redis servers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any

import anyio
import pytest

from starlette_pomo_ws.backends.base import Backend, Record
from starlette_pomo_ws.backends.memory import MemoryBackend

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/15"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # redis-py is asyncio-only


class Recorder:
    """Collects what a backend hands to the core, and waits (bounded) for a condition on it."""

    def __init__(self) -> None:
        self.records: list[Record] = []
        self.controls: list[tuple[str, dict[str, Any]]] = []
        self._changed = asyncio.Event()

    def deliver(self, record: Record) -> None:
        self.records.append(record)
        self._changed.set()

    def control(self, kind: str, arguments: Mapping[str, Any]) -> None:
        self.controls.append((kind, dict(arguments)))
        self._changed.set()

    @property
    def seqs(self) -> list[int]:
        return [r.seq for r in self.records]

    async def wait(self, predicate: Callable[[], bool], limit: float = 5.0) -> None:
        with anyio.fail_after(limit):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()


def _reachable(url: str) -> str | None:
    try:
        import redis
    except ImportError:  # pragma: no cover - the test extra installs it
        return "redis-py is not installed"
    client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.RedisError as exc:
        return f"Redis at {url} is unreachable: {exc}"
    finally:
        client.close()
    return None


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The shared test Redis; a missing server skips, except under CI where it fails."""
    url = os.environ.get("POMO_WS_TEST_REDIS_URL", DEFAULT_REDIS_URL)
    problem = _reachable(url)
    if problem is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(problem)
        pytest.skip(problem)
    return url


@pytest.fixture
def key_prefix() -> str:
    return f"pomo-ws-test:{secrets.token_hex(4)}:"


async def delete_prefix(url: str, prefix: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture
async def redis_cleanup(redis_url: str, key_prefix: str, anyio_backend: str) -> AsyncIterator[None]:
    yield
    await delete_prefix(redis_url, key_prefix)


BackendFactory = Callable[..., Any]


@pytest.fixture
async def redis_factory(
    redis_url: str, key_prefix: str, redis_cleanup: None, anyio_backend: str
) -> AsyncIterator[Callable[..., Any]]:
    """Builds started Redis backends on the shared server under this test's key prefix; stops them after."""
    from starlette_pomo_ws.backends.redis import RedisBackend

    started: list[RedisBackend] = []

    async def make(**options: Any) -> tuple[RedisBackend, Recorder]:
        url = options.pop("url", redis_url)
        options.setdefault("key_prefix", key_prefix)
        backend = RedisBackend(url, **options)
        recorder = Recorder()
        await backend.start(recorder.deliver, recorder.control)
        started.append(backend)
        return backend, recorder

    yield make
    for backend in started:
        await backend.stop()


@pytest.fixture
async def memory_factory(anyio_backend: str) -> AsyncIterator[Callable[..., Any]]:
    started: list[MemoryBackend] = []

    async def make(**options: Any) -> tuple[MemoryBackend, Recorder]:
        options.pop("key_prefix", None)
        backend = MemoryBackend(**options)
        recorder = Recorder()
        await backend.start(recorder.deliver, recorder.control)
        started.append(backend)
        return backend, recorder

    yield make
    for backend in started:
        await backend.stop()


@pytest.fixture(params=["memory", "redis"])
def backend_factory(request: pytest.FixtureRequest) -> Callable[..., Any]:
    """The same contract over every backend: `await backend_factory(**options) -> (backend, recorder)`."""
    factory: Callable[..., Any] = request.getfixturevalue(f"{request.param}_factory")
    return factory


@pytest.fixture
async def started(backend_factory: Callable[..., Any]) -> tuple[Backend, Recorder]:
    backend, recorder = await backend_factory()
    return backend, recorder


# -- private Redis servers, for tests that stop, restart, flush or reconfigure Redis ------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """A `redis-server` of this test's own on a free port (never the shared one)."""

    def __init__(self, directory: pathlib.Path, *extra: str) -> None:
        self.directory = directory
        self.port = free_port()
        self.extra = list(extra)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, *, persist: bool = False, port_option: str = "--port", ready_port: int | None = None) -> None:
        assert self.process is None
        args = [
            "redis-server",
            port_option,
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.directory),
            "--save",
            "",
            "--appendonly",
            "yes" if persist else "no",
            "--appendfsync",
            "always",
            *self.extra,
        ]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", ready_port or self.port), 0.2):
                return
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start: {args}")
            time.sleep(0.02)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            process.wait(10)

    def kill(self) -> None:
        """A crash: SIGKILL, no shutdown save. Only what the AOF already has on disk survives."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(10)

    def wipe_persistence(self) -> None:
        for path in self.directory.iterdir():
            if path.name.startswith("appendonly") or path.suffix == ".rdb":
                shutil.rmtree(path) if path.is_dir() else path.unlink()


async def replica_in_sync(replica: RedisServer, limit: float = 10) -> None:
    """Until the replica's link to its primary is up (its first sync done)."""
    import redis.asyncio as aioredis

    client = aioredis.Redis(host="127.0.0.1", port=replica.port, socket_timeout=1, decode_responses=True)
    try:
        with anyio.fail_after(limit):
            while (await client.info("replication")).get("master_link_status") != "up":  # noqa: ASYNC110  # another process's state
                await anyio.sleep(0.05)
    finally:
        await client.aclose()


@pytest.fixture
def redis_server_factory(tmp_path: pathlib.Path) -> Iterator[Callable[..., RedisServer]]:
    if shutil.which("redis-server") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("redis-server is not installed")
        pytest.skip("redis-server is not installed")
    servers: list[RedisServer] = []

    def make(*extra: str) -> RedisServer:
        directory = tmp_path / f"redis{len(servers)}"
        directory.mkdir()
        server = RedisServer(directory, *extra)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()
