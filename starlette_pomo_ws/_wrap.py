"""`pomo.wrap(app)`: an optional top-level entry around the whole app.

The documented setup (`lifespan=pomo.lifespan` and `app.mount("/ws", pomo)`) needs nothing else on
uvicorn, hypercorn and granian. `pomo.wrap(app)` is for two cases:

- A server that sends no lifespan events (daphne): the app's own lifespan, and so `pomo.lifespan`,
  then runs on the first request, and its state reaches every request as a server would pass it, so
  `request.state.broadcaster` works. It stops with the process.
- A deployment that wants WebSocket traffic to skip the framework's routing and exception wrapper on
  the way to `/ws`: every WebSocket under the mount path goes straight to the package. The app's own
  middleware then does not see those WebSockets (HTTP requests still go through the app).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from ._types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from ._app import PomoWS

__all__ = ["Wrapped"]

logger = logging.getLogger("starlette_pomo_ws")


class Wrapped:
    """The app, with its lifespan run on first use where the server sends none, and `/ws` routed directly."""

    def __init__(self, app: ASGIApp, pomo: PomoWS, path: str = "/ws") -> None:
        self.app = app
        self.pomo = pomo
        self.path = path.rstrip("/")
        self._server_lifespan = False  # the server sent lifespan events: it runs the lifespan itself
        self._started: asyncio.Future[dict[str, Any]] | None = None
        self._lifespan_task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"Wrapped({self.app!r}, path={self.path!r})"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            self._server_lifespan = True
            await self.app(scope, receive, send)
            return
        if not self._server_lifespan:
            state = await self._lifespan_state()
            scope = {**scope, "state": {**state, **scope.get("state", {})}}
        if kind == "websocket" and self.path:
            path: str = scope.get("path", "")
            if path == self.path or path.startswith(self.path + "/"):
                await self.pomo(scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _lifespan_state(self) -> dict[str, Any]:
        """Start the app's lifespan once, as a server would, and return the state it yielded."""
        if self._started is None:
            self._started = asyncio.get_running_loop().create_future()
            try:
                state = await self._start()
            except BaseException as exc:
                self._started.set_exception(exc)
                self._started.exception()  # retrieved: later requests re-raise it
                raise
            self._started.set_result(state)
        return await asyncio.shield(self._started)

    async def _start(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        to_app: asyncio.Queue[Message] = asyncio.Queue()
        from_app: asyncio.Queue[Message] = asyncio.Queue()
        to_app.put_nowait({"type": "lifespan.startup"})
        scope: Scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": state}

        async def send(message: Message) -> None:
            await from_app.put(message)

        task = self._lifespan_task = asyncio.ensure_future(self.app(scope, to_app.get, send))
        answer = asyncio.ensure_future(from_app.get())
        await asyncio.wait({task, answer}, return_when=asyncio.FIRST_COMPLETED)
        if not answer.done():
            answer.cancel()
            task.result()  # the lifespan crashed: raise its error
            raise RuntimeError("The app's lifespan returned without completing its startup")
        message = answer.result()
        if message["type"] != "lifespan.startup.complete":
            raise RuntimeError(f"The app's lifespan startup failed: {message.get('message', '')}")
        logger.info("The server sent no lifespan events (as daphne does): started the app's lifespan on first use")
        return state
