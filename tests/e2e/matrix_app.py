"""The app that the server-matrix tests run under every ASGI server, in a process of its own.

Settings come from the environment (`POMO_WS_*`), as a deployment's would. `app` is the documented
two-line setup; `wrapped` is `pomo.wrap(app)`, for servers that send no lifespan events (daphne).
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from starlette_pomo_ws import Broadcaster, PomoWS
from starlette_pomo_ws._types import ASGIApp, Receive, Scope, Send

pomo = PomoWS()


class Handlers:
    """Counts the WebSocket handlers still running: a released connection's handler must return."""

    active = 0

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "websocket":
            await self.app(scope, receive, send)
            return
        Handlers.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            Handlers.active -= 1


async def publish(request: Request) -> JSONResponse:
    """Publish one event (`user` absent: to everyone), or `count` of them in a row."""
    body = await request.json()
    broadcaster: Broadcaster = request.state.broadcaster
    ids = []
    for n in range(int(body.get("count", 1))):
        data = body.get("data")
        if "count" in body:
            data = {**(data or {}), "n": n}
        if body.get("user") is None:
            event = await broadcaster.broadcast_to_all(body["type"], data)
        else:
            event = await broadcaster.broadcast_to_user(body["user"], body["type"], data)
        ids.append(event.id)
    return JSONResponse({"id": ids[-1], "ids": ids})


async def disconnect(request: Request) -> JSONResponse:
    body = await request.json()
    await request.state.broadcaster.disconnect_user(
        body["user"], reason=body.get("reason", "Disconnected by the server")
    )
    return JSONResponse({})


async def count(request: Request) -> JSONResponse:
    broadcaster: Broadcaster = request.state.broadcaster
    return JSONResponse(
        {
            "user": broadcaster.user_connection_count(request.query_params.get("user", "")),
            "total": broadcaster.total_connection_count(),
            "slow_closes": broadcaster.stats.slow_closes,
            "handlers": Handlers.active,
        }
    )


starlette_app = Starlette(
    lifespan=pomo.lifespan,
    routes=[
        Route("/publish", publish, methods=["POST"]),
        Route("/disconnect", disconnect, methods=["POST"]),
        Route("/count", count),
    ],
)
starlette_app.mount("/ws", pomo)

app = Handlers(starlette_app)
wrapped = Handlers(pomo.wrap(starlette_app))
