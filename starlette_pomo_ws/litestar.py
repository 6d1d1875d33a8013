"""Litestar integration: `Litestar(plugins=[PomoWSPlugin(pomo, path="/ws")])`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from litestar import asgi
from litestar.di import Provide

try:
    from litestar.plugins import InitPlugin
except ImportError:  # Litestar < 2.13 names it InitPluginProtocol
    from litestar.plugins import InitPluginProtocol as InitPlugin  # type: ignore[assignment]

from ._broadcaster import Broadcaster
from ._types import ASGIApp, Receive, Scope, Send

if TYPE_CHECKING:
    from litestar.config.app import AppConfig

    from ._app import PomoWS

__all__ = ["PomoWSPlugin"]


class PomoWSPlugin(InitPlugin):
    """Mounts a `PomoWS` app, runs its lifespan, and provides the broadcaster.

    It adds the mount at `path` (WebSockets reach it at both `/ws` and `/ws/`), appends
    `pomo.lifespan` to the app's lifespan, sets `request.state.broadcaster` on every request and
    registers a `broadcaster` dependency. Passing `pomo.lifespan` yourself as well is harmless.

    Args:
        pomo: the app to mount.
        path: where to mount it.
        dependency_key: the name of the dependency that provides the `Broadcaster`.
    """

    def __init__(self, pomo: PomoWS, *, path: str = "/ws", dependency_key: str = "broadcaster") -> None:
        self.pomo = pomo
        self.path = path
        self.dependency_key = dependency_key

    def __repr__(self) -> str:
        return f"PomoWSPlugin(path={self.path!r})"

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        pomo = self.pomo

        @asgi(self.path, is_mount=True, copy_scope=True)
        async def pomo_ws_mount(scope: Scope, receive: Receive, send: Send) -> None:
            await pomo(scope, receive, send)

        def provide_broadcaster() -> Broadcaster:
            return pomo.broadcaster

        def state_middleware(app: ASGIApp) -> ASGIApp:
            async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
                state: dict[str, Any] = scope.setdefault("state", {})
                state.setdefault("broadcaster", pomo.broadcaster)
                await app(scope, receive, send)

            return middleware

        app_config.route_handlers.append(pomo_ws_mount)
        app_config.lifespan.append(pomo.lifespan)
        app_config.middleware.insert(0, cast(Any, state_middleware))
        app_config.signature_namespace.setdefault("Broadcaster", Broadcaster)
        app_config.dependencies[self.dependency_key] = Provide(provide_broadcaster, sync_to_thread=False)
        return app_config
