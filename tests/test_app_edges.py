"""The less travelled paths of the ASGI app: served bare, shutdown, failing callables and backends."""

from __future__ import annotations

import gc
import json
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from starlette.requests import HTTPConnection
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from starlette_pomo_ws import BackendUnavailable, PomoWS, Principal, Settings
from starlette_pomo_ws._events import Position
from starlette_pomo_ws.backends import MemoryBackend, create_backend
from starlette_pomo_ws.backends.base import Record

from .conftest import make_app, make_settings, make_token, settled
from .test_churn import Socket

pytestmark = pytest.mark.anyio


def refusal(app: Any, path: str) -> tuple[int, str]:
    with TestClient(app) as client, pytest.raises(WebSocketDisconnect) as exc:
        with client.websocket_connect(path) as ws:
            ws.receive_json()
    return exc.value.code, exc.value.reason


def test_pomo_ws_served_as_the_whole_app_runs_its_own_lifespan() -> None:
    pomo = PomoWS(make_settings())
    with TestClient(pomo) as client:
        assert client.get("/health").json()["status"] == "ok"
        with client.websocket_connect(f"/?token={make_token()}") as ws:
            assert ws.receive_json()["type"] == "CONNECTION_ESTABLISHED"
        script = client.get("/client.js")
        assert script.headers["content-type"].startswith("text/javascript")
        assert b"export" in script.content
    assert not pomo.broadcaster.running


def test_a_failed_startup_is_reported_through_the_lifespan_protocol() -> None:
    with pytest.raises(Exception, match="'jwt_secret' is missing"), TestClient(PomoWS(Settings())):
        pass  # pragma: no cover


async def test_shutdown_closes_open_sockets_with_1001_and_refuses_new_ones() -> None:
    pomo = PomoWS(make_settings())
    app = make_app(pomo)
    async with LifespanManager(app) as manager:
        ws = Socket(manager.app, "/ws", {"token": make_token()})
        assert (await ws.next_json() or {})["type"] == "CONNECTION_ESTABLISHED"
        pomo.broadcaster._accepting = False  # as stop() does first
        late = Socket(manager.app, "/ws", {"token": make_token()})
        assert (await late.next())["type"] == "websocket.accept"
        close = await late.next()
        assert (close["code"], close["reason"]) == (1001, "Server shutting down")
        pomo.broadcaster._accepting = True
    close = await ws.next()
    assert (close["type"], close["code"], close["reason"]) == ("websocket.close", 1001, "Server shutting down")
    assert pomo.broadcaster.stats.rejected["shutdown"] == 1


def test_an_authenticate_that_returns_the_wrong_type_is_an_internal_error() -> None:
    async def authenticate(connection: HTTPConnection) -> Principal:
        return "u1"  # type: ignore[return-value]

    assert refusal(make_app(PomoWS(Settings(), authenticate=authenticate)), "/ws") == (1011, "Internal error")


class FlakyBackend(MemoryBackend):
    """A memory backend that can fail where a remote one would."""

    kind = "flaky"
    shared = True  # like a remote backend: presence and subscriptions go through it

    def __init__(self) -> None:
        super().__init__()
        self.fail_presence = False
        self.fail_position = False
        self.fail_publish = False
        self.removed: list[str] = []
        self.fail_after_recording = False

    async def add_presence(self, node_id: str, user_id: str, connection_id: str) -> int:
        if self.fail_presence:
            raise BackendUnavailable("presence is down")
        count = await super().add_presence(node_id, user_id, connection_id)
        if self.fail_after_recording:  # recorded, then the reply is lost: any error, not only BackendUnavailable
            raise UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed")
        return count

    async def remove_presence(self, node_id: str, user_id: str, connection_id: str) -> None:
        self.removed.append(connection_id)
        await super().remove_presence(node_id, user_id, connection_id)

    async def position(self) -> Position:
        if self.fail_position:
            raise BackendUnavailable("position is down")
        return await super().position()

    async def publish(self, user_id: str | None, head: str) -> Record:
        if self.fail_publish:
            raise BackendUnavailable("publish is down")
        return await super().publish(user_id, head)


async def test_a_presence_that_fails_after_recording_is_undone() -> None:
    """Whatever the error, a refused handshake leaves no presence entry behind (it would count forever)."""
    backend = FlakyBackend()
    backend.fail_after_recording = True
    pomo = PomoWS(make_settings(cursor_secret="c" * 32), backend=backend)
    async with LifespanManager(make_app(pomo)) as manager:
        ws = Socket(manager.app, "/ws", {"token": make_token()})
        await ws.next()
        assert (await ws.next())["code"] == 1011
        await ws.finished()
        if pomo.broadcaster._tasks:  # the undo runs in the background
            await settled(pomo.broadcaster._tasks)
        assert await pomo.broadcaster.cluster_user_connection_count("u1") == 0


async def test_backend_failures_during_a_handshake_close_with_1011_and_count() -> None:
    backend = FlakyBackend()
    pomo = PomoWS(make_settings(max_connections_per_user=1, cursor_secret="c" * 32), backend=backend)
    async with LifespanManager(make_app(pomo)) as manager:
        backend.fail_presence = True
        ws = Socket(manager.app, "/ws", {"token": make_token()})
        await ws.next()
        assert (await ws.next())["code"] == 1011
        backend.fail_presence = False
        backend.fail_position = True
        ws = Socket(manager.app, "/ws", {"token": make_token()})
        await ws.next()
        assert (await ws.next())["code"] == 1011
        await ws.finished()
        backend.fail_position = False
        # A shared backend counts the cluster: the limit holds, and a closed connection leaves it.
        first = Socket(manager.app, "/ws", {"token": make_token()})
        assert (await first.next_json() or {})["type"] == "CONNECTION_ESTABLISHED"
        assert await pomo.broadcaster.cluster_user_connection_count("u1") == 1
        assert await pomo.broadcaster.cluster_total_connection_count() == 1
        second = Socket(manager.app, "/ws", {"token": make_token()})
        await second.next()
        close = await second.next()
        assert (close["code"], close["reason"]) == (1008, "Too many connections for this user")
        first.leave()
        await first.finished()
        if pomo.broadcaster._tasks:  # the presence is removed in the background
            await settled(pomo.broadcaster._tasks)
        assert await pomo.broadcaster.cluster_user_connection_count("u1") == 0
        backend.fail_publish = True
        with pytest.raises(BackendUnavailable):
            await pomo.broadcaster.broadcast_to_all("X")
        assert pomo.broadcaster.stats.backend_errors == 1


async def test_a_backend_resync_keeps_established_sockets_up_with_an_in_band_resync() -> None:
    """A new epoch (or history trimmed while cut off): RESYNC_REQUIRED in band with the position that live
    events continue after, and then those events, although the new epoch numbers them below the old."""
    pomo = PomoWS(make_settings())
    async with LifespanManager(make_app(pomo)) as manager:
        broadcaster = pomo.broadcaster
        for n in range(5):  # the sockets start at seq 5 of the old numbering
            await broadcaster.broadcast_to_user("u0", "OLD", n)
        sockets = [Socket(manager.app, "/ws", {"token": make_token(f"u{n}")}) for n in range(3)]
        for ws in sockets:
            await ws.next_json()
        backend = broadcaster.backend
        assert isinstance(backend, MemoryBackend)
        # What a Redis node does when it finds a new epoch: the numbering starts again, lower.
        backend._epoch, backend._seq = "fresh", 1
        broadcaster._on_control("resync", {"epoch": "fresh", "seq": 1, "reason": "new_epoch"})
        for n, ws in enumerate(sockets):
            resync = await ws.next_json()
            assert resync is not None
            assert (resync["type"], resync["data"]) == ("RESYNC_REQUIRED", {"reason": "new_epoch"})
            assert broadcaster.verify(resync["id"], f"u{n}") == ("fresh", 1)
        event = await broadcaster.broadcast_to_user("u0", "NEW", "after")
        got = await sockets[0].next_json()
        assert got is not None and (got["type"], got["id"]) == ("NEW", event.id)


async def test_a_backend_resync_without_a_position_closes_every_socket_so_clients_resume() -> None:
    pomo = PomoWS(make_settings())
    async with LifespanManager(make_app(pomo)) as manager:
        sockets = [Socket(manager.app, "/ws", {"token": make_token(f"u{n}")}) for n in range(3)]
        for ws in sockets:
            await ws.next_json()
        pomo.broadcaster._on_control("resync", {})
        for ws in sockets:
            close = await ws.next()
            assert (close["code"], close["reason"]) == (1012, "Service restart")


async def test_pubsub_lag_is_measured_when_the_backend_carries_the_publish_time() -> None:
    pomo = PomoWS(make_settings())
    async with pomo.lifespan():
        position = await pomo.broadcaster.backend.position()
        head = '{"type":"X","userId":null,"data":null,"timestamp":"2025-01-06T12:00:00.000Z"'
        pomo.broadcaster._on_record(Record(position.epoch, position.seq + 1, None, head, published_at=1.0))
        assert sum(pomo.broadcaster.stats.pubsub_lag.counts) == 1
    assert "Broadcaster(backend=MemoryBackend" in repr(pomo.broadcaster)


async def test_refresh_with_a_failing_or_malformed_request_gets_error() -> None:
    async def authenticate(connection: HTTPConnection) -> Principal:
        if connection.headers.get("authorization") == "Bearer boom":
            raise RuntimeError("auth service down")
        return Principal("u1")

    pomo = PomoWS(Settings(), authenticate=authenticate)
    async with LifespanManager(make_app(pomo)) as manager:
        ws = Socket(manager.app, "/ws", {})
        await ws.next_json()
        for data in ({"token": "boom"}, "not an object", {"token": ""}):
            ws.send_text(json.dumps({"type": "REFRESH_TOKEN", "data": data}))
            error = await ws.next_json()
            assert error is not None and error["type"] == "ERROR"
            assert error["data"]["code"] == "invalid_token"
        ws.leave()
        await ws.finished()


def test_create_backend_names_unknown_schemes() -> None:
    with pytest.raises(Exception, match="unsupported backend"):
        create_backend(make_settings(backend_url="kafka://broker"))


async def test_health_over_http_without_the_lifespan() -> None:
    pomo = PomoWS(make_settings())
    app = make_app(pomo)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        response = await client.get("/ws/health/")
    assert response.status_code == 503


async def test_an_open_socket_keeps_none_of_its_handshake_request_objects() -> None:
    """The handler's frame lives as long as its socket. The `HTTPConnection` and query the token and the
    resume were read from are gone once the socket is established: at 10,000 sockets each object kept per
    socket is walked 10,000 times by every full garbage collection."""
    pomo = PomoWS(make_settings())
    async with LifespanManager(make_app(pomo)) as manager:
        sockets = [
            Socket(manager.app, "/ws", {"token": make_token(f"u{n}"), "last_event_id": "", "channels": ""})
            for n in range(3)
        ]
        for ws in sockets:
            established = await ws.next_json()
            assert established is not None and established["type"] == "CONNECTION_ESTABLISHED"
        assert pomo.broadcaster.total_connection_count() == 3
        kept = [obj for obj in gc.get_objects() if type(obj) is HTTPConnection]
        assert kept == []
