"""End to end: a real uvicorn server on 127.0.0.1 and the real `websockets` client, for every framework."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import httpx
import pytest
from fastapi import FastAPI, Request as FastAPIRequest
from litestar import Litestar, Request as LitestarRequest, post
from websockets.asyncio.client import ClientConnection, connect

from starlette_pomo_ws import Broadcaster, PomoWS
from starlette_pomo_ws.litestar import PomoWSPlugin

from ..conftest import (
    WS_IMPLEMENTATIONS,
    closed_with,
    make_app,
    make_settings,
    make_token,
    recv,
    run_server,
    wait_until,
)

pytestmark = pytest.mark.anyio


def starlette_app(pomo: PomoWS) -> Any:
    return make_app(pomo)


def fastapi_app(pomo: PomoWS) -> Any:
    app = FastAPI(lifespan=pomo.lifespan)
    app.mount("/ws", pomo)

    @app.post("/publish")
    async def publish(request: FastAPIRequest) -> dict[str, str]:
        body = await request.json()
        broadcaster: Broadcaster = request.state.broadcaster
        if "channel" in body:
            event = await broadcaster.broadcast_to_channel(body["channel"], body["type"], body.get("data"))
        elif body.get("user") is None:
            event = await broadcaster.broadcast_to_all(body["type"], body.get("data"))
        else:
            event = await broadcaster.broadcast_to_user(body["user"], body["type"], body.get("data"))
        return {"id": event.id}

    return app


def litestar_app(pomo: PomoWS) -> Any:
    @post("/publish", status_code=200)
    async def publish(request: LitestarRequest[Any, Any, Any]) -> dict[str, str]:
        data = await request.json()
        broadcaster: Broadcaster = request.state.broadcaster
        if "channel" in data:
            event = await broadcaster.broadcast_to_channel(data["channel"], data["type"], data.get("data"))
        elif data.get("user") is None:
            event = await broadcaster.broadcast_to_all(data["type"], data.get("data"))
        else:
            event = await broadcaster.broadcast_to_user(data["user"], data["type"], data.get("data"))
        return {"id": event.id}

    return Litestar(route_handlers=[publish], plugins=[PomoWSPlugin(pomo, path="/ws")])


FRAMEWORKS: dict[str, Callable[[PomoWS], Any]] = {
    "starlette": starlette_app,
    "fastapi": fastapi_app,
    "litestar": litestar_app,
}


@pytest.fixture(params=WS_IMPLEMENTATIONS)
def ws_impl(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=list(FRAMEWORKS))
def framework(request: pytest.FixtureRequest) -> Callable[[PomoWS], Any]:
    return FRAMEWORKS[request.param]


async def test_fan_out_reaches_every_tab_of_the_user_and_no_one_else(
    framework: Callable[[PomoWS], Any], ws_impl: str
) -> None:
    pomo = PomoWS(make_settings())
    async with run_server(framework(pomo), ws=ws_impl) as server:
        token_a, token_b = make_token("alice"), make_token("bob")
        async with (
            connect(server.url(f"/ws?token={token_a}")) as tab1,
            connect(server.url("/ws/"), subprotocols=["bearer", token_a]) as tab2,  # type: ignore[list-item]
            connect(server.url("/ws"), additional_headers={"Authorization": f"Bearer {token_b}"}) as other,
        ):
            assert tab2.subprotocol == "bearer"
            for ws, user in ((tab1, "alice"), (tab2, "alice"), (other, "bob")):
                hello = await recv(ws)
                assert hello["type"] == "CONNECTION_ESTABLISHED"
                assert hello["userId"] == user
                assert hello["data"]["message"] == "WebSocket connection established"
                assert "id" in hello
            assert pomo.broadcaster.user_connection_count("alice") == 2
            assert pomo.broadcaster.total_connection_count() == 3
            async with httpx.AsyncClient(base_url=server.http) as http:
                response = await http.post(
                    "/publish", json={"user": "alice", "type": "TASK_CREATED", "data": {"id": 1}}
                )
                assert response.status_code == 200
                event_id = response.json()["id"]
                await http.post("/publish", json={"type": "NOTIFICATION", "data": {"message": "hi"}})
            for ws in (tab1, tab2):
                event = await recv(ws)
                assert event["type"] == "TASK_CREATED"
                assert event["userId"] == "alice"
                assert event["data"] == {"id": 1}
                assert event["id"] == event_id
                assert event["timestamp"].endswith("Z") and len(event["timestamp"]) == 24
            for ws in (tab1, tab2, other):
                event = await recv(ws)
                assert event["type"] == "NOTIFICATION"
                assert event["userId"] is None
            # bob never saw alice's task: the next thing he gets is the answer to his own ping
            await other.send(json.dumps({"type": "PING"}))
            assert (await recv(other))["type"] == "PONG"


async def test_a_channel_event_reaches_its_subscribers_on_every_framework(framework: Callable[[PomoWS], Any]) -> None:
    pomo = PomoWS(make_settings())
    async with run_server(framework(pomo)) as server:
        member, outsider = make_token("alice", channels=["team:*"]), make_token("bob", channels=["team:*"])
        async with (
            connect(server.url(f"/ws?token={member}&channels=team:42")) as ws,
            connect(server.url(f"/ws?token={outsider}")) as other,
        ):
            assert (await recv(ws))["type"] == "CONNECTION_ESTABLISHED"
            assert (await recv(ws))["type"] == "SUBSCRIBED"
            assert (await recv(other))["type"] == "CONNECTION_ESTABLISHED"
            async with httpx.AsyncClient(base_url=server.http) as http:
                response = await http.post("/publish", json={"channel": "team:42", "type": "TASK_CREATED", "data": 1})
                assert response.status_code == 200
            event = await recv(ws)
            assert (event["type"], event["channel"], event["id"]) == ("TASK_CREATED", "team:42", response.json()["id"])
            await other.send(json.dumps({"type": "PING"}))
            assert (await recv(other))["type"] == "PONG"


@pytest.mark.parametrize(
    ("query", "headers", "reason"),
    [
        ("", {}, "No authentication token provided"),
        ("?token=not-a-jwt", {}, "Invalid authentication token"),
        (
            f"?token={make_token('u1', secret='another-secret-0123456789-0123456789-0123')}",
            {},
            "Invalid authentication token",
        ),
        (f"?token={make_token('u1', ttl=-60)}", {}, "Authentication token expired"),
        ("", {"Authorization": "Bearer garbage"}, "Invalid authentication token"),
    ],
    ids=["missing", "malformed", "wrong-key", "expired", "bad-header"],
)
async def test_refusals_arrive_as_1008_with_the_guides_reason(
    query: str, headers: dict[str, str], reason: str, ws_impl: str
) -> None:
    """Under uvicorn a close before accept becomes HTTP 403; we accept first, so the reason reaches the client."""
    pomo = PomoWS(make_settings())
    async with run_server(make_app(pomo), ws=ws_impl) as server:
        async with connect(server.url("/ws" + query), additional_headers=headers) as ws:
            assert await closed_with(ws) == (1008, reason)
        assert pomo.broadcaster.total_connection_count() == 0


async def test_bearer_subprotocol_refusal_still_selects_bearer(ws_impl: str) -> None:
    """A browser fails the handshake unless the server selects an offered subprotocol, even to refuse."""
    pomo = PomoWS(make_settings())
    async with run_server(make_app(pomo), ws=ws_impl) as server:
        async with connect(server.url("/ws"), subprotocols=["bearer", "bad-token"]) as ws:  # type: ignore[list-item]
            assert ws.subprotocol == "bearer"
            assert await closed_with(ws) == (1008, "Invalid authentication token")


async def test_abrupt_client_death_is_seen_at_once(framework: Callable[[PomoWS], Any], ws_impl: str) -> None:
    pomo = PomoWS(make_settings())
    async with run_server(framework(pomo), ws=ws_impl) as server:
        sockets = []
        for _ in range(3):
            ws = await connect(server.url(f"/ws?token={make_token('u1')}"))
            await recv(ws)
            sockets.append(ws)
        assert pomo.broadcaster.user_connection_count("u1") == 3
        # Kill the TCP connections without a close handshake.
        for ws in sockets[:2]:
            ws.transport.abort()
        await wait_until(lambda: pomo.broadcaster.user_connection_count("u1") == 1, what="dead sockets released")
        assert pomo.broadcaster.total_connection_count() == 1
        await sockets[2].close()
        await wait_until(lambda: pomo.broadcaster.total_connection_count() == 0, what="clean close released")


async def test_shutdown_sends_every_client_a_close_frame(ws_impl: str) -> None:
    pomo = PomoWS(make_settings())
    clients = []
    async with run_server(make_app(pomo), ws=ws_impl) as server:
        for user in ("a", "b", "c"):
            ws = await connect(server.url(f"/ws?token={make_token(user)}"))
            await recv(ws)
            clients.append(ws)
    # uvicorn sends 1012 before the lifespan shutdown runs; our shutdown would send 1001 to any left.
    for ws in clients:
        code, _ = await closed_with(ws)
        assert code in (1012, 1001)


async def test_a_slow_client_is_closed_with_1013_and_fast_ones_get_everything(ws_impl: str) -> None:
    """A client that stops reading (tiny receive buffer, never reads) is dropped; the others get every event."""
    import socket as socketlib

    pomo = PomoWS(make_settings(send_queue_size=20, send_timeout=2))
    async with run_server(make_app(pomo), ws=ws_impl) as server:
        fast = [await connect(server.url(f"/ws?token={make_token(f'fast{i}')}"), max_size=None) for i in range(3)]
        for ws in fast:
            await recv(ws)
        slow = socketlib.socket(socketlib.AF_INET, socketlib.SOCK_STREAM)
        slow.setsockopt(socketlib.SOL_SOCKET, socketlib.SO_RCVBUF, 4096)
        slow.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(slow, ("127.0.0.1", server.port))
        request = (
            f"GET /ws?token={make_token('slow')} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        await loop.sock_sendall(slow, request.encode())
        await wait_until(lambda: pomo.broadcaster.user_connection_count("slow") == 1, what="slow client connected")
        # From here on the slow client reads nothing.
        payload = "x" * 16384
        received = [0] * len(fast)

        async def drain(index: int, ws: ClientConnection) -> None:
            while True:
                event = json.loads(await ws.recv())
                if event["type"] == "BULK":
                    received[index] += 1
                    if event["data"]["last"]:
                        return

        published = 0
        async with anyio.create_task_group() as readers:
            for index, ws in enumerate(fast):
                readers.start_soon(drain, index, ws)
            with anyio.fail_after(60):
                # Bounded: 16 KiB events until the slow client is dropped (at most 64 MiB), then 20 more.
                while published < 4000 and pomo.broadcaster.user_connection_count("slow"):
                    await pomo.broadcaster.broadcast_to_all("BULK", {"blob": payload, "last": False})
                    published += 1
                    if published % 50 == 0:
                        await asyncio.sleep(0)  # let the readers and the server's writers run
                assert pomo.broadcaster.user_connection_count("slow") == 0, "the slow client was never dropped"
                for _ in range(20):
                    await pomo.broadcaster.broadcast_to_all("BULK", {"blob": payload, "last": False})
                    published += 1
                await pomo.broadcaster.broadcast_to_all("BULK", {"blob": "", "last": True})
                published += 1
        assert published > 20, "the slow client was dropped before its queue could fill"
        assert received == [published] * len(fast)
        # Now the slow client reads: under its buffered events lies the 1013 close frame.
        code = await read_close_code(slow)
        slow.close()
        assert code == 1013
        for ws in fast:
            await ws.close()
        await wait_until(lambda: pomo.broadcaster.total_connection_count() == 0, what="all released")


async def read_frames(sock: Any) -> AsyncIterator[tuple[int, bytes]]:
    """Yield (opcode, payload) of the raw server frames on a socket whose handshake was sent."""
    loop = asyncio.get_running_loop()
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        chunk = await loop.sock_recv(sock, 65536)
        assert chunk, "the server closed during the handshake"
        buffer += chunk
    buffer = buffer.split(b"\r\n\r\n", 1)[1]
    while True:
        while len(buffer) < 2 or len(buffer) < _frame_length(buffer):
            chunk = await loop.sock_recv(sock, 1 << 20)
            if not chunk:
                return
            buffer += chunk
        size = _frame_length(buffer)
        frame, buffer = buffer[:size], buffer[size:]
        payload = frame[size - _payload_length(frame) :]
        yield frame[0] & 0x0F, payload


async def read_close_code(sock: Any) -> int | None:
    """Read raw frames from a socket until the close frame; return its code."""
    with anyio.fail_after(30):
        async for opcode, payload in read_frames(sock):
            if opcode == 0x8:
                return int.from_bytes(payload[:2], "big")
    return None


async def raw_client(port: int, user: str) -> Any:
    """A WebSocket client on a raw socket with a tiny receive buffer, which reads only when told."""
    import socket as socketlib

    sock = socketlib.socket(socketlib.AF_INET, socketlib.SOCK_STREAM)
    sock.setsockopt(socketlib.SOL_SOCKET, socketlib.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    request = (
        f"GET /ws?token={make_token(user)} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    await loop.sock_sendall(sock, request.encode())
    return sock


async def test_a_client_that_pauses_then_reads_gets_everything_in_order(ws_impl: str) -> None:
    """A socket that the server pauses is queued, not dropped, and catches up in order once it reads."""
    pomo = PomoWS(make_settings(send_queue_size=5000, send_timeout=30))
    async with run_server(make_app(pomo), ws=ws_impl) as server:
        sock = await raw_client(server.port, "pauser")
        await wait_until(lambda: pomo.broadcaster.user_connection_count("pauser") == 1, what="connected")
        blob = "y" * 16384
        published = 0
        with anyio.fail_after(30):
            while published < 3000 and not pomo.broadcaster.backed_up:
                await pomo.broadcaster.broadcast_to_user("pauser", "BULK", {"n": published, "blob": blob})
                published += 1
            assert pomo.broadcaster.backed_up, "the server never paused the socket"
            for _ in range(50):  # these wait in the connection's queue
                await pomo.broadcaster.broadcast_to_user("pauser", "BULK", {"n": published, "blob": blob})
                published += 1
            seen = []
            async for opcode, payload in read_frames(sock):
                assert opcode == 0x1, "text frames only"
                event = json.loads(payload)
                if event["type"] == "BULK":
                    seen.append(event["data"]["n"])
                    if len(seen) == published:
                        break
        sock.close()
        assert seen == list(range(published))
        await wait_until(lambda: not pomo.broadcaster.backed_up, what="the writer task finished")


def _payload_length(frame: bytes) -> int:
    length = frame[1] & 0x7F
    if length == 126:
        return int.from_bytes(frame[2:4], "big") if len(frame) >= 4 else 1 << 30
    if length == 127:
        return int.from_bytes(frame[2:10], "big") if len(frame) >= 10 else 1 << 30
    return length


def _frame_length(buffer: bytes) -> int:
    length = buffer[1] & 0x7F
    header = 2 + (2 if length == 126 else 8 if length == 127 else 0)
    if len(buffer) < header:
        return header + 1
    return header + _payload_length(buffer)
