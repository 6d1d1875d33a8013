"""The Pomofocus demo: a small Starlette app whose services broadcast every change to the user's tabs.

A user named `name@team` is also a member of `team`: the team shares a timer (the retained state
of the channel `team:<team>`), a task board (that channel's events) and a "who's here" list (its
presence). Personal tasks and sessions stay personal.

Run it with `pomo-ws demo`, or `uvicorn --factory starlette_pomo_ws.demo.app:create_app
--ws-per-message-deflate false`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .. import Broadcaster, PomoWS, Settings
from .._auth import JWTAuthenticator
from .._connection import Connection
from .._types import ASGIApp, Receive, Scope, Send
from ..exceptions import AuthenticationError, BackendUnavailable
from .store import SESSION_TYPES, TASK_STATUSES, Store, now_iso
from .tokens import LOOPBACK_HOSTS, demo_token, dev_settings, team_channel, team_of

__all__ = ["DEFAULT_DB_PATH", "create_app"]

logger = logging.getLogger("starlette_pomo_ws")

DEFAULT_DB_PATH = "pomo-demo.sqlite3"
TOKEN_TTL = 3600
TEAM_PRESENCE = "team:*"
_HERE = Path(__file__).parent
_USER_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
_MAX_TITLE = 200

Handler = Callable[[Request], Awaitable[Response]]


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _json_body(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise HTTPException(400, "The body must be a JSON object.") from None
    if not isinstance(body, dict):
        raise HTTPException(400, "The body must be a JSON object.")
    return body


def _int_field(body: dict[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise HTTPException(400, f"'{key}' must be an integer from {low} to {high}.")
    return value


def _title(body: dict[str, Any]) -> str:
    title = body.get("title")
    if not isinstance(title, str) or not title.strip() or len(title) > _MAX_TITLE:
        raise HTTPException(400, f"'title' must be a non-empty string of at most {_MAX_TITLE} characters.")
    return title.strip()


def host_name(header: str) -> str:
    """The name in a `Host` header, without its port: `[::1]:8000` gives `::1`, `LocalHost.:80` gives `localhost`."""
    header = header.strip().lower()
    if header.startswith("["):
        name, _, _ = header[1:].partition("]")
    else:
        name = header.rpartition(":")[0] if header.count(":") == 1 else header
    return name.rstrip(".")


class HostCheck:
    """Answer only requests whose `Host` is one of `allowed` (`"*"` allows any), HTTP and WebSocket alike.

    A page on evil.example that rebinds its name to 127.0.0.1 still sends `Host: evil.example`, so a
    loopback-only demo refuses it: its login would otherwise mint tokens for that page.
    """

    def __init__(self, app: ASGIApp, allowed: Sequence[str]) -> None:
        self.app = app
        self.allowed = frozenset(host_name(name) for name in allowed)
        self.any = "*" in allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and not self.any:
            header = next((bytes(v).decode("latin-1") for k, v in scope.get("headers") or () if k == b"host"), "")
            if host_name(header) not in self.allowed:
                answers = ", ".join(sorted(self.allowed))
                logger.warning("Demo: refused a request for Host %r; it answers %s only", header[:100], answers)
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008, "reason": "Host not allowed"})
                else:
                    await JSONResponse({"error": "Host not allowed."}, status_code=400)(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def relay_notification(broadcaster: Broadcaster, connection: Connection, message: dict[str, Any]) -> None:
    """The guide's test step: a `NOTIFICATION` a client sends reaches every tab of its own user, and no one else.

    The message's own `userId` and `timestamp` are ignored: a client may only notify itself.
    """
    if message["type"] != "NOTIFICATION":
        await connection.send(
            "ERROR",
            {
                "code": "unknown_type",
                "message": f"Unknown message type {message['type'][:64]!r}; the demo accepts PING, REFRESH_TOKEN "
                "and NOTIFICATION.",
            },
        )
        return
    data = message.get("data")
    text = data.get("message") if isinstance(data, dict) else None
    if not isinstance(text, str) or len(text) > 500:
        await connection.send(
            "ERROR",
            {"code": "invalid_notification", "message": "NOTIFICATION needs data.message, at most 500 characters."},
        )
        return
    await broadcaster.broadcast_to_user(connection.user_id, "NOTIFICATION", {"message": text})


def create_app(
    settings: Settings | None = None,
    db_path: str | os.PathLike[str] = DEFAULT_DB_PATH,
    *,
    allowed_hosts: Sequence[str] = LOOPBACK_HOSTS,
) -> Starlette:
    """Build the demo app.

    Its login mints a token for any name, for anyone who can reach it: never expose it.

    Args:
        settings: the package settings. `None` reads them from the environment, but never the secret
            (`JWT_SECRET`, `POMO_WS_JWT_SECRET`): without a secret, one is generated for this run.
        db_path: the SQLite file (created when missing), or `":memory:"`.
        allowed_hosts: the `Host` names it answers (with any port); `("*",)` answers every name.

    Returns:
        A Starlette app with the pages, the JSON API and the WebSocket mount at `/ws`.
    """
    settings, _ = dev_settings(settings)
    if TEAM_PRESENCE not in settings.presence_channels:
        settings = settings.replace(presence_channels=(*settings.presence_channels, TEAM_PRESENCE))
    store = Store(db_path)

    async def on_message(connection: Connection, message: dict[str, Any]) -> None:
        await relay_notification(pomo.broadcaster, connection, message)

    pomo = PomoWS(settings, on_message=on_message)
    check_token = JWTAuthenticator(settings).decode  # the API refuses exactly what the WebSocket refuses
    logger.warning(
        "Demo: POST /api/login issues a token for any name to anyone who can reach this server; never expose it. "
        "It answers %s.",
        "every Host name" if "*" in allowed_hosts else "Host " + ", ".join(allowed_hosts),
    )

    def user_of(request: Request) -> str:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise HTTPException(401, "Log in first: send 'Authorization: Bearer <token>'.")
        try:
            return check_token(token.strip()).user_id
        except AuthenticationError as exc:
            logger.info("Demo: refused an API token: %s", exc.detail or exc.reason)
            raise HTTPException(401, "Invalid or expired token; log in again.") from None

    async def broadcast(request: Request, user_id: str, event_type: str, data: Any) -> None:
        await request.state.broadcaster.broadcast_to_user(user_id, event_type, data)

    async def broadcast_to_team(
        request: Request, team: str, event_type: str, data: Any, *, retain: bool = False
    ) -> None:
        await request.state.broadcaster.broadcast_to_channel(team_channel(team), event_type, data, retain=retain)

    def team_of_request(request: Request) -> tuple[str, str]:
        user_id = user_of(request)
        team = team_of(user_id)
        if team is None:
            raise HTTPException(403, "You are in no team: log in as name@team.")
        return user_id, team

    def team_state(team: str, now: float) -> dict[str, Any]:
        focusing = {
            user_id: now_iso(ends_at)
            for user_id, ends_at in store.running_work_sessions(now)
            if team_of(user_id) == team
        }
        return {
            "name": team,
            "channel": team_channel(team),
            "tasks": store.list_team_tasks(team),
            "timer": store.get_team_timer(team),
            "focusing": focusing,
        }

    # -- pages ------------------------------------------------------------------------------------

    async def index(request: Request) -> Response:
        return FileResponse(_HERE / "templates" / "index.html")

    async def websocket_test(request: Request) -> Response:
        return FileResponse(_HERE / "templates" / "websocket-test.html")

    # -- auth -------------------------------------------------------------------------------------

    async def login(request: Request) -> Response:
        """The dev login: anyone may be anyone. Never ship this."""
        body = await _json_body(request)
        name = body.get("name")
        if not isinstance(name, str) or not _USER_NAME.match(name):
            return _error(400, "'name' must be 1-64 letters, digits or _.@-")
        token = demo_token(settings, name, ttl=TOKEN_TTL, iat=int(time.time()))
        return JSONResponse({"token": token, "userId": name, "team": team_of(name), "expiresIn": TOKEN_TTL})

    # -- state ------------------------------------------------------------------------------------

    async def state(request: Request) -> Response:
        """Everything a page shows, in one response: what a client refetches on RESYNC_REQUIRED."""
        user_id = user_of(request)
        team = team_of(user_id)
        now = time.time()
        return JSONResponse(
            {
                "userId": user_id,
                "tasks": store.list_tasks(user_id),
                "session": store.current_session(user_id),
                "settings": store.get_settings(user_id),
                "team": team_state(team, now) if team else None,
                "serverTime": now * 1000,
            }
        )

    # -- the task service -------------------------------------------------------------------------

    async def list_tasks(request: Request) -> Response:
        return JSONResponse(store.list_tasks(user_of(request)))

    async def create_task(request: Request) -> Response:
        user_id = user_of(request)
        body = await _json_body(request)
        task = store.create_task(user_id, _title(body), _int_field(body, "estimatedPomodoros", 1, 1, 99))
        await broadcast(request, user_id, "TASK_CREATED", task)
        return JSONResponse(task, status_code=201)

    async def get_task(request: Request) -> Response:
        task = store.get_task(user_of(request), request.path_params["task_id"])
        return JSONResponse(task) if task else _error(404, "No such task.")

    async def update_task(request: Request) -> Response:
        user_id = user_of(request)
        body = await _json_body(request)
        changes: dict[str, Any] = {}
        if "title" in body:
            changes["title"] = _title(body)
        if "estimatedPomodoros" in body:
            changes["estimatedPomodoros"] = _int_field(body, "estimatedPomodoros", 1, 1, 99)
        task = store.update_task(user_id, request.path_params["task_id"], changes)
        if task is None:
            return _error(404, "No such task.")
        await broadcast(request, user_id, "TASK_UPDATED", task)
        return JSONResponse(task)

    async def delete_task(request: Request) -> Response:
        user_id = user_of(request)
        task_id = request.path_params["task_id"]
        if not store.delete_task(user_id, task_id):
            return _error(404, "No such task.")
        await broadcast(request, user_id, "TASK_DELETED", {"taskId": task_id})
        return Response(status_code=204)

    async def set_task_status(request: Request) -> Response:
        user_id = user_of(request)
        body = await _json_body(request)
        status = body.get("status")
        if status not in TASK_STATUSES:
            return _error(400, f"'status' must be one of {', '.join(TASK_STATUSES)}.")
        task = store.update_task(user_id, request.path_params["task_id"], {"status": status})
        if task is None:
            return _error(404, "No such task.")
        await broadcast(request, user_id, "TASK_STATUS_CHANGED", {"taskId": task["id"], "status": task["status"]})
        return JSONResponse(task)

    # -- the session service ----------------------------------------------------------------------

    async def current_session(request: Request) -> Response:
        return JSONResponse(store.current_session(user_of(request)))

    async def start_session(request: Request) -> Response:
        user_id = user_of(request)
        body = await _json_body(request)
        session_type = body.get("type", "work")
        if session_type not in SESSION_TYPES:
            return _error(400, f"'type' must be one of {', '.join(SESSION_TYPES)}.")
        user_settings = store.get_settings(user_id)
        minutes = {"work": "workDuration", "short_break": "shortBreakDuration", "long_break": "longBreakDuration"}
        duration = _int_field(body, "duration", int(user_settings[minutes[session_type]]) * 60, 1, 24 * 3600)
        task_id = body.get("taskId")
        if task_id is not None and (not isinstance(task_id, str) or store.get_task(user_id, task_id) is None):
            return _error(400, "'taskId' must name one of your tasks.")
        if store.current_session(user_id) is not None:
            return _error(409, "A session is already running; end it first.")
        started_at = time.time()
        session = store.start_session(user_id, session_type, duration, task_id, started_at=started_at)
        await broadcast(
            request,
            user_id,
            "SESSION_START",
            {
                "sessionId": session["id"],
                "type": session["type"],
                "duration": session["duration"],
                "startTime": session["startTime"],
                "taskId": session["taskId"],
            },
        )
        team = team_of(user_id)
        if team is not None and session_type == "work":
            # The team sees that you focus, and until when; never on what (personal tasks stay personal).
            ends_at = now_iso(started_at + duration)
            await broadcast_to_team(
                request, team, "MEMBER_FOCUS", {"userId": user_id, "focusing": True, "endsAt": ends_at}
            )
        return JSONResponse(session, status_code=201)

    async def end_session(request: Request) -> Response:
        user_id = user_of(request)
        body = await _json_body(request)
        completed = body.get("completed")
        if completed is not None and not isinstance(completed, bool):
            return _error(400, "'completed' must be true, false or absent.")
        result = store.end_session(user_id, request.path_params["session_id"], completed=completed, now=time.time())
        if result is None:
            return _error(404, "No such session.")
        session, task, changed = result
        if changed:
            await broadcast(
                request,
                user_id,
                "SESSION_END",
                {
                    "sessionId": session["id"],
                    "completedPomodoros": task["completedPomodoros"] if task else 0,
                    "isCompleted": session["isCompleted"],
                    "taskId": session["taskId"],
                },
            )
            if session["isCompleted"]:
                what = "Pomodoro" if session["type"] == "work" else "Break"
                message = f"{what} complete" + (f": {task['title']}" if task else "")
                await broadcast(request, user_id, "NOTIFICATION", {"message": message, "sessionId": session["id"]})
            team = team_of(user_id)
            if team is not None and session["type"] == "work":
                await broadcast_to_team(request, team, "MEMBER_FOCUS", {"userId": user_id, "focusing": False})
        return JSONResponse(session)

    # -- the team service: a board and a timer per team, on the team's channel ---------------------

    async def create_team_task(request: Request) -> Response:
        user_id, team = team_of_request(request)
        task = store.create_team_task(team, _title(await _json_body(request)), user_id)
        await broadcast_to_team(request, team, "TEAM_TASK_CREATED", task)
        return JSONResponse(task, status_code=201)

    async def set_team_task_status(request: Request) -> Response:
        _, team = team_of_request(request)
        status = (await _json_body(request)).get("status")
        if status not in TASK_STATUSES:
            return _error(400, f"'status' must be one of {', '.join(TASK_STATUSES)}.")
        task = store.set_team_task_status(team, request.path_params["task_id"], status)
        if task is None:
            return _error(404, "No such task on your team's board.")
        await broadcast_to_team(request, team, "TEAM_TASK_UPDATED", task)
        return JSONResponse(task)

    async def delete_team_task(request: Request) -> Response:
        _, team = team_of_request(request)
        task_id = request.path_params["task_id"]
        if not store.delete_team_task(team, task_id):
            return _error(404, "No such task on your team's board.")
        await broadcast_to_team(request, team, "TEAM_TASK_DELETED", {"taskId": task_id})
        return Response(status_code=204)

    async def start_team_timer(request: Request) -> Response:
        """Start the team's timer. The server's clock decides when it ends: the state carries `endsAt`."""
        user_id, team = team_of_request(request)
        body = await _json_body(request)
        duration = _int_field(body, "duration", 25 * 60, 1, 24 * 3600)
        now = time.time()
        current = store.get_team_timer(team)
        if current and current["running"] and current["endsAt"] > now_iso(now):  # one format: ISO order is time order
            return _error(409, "The team's timer is already running; stop it first.")
        timer = {
            "running": True,
            "duration": duration,
            "startedAt": now_iso(now),
            "endsAt": now_iso(now + duration),
            "startedBy": user_id,
        }
        store.set_team_timer(team, timer)
        # Retained: a member who opens a tab later gets this state right after subscribing.
        await broadcast_to_team(request, team, "TEAM_TIMER", timer, retain=True)
        return JSONResponse(timer, status_code=201)

    async def stop_team_timer(request: Request) -> Response:
        user_id, team = team_of_request(request)
        timer = {"running": False, "stoppedBy": user_id, "stoppedAt": now_iso(time.time())}
        store.set_team_timer(team, timer)
        await broadcast_to_team(request, team, "TEAM_TIMER", timer, retain=True)
        return JSONResponse(timer)

    # -- the settings service ---------------------------------------------------------------------

    async def get_settings(request: Request) -> Response:
        return JSONResponse(store.get_settings(user_of(request)))

    async def update_settings(request: Request) -> Response:
        user_id = user_of(request)
        body = await _json_body(request)
        changes: dict[str, Any] = {}
        for key in ("workDuration", "shortBreakDuration", "longBreakDuration"):
            if key in body:
                changes[key] = _int_field(body, key, 0, 1, 180)
        if "longBreakInterval" in body:
            changes["longBreakInterval"] = _int_field(body, "longBreakInterval", 0, 1, 12)
        for key in ("autoStartBreaks", "autoStartPomodoros"):
            if key in body:
                if not isinstance(body[key], bool):
                    return _error(400, f"'{key}' must be true or false.")
                changes[key] = body[key]
        unknown = sorted(set(body) - set(changes))
        if unknown:
            return _error(400, f"Unknown settings: {', '.join(unknown)}.")
        merged = store.update_settings(user_id, changes)
        await broadcast(request, user_id, "SETTINGS_UPDATED", merged)
        return JSONResponse(merged)

    # -- notifications ----------------------------------------------------------------------------

    async def notify(request: Request) -> Response:
        """Broadcast a test NOTIFICATION to the caller's tabs (the /websocket-test page's button)."""
        user_id = user_of(request)
        body = await _json_body(request)
        message = body.get("message", "Test notification")
        if not isinstance(message, str) or len(message) > 500:
            return _error(400, "'message' must be a string of at most 500 characters.")
        event = await request.state.broadcaster.broadcast_to_user(user_id, "NOTIFICATION", {"message": message})
        return JSONResponse({"id": event.id, "type": event.type, "timestamp": event.timestamp}, status_code=202)

    # -- errors -----------------------------------------------------------------------------------

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return _error(exc.status_code, exc.detail)

    async def backend_down(request: Request, exc: Exception) -> Response:
        # The change is stored, but its event could not be published: say so rather than pretend.
        logger.warning("Demo: the broadcast failed, the backend is unavailable: %s", exc)
        return _error(503, "Saved, but the real-time backend is unavailable; other tabs will resync.")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        # Composing lifespans: enter the package's, then add the app's own state next to its.
        async with pomo.lifespan(app) as pomo_state:
            try:
                yield {**pomo_state, "store": store}
            finally:
                store.close()

    routes = [
        Route("/", index),
        Route("/websocket-test", websocket_test),
        Route("/api/login", login, methods=["POST"]),
        Route("/api/state", state),
        Route("/api/tasks", list_tasks),
        Route("/api/tasks", create_task, methods=["POST"]),
        Route("/api/tasks/{task_id}", get_task),
        Route("/api/tasks/{task_id}", update_task, methods=["PATCH", "PUT"]),
        Route("/api/tasks/{task_id}", delete_task, methods=["DELETE"]),
        Route("/api/tasks/{task_id}/status", set_task_status, methods=["POST", "PUT"]),
        Route("/api/sessions/current", current_session),
        Route("/api/sessions", start_session, methods=["POST"]),
        Route("/api/sessions/{session_id}/end", end_session, methods=["POST"]),
        Route("/api/team/tasks", create_team_task, methods=["POST"]),
        Route("/api/team/tasks/{task_id}", delete_team_task, methods=["DELETE"]),
        Route("/api/team/tasks/{task_id}/status", set_team_task_status, methods=["POST", "PUT"]),
        Route("/api/team/timer", start_team_timer, methods=["POST"]),
        Route("/api/team/timer/stop", stop_team_timer, methods=["POST"]),
        Route("/api/settings", get_settings),
        Route("/api/settings", update_settings, methods=["PUT", "PATCH"]),
        Route("/api/notifications", notify, methods=["POST"]),
        Mount("/static", StaticFiles(directory=_HERE / "static"), name="static"),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        middleware=[Middleware(HostCheck, allowed=tuple(allowed_hosts))],
        exception_handlers={HTTPException: http_error, BackendUnavailable: backend_down},
    )
    app.mount("/ws", pomo)
    app.state.store = store
    app.state.pomo = pomo
    app.state.settings = settings
    return app
