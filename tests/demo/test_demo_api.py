"""The demo's JSON API, in process: every service broadcasts the guide's event with the guide's data."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import jwt
import pytest
from asgi_lifespan import LifespanManager
from httpx_ws import AsyncWebSocketSession, WebSocketDisconnect, WebSocketUpgradeError, aconnect_ws
from httpx_ws.transport import ASGIWebSocketTransport
from starlette.applications import Starlette

from starlette_pomo_ws import Settings
from starlette_pomo_ws.client import PomoClient
from starlette_pomo_ws.demo.app import create_app
from starlette_pomo_ws.demo.store import DEFAULT_SETTINGS, Store
from starlette_pomo_ws.demo.tokens import demo_settings, dev_settings, is_loopback
from starlette_pomo_ws.testing import mint_token

from ..conftest import run_server

pytestmark = pytest.mark.anyio

SECRET = "demo-test-secret-0123456789-0123456789-0123456789"
SETTINGS = Settings(jwt_secret=SECRET)


@pytest.fixture
def app(tmp_path: Path) -> Starlette:
    return create_app(SETTINGS, db_path=tmp_path / "demo.sqlite3")


@contextlib.asynccontextmanager
async def serve(app: Starlette, base_url: str = "http://127.0.0.1:8000") -> AsyncIterator[httpx.AsyncClient]:
    async with (
        LifespanManager(app) as manager,
        ASGIWebSocketTransport(app=manager.app) as transport,
        httpx.AsyncClient(transport=transport, base_url=base_url) as client,
    ):
        yield client


def auth(user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_token(SETTINGS, user)}"}


async def receive(ws: AsyncWebSocketSession, expected_type: str | None = None) -> dict[str, Any]:
    with anyio.fail_after(2):
        event: dict[str, Any] = await ws.receive_json()
    if expected_type is not None:
        assert event["type"] == expected_type, event
    return event


async def ws_refusal(client: httpx.AsyncClient, headers: dict[str, str]) -> int:
    """The close code of a refused handshake, or the HTTP status of a refused upgrade."""
    try:
        async with aconnect_ws("/ws", client, headers=headers, session_class=AsyncWebSocketSession) as ws:
            await ws.receive_json()
    except BaseException as exc:
        errors = list(getattr(exc, "exceptions", [exc]))  # anyio wraps it in a group (no builtin on 3.10)
        for error in errors:
            if isinstance(error, WebSocketDisconnect):
                return int(error.code)
            if isinstance(error, WebSocketUpgradeError):
                return error.response.status_code
        raise
    raise AssertionError("the handshake was not refused")


@contextlib.asynccontextmanager
async def socket(client: httpx.AsyncClient, user: str) -> AsyncIterator[AsyncWebSocketSession]:
    # The Authorization header: httpx-ws's ASGI transport does not strip spaces from subprotocols.
    async with aconnect_ws("/ws", client, headers=auth(user), session_class=AsyncWebSocketSession) as ws:
        await receive(ws, "CONNECTION_ESTABLISHED")
        yield ws


async def test_login_mints_a_token_for_the_name(app: Starlette) -> None:
    async with serve(app) as client:
        response = await client.post("/api/login", json={"name": "alice"})
        assert response.status_code == 200
        body = response.json()
        assert body["userId"] == "alice"
        claims = jwt.decode(body["token"], SECRET, algorithms=["HS256"])
        assert claims["userId"] == "alice"
        assert claims["exp"] > claims["iat"]
        for bad in ({"name": ""}, {"name": "a b"}, {"name": 3}, {}):
            assert (await client.post("/api/login", json=bad)).status_code == 400
        assert (await client.post("/api/login", content=b"[1]")).status_code == 400
        assert (await client.post("/api/login", content=b"{nope")).status_code == 400


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer"}],
)
async def test_the_api_needs_a_valid_token(app: Starlette, headers: dict[str, str]) -> None:
    async with serve(app) as client:
        response = await client.get("/api/tasks", headers=headers)
        assert response.status_code == 401
        assert "error" in response.json()


async def test_task_service_broadcasts_the_guides_events(app: Starlette) -> None:
    async with serve(app) as client, socket(client, "alice") as ws:
        created = await client.post(
            "/api/tasks", json={"title": " Write ", "estimatedPomodoros": 3}, headers=auth("alice")
        )
        assert created.status_code == 201
        task = created.json()
        assert task["title"] == "Write"
        assert task["status"] == "pending"
        assert (task["estimatedPomodoros"], task["completedPomodoros"]) == (3, 0)
        event = await receive(ws, "TASK_CREATED")
        assert event["data"] == task
        assert event["userId"] == "alice"
        assert event["id"]
        assert event["timestamp"].endswith("Z")

        updated = await client.patch(f"/api/tasks/{task['id']}", json={"title": "Rewrite"}, headers=auth("alice"))
        assert updated.json()["title"] == "Rewrite"
        assert (await receive(ws, "TASK_UPDATED"))["data"] == updated.json()

        status = await client.post(
            f"/api/tasks/{task['id']}/status", json={"status": "in_progress"}, headers=auth("alice")
        )
        assert status.json()["status"] == "in_progress"
        event = await receive(ws, "TASK_STATUS_CHANGED")
        assert event["data"] == {"taskId": task["id"], "status": "in_progress"}

        got = await client.get(f"/api/tasks/{task['id']}", headers=auth("alice"))
        assert got.json()["status"] == "in_progress"
        listed = await client.get("/api/tasks", headers=auth("alice"))
        assert [t["id"] for t in listed.json()] == [task["id"]]

        deleted = await client.delete(f"/api/tasks/{task['id']}", headers=auth("alice"))
        assert deleted.status_code == 204
        assert (await receive(ws, "TASK_DELETED"))["data"] == {"taskId": task["id"]}


async def test_task_service_validates_and_404s(app: Starlette) -> None:
    async with serve(app) as client:
        headers = auth("alice")
        for body in ({}, {"title": ""}, {"title": "x" * 201}, {"title": "x", "estimatedPomodoros": 0}):
            assert (await client.post("/api/tasks", json=body, headers=headers)).status_code == 400
        assert (
            await client.post("/api/tasks", json={"title": "x", "estimatedPomodoros": True}, headers=headers)
        ).status_code == 400
        assert (await client.get("/api/tasks/missing", headers=headers)).status_code == 404
        assert (await client.patch("/api/tasks/missing", json={"title": "x"}, headers=headers)).status_code == 404
        assert (await client.delete("/api/tasks/missing", headers=headers)).status_code == 404
        missing_status = await client.post("/api/tasks/missing/status", json={"status": "completed"}, headers=headers)
        assert missing_status.status_code == 404
        task = (await client.post("/api/tasks", json={"title": "x"}, headers=headers)).json()
        bad_status = await client.post(f"/api/tasks/{task['id']}/status", json={"status": "done"}, headers=headers)
        assert bad_status.status_code == 400
        estimate = await client.patch(f"/api/tasks/{task['id']}", json={"estimatedPomodoros": 4}, headers=headers)
        assert estimate.json()["estimatedPomodoros"] == 4
        # Another user's task does not exist for you.
        assert (await client.get(f"/api/tasks/{task['id']}", headers=auth("bob"))).status_code == 404


async def test_session_service_broadcasts_start_end_and_a_notification(app: Starlette) -> None:
    async with serve(app) as client, socket(client, "alice") as ws:
        headers = auth("alice")
        task = (await client.post("/api/tasks", json={"title": "Focus"}, headers=headers)).json()
        await receive(ws, "TASK_CREATED")
        started = await client.post("/api/sessions", json={"taskId": task["id"]}, headers=headers)
        assert started.status_code == 201
        session = started.json()
        assert session["duration"] == 25 * 60
        event = await receive(ws, "SESSION_START")
        assert event["data"] == {
            "sessionId": session["id"],
            "type": "work",
            "duration": 1500,
            "startTime": session["startTime"],
            "taskId": task["id"],
        }
        assert (await client.get("/api/sessions/current", headers=headers)).json()["id"] == session["id"]
        again = await client.post("/api/sessions", json={}, headers=headers)
        assert again.status_code == 409

        ended = await client.post(f"/api/sessions/{session['id']}/end", json={"completed": True}, headers=headers)
        assert ended.json()["isCompleted"] is True
        event = await receive(ws, "SESSION_END")
        assert event["data"] == {
            "sessionId": session["id"],
            "completedPomodoros": 1,
            "isCompleted": True,
            "taskId": task["id"],
        }
        note = await receive(ws, "NOTIFICATION")
        assert note["data"]["message"] == "Pomodoro complete: Focus"

        # Ending twice (every tab may try at zero) changes nothing and broadcasts nothing.
        twice = await client.post(f"/api/sessions/{session['id']}/end", json={}, headers=headers)
        assert twice.status_code == 200
        assert (await client.get("/api/sessions/current", headers=headers)).json() is None
        assert (await client.get(f"/api/tasks/{task['id']}", headers=headers)).json()["completedPomodoros"] == 1
        await client.post("/api/notifications", json={"message": "barrier"}, headers=headers)
        assert (await receive(ws, "NOTIFICATION"))["data"] == {"message": "barrier"}


async def test_session_service_validates(app: Starlette) -> None:
    async with serve(app) as client:
        headers = auth("alice")
        assert (await client.post("/api/sessions", json={"type": "nap"}, headers=headers)).status_code == 400
        assert (await client.post("/api/sessions", json={"taskId": "nope"}, headers=headers)).status_code == 400
        assert (await client.post("/api/sessions", json={"duration": 0}, headers=headers)).status_code == 400
        assert (await client.post("/api/sessions/nope/end", json={}, headers=headers)).status_code == 404
        short = (await client.post("/api/sessions", json={"type": "short_break"}, headers=headers)).json()
        assert short["duration"] == 5 * 60
        bad = await client.post(f"/api/sessions/{short['id']}/end", json={"completed": "yes"}, headers=headers)
        assert bad.status_code == 400
        stopped = await client.post(f"/api/sessions/{short['id']}/end", json={}, headers=headers)
        assert stopped.json()["isCompleted"] is False  # stopped early


async def test_settings_service_broadcasts_settings_updated(app: Starlette) -> None:
    async with serve(app) as client, socket(client, "alice") as ws:
        headers = auth("alice")
        assert (await client.get("/api/settings", headers=headers)).json() == DEFAULT_SETTINGS
        changed = await client.put("/api/settings", json={"workDuration": 50, "autoStartBreaks": True}, headers=headers)
        assert changed.json() == {**DEFAULT_SETTINGS, "workDuration": 50, "autoStartBreaks": True}
        assert (await receive(ws, "SETTINGS_UPDATED"))["data"] == changed.json()
        session = (await client.post("/api/sessions", json={}, headers=headers)).json()
        assert session["duration"] == 50 * 60
        for bad in ({"workDuration": 0}, {"autoStartBreaks": "yes"}, {"colour": "red"}, {"longBreakInterval": 99}):
            assert (await client.put("/api/settings", json=bad, headers=headers)).status_code == 400


async def test_notifications_and_state(app: Starlette) -> None:
    async with serve(app) as client, socket(client, "alice") as ws:
        headers = auth("alice")
        sent = await client.post("/api/notifications", json={"message": "Hello"}, headers=headers)
        assert sent.status_code == 202
        event = await receive(ws, "NOTIFICATION")
        assert event["data"] == {"message": "Hello"}
        assert event["id"] == sent.json()["id"]
        default = await client.post("/api/notifications", json={}, headers=headers)
        assert default.status_code == 202
        assert (await receive(ws, "NOTIFICATION"))["data"] == {"message": "Test notification"}
        assert (await client.post("/api/notifications", json={"message": 1}, headers=headers)).status_code == 400

        await client.post("/api/tasks", json={"title": "a"}, headers=headers)
        state = (await client.get("/api/state", headers=headers)).json()
        assert state["userId"] == "alice"
        assert [t["title"] for t in state["tasks"]] == ["a"]
        assert state["session"] is None
        assert state["settings"] == DEFAULT_SETTINGS
        assert state["serverTime"] > 0


async def test_events_reach_only_their_user(app: Starlette) -> None:
    async with serve(app) as client, socket(client, "alice") as alice, socket(client, "bob") as bob:
        await client.post("/api/tasks", json={"title": "Bob's"}, headers=auth("bob"))
        assert (await receive(bob, "TASK_CREATED"))["data"]["title"] == "Bob's"
        await client.post("/api/tasks", json={"title": "Alice's"}, headers=auth("alice"))
        # Alice's first event is her own: Bob's never reached her.
        assert (await receive(alice, "TASK_CREATED"))["data"]["title"] == "Alice's"
        assert [t["title"] for t in (await client.get("/api/tasks", headers=auth("alice"))).json()] == ["Alice's"]


async def test_pages_static_files_and_the_client_module(app: Starlette) -> None:
    async with serve(app) as client:
        for path, marker in (("/", 'id="tasks"'), ("/websocket-test", 'id="ping"')):
            page = await client.get(path)
            assert page.status_code == 200
            assert page.headers["content-type"].startswith("text/html")
            assert marker in page.text
        for path in ("/static/app.js", "/static/common.js", "/static/websocket-test.js", "/static/style.css"):
            assert (await client.get(path)).status_code == 200
        module = await client.get("/ws/client.js")
        assert module.status_code == 200
        assert "export class PomoSocket" in module.text


async def test_data_survives_a_restart(tmp_path: Path) -> None:
    db = tmp_path / "demo.sqlite3"
    async with serve(create_app(SETTINGS, db_path=db)) as client:
        await client.post("/api/tasks", json={"title": "durable"}, headers=auth("alice"))
        await client.put("/api/settings", json={"workDuration": 30}, headers=auth("alice"))
    async with serve(create_app(SETTINGS, db_path=db)) as client:
        assert [t["title"] for t in (await client.get("/api/tasks", headers=auth("alice"))).json()] == ["durable"]
        assert (await client.get("/api/settings", headers=auth("alice"))).json()["workDuration"] == 30


async def test_backend_unavailable_is_a_503(app: Starlette) -> None:
    from starlette_pomo_ws.exceptions import BackendUnavailable

    async with serve(app) as client:
        broadcaster = app.state.pomo.broadcaster

        async def down(*args: Any, **kwargs: Any) -> Any:
            raise BackendUnavailable("redis is down")

        original = broadcaster.broadcast_to_user
        broadcaster.broadcast_to_user = down
        try:
            response = await client.post("/api/tasks", json={"title": "x"}, headers=auth("alice"))
        finally:
            broadcaster.broadcast_to_user = original
        assert response.status_code == 503
        assert "unavailable" in response.json()["error"]


def test_a_missing_secret_is_generated_and_logged(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    monkeypatch.delenv("POMO_WS_JWT_SECRET", raising=False)
    monkeypatch.delenv("JWT_SECRET", raising=False)
    with caplog.at_level(logging.WARNING, logger="starlette_pomo_ws"):
        app = create_app(db_path=tmp_path / "d.sqlite3")
    assert "generated a development secret" in caplog.text
    secret = app.state.settings.jwt_secret
    assert secret and len(secret) >= 64
    assert secret not in caplog.text
    settings, generated = dev_settings(SETTINGS)
    assert (settings, generated) == (SETTINGS, False)


async def test_the_api_refuses_what_the_websocket_refuses(app: Starlette) -> None:
    """The API reuses the package's token check: `userId: true`, a long or control-character id, a string exp."""
    bad = [
        mint_token(SETTINGS, "alice", userId=True),
        mint_token(SETTINGS, "a" * 257),
        mint_token(SETTINGS, "alice\nINFO forged"),
        mint_token(SETTINGS, "alice", exp="99999999999"),
        mint_token(SETTINGS.replace(jwt_audience="other"), "alice"),
        jwt.encode({"exp": 2**40}, SECRET, algorithm="HS256"),
    ]
    async with serve(app) as client:
        for token in bad:
            response = await client.get("/api/tasks", headers={"Authorization": f"Bearer {token}"})
            assert response.status_code == 401, token
            assert await ws_refusal(client, {"Authorization": f"Bearer {token}"}) == 1008
        assert (await client.get("/api/tasks", headers=auth("alice"))).status_code == 200


@pytest.mark.parametrize("host", ["127.0.0.1:8000", "localhost:8000", "LOCALHOST.", "[::1]:8000", "127.0.0.1"])
async def test_loopback_host_names_are_answered(app: Starlette, host: str) -> None:
    async with serve(app) as client:
        response = await client.post("/api/login", json={"name": "alice"}, headers={"Host": host})
        assert response.status_code == 200


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "127.0.0.1.evil.example", "", "[::2]:80"])
async def test_other_host_names_are_refused_against_dns_rebinding(
    app: Starlette, host: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A page on evil.example rebound to 127.0.0.1 sends its own Host: the login must not answer it."""
    async with serve(app) as client:
        with caplog.at_level(logging.WARNING, logger="starlette_pomo_ws"):
            response = await client.post("/api/login", json={"name": "admin"}, headers={"Host": host})
        assert response.status_code == 400
        assert "token" not in response.json()
        assert "refused a request for Host" in caplog.text
        # A close before the accept: a real server answers HTTP 403, httpx-ws's ASGI transport reports 1008.
        assert await ws_refusal(client, {"Host": host, **auth("alice")}) in (403, 1008)


async def test_allowed_hosts_can_be_widened(tmp_path: Path) -> None:
    app = create_app(SETTINGS, db_path=tmp_path / "d.sqlite3", allowed_hosts=("demo.internal",))
    async with serve(app, "http://demo.internal") as client:
        assert (await client.post("/api/login", json={"name": "alice"})).status_code == 200
        assert (await client.post("/api/login", json={"name": "a"}, headers={"Host": "x"})).status_code == 400
    anyone = create_app(SETTINGS, db_path=tmp_path / "d.sqlite3", allowed_hosts=("*",))
    async with serve(anyone, "http://anything.example") as client:
        assert (await client.post("/api/login", json={"name": "alice"})).status_code == 200


def test_the_demo_warns_that_its_login_issues_tokens_for_anyone(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    with caplog.at_level(logging.WARNING, logger="starlette_pomo_ws"):
        create_app(SETTINGS, db_path=tmp_path / "d.sqlite3")
    warning = next(r for r in caplog.records if "/api/login" in r.getMessage())
    assert warning.levelno == logging.WARNING
    assert "token for any name" in warning.getMessage()


def test_the_demo_never_signs_with_the_environments_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """JWT_SECRET is another app's key: a demo token must never open that app's sockets."""
    other_app = "another-apps-secret-0123456789-0123456789-0123456789"
    monkeypatch.setenv("JWT_SECRET", other_app)
    monkeypatch.setenv("POMO_WS_JWT_SECRET", other_app)
    monkeypatch.setenv("POMO_WS_JWT_AUDIENCE", "pomo")  # other settings still come from the environment
    for settings, generated in (demo_settings(), dev_settings(None)):
        assert generated
        assert settings.jwt_secret != other_app
        assert settings.jwt_audience == "pomo"
    app = create_app(db_path=tmp_path / "d.sqlite3")
    assert app.state.settings.jwt_secret != other_app
    settings, generated = demo_settings(use_env_secret=True)
    assert (settings.jwt_secret, generated) == (other_app, False)
    monkeypatch.delenv("POMO_WS_JWT_SECRET")
    settings, generated = demo_settings(use_env_secret=True)  # JWT_SECRET is never read, even then
    assert generated
    assert settings.jwt_secret != other_app


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("[::1]", True), ("localhost", True),
     ("0.0.0.0", False), ("::", False), ("", False), ("192.168.1.2", False), ("example.com", False)],
)  # fmt: skip
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_store_edges(tmp_path: Path) -> None:
    store = Store(":memory:")
    assert repr(store) == "Store(path=':memory:')"
    assert store.update_task("u", "missing", {"title": "x"}) is None
    assert store.update_task("u", "missing", {}) is None
    assert store.end_session("u", "missing", completed=True, now=0) is None
    assert store.get_session("u", "missing") is None
    store.close()
    assert store.list_tasks("u") == []  # reopened on use
    store.close()
    on_disk = Store(tmp_path / "s.sqlite3")
    task = on_disk.create_task("u", "t")
    on_disk.close()
    assert on_disk.get_task("u", task["id"]) == task  # reopened on use
    session = on_disk.start_session("u", "short_break", 60, None, started_at=1000.0)
    result = on_disk.end_session("u", session["id"], completed=None, now=1100.0)
    assert result is not None
    ended, no_task, changed = result
    assert (ended["isCompleted"], no_task, changed) == (True, None, True)
    on_disk.close()


@pytest.mark.redis
async def test_two_demo_nodes_on_one_redis_share_events(tmp_path: Path, redis_url: str) -> None:
    """What `pomo-ws demo --redis URL` gives: a change made on one node reaches tabs connected to another."""
    settings = SETTINGS.replace(backend_url=redis_url)
    db = tmp_path / "shared.sqlite3"
    async with (
        run_server(create_app(settings, db_path=db)) as one,
        run_server(create_app(settings, db_path=db)) as two,
        httpx.AsyncClient(base_url=one.http) as http,
    ):
        client = PomoClient(two.url("/ws"), token=mint_token(SETTINGS, "alice"))
        events = client.events()
        with anyio.fail_after(5):
            assert (await events.__anext__())["type"] == "CONNECTION_ESTABLISHED"
            task = (await http.post("/api/tasks", json={"title": "via redis"}, headers=auth("alice"))).json()
            event = await events.__anext__()
        assert (event["type"], event["data"]) == ("TASK_CREATED", task)
        await client.close()
        await events.aclose()


async def test_a_client_notification_reaches_the_senders_tabs_only(app: Starlette) -> None:
    """The guide's wscat step: send a NOTIFICATION, and every tab of that user shows it."""
    async with serve(app) as client, socket(client, "ann") as tab1, socket(client, "ann") as tab2:
        async with socket(client, "bob") as other:
            guide_message = {
                "type": "NOTIFICATION",
                "userId": "bob",  # ignored: a client notifies only itself
                "data": {"message": "Test message"},
                "timestamp": "2025-01-06T12:00:00.000Z",
            }
            await tab1.send_json(guide_message)
            for tab in (tab1, tab2):
                event = await receive(tab, "NOTIFICATION")
                assert (event["userId"], event["data"]) == ("ann", {"message": "Test message"})
            await tab1.send_json({"type": "NOTIFICATION", "data": {}})
            error = await receive(tab1, "ERROR")
            assert error["data"]["code"] == "invalid_notification"
            await tab1.send_json({"type": "TASK_CREATED"})
            error = await receive(tab1, "ERROR")
            assert error["data"]["code"] == "unknown_type" and "NOTIFICATION" in error["data"]["message"]
            await other.send_json({"type": "PING"})
            assert (await receive(other))["type"] == "PONG", "bob got nothing of ann's"


# -- teams: a board and a timer on the channel team:<team>, and its presence -------------------------


async def log_in(client: httpx.AsyncClient, user: str) -> str:
    response = await client.post("/api/login", json={"name": user})
    assert response.status_code == 200, response.text
    token: str = response.json()["token"]
    return token


@contextlib.asynccontextmanager
async def team_socket(client: httpx.AsyncClient, user: str, team: str) -> AsyncIterator[AsyncWebSocketSession]:
    """A socket with the demo login's token, subscribed to its team's channel in the handshake."""
    headers = {"Authorization": f"Bearer {await log_in(client, user)}"}
    async with aconnect_ws(
        f"/ws?channels=team:{team}", client, headers=headers, session_class=AsyncWebSocketSession
    ) as ws:
        await receive(ws, "CONNECTION_ESTABLISHED")
        subscribed = await receive(ws, "SUBSCRIBED")
        assert subscribed["data"] == {"channel": f"team:{team}", "presence": True}
        yield ws


async def receive_past(
    ws: AsyncWebSocketSession, expected_type: str, skipped: list[Any] | None = None
) -> dict[str, Any]:
    """The next event of `expected_type`; the ones before it go to `skipped`."""
    while True:
        event = await receive(ws)
        if event["type"] == expected_type:
            return event
        if skipped is not None:
            skipped.append(event)


async def test_login_puts_the_users_own_team_channels_in_the_token(app: Starlette) -> None:
    async with serve(app) as client:
        member = jwt.decode(await log_in(client, "alice@focus"), SECRET, algorithms=["HS256"])
        assert member["channels"] == ["team:focus", "team:focus:*"]
        solo = jwt.decode(await log_in(client, "alice"), SECRET, algorithms=["HS256"])
        assert "channels" not in solo
        assert (await client.post("/api/login", json={"name": "bob@focus"})).json()["team"] == "focus"
    assert "team:*" in app.state.settings.presence_channels


async def test_team_board_and_timer_reach_the_team_and_no_one_else(app: Starlette) -> None:
    async with (
        serve(app) as client,
        team_socket(client, "alice@focus", "focus") as alice,
        team_socket(client, "bob@focus", "focus") as bob,
        team_socket(client, "carol@other", "other") as carol,
    ):
        created = await client.post("/api/team/tasks", json={"title": "Plan the launch"}, headers=auth("alice@focus"))
        assert created.status_code == 201
        task = created.json()
        assert task["createdBy"] == "alice@focus" and task["status"] == "pending"
        event = await receive_past(bob, "TEAM_TASK_CREATED")
        assert event["channel"] == "team:focus" and event["userId"] is None and event["id"]
        assert event["data"] == task
        assert (await receive_past(alice, "TEAM_TASK_CREATED"))["data"] == task

        done = await client.post(
            f"/api/team/tasks/{task['id']}/status", json={"status": "completed"}, headers=auth("bob@focus")
        )
        assert done.json()["status"] == "completed"
        assert (await receive_past(alice, "TEAM_TASK_UPDATED"))["data"]["status"] == "completed"

        started = await client.post("/api/team/timer", json={"duration": 600}, headers=auth("bob@focus"))
        assert started.status_code == 201
        timer = started.json()
        assert timer["running"] and timer["duration"] == 600 and timer["startedBy"] == "bob@focus"
        assert timer["endsAt"] > timer["startedAt"]  # the server's clock decides the end
        assert (await receive_past(alice, "TEAM_TIMER"))["data"] == timer
        again = await client.post("/api/team/timer", json={}, headers=auth("alice@focus"))
        assert again.status_code == 409

        # A later subscriber gets the timer as retained state, without an id.
        async with team_socket(client, "erin@focus", "focus") as erin:
            retained = await receive(erin, "TEAM_TIMER")
            assert retained["retained"] is True and "id" not in retained
            assert retained["data"] == timer

        state = (await client.get("/api/state", headers=auth("bob@focus"))).json()
        assert state["team"]["name"] == "focus" and state["team"]["channel"] == "team:focus"
        assert state["team"]["timer"] == timer
        assert [t["id"] for t in state["team"]["tasks"]] == [task["id"]]

        assert (await client.delete(f"/api/team/tasks/{task['id']}", headers=auth("alice@focus"))).status_code == 204
        assert (await receive_past(bob, "TEAM_TASK_DELETED"))["data"] == {"taskId": task["id"]}

        # The other team's first board event is its own: nothing of team:focus reached carol.
        await client.post("/api/team/tasks", json={"title": "Theirs"}, headers=auth("dave@other"))
        before: list[Any] = []
        theirs = await receive_past(carol, "TEAM_TASK_CREATED", before)
        assert theirs["channel"] == "team:other" and theirs["data"]["title"] == "Theirs"
        assert {e["data"]["channel"] for e in before} == {"team:other"}, before  # her presence, nothing of focus
        assert (await client.get("/api/state", headers=auth("carol@other"))).json()["team"]["tasks"][0]["title"] == (
            "Theirs"
        )

        stopped = await client.post("/api/team/timer/stop", json={}, headers=auth("alice@focus"))
        assert stopped.json() == {
            "running": False,
            "stoppedBy": "alice@focus",
            "stoppedAt": stopped.json()["stoppedAt"],
        }
        assert (await receive_past(bob, "TEAM_TIMER"))["data"]["running"] is False


async def test_a_member_may_not_subscribe_to_another_team(app: Starlette) -> None:
    async with serve(app) as client:
        headers = {"Authorization": f"Bearer {await log_in(client, 'carol@other')}"}
        async with aconnect_ws(
            "/ws?channels=team:focus", client, headers=headers, session_class=AsyncWebSocketSession
        ) as ws:
            await receive(ws, "CONNECTION_ESTABLISHED")
            refusal = await receive(ws, "ERROR")
            assert refusal["data"]["code"] == "forbidden" and refusal["data"]["channel"] == "team:focus"


async def test_members_focus_shows_on_the_team_channel_but_not_its_task(app: Starlette) -> None:
    async with serve(app) as client, team_socket(client, "alice@focus", "focus") as alice:
        task = (await client.post("/api/tasks", json={"title": "Private"}, headers=auth("bob@focus"))).json()
        body = {"type": "work", "duration": 300, "taskId": task["id"]}
        session = (await client.post("/api/sessions", json=body, headers=auth("bob@focus"))).json()
        focus = await receive_past(alice, "MEMBER_FOCUS")
        assert focus["channel"] == "team:focus"
        assert focus["data"] == {"userId": "bob@focus", "focusing": True, "endsAt": focus["data"]["endsAt"]}
        state = (await client.get("/api/state", headers=auth("alice@focus"))).json()
        assert state["team"]["focusing"] == {"bob@focus": focus["data"]["endsAt"]}
        assert state["tasks"] == []  # bob's task stays bob's
        await client.post(f"/api/sessions/{session['id']}/end", json={"completed": False}, headers=auth("bob@focus"))
        assert (await receive_past(alice, "MEMBER_FOCUS"))["data"] == {"userId": "bob@focus", "focusing": False}
        assert (await client.get("/api/state", headers=auth("alice@focus"))).json()["team"]["focusing"] == {}


async def test_team_endpoints_need_a_team_and_validate(app: Starlette) -> None:
    async with serve(app) as client:
        for method, path in [
            ("POST", "/api/team/tasks"),
            ("POST", "/api/team/timer"),
            ("POST", "/api/team/timer/stop"),
            ("DELETE", "/api/team/tasks/x"),
        ]:
            response = await client.request(method, path, json={"title": "x"}, headers=auth("alice"))
            assert response.status_code == 403, path
            assert "name@team" in response.json()["error"]
        member = auth("alice@focus")
        assert (await client.post("/api/team/tasks", json={"title": ""}, headers=member)).status_code == 400
        assert (
            await client.post("/api/team/tasks/x/status", json={"status": "done"}, headers=member)
        ).status_code == 400
        assert (
            await client.post("/api/team/tasks/x/status", json={"status": "completed"}, headers=member)
        ).status_code == 404
        assert (await client.delete("/api/team/tasks/x", headers=member)).status_code == 404
        assert (await client.post("/api/team/timer", json={"duration": 0}, headers=member)).status_code == 400
        # Another team's task is not on yours.
        theirs = (await client.post("/api/team/tasks", json={"title": "t"}, headers=auth("bob@other"))).json()
        assert (await client.delete(f"/api/team/tasks/{theirs['id']}", headers=member)).status_code == 404
        assert (await client.get("/api/state", headers=auth("alice"))).json()["team"] is None
