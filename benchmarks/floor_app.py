"""The floor: the thinnest fan-out any app mounted in a Starlette router can have.

Not a competitor and not a target: a reference that shows how much of the baseline's cost an app in
the package's position (behind Starlette's routing, where ``app.mount("/ws", pomo)`` puts it) can
remove at all. A raw ASGI websocket app at the bare ``/ws`` path: ``send`` is the one Starlette's
``ExceptionMiddleware`` wraps, there is no ``WebSocket`` object, one message dict per event, and the
loop is ``await send(message)``. The JWT check, the envelope and the benchmark endpoints are those of
``baseline_app.py``. No queues, no history, no heartbeats, and a slow client blocks everyone.

Run: ``uvicorn benchmarks.floor_app:app --ws websockets-sansio --ws-per-message-deflate false``.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

import jwt
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Match, Route
from starlette.types import Receive, Scope, Send

from benchmarks.baseline_app import SECRET, envelope

Message = MutableMapping[str, Any]
SENDS: dict[str, dict[Callable[[Message], Awaitable[None]], None]] = {}


async def ws_app(scope: Scope, receive: Receive, send: Send) -> None:
    await receive()  # websocket.connect
    token = parse_qs(scope["query_string"].decode()).get("token", [""])[0]
    try:
        claims = jwt.decode(token, SECRET, algorithms=["HS256"], options={"require": ["exp"]})
        user_id = str(claims["userId"])
    except (jwt.PyJWTError, KeyError):
        await send({"type": "websocket.close", "code": 1008})
        return
    await send({"type": "websocket.accept"})
    sends = SENDS.setdefault(user_id, {})
    sends[send] = None
    try:
        text = envelope("CONNECTION_ESTABLISHED", user_id, {"message": "WebSocket connection established"})
        await send({"type": "websocket.send", "text": text})
        while (await receive())["type"] != "websocket.disconnect":
            pass
    finally:
        sends.pop(send, None)
        if not sends:
            SENDS.pop(user_id, None)


async def fan(sends: list[Callable[[Message], Awaitable[None]]], message: Message) -> None:
    for send in sends:
        try:
            await send(message)
        except Exception:  # a socket that went away; its own handler unregisters it
            pass


async def bench_all(request: Request) -> JSONResponse:
    count = int(request.query_params.get("count", "1"))
    seq = int(request.query_params.get("seq", "0"))
    for i in range(count):
        message = {"type": "websocket.send", "text": envelope("BENCH", None, {"seq": seq + i, "t": time.time_ns()})}
        for sends in list(SENDS.values()):
            await fan(list(sends), message)
    return JSONResponse({"sent": count})


async def bench_user(request: Request) -> JSONResponse:
    user_id = request.path_params["uid"]
    seq = int(request.query_params.get("seq", "0"))
    message = {"type": "websocket.send", "text": envelope("BENCH", user_id, {"seq": seq, "t": time.time_ns()})}
    await fan(list(SENDS.get(user_id, ())), message)
    return JSONResponse({"sent": 1})


async def ready(request: Request) -> JSONResponse:
    return JSONResponse({"connections": sum(len(s) for s in SENDS.values())})


class BarePath(BaseRoute):
    """The bare ``/ws`` websocket path, as the package's lifespan installs it (a ``Mount`` wants ``/ws/``)."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        await ws_app(scope, receive, send)

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] == "websocket" and scope["path"] == "/ws":
            return Match.FULL, {}
        return Match.NONE, {}


app = Starlette(
    routes=[
        Route("/bench/all", bench_all, methods=["POST"]),
        Route("/bench/user/{uid}", bench_user, methods=["POST"]),
        Route("/bench/ready", ready),
        BarePath(),
    ]
)
