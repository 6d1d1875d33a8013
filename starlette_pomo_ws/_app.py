from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import resources
from typing import Any

from starlette.requests import HTTPConnection
from starlette.responses import JSONResponse, Response

from ._auth import (
    NO_TOKEN,
    OTHER_USER,
    Authenticate,
    JWTAuthenticator,
    Principal,
    RefusalLog,
    origin_allowed,
    raw_header,
    user_id_problem,
)
from ._broadcaster import _NOT_STARTED, Broadcaster, fit_reason
from ._channels import AuthorizeChannel
from ._connection import Connection
from ._events import CursorSigner, iso_timestamp
from ._lifespan import install_bare_route, route_from_scope, route_loaded_apps_soon, warn_if_unshared_in_workers
from ._metrics import MetricsCollector
from ._outbox import send_close
from ._settings import Settings
from ._types import Message, Receive, Scope, Send
from ._wrap import Wrapped
from .backends import create_backend
from .backends.base import Backend
from .exceptions import AuthenticationError, BackendUnavailable

__all__ = ["PomoWS"]

logger = logging.getLogger("starlette_pomo_ws")

OnMessage = Callable[[Connection, dict[str, Any]], Awaitable[None]]
_MAX_STRIKES = 10
# The client message types handled here, without an on_message.
_CLIENT_TYPES = ("PING", "REFRESH_TOKEN", "SUBSCRIBE", "UNSUBSCRIBE", "PRESENCE")


class PomoWS:
    """The ASGI app to mount at `/ws`: authenticated WebSockets, `/health` and `/client.js`.

    Args:
        settings: the settings; `None` reads them from the environment (`Settings.from_env()`).
        backend: a ready backend that overrides `settings.backend_url`, e.g.
            `RedisBackend(client=redis.asyncio.Redis(...))`.
        authenticate: replaces the JWT check: an async callable that receives the handshake's
            `HTTPConnection` and returns a `Principal`, or raises `AuthenticationError(reason)`.
        on_message: receives client messages of types the protocol does not handle itself.
        authorize_channel: decides who may subscribe to a channel, on every subscribe and every resume:
            `async (principal, channel) -> bool`. Without it, the token's `channels` claim does (a list of
            exact names and `prefix*` patterns); with neither, every subscribe is refused.

    Attributes:
        settings: the settings in force.
        broadcaster: the `Broadcaster`, also for code outside requests (background jobs).

    Example:
        ```python
        pomo = PomoWS(Settings(jwt_secret=...))
        app = Starlette(lifespan=pomo.lifespan)
        app.mount("/ws", pomo)
        ```
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        backend: Backend | None = None,
        authenticate: Authenticate | None = None,
        on_message: OnMessage | None = None,
        authorize_channel: AuthorizeChannel | None = None,
    ) -> None:
        self.settings = Settings.from_env() if settings is None else settings
        self._custom_backend = backend is not None
        if backend is None:
            backend = create_backend(self.settings)
        self._custom_authenticate = authenticate is not None
        self._authenticate: Authenticate | None = authenticate
        self.on_message = on_message
        self.broadcaster = Broadcaster(self.settings, backend, authorize_channel)
        self._starts = 0
        self._metrics_collector: MetricsCollector | None = None
        self._metrics_registry: Any = None
        self._refusals = RefusalLog()
        self._scope_routed = False
        route_loaded_apps_soon(self)

    def __repr__(self) -> str:
        return f"PomoWS(settings={self.settings!r}, backend={self.broadcaster.backend!r})"

    def wrap(self, app: Any, *, path: str = "/ws") -> Wrapped:
        """Wrap the whole app: run its lifespan on first use where the server sends none, and route
        WebSockets under `path` straight to this app.

        Needed under daphne, which sends no lifespan events: `application = pomo.wrap(app)`. Elsewhere it
        is optional: it keeps WebSocket traffic out of the framework's routing and exception wrapper
        (and out of the app's own middleware). The app is still set up as usual, with
        `lifespan=pomo.lifespan` and `app.mount(path, pomo)`.

        Args:
            app: the ASGI app (Starlette, FastAPI, or any app whose lifespan starts this one).
            path: the mount path; `""` routes no WebSocket directly.
        """
        return Wrapped(app, self, path)

    @property
    def metrics_collector(self) -> MetricsCollector:
        """A prometheus_client collector of this app's `pomo_ws_*` metrics, for your own registry."""
        if self._metrics_collector is None:
            self._metrics_collector = MetricsCollector(self.broadcaster)
        return self._metrics_collector

    async def metrics_app(self, scope: Scope, receive: Receive, send: Send) -> None:
        """An ASGI app serving the metrics in the Prometheus text format; mount it anywhere.

        `GET /ws/metrics` serves the same when `Settings(metrics=True)`. Needs the `metrics` extra.
        """
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

        if self._metrics_registry is None:
            registry = CollectorRegistry(auto_describe=False)
            registry.register(self.metrics_collector)
            self._metrics_registry = registry
        body = generate_latest(self._metrics_registry)
        await Response(body, headers={"content-type": CONTENT_TYPE_LATEST})(scope, receive, send)

    # -- lifespan -----------------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Any = None) -> AsyncIterator[dict[str, Any]]:
        """Start the broadcaster for the app's lifetime and yield `{"broadcaster": ...}` as lifespan state.

        Use it as `lifespan=pomo.lifespan`, or inside your own lifespan:
        `async with pomo.lifespan(app) as state: yield {**state, ...}`. It also routes the bare `/ws`
        WebSocket path, which a Starlette `Mount("/ws")` does not match. Starting twice is harmless.

        Raises:
            ConfigurationError: the settings cannot serve (missing key, contradictory settings).
        """
        if app is not None:
            install_bare_route(app, self)
        await self.start()
        try:
            yield {"broadcaster": self.broadcaster}
        finally:
            await self.stop()

    async def start(self) -> None:
        """Check the settings and start the broadcaster (counted: only the first call starts)."""
        self._starts += 1
        if self._starts > 1:
            return
        try:
            settings = self.settings
            settings.check(custom_authenticate=self._custom_authenticate)
            if self._authenticate is None:
                self._authenticate = JWTAuthenticator(settings)
            shared = self.broadcaster.backend.shared
            await self.broadcaster.start(CursorSigner(settings.derived_cursor_key(shared=shared)))
        except BaseException:
            self._starts -= 1
            raise
        logger.info("starlette-pomo-ws started (%r, node %s)", self.broadcaster.backend, self.broadcaster.node_id)
        warn_if_unshared_in_workers(shared)

    async def stop(self) -> None:
        """Stop the broadcaster when the last `start()` is matched; close every socket with 1001."""
        if self._starts == 0:
            return
        self._starts -= 1
        if self._starts == 0:
            await self.broadcaster.stop()
            logger.info("starlette-pomo-ws stopped")

    # -- ASGI -----------------------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self._scope_routed:  # the bare path also fails loudly when the lifespan was forgotten
            self._scope_routed = True
            route_from_scope(scope, self)
        kind = scope["type"]
        if kind == "websocket":
            await self._websocket(scope, receive, send)
        elif kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":  # mounted apps normally get none, but be a good ASGI citizen
            await self._lifespan_protocol(receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = _route_path(scope)
        if path in ("/health", "/health/"):
            status, body = self.broadcaster.health()
            if not self.settings.health_details:  # a public health check need not show how busy the node is
                body.pop("connections", None)
                body.pop("users", None)
            if not self.broadcaster.running:
                body["error"] = "pomo.lifespan is not wired; see the Lifespan composition docs"
            response: Response = JSONResponse(body, status_code=status, headers={"cache-control": "no-store"})
        elif path == "/metrics" and self.settings.metrics:
            await self.metrics_app(scope, receive, send)
            return
        elif path == "/client.js":
            content = resources.files("starlette_pomo_ws").joinpath("static/pomo-ws.js").read_bytes()
            response = Response(content, media_type="text/javascript", headers={"cache-control": "no-cache"})
        else:
            response = JSONResponse({"detail": "Not Found"}, status_code=404)
        await response(scope, receive, send)

    async def _lifespan_protocol(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.start()
                except Exception as exc:
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    raise
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        broadcaster = self.broadcaster
        settings = self.settings
        # Select "bearer" spelled as the client offered it: a client refuses a subprotocol it did not offer.
        subprotocol = next((name for name in scope.get("subprotocols") or () if name.strip().lower() == "bearer"), None)
        if not broadcaster.accepting:
            if not broadcaster.running:
                logger.error("NotStartedError: %s", _NOT_STARTED)
                broadcaster.stats.rejected["not_started"] += 1
                await _refuse(send, subprotocol, 1011, "Internal error")
            else:
                broadcaster.stats.rejected["shutdown"] += 1
                await _refuse(send, subprotocol, 1001, "Server shutting down")
            return
        connection_info = HTTPConnection(scope)
        origin = raw_header(scope, b"origin")
        if not origin_allowed(origin, settings.allowed_origins, cookie_auth=_uses_cookie(connection_info, settings)):
            self._refusals.refused("origin", "Origin not allowed", f"origin {origin!r}", scope.get("client"))
            broadcaster.stats.rejected["origin"] += 1
            await _refuse(send, subprotocol, 1008, "Origin not allowed")
            return
        assert self._authenticate is not None
        try:
            principal = await self._authenticate(connection_info)
            if not isinstance(principal, Principal):
                raise TypeError(f"authenticate returned {type(principal).__name__}, not a Principal")
            if problem := user_id_problem(principal.user_id):
                raise AuthenticationError(detail=f"authenticate returned an unusable user id: {problem}")
        except AuthenticationError as exc:
            self._refusals.refused("auth", exc.reason or NO_TOKEN, exc.detail, scope.get("client"))
            broadcaster.stats.rejected["auth"] += 1
            await _refuse(send, subprotocol, 1008, exc.reason or NO_TOKEN)
            return
        except Exception:
            logger.exception("The authenticate callable failed")
            broadcaster.stats.rejected["error"] += 1
            await _refuse(send, subprotocol, 1011, "Internal error")
            return
        connection = Connection(broadcaster, principal, send, scope)
        try:
            admitted = await broadcaster.admit(connection)
        except Exception:
            logger.exception("Could not admit a connection for user %r", principal.user_id)
            broadcaster.stats.rejected["error"] += 1
            await _refuse(send, subprotocol, 1011, "Internal error")
            return
        if not admitted:
            self._refusals.refused(
                "limit", "Too many connections for this user", f"user {principal.user_id!r}", scope.get("client")
            )
            broadcaster.stats.rejected["limit"] += 1
            await _refuse(send, subprotocol, 1008, "Too many connections for this user")
            return
        query = connection_info.query_params
        last_event_id = query.get("last_event_id")
        channels = [name for name in query.get("channels", "").split(",") if name]
        # This frame lives as long as the socket: every object it holds is walked by each full garbage
        # collection, 10,000 times over at 10,000 sockets.
        del connection_info, query
        try:
            await send({"type": "websocket.accept", "subprotocol": subprotocol})
            broadcaster.stats.accepted += 1
            await connection.accepted()
            logger.info("WebSocket connected: user %r, connection %s", connection.user_id, connection.id)
            try:
                await broadcaster.establish(connection, last_event_id, channels)
            except Exception:
                logger.exception("Could not establish connection %s", connection.id)
                connection.abort(1011, "Internal error")
            await self._read(connection, receive)
        finally:
            connection.release()
            logger.info("WebSocket disconnected: user %r, connection %s", connection.user_id, connection.id)

    async def _read(self, connection: Connection, receive: Receive) -> None:
        max_size = self.settings.max_message_size
        while not connection.dead:
            try:
                message = await receive()
            except BaseException as exc:
                if isinstance(exc, Exception) or connection.reader_cancelled():
                    return
                if isinstance(exc, asyncio.CancelledError):
                    # The server cancels the handler: it is going away (hypercorn and granian do this at
                    # shutdown, before the lifespan's). Tell the client so, with a short bounded wait.
                    await connection.going_away()
                raise
            kind = message["type"]
            if kind == "websocket.disconnect":
                connection.disconnected(message.get("code") or 1005)
                return
            if kind != "websocket.receive" or connection.released():
                continue
            text = message.get("text")
            if text is None:
                if len(message.get("bytes") or b"") > max_size:
                    connection.abort(1009, "Message too big")
                elif self._within_rate(connection):
                    _error(connection, "binary_not_supported", "Binary frames are not supported; send JSON text.")
                continue
            if len(text) > max_size // 4 and len(text.encode()) > max_size:
                connection.abort(1009, "Message too big")
                continue
            if self._within_rate(connection):
                await self._handle(connection, text)

    @staticmethod
    def _within_rate(connection: Connection) -> bool:
        """Take a token from the connection's bucket; over the rate, answer ERROR, and close a flood with 1008."""
        if connection.take_token(time.monotonic()):
            return True
        if connection.strikes >= _MAX_STRIKES:
            connection.abort(1008, "Too many messages")
        else:
            _error(connection, "rate_limited", "Too many messages; slow down.")
        return False

    async def _handle(self, connection: Connection, text: str) -> None:
        try:
            payload = json.loads(text)
        except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
            _error(connection, "invalid_json", "Messages must be JSON.")
            return
        if not isinstance(payload, dict):
            _error(connection, "not_an_object", "Messages must be JSON objects with a string 'type'.")
            return
        type_ = payload.get("type")
        if not isinstance(type_, str) or not type_:
            _error(connection, "missing_type", "Messages must have a string 'type'.")
            return
        if type_ == "PING":
            connection.notify("PONG")
        elif type_ == "REFRESH_TOKEN":
            await self._refresh(connection, payload.get("data"))
        elif type_ in ("SUBSCRIBE", "UNSUBSCRIBE", "PRESENCE"):
            await self._channel_message(connection, type_, payload.get("data"))
        elif self.on_message is not None:
            try:
                await self.on_message(connection, payload)
            except Exception:
                logger.exception("on_message failed for connection %s (user %r)", connection.id, connection.user_id)
                _error(connection, "handler_error", "The server could not handle this message.")
        else:
            accepted = ", ".join(_CLIENT_TYPES[:-1]) + " and " + _CLIENT_TYPES[-1]
            _error(connection, "unknown_type", f"Unknown message type {type_[:64]!r}; this server accepts {accepted}.")

    async def _channel_message(self, connection: Connection, type_: str, data: Any) -> None:
        channels = self.broadcaster.channels
        if not isinstance(data, dict) or "channel" not in data:
            _error(connection, "invalid_message", f"{type_} needs data.channel.")
            return
        name = data["channel"]
        try:
            if type_ == "SUBSCRIBE":
                await channels.subscribe(connection, name, data.get("since"))
            elif type_ == "UNSUBSCRIBE":
                channels.unsubscribe(connection, name)
            else:
                await channels.answer_presence(connection, name)
        except BackendUnavailable:
            _error(connection, "unavailable", "The server cannot reach its backend right now; try again.")

    async def _refresh(self, connection: Connection, data: Any) -> None:
        token = data.get("token") if isinstance(data, dict) else None
        if not isinstance(token, str) or not token:
            _error(connection, "invalid_token", "REFRESH_TOKEN needs data.token.")
            return
        assert self._authenticate is not None
        # Re-run the same authentication as a handshake, with the new token as the only credential.
        scope = dict(connection.scope)
        scope["headers"] = [(b"authorization", b"Bearer " + token.encode("latin-1", "replace"))] + [
            (k, v) for k, v in scope.get("headers", []) if k not in (b"authorization", b"cookie")
        ]
        scope["query_string"] = b""
        scope["subprotocols"] = []
        try:
            principal = await self._authenticate(HTTPConnection(scope))
            if not isinstance(principal, Principal):
                raise TypeError(f"authenticate returned {type(principal).__name__}, not a Principal")
        except AuthenticationError as exc:
            _error(connection, "invalid_token", exc.reason)
            return
        except Exception:
            logger.exception("The authenticate callable failed during a token refresh")
            _error(connection, "invalid_token", "Invalid authentication token")
            return
        if principal.user_id != connection.user_id:
            logger.warning("Connection %s (user %r) sent a token for another user", connection.id, connection.user_id)
            connection.abort(1008, OTHER_USER)
            return
        connection.principal = principal
        connection.expires_at = principal.expires_at
        self.broadcaster.schedule_expiry(connection)
        expires = iso_timestamp(principal.expires_at) if principal.expires_at is not None else None
        connection.notify("TOKEN_REFRESHED", {"expiresAt": expires})


def _route_path(scope: Scope) -> str:
    path: str = scope.get("path", "")
    root_path: str = scope.get("root_path", "")
    if root_path and path.startswith(root_path):
        path = path[len(root_path) :]
    return path or "/"


def _uses_cookie(connection: HTTPConnection, settings: Settings) -> bool:
    return settings.token_cookie is not None and settings.token_cookie in connection.cookies


def _error(connection: Connection, code: str, message: str) -> None:
    connection.notify("ERROR", {"code": code, "message": message})


async def _refuse(send: Send, subprotocol: str | None, code: int, reason: str) -> None:
    # Accept, then close: under uvicorn a close before accept becomes HTTP 403 and the reason is lost.
    accept: Message = {"type": "websocket.accept", "subprotocol": subprotocol}
    await send(accept)
    await send_close(send, code, fit_reason(reason))
