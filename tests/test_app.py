from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pydantic
import pytest
from fastapi import Depends, FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocket, WebSocketDisconnect

from starlette_pomo_ws import Broadcaster, Connection, NotStartedError, PomoWS, get_broadcaster

from .conftest import make_app, make_settings, make_token

pytestmark = pytest.mark.anyio


def test_request_state_broadcaster_in_http_and_websocket_handlers() -> None:
    pomo = PomoWS(make_settings())
    seen: list[Broadcaster] = []

    async def http(request: Request) -> JSONResponse:
        seen.append(request.state.broadcaster)
        return JSONResponse({})

    async def websocket(websocket: WebSocket) -> None:
        seen.append(websocket.state.broadcaster)
        await websocket.accept()
        await websocket.close()

    app = Starlette(lifespan=pomo.lifespan, routes=[Route("/h", http), WebSocketRoute("/other", websocket)])
    app.mount("/ws", pomo)
    with TestClient(app) as client:
        client.get("/h")
        with client.websocket_connect("/other"):
            pass
    assert seen == [pomo.broadcaster, pomo.broadcaster]


def test_fastapi_depends_get_broadcaster() -> None:
    pomo = PomoWS(make_settings())
    app = FastAPI(lifespan=pomo.lifespan)
    app.mount("/ws", pomo)

    @app.post("/tasks")
    async def create(broadcaster: Broadcaster = Depends(get_broadcaster)) -> dict[str, str]:  # noqa: B008
        event = await broadcaster.broadcast_to_user("u1", "TASK_CREATED", {"title": "write tests"})
        return {"id": event.id}

    with TestClient(app) as client, client.websocket_connect(f"/ws?token={make_token('u1')}") as ws:
        ws.receive_json()
        event_id = client.post("/tasks").json()["id"]
        message = ws.receive_json()
        assert message["id"] == event_id
        assert message["data"] == {"title": "write tests"}


def test_get_broadcaster_without_the_lifespan_says_how_to_wire_it() -> None:
    app = FastAPI()

    @app.get("/x")
    async def handler(broadcaster: Broadcaster = Depends(get_broadcaster)) -> None:  # noqa: B008
        return None  # pragma: no cover

    with TestClient(app, raise_server_exceptions=True) as client, pytest.raises(NotStartedError, match="lifespan"):
        client.get("/x")


def test_composing_with_the_apps_own_lifespan() -> None:
    pomo = PomoWS(make_settings())

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        async with pomo.lifespan(app) as state:
            yield {**state, "db": "connected"}

    async def show(request: Request) -> JSONResponse:
        return JSONResponse({"db": request.state.db, "ok": request.state.broadcaster is pomo.broadcaster})

    app = Starlette(lifespan=lifespan, routes=[Route("/show", show)])
    app.mount("/ws", pomo)
    with TestClient(app) as client:
        assert client.get("/show").json() == {"db": "connected", "ok": True}
        with client.websocket_connect(f"/ws?token={make_token()}") as ws:  # the bare path works here too
            assert ws.receive_json()["type"] == "CONNECTION_ESTABLISHED"
    assert not pomo.broadcaster.running


async def test_starting_twice_is_harmless() -> None:
    pomo = PomoWS(make_settings())
    async with pomo.lifespan() as outer:
        async with pomo.lifespan() as inner:
            assert inner == outer
        assert pomo.broadcaster.running, "the inner exit must not stop what the outer started"
        await pomo.broadcaster.broadcast_to_all("STILL_UP")
    assert not pomo.broadcaster.running


def test_a_mount_without_the_lifespan_fails_with_instructions(caplog: pytest.LogCaptureFixture) -> None:
    pomo = PomoWS(make_settings())
    app = Starlette()
    app.mount("/ws", pomo)
    with TestClient(app) as client:
        with caplog.at_level(logging.ERROR, logger="starlette_pomo_ws"):
            with (
                pytest.raises(WebSocketDisconnect) as exc,
                client.websocket_connect(f"/ws/?token={make_token()}") as ws,
            ):
                ws.receive_json()
        assert (exc.value.code, exc.value.reason) == (1011, "Internal error")
        assert "lifespan=pomo.lifespan" in caplog.text
        health = client.get("/ws/health")
        assert health.status_code == 503
        assert "lifespan" in health.json()["error"]


async def test_broadcast_before_start_raises_with_instructions() -> None:
    pomo = PomoWS(make_settings())
    with pytest.raises(NotStartedError, match=r"lifespan=pomo\.lifespan"):
        await pomo.broadcaster.broadcast_to_user("u1", "TASK_CREATED")


def test_health_reports_counts_and_never_a_password() -> None:
    pomo = PomoWS(make_settings())
    with TestClient(make_app(pomo)) as client:
        with (
            client.websocket_connect(f"/ws?token={make_token('a')}") as a,
            client.websocket_connect(f"/ws?token={make_token('a')}"),
            client.websocket_connect(f"/ws?token={make_token('b')}"),
        ):
            a.receive_json()
            response = client.get("/ws/health")
            assert response.status_code == 200
            assert response.json() == {
                "status": "ok",
                "backend": {"kind": "memory", "connected": True},
                "connections": 3,
                "users": 2,
            }
        assert client.get("/ws/nope").status_code == 404


async def test_health_is_503_while_shutting_down() -> None:
    pomo = PomoWS(make_settings())
    transport = httpx.ASGITransport(app=make_app(pomo))
    async with pomo.lifespan(), httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.get("/ws/health")).status_code == 200
        pomo.broadcaster._accepting = False  # the first thing stop() does
        response = await client.get("/ws/health")
        assert response.status_code == 503
        pomo.broadcaster._accepting = True


def test_client_messages() -> None:
    received: list[tuple[str, dict[str, Any]]] = []

    async def on_message(connection: Connection, message: dict[str, Any]) -> None:
        received.append((connection.user_id, message))
        if message["type"] == "ECHO":
            await connection.send("ECHOED", message.get("data"))
        if message["type"] == "BOOM":
            raise ValueError("handler bug")

    pomo = PomoWS(make_settings(), on_message=on_message)
    with TestClient(make_app(pomo)) as client, client.websocket_connect(f"/ws?token={make_token('eve')}") as ws:
        ws.receive_json()
        ws.send_json({"type": "PING"})
        pong = ws.receive_json()
        assert pong["type"] == "PONG" and pong["userId"] == "eve" and "id" not in pong
        ws.send_json({"type": "ECHO", "data": [1, 2]})
        assert ws.receive_json()["data"] == [1, 2]
        ws.send_json({"type": "BOOM"})
        assert ws.receive_json()["data"]["code"] == "handler_error"
        ws.send_json({"type": "PING"})
        assert ws.receive_json()["type"] == "PONG", "the connection survives a failing handler"
    assert [m["type"] for _, m in received] == ["ECHO", "BOOM"]


def test_without_on_message_unknown_types_get_error() -> None:
    with TestClient(make_app(PomoWS(make_settings()))) as client:
        with client.websocket_connect(f"/ws?token={make_token()}") as ws:
            ws.receive_json()
            ws.send_json({"type": "DANCE"})
            error = ws.receive_json()
            assert error["type"] == "ERROR"
            assert error["data"]["code"] == "unknown_type"


@dataclasses.dataclass
class Task:
    id: int
    title: str
    due: datetime.datetime


class Settings(pydantic.BaseModel):
    focus_minutes: int
    when: datetime.date


async def test_data_is_converted_or_refused_with_type_error() -> None:
    pomo = PomoWS(make_settings())
    async with pomo.lifespan():
        due = datetime.datetime(2025, 1, 6, 12, 0, tzinfo=datetime.timezone.utc)
        event = await pomo.broadcaster.broadcast_to_user("u1", "TASK_CREATED", Task(1, "plan", due))
        assert event.user_id == "u1" and event.type == "TASK_CREATED"
        await pomo.broadcaster.broadcast_to_all("SETTINGS_UPDATED", Settings(focus_minutes=25, when=due.date()))
        history = await pomo.broadcaster.backend.history(
            "u1", (await pomo.broadcaster.backend.position())._replace(seq=0)
        )
        heads = [record.head for record in history.records]
        assert '"data":{"id":1,"title":"plan","due":"2025-01-06T12:00:00.000Z"}' in heads[0]
        assert '"data":{"focus_minutes":25,"when":"2025-01-06"}' in heads[1]
        with pytest.raises(TypeError, match="not JSON serializable"):
            await pomo.broadcaster.broadcast_to_user("u1", "TASK_CREATED", object())
        with pytest.raises(TypeError, match="not valid JSON"):
            await pomo.broadcaster.broadcast_to_all("X", float("nan"))
        assert (await pomo.broadcaster.backend.position()).seq == 2, "refused events are not published"


def eventually(predicate: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.002)


def test_counts_follow_connections() -> None:
    pomo = PomoWS(make_settings())
    broadcaster = pomo.broadcaster
    with TestClient(make_app(pomo)) as client:
        with client.websocket_connect(f"/ws?token={make_token('a')}") as a1:
            a1.receive_json()
            with client.websocket_connect(f"/ws?token={make_token('a')}") as a2:
                a2.receive_json()
                assert broadcaster.user_connection_count("a") == 2
                assert broadcaster.total_connection_count() == 2
            a1.send_json({"type": "PING"})
            a1.receive_json()
            eventually(lambda: broadcaster.user_connection_count("a") == 1)
        # The TestClient's app thread sees the close a moment after the client side is gone.
        eventually(lambda: broadcaster.user_connection_count("a") == 0 and broadcaster.total_connection_count() == 0)


async def test_cluster_counts_equal_local_counts_on_memory() -> None:
    pomo = PomoWS(make_settings())
    async with pomo.lifespan():
        assert await pomo.broadcaster.cluster_user_connection_count("a") == 0
        assert await pomo.broadcaster.cluster_total_connection_count() == 0
