"""Starlette: the two lines, and an endpoint that broadcasts to every tab of the user.

Run it with `POMO_WS_JWT_SECRET=<at least 32 random bytes> uvicorn starlette_app:app --ws-per-message-deflate false`.
"""

from __future__ import annotations

import uuid

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from starlette_pomo_ws import Broadcaster, PomoWS

pomo = PomoWS()  # Settings.from_env(): POMO_WS_JWT_SECRET (or JWT_SECRET), POMO_WS_BACKEND_URL, ...


async def create_task(request: Request) -> JSONResponse:
    user_id = request.headers["x-user-id"]  # a stand-in for your app's own authentication
    task = {"id": str(uuid.uuid4()), "title": (await request.json())["title"], "completed": False}
    broadcaster: Broadcaster = request.state.broadcaster
    await broadcaster.broadcast_to_user(user_id, "TASK_CREATED", task)
    return JSONResponse(task, status_code=201)


app = Starlette(lifespan=pomo.lifespan, routes=[Route("/tasks", create_task, methods=["POST"])])
app.mount("/ws", pomo)
