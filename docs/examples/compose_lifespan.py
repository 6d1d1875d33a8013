"""Compose `pomo.lifespan` with the app's own lifespan, and add your own state next to the broadcaster."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from starlette_pomo_ws import Broadcaster, PomoWS

pomo = PomoWS()


class TaskStore:
    """A stand-in for your database pool or HTTP client."""

    def __init__(self) -> None:
        self.tasks: dict[str, list[str]] = {}

    async def close(self) -> None:
        self.tasks.clear()


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
    store = TaskStore()  # your own startup
    try:
        # Pass `app`: it lets pomo.lifespan route the bare `/ws` path as well as `/ws/`.
        async with pomo.lifespan(app) as state:
            yield {**state, "store": store}  # request.state.broadcaster and request.state.store
    finally:
        await store.close()  # your own shutdown, after pomo's sockets are closed


async def add_task(request: Request) -> JSONResponse:
    user_id = request.path_params["user_id"]
    title = (await request.json())["title"]
    store: TaskStore = request.state.store
    store.tasks.setdefault(user_id, []).append(title)
    broadcaster: Broadcaster = request.state.broadcaster
    await broadcaster.broadcast_to_user(user_id, "TASK_CREATED", {"title": title})
    return JSONResponse({"count": len(store.tasks[user_id])}, status_code=201)


app = Starlette(lifespan=lifespan, routes=[Route("/users/{user_id}/tasks", add_task, methods=["POST"])])
app.mount("/ws", pomo)
