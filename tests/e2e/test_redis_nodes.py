"""Many nodes on one Redis: separate uvicorn processes, and one app under `uvicorn --workers 2`."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from ..backends.conftest import delete_prefix
from ..conftest import SECRET, free_socket, make_token

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

ROOT = Path(__file__).resolve().parents[2]


class Node:
    def __init__(self, process: subprocess.Popen[bytes], port: int) -> None:
        self.process = process
        self.port = port
        self.http = f"http://127.0.0.1:{port}"

    def ws(self, query: str) -> str:
        return f"ws://127.0.0.1:{self.port}/ws?{query}"


@contextlib.asynccontextmanager
async def node(
    redis_url: str, prefix: str, *, workers: int = 1, env: dict[str, str] | None = None
) -> AsyncIterator[Node]:
    """Start `uvicorn tests.e2e.redis_app:app` in its own process on an inherited, already bound socket."""
    sock = free_socket()
    sock.listen(128)
    port = sock.getsockname()[1]
    command = [sys.executable, "-m", "uvicorn", "tests.e2e.redis_app:app", "--fd", str(sock.fileno())]
    command += ["--ws-per-message-deflate", "false", "--log-level", "warning", "--workers", str(workers)]
    environment = {
        **os.environ,
        "POMO_WS_TEST_SECRET": SECRET,
        "POMO_WS_TEST_REDIS_URL": redis_url,
        "POMO_WS_TEST_KEY_PREFIX": prefix,
        **(env or {}),
    }
    # Popen returns at once (the node starts in the background); we poll it without blocking.
    process = subprocess.Popen(command, cwd=ROOT, env=environment, pass_fds=(sock.fileno(),))  # noqa: ASYNC220
    sock.close()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            deadline = time.monotonic() + 20
            while True:
                assert process.poll() is None, "the node exited at startup"
                assert time.monotonic() < deadline, "the node did not become healthy in 20 s"
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get("/ws/health")).status_code == 200:
                        break
                await anyio.sleep(0.05)
        yield Node(process, port)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:  # pragma: no cover - a stuck node
            process.kill()
            process.wait(timeout=5)


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    prefix = f"pomo-ws-test:{secrets.token_hex(4)}:"
    yield prefix
    anyio.run(delete_prefix, redis_url, prefix)


async def recv(ws: ClientConnection, within: float = 10) -> dict[str, Any]:
    with anyio.fail_after(within):
        result: dict[str, Any] = json.loads(await ws.recv())
    return result


async def test_two_processes_share_events_counts_limits_and_logout(redis_url: str, prefix: str) -> None:
    limit = {"POMO_WS_TEST_MAX_CONNECTIONS": "3"}
    async with node(redis_url, prefix, env=limit) as a, node(redis_url, prefix, env=limit) as b:
        token = make_token("u1")
        async with (
            connect(b.ws(f"token={token}")) as b1,
            connect(b.ws(f"token={token}")) as b2,
            connect(a.ws(f"token={token}")) as a1,
            connect(b.ws(f"token={make_token('u2')}")) as other,
        ):
            for ws in (b1, b2, a1, other):
                assert (await recv(ws))["type"] == "CONNECTION_ESTABLISHED"
            async with httpx.AsyncClient() as http:
                counts = (await http.get(f"{a.http}/counts", params={"user": "u1"})).json()
                assert counts == {"local": 1, "user": 3, "total": 4}
                # The limit holds across the cluster: a fourth tab on either node is refused.
                async with connect(a.ws(f"token={token}")) as fourth:
                    with pytest.raises(ConnectionClosed) as refused:
                        await recv(fourth)
                    assert refused.value.rcvd is not None
                    assert (refused.value.rcvd.code, refused.value.rcvd.reason) == (
                        1008,
                        "Too many connections for this user",
                    )
                published = await http.post(f"{a.http}/publish", json={"user": "u1", "type": "TASK_CREATED", "data": 1})
                event_id = published.json()["id"]
                for ws in (b1, b2, a1):
                    event = await recv(ws)
                    assert (event["type"], event["id"]) == ("TASK_CREATED", event_id)
                await http.post(f"{b.http}/publish", json={"type": "NOTIFICATION"})
                for ws in (b1, b2, a1, other):
                    assert (await recv(ws))["type"] == "NOTIFICATION"
                # Logout on node A closes u1's sockets on node B too, and nobody else's.
                await http.post(f"{a.http}/logout", params={"user": "u1"})
                for ws in (b1, b2, a1):
                    with pytest.raises(ConnectionClosed) as closed:
                        await recv(ws)
                    assert closed.value.rcvd is not None
                    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1000, "Logged out")
                await other.send('{"type": "PING"}')
                assert (await recv(other))["type"] == "PONG"


async def test_a_client_resumes_on_another_node(redis_url: str, prefix: str) -> None:
    async with node(redis_url, prefix) as a, node(redis_url, prefix) as b, httpx.AsyncClient() as http:
        token = make_token("u1")
        async with connect(a.ws(f"token={token}")) as ws:
            cursor = (await recv(ws))["id"]
        missed = []
        for n in range(5):
            target = {"user": "u1"} if n % 2 else {}
            response = await http.post(f"{a.http}/publish", json={**target, "type": "TASK_UPDATED", "data": n})
            missed.append(response.json()["id"])
        await http.post(f"{a.http}/publish", json={"user": "u2", "type": "TASK_UPDATED"})
        async with connect(b.ws(f"token={token}&last_event_id={cursor}")) as ws:
            established = await recv(ws)
            assert established["data"]["resumed"] is True
            assert [(await recv(ws))["id"] for _ in missed] == missed
            live = (await http.post(f"{a.http}/publish", json={"user": "u1", "type": "LIVE"})).json()["id"]
            assert (await recv(ws))["id"] == live


async def test_lost_redis_data_starts_a_new_epoch_and_old_cursors_resync(redis_url: str, prefix: str) -> None:
    async with node(redis_url, prefix) as a, httpx.AsyncClient() as http:
        token = make_token("u1")
        await http.post(f"{a.http}/publish", json={"user": "u1", "type": "TASK_CREATED"})
        async with connect(a.ws(f"token={token}")) as ws:
            cursor = (await recv(ws))["id"]
        await delete_prefix(redis_url, prefix)  # as a FLUSHDB or a restart without persistence would
        await http.post(f"{a.http}/publish", json={"user": "u1", "type": "AFTER_THE_LOSS"})
        async with connect(a.ws(f"token={token}&last_event_id={cursor}")) as ws:
            assert (await recv(ws))["type"] == "CONNECTION_ESTABLISHED"
            resync = await recv(ws)
            assert resync["type"] == "RESYNC_REQUIRED"
            await ws.send('{"type": "PING"}')
            assert (await recv(ws))["type"] == "PONG", "no stale or partial replay before the answer"


async def test_one_app_under_uvicorn_workers_2(redis_url: str, prefix: str) -> None:
    async with node(redis_url, prefix, workers=2) as app, httpx.AsyncClient() as http:
        sockets = []
        async with contextlib.AsyncExitStack() as stack:
            for n in range(8):
                ws = await stack.enter_async_context(connect(app.ws(f"token={make_token(f'user{n % 2}')}")))
                assert (await recv(ws))["type"] == "CONNECTION_ESTABLISHED"
                sockets.append(ws)
            for _ in range(6):  # requests land on either worker; every socket still gets every event
                await http.post(f"{app.http}/publish", json={"type": "NOTIFICATION"})
            for ws in sockets:
                assert [(await recv(ws))["type"] for _ in range(6)] == ["NOTIFICATION"] * 6
            await http.post(f"{app.http}/publish", json={"user": "user1", "type": "TASK_CREATED"})
            for n, ws in enumerate(sockets):
                if n % 2:
                    assert (await recv(ws))["type"] == "TASK_CREATED"
            counts = (await http.get(f"{app.http}/counts", params={"user": "user1"})).json()
            assert (counts["user"], counts["total"]) == (4, 8)
