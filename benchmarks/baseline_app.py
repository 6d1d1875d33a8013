"""The baseline: the thinnest hand-written Starlette fan-out.

One ``WebSocketRoute`` at ``/ws``, an HS256 JWT check of ``?token=`` (PyJWT), a dict of
``user_id -> set[WebSocket]``, the envelope JSON-encoded once per event, and ``await ws.send_text(msg)``
in a loop. It has none of the package's guarantees (no queues, no history, no heartbeats, a slow
client blocks everyone). The benchmark endpoints are the same as in ``pomo_app.py``:

* ``POST /bench/all?count=C&seq=S``: C broadcasts to every connection, ``data = {"seq": S+i, "t": time_ns}``;
* ``POST /bench/user/{uid}?seq=S``: one broadcast to the connections of user ``uid``;
* ``GET /bench/ready``: 200 once the app runs.

Run: ``uvicorn benchmarks.baseline_app:app --ws websockets-sansio --ws-per-message-deflate false``.
"""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone
from typing import Any

import jwt
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

SECRET = os.environ.get("BENCH_JWT_SECRET", "benchmark-secret-at-least-32-bytes-long!")
CONNECTIONS: dict[str, set[WebSocket]] = {}


def envelope(type_: str, user_id: str | None, data: Any) -> str:
    # The guide's envelope, encoded once per event.
    now = datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return json.dumps({"type": type_, "userId": user_id, "data": data, "timestamp": now})


async def send_all(conns: set[WebSocket], msg: str) -> None:
    for ws in list(conns):
        try:
            await ws.send_text(msg)
        except Exception:  # a socket that went away; its own handler unregisters it
            pass


_dropped = [0]


async def lossy_send_all(conns: set[WebSocket], msg: str) -> None:
    """Drops one delivery in ``BENCH_DROP_EVERY``: only for the test that proves losses are caught."""
    for ws in list(conns):
        _dropped[0] += 1
        if _dropped[0] % DROP_EVERY == 0:
            continue
        await ws.send_text(msg)


DROP_EVERY = int(os.environ.get("BENCH_DROP_EVERY", "0"))
if DROP_EVERY:
    send_all = lossy_send_all


async def ws_endpoint(websocket: WebSocket) -> None:
    token = websocket.query_params.get("token")
    try:
        claims = jwt.decode(token or "", SECRET, algorithms=["HS256"], options={"require": ["exp"]})
        user_id = str(claims["userId"])
    except (jwt.PyJWTError, KeyError):
        await websocket.accept()
        await websocket.close(code=1008, reason="Invalid authentication token")
        return
    await websocket.accept()
    CONNECTIONS.setdefault(user_id, set()).add(websocket)
    try:
        await websocket.send_text(
            envelope("CONNECTION_ESTABLISHED", user_id, {"message": "WebSocket connection established"})
        )
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                break
    except WebSocketDisconnect:
        pass
    finally:
        conns = CONNECTIONS.get(user_id)
        if conns is not None:
            conns.discard(websocket)
            if not conns:
                del CONNECTIONS[user_id]


async def bench_all(request: Request) -> JSONResponse:
    count = int(request.query_params.get("count", "1"))
    seq = int(request.query_params.get("seq", "0"))
    for i in range(count):
        msg = envelope("BENCH", None, {"seq": seq + i, "t": time.time_ns()})
        for conns in list(CONNECTIONS.values()):
            await send_all(conns, msg)
    return JSONResponse({"sent": count})


async def bench_user(request: Request) -> JSONResponse:
    user_id = request.path_params["uid"]
    seq = int(request.query_params.get("seq", "0"))
    msg = envelope("BENCH", user_id, {"seq": seq, "t": time.time_ns()})
    conns = CONNECTIONS.get(user_id)
    if conns:
        await send_all(conns, msg)
    return JSONResponse({"sent": 1})


async def ready(request: Request) -> JSONResponse:
    return JSONResponse({"connections": sum(len(c) for c in CONNECTIONS.values())})


app = Starlette(
    routes=[
        WebSocketRoute("/ws", ws_endpoint),
        Route("/bench/all", bench_all, methods=["POST"]),
        Route("/bench/user/{uid}", bench_user, methods=["POST"]),
        Route("/bench/ready", ready),
    ]
)
