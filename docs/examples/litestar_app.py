"""Litestar: the plugin adds the mount, the lifespan, `request.state.broadcaster` and a `broadcaster` dependency.

Run it with `POMO_WS_JWT_SECRET=... uvicorn litestar_app:app --ws-per-message-deflate false`.
"""

from __future__ import annotations

import uuid
from typing import Any

from litestar import Litestar, Request, post

from starlette_pomo_ws import Broadcaster, PomoWS
from starlette_pomo_ws.litestar import PomoWSPlugin

pomo = PomoWS()  # Settings.from_env()


@post("/tasks")
async def create_task(request: Request[Any, Any, Any]) -> dict[str, Any]:
    user_id = request.headers["x-user-id"]  # a stand-in for your app's own authentication
    task = {"id": str(uuid.uuid4()), "title": (await request.json())["title"], "completed": False}
    broadcaster: Broadcaster = request.state.broadcaster  # set by the plugin on every request
    await broadcaster.broadcast_to_user(user_id, "TASK_CREATED", task)
    return task


app = Litestar(route_handlers=[create_task], plugins=[PomoWSPlugin(pomo, path="/ws")])
