from __future__ import annotations

import asyncio
import logging
import os
import sys
from typing import TYPE_CHECKING, Any

from starlette.requests import HTTPConnection  # FastAPI reads this annotation at runtime

from ._types import Receive, Scope, Send

if TYPE_CHECKING:
    from ._app import PomoWS
    from ._broadcaster import Broadcaster

__all__ = [
    "get_broadcaster",
    "install_bare_route",
    "route_from_scope",
    "route_loaded_apps_soon",
    "warn_if_unshared_in_workers",
]

logger = logging.getLogger("starlette_pomo_ws")


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


def install_bare_route(app: Any, pomo: PomoWS) -> bool:
    """Add a WebSocket route for every mount of `pomo` on a Starlette or FastAPI app (once).

    Returns whether the app (or router) mounts `pomo`.
    """
    router = getattr(app, "router", app)
    routes = getattr(router, "routes", None)
    if not isinstance(routes, list):
        return False  # not a Starlette router (e.g. Litestar, whose plugin routes the path itself)
    from starlette.routing import Mount, WebSocketRoute

    found = False
    for route in list(routes):
        if isinstance(route, Mount) and route.app is pomo:
            prefix = route.path
            already = any(
                isinstance(r, WebSocketRoute) and r.path == prefix and isinstance(r.app, _BarePath) for r in routes
            )
            found = True
            if prefix and not already:  # just before the mount, so that it wins for the exact path
                routes.insert(routes.index(route), WebSocketRoute(prefix, _BarePath(pomo, prefix)))
    return found


def route_from_scope(scope: Scope, pomo: PomoWS) -> None:
    """Route the bare path of the app that a request reached `pomo` through, even without `pomo.lifespan`."""
    router = scope.get("router")
    if router is not None:
        install_bare_route(router, pomo)


# Without `pomo.lifespan`, nothing of ours runs before Starlette refuses a WebSocket to the bare `/ws`
# (HTTP 403, nothing logged). The uvicorn CLI imports the app inside its running event loop, so a `PomoWS`
# made there can look at the apps once the import is done, and route the bare path of the ones that mount
# it: then `/ws` fails as loudly as `/ws/` (1011 and the NotStartedError line). It only ever adds the route
# that `pomo.lifespan(app)` would add.


def route_loaded_apps_soon(pomo: PomoWS) -> None:
    """When a server imports the app inside its running event loop, route the bare path of module-level apps
    once the import is done. Only under a server we know (a scan of the loaded modules takes some 30 ms)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return
    if server_workers(sys.argv, os.environ) is None:
        return
    loop.call_soon(route_loaded_apps, pomo)


def route_loaded_apps(pomo: PomoWS) -> None:
    """Route the bare path of every module-level Starlette app that mounts `pomo`; when none does and a
    Litestar app has no `PomoWSPlugin`, say that the plugin is missing."""
    if pomo.broadcaster.running:
        return
    from starlette.applications import Starlette

    litestar = sys.modules.get("litestar")
    litestar_app = getattr(litestar, "Litestar", None)
    mounted = False
    unplugged: list[str] = []
    for name, module in list(sys.modules.items()):
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        for attribute, value in list(namespace.items()):
            try:
                if isinstance(value, Starlette):
                    mounted = install_bare_route(value, pomo) or mounted
                elif isinstance(litestar_app, type) and isinstance(value, litestar_app):
                    plugins = _pomo_plugins(value)
                    mounted = mounted or any(plugin.pomo is pomo for plugin in plugins)
                    if not plugins:
                        unplugged.append(f"{name}:{attribute}")
            except Exception:  # an odd module attribute (a proxy whose __class__ raises): not an app of ours
                continue
    if not mounted:
        for app in unplugged:
            logger.error(
                "The Litestar app %s does not use PomoWSPlugin, so the WebSocket path is not routed and the "
                'broadcaster never starts: add `plugins=[PomoWSPlugin(pomo, path="/ws")]` '
                "(from starlette_pomo_ws.litestar import PomoWSPlugin).",
                app,
            )


def _pomo_plugins(app: Any) -> list[Any]:
    from .litestar import PomoWSPlugin

    plugins = getattr(getattr(app, "plugins", None), "init", ())
    return [plugin for plugin in plugins if isinstance(plugin, PomoWSPlugin)]


_SERVERS = {"uvicorn", "gunicorn", "hypercorn", "granian"}
_WORKER_FLAGS = {"--workers", "-w"}


def server_workers(argv: list[str], environ: Any) -> tuple[str, int] | None:
    """The server program and its worker count, when `argv` runs one of the servers we know.

    A uvicorn worker is spawned by multiprocessing, which gives it the supervisor's `sys.argv`; a gunicorn
    worker is forked, with the same. `WEB_CONCURRENCY` is the default both servers read.
    """
    if not argv:
        return None
    parts = argv[0].replace("\\", "/").split("/")
    program = parts[-2] if parts[-1] == "__main__.py" and len(parts) > 1 else parts[-1]
    program = program.removesuffix(".exe")
    if program not in _SERVERS:
        return None
    if program == "uvicorn" and "--reload" in argv:
        return program, 1  # uvicorn runs one process under its reloader, whatever --workers says
    count: str | None = None
    for index, arg in enumerate(argv[1:], start=1):
        flag, equals, value = arg.partition("=")
        if flag in _WORKER_FLAGS and equals:
            count = value
        elif arg in _WORKER_FLAGS and index + 1 < len(argv):
            count = argv[index + 1]
        elif arg.startswith("-w") and arg[2:].isdigit():
            count = arg[2:]
    if count is None:
        count = environ.get("WEB_CONCURRENCY")
    try:
        return program, int(count) if count is not None else 1
    except ValueError:
        return None


def warn_if_unshared_in_workers(shared: bool) -> None:
    """Warn at startup when a process-local backend runs in one of several server workers."""
    if shared:
        return
    found = server_workers(sys.argv, os.environ)
    if found is not None and found[1] > 1:
        program, count = found
        logger.warning(
            "The memory backend runs in one of %d %s workers: each worker reaches only its own sockets, so "
            "clients connected to another worker miss its events. Set POMO_WS_BACKEND_URL=redis://HOST:6379/0 "
            "(pip install 'starlette-pomo-ws[redis]'), or run a single worker.",
            count,
            program,
        )
