from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.requests import HTTPConnection  # FastAPI reads this annotation at runtime

from ._types import Receive, Scope, Send

if TYPE_CHECKING:
    from ._app import PomoWS
    from ._broadcaster import Broadcaster

__all__ = ["get_broadcaster", "install_bare_route"]


def get_broadcaster(request: HTTPConnection) -> Broadcaster:
    """The broadcaster of the current request, for FastAPI's `Depends(get_broadcaster)`.

    Raises:
        NotStartedError: `pomo.lifespan` was not wired into the app.
    """
    broadcaster: Broadcaster | None = getattr(request.state, "broadcaster", None)
    if broadcaster is None:
        from ._broadcaster import _NOT_STARTED
        from .exceptions import NotStartedError

        raise NotStartedError(_NOT_STARTED)
    return broadcaster


class _BarePath:
    """Routes the exact mount path (`/ws`, no slash) to the mounted app, which `Mount` does not match."""

    def __init__(self, app: PomoWS, prefix: str) -> None:
        self.app = app
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope = dict(scope)
        scope["root_path"] = scope.get("root_path", "") + self.prefix
        await self.app(scope, receive, send)


def install_bare_route(app: Any, pomo: PomoWS) -> None:
    """Add a WebSocket route for every mount of `pomo` on a Starlette or FastAPI app (once)."""
    router = getattr(app, "router", None)
    routes = getattr(router, "routes", None)
    if not isinstance(routes, list):
        return  # not a Starlette router (e.g. Litestar, whose plugin routes the path itself)
    from starlette.routing import Mount, WebSocketRoute

    for route in list(routes):
        if isinstance(route, Mount) and route.app is pomo:
            prefix = route.path
            already = any(
                isinstance(r, WebSocketRoute) and r.path == prefix and isinstance(r.app, _BarePath) for r in routes
            )
            if prefix and not already:  # just before the mount, so that it wins for the exact path
                routes.insert(routes.index(route), WebSocketRoute(prefix, _BarePath(pomo, prefix)))
