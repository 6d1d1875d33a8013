"""A test kit for your own app: run its lifespan, connect users in-process, assert on their events.

```python
from starlette_pomo_ws.testing import PomoTestClient


async def test_task_created() -> None:
    async with PomoTestClient(app) as client, client.connect("u1") as ws:
        await client.broadcaster.broadcast_to_user("u1", "TASK_CREATED", {"title": "Write docs"})
        await ws.expect("TASK_CREATED", data={"title": "Write docs"})


async def test_team_channel() -> None:
    async with PomoTestClient(app) as client, client.connect("u1", claims={"channels": ["team:*"]}) as ws:
        await ws.subscribe("team:42")
        await client.broadcaster.broadcast_to_channel("team:42", "TIMER_STARTED", {"minutes": 25})
        await ws.expect("TIMER_STARTED", channel="team:42")
```

Everything runs in the test's own event loop (asyncio; with pytest use the anyio plugin and pin
`anyio_backend` to `"asyncio"`), and every wait is bounded: a missing event fails the test with a
message that says what was expected, it never hangs. The WebSocket client and the lifespan runner
are built in and need no extra dependency; `PomoTestClient.http` needs `httpx`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit

from ._settings import _HMAC_ALGORITHMS, Settings
from ._types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    import httpx

    from ._app import PomoWS
    from ._broadcaster import Broadcaster

__all__ = [
    "ChannelRefused",
    "PomoTestClient",
    "PomoWebSocket",
    "ReceiveTimeout",
    "WebSocketClosed",
    "mint_token",
    "run_lifespan",
]

# Any ASGI app. Frameworks declare their own, mutually incompatible, types for scope and messages
# (Litestar's are TypedDicts), so a precise Callable type would reject some of them.
AnyASGIApp = Any

#: Event types that `expect()` and `assert_no_event()` skip unless told otherwise: they may arrive at any time.
DEFAULT_SKIP: tuple[str, ...] = ("HEARTBEAT",)
#: Protocol messages that name their channel in `data.channel` (channel events carry it in the envelope).
_CHANNEL_PROTOCOL = frozenset(
    {"SUBSCRIBED", "UNSUBSCRIBED", "PRESENCE", "PRESENCE_JOIN", "PRESENCE_LEAVE", "RESYNC_REQUIRED", "ERROR"}
)


def _channel_of(message: Mapping[str, Any]) -> Any:
    """The channel a message is about: the envelope's `channel`, or `data.channel` of a protocol message."""
    if "channel" in message:
        return message["channel"]
    data = message.get("data")
    if message.get("type") in _CHANNEL_PROTOCOL and isinstance(data, dict):
        return data.get("channel")
    return None


def _is_cursor(message: Mapping[str, Any]) -> bool:
    """Whether a message's `id` is a cursor to resume from.

    `SUBSCRIBED` (and a `RESYNC_REQUIRED` of one channel) carry the position of one channel, which
    may be ahead of user events still in flight; a retained event carries no position at all.
    """
    if not isinstance(message.get("id"), str) or message.get("retained") is True:
        return False
    if message.get("type") == "SUBSCRIBED":
        return False
    return not (message.get("type") == "RESYNC_REQUIRED" and _channel_of(message) is not None)


class _Any:
    def __repr__(self) -> str:
        return "ANY"


_ANY: Any = _Any()


class ReceiveTimeout(AssertionError, TimeoutError):
    """Nothing (or not the expected message) arrived in time.

    It is an `AssertionError`, so pytest reports it as a failed assertion, and a `TimeoutError`.
    """


class WebSocketClosed(Exception):
    """The server closed the WebSocket (or refused the handshake) while the test waited for a message.

    Attributes:
        code: the close code, e.g. 1008.
        reason: the close reason, e.g. `"Invalid authentication token"`.
    """

    def __init__(self, code: int, reason: str = "", *, waiting_for: str | None = None) -> None:
        text = f"WebSocket closed with {code}" + (f": {reason!r}" if reason else "")
        super().__init__(text + (f" while waiting for {waiting_for}" if waiting_for else ""))
        self.code = code
        self.reason = reason


class ChannelRefused(AssertionError):
    """The server answered `subscribe()` or `presence()` with an `ERROR` (e.g. `forbidden`).

    Attributes:
        channel: the channel asked for.
        code: the `ERROR` code: `forbidden`, `invalid_channel`, `too_many_channels`,
            `not_presence_channel`, `rate_limited`.
        message: the `ERROR` message, for people.
    """

    def __init__(self, channel: str, code: str, message: str = "") -> None:
        super().__init__(f"Channel {channel!r} refused: ERROR {code}" + (f": {message}" if message else ""))
        self.channel = channel
        self.code = code
        self.message = message


def mint_token(
    settings: Settings,
    user_id: str | int,
    *,
    ttl: float | None = 300,
    key: str | None = None,
    algorithm: str | None = None,
    **claims: Any,
) -> str:
    """Mint a JWT that `settings` accept, for `user_id`.

    The token carries `settings.user_id_claim` (a string when that claim is `sub`), `exp` (unless
    `ttl` is `None`), and the audience and issuer when the settings check them. Extra keyword
    arguments become claims and override these.

    Args:
        settings: the settings of the app under test.
        user_id: the user the token is for.
        ttl: seconds until `exp`; `None` mints a token without `exp` (refused unless `jwt_require_exp` is off).
        key: the signing key. Defaults to `settings.jwt_secret`, which only works for HMAC algorithms:
            for RS256/ES256/EdDSA pass the private key that matches the public key in the settings.
        algorithm: defaults to the first of `settings.jwt_algorithms`.
        **claims: more claims, e.g. `iat=...`, `role="admin"`, or `channels=["team:42", "board:*"]`
            (the channels the token may subscribe to, when the app has no `authorize_channel`).

    Returns:
        The encoded token.

    Raises:
        ValueError: there is no key to sign with.
    """
    import jwt

    algorithm = algorithm or settings.jwt_algorithms[0]
    if key is None:
        if algorithm not in _HMAC_ALGORITHMS or not settings.jwt_secret:
            raise ValueError(
                f"mint_token() cannot sign {algorithm} tokens with the settings alone; pass key= with the private "
                "key (or an HMAC secret)."
            )
        key = settings.jwt_secret
    if settings.user_id_claim == "sub":
        user_id = str(user_id)  # RFC 7519: `sub` is a string, and PyJWT refuses anything else
    payload: dict[str, Any] = {settings.user_id_claim: user_id}
    if ttl is not None:
        payload["exp"] = int(time.time() + ttl)
    if settings.jwt_audience is not None:
        payload["aud"] = settings.jwt_audience
    if settings.jwt_issuer is not None:
        payload["iss"] = settings.jwt_issuer
    payload.update(claims)
    return jwt.encode(payload, key, algorithm=algorithm)


# -- the lifespan ---------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def run_lifespan(app: AnyASGIApp, *, timeout: float = 10.0) -> AsyncIterator[dict[str, Any]]:
    """Run an ASGI app's lifespan around a block, as a server would, and yield its lifespan state.

    Startup errors (for example a `ConfigurationError` from `pomo.lifespan`) are raised here, with
    their own type. Startup and shutdown each get `timeout` seconds.

    Args:
        app: the ASGI app (Starlette, FastAPI, Litestar or any other).
        timeout: seconds allowed for startup, and again for shutdown.

    Yields:
        The lifespan state, e.g. `{"broadcaster": Broadcaster}`.

    Raises:
        TimeoutError: startup or shutdown took longer than `timeout`.
        RuntimeError: the app reported a failure without raising.
    """
    state: dict[str, Any] = {}
    to_app: asyncio.Queue[Message] = asyncio.Queue()
    from_app: asyncio.Queue[Message] = asyncio.Queue()
    scope: Scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": state}

    async def receive() -> Message:
        return await to_app.get()

    async def send(message: Message) -> None:
        from_app.put_nowait(message)

    task = asyncio.ensure_future(app(scope, receive, send))
    try:
        to_app.put_nowait({"type": "lifespan.startup"})
        await _lifespan_step(task, from_app, "startup", timeout)
    except BaseException:
        await _cancel(task)
        raise
    failed = False
    try:
        yield state
    except BaseException:
        failed = True
        raise
    finally:
        to_app.put_nowait({"type": "lifespan.shutdown"})
        try:
            await _lifespan_step(task, from_app, "shutdown", timeout)
            await asyncio.wait_for(asyncio.shield(task), timeout)
        except BaseException:
            await _cancel(task)
            if not failed:
                raise


async def _lifespan_step(
    task: asyncio.Future[None], from_app: asyncio.Queue[Message], step: str, timeout: float
) -> None:
    getter = asyncio.ensure_future(from_app.get())
    waiting: set[asyncio.Future[Any]] = {task, getter}
    try:
        done, _ = await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not getter.done():
            getter.cancel()
    if getter in done:
        message = getter.result()
        if message["type"] == f"lifespan.{step}.complete":
            return
        if message["type"] == f"lifespan.{step}.failed":
            # Starlette sends `failed` and then re-raises: prefer the app's own exception.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait({task}, timeout=timeout)
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
            raise RuntimeError(f"Lifespan {step} failed: {message.get('message', '')}")
        raise RuntimeError(f"Unexpected lifespan message during {step}: {message!r}")
    if task in done:
        exc = task.exception()
        if exc is not None:
            raise exc
        raise RuntimeError(f"The app returned during lifespan {step} without completing it; does it support lifespan?")
    raise TimeoutError(f"Lifespan {step} did not complete within {timeout} s")


async def _cancel(task: asyncio.Future[Any]) -> None:
    if not task.done():
        task.cancel()
        # asyncio.wait, not `await task`: a cancellation of the caller itself must still propagate.
        await asyncio.wait({task})
    if not task.cancelled():
        task.exception()  # mark it retrieved: the caller reports the failure that matters


# -- the client -------------------------------------------------------------------------------------------


class PomoTestClient:
    """Runs an app's lifespan and connects users to it in-process, in the test's own event loop.

    Use it as an async context manager: entering runs the lifespan (so `pomo.lifespan` starts, and
    a misconfiguration raises here), leaving closes every socket it opened and shuts the app down.

    Args:
        app: your Starlette, FastAPI or Litestar app (with `pomo.lifespan` wired or the Litestar plugin).
        settings: the settings to mint tokens with; by default those of the app's `PomoWS`.
        ws_path: where `PomoWS` is mounted.
        timeout: the default bound, in seconds, of every wait (lifespan, handshake, `receive`).
        run_lifespan: `False` when something else already runs the app's lifespan.

    Example:
        ```python
        async with PomoTestClient(app) as client, client.connect("u1") as ws:
            response = await client.http.post("/tasks", json={"title": "Tea"}, headers=client.auth_headers("u1"))
            await ws.expect("TASK_CREATED", data=response.json())
        ```
    """

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        app: AnyASGIApp,
        *,
        settings: Settings | None = None,
        ws_path: str = "/ws",
        timeout: float = 5.0,
        run_lifespan: bool = True,
    ) -> None:
        self._app = app
        self._settings = settings
        self.ws_path = ws_path
        self.timeout = timeout
        self._run_lifespan = run_lifespan
        self.state: dict[str, Any] = {}
        self._stack: contextlib.AsyncExitStack | None = None
        self._http: httpx.AsyncClient | None = None
        self._sockets: set[PomoWebSocket] = set()

    def __repr__(self) -> str:
        return f"PomoTestClient(app={self._app!r}, ws_path={self.ws_path!r})"

    async def __aenter__(self) -> PomoTestClient:
        stack = contextlib.AsyncExitStack()
        try:
            if self._run_lifespan:
                self.state = await stack.enter_async_context(run_lifespan(self._app, timeout=max(self.timeout, 10.0)))
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            for ws in list(self._sockets):
                await ws.close()
        finally:
            # Shut the app down even when a socket did not close cleanly.
            if self._http is not None:
                await self._http.aclose()
                self._http = None
            stack, self._stack = self._stack, None
            if stack is not None:
                await stack.__aexit__(exc_type, exc, tb)

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The app under test as an ASGI app that gives every request a copy of the lifespan state."""
        if scope["type"] in ("http", "websocket"):
            scope = dict(scope)
            scope["state"] = {**self.state, **(scope.get("state") or {})}
        await self._app(scope, receive, send)

    @property
    def pomo(self) -> PomoWS | None:
        """The app's `PomoWS`, found in its routes or its Litestar plugins (`None` if there is none)."""
        return _find_pomo(self._app)

    @property
    def broadcaster(self) -> Broadcaster:
        """The running broadcaster, as handlers see it in `request.state.broadcaster`."""
        broadcaster: Broadcaster | None = self.state.get("broadcaster")
        if broadcaster is None:
            pomo = self.pomo
            if pomo is None:
                raise LookupError("No broadcaster: the app has no PomoWS mount and its lifespan state has none.")
            broadcaster = pomo.broadcaster
        return broadcaster

    @property
    def settings(self) -> Settings:
        """The settings tokens are minted with."""
        if self._settings is not None:
            return self._settings
        broadcaster: Broadcaster | None = self.state.get("broadcaster")
        if broadcaster is not None:
            return broadcaster.settings
        pomo = self.pomo
        if pomo is None:
            raise LookupError("Cannot find the app's PomoWS to mint tokens; pass PomoTestClient(app, settings=...).")
        return pomo.settings

    @property
    def http(self) -> httpx.AsyncClient:
        """An `httpx.AsyncClient` for the app's HTTP routes, in-process (needs `httpx`)."""
        if self._http is None:
            try:
                import httpx
            except ImportError as exc:  # pragma: no cover - depends on the environment
                raise ImportError(
                    "PomoTestClient.http needs httpx: pip install httpx (or 'starlette-pomo-ws[test]')."
                ) from exc
            self._http = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://testserver")
        return self._http

    def mint_token(self, user_id: str | int, *, ttl: float | None = 300, **claims: Any) -> str:
        """A token for `user_id` that the app accepts; see `mint_token`."""
        return mint_token(self.settings, user_id, ttl=ttl, **claims)

    def auth_headers(self, user_id: str | int, *, ttl: float | None = 300, **claims: Any) -> dict[str, str]:
        """`{"Authorization": "Bearer <token>"}` for `user_id`, for your own HTTP routes."""
        return {"Authorization": f"Bearer {self.mint_token(user_id, ttl=ttl, **claims)}"}

    @contextlib.asynccontextmanager
    async def connect(
        self,
        user_id: str | int | None = None,
        *,
        token: str | None = None,
        claims: Mapping[str, Any] | None = None,
        token_via: Literal["query", "subprotocol", "header"] = "query",
        path: str | None = None,
        last_event_id: str | None = None,
        channels: Sequence[str] = (),
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        subprotocols: Sequence[str] = (),
        origin: str | None = None,
        wait_established: bool = True,
        timeout: float | None = None,
        send_mode: Literal["instant", "yield", "fail"] = "instant",
    ) -> AsyncIterator[PomoWebSocket]:
        """Open a WebSocket to the app, in-process, as `user_id` (or with `token`, or with no credentials).

        By default it waits for `CONNECTION_ESTABLISHED` (stored as `ws.established`), so the
        connection is registered before your test broadcasts. A refused handshake raises
        `WebSocketClosed` with the close code and reason, e.g. 1008.

        Args:
            user_id: mint a token for this user from the app's settings.
            token: use this token instead (e.g. an expired or forged one).
            claims: more claims for the token minted for `user_id`, e.g. `{"channels": ["team:*"]}`.
            token_via: how to present the token: the `token` query parameter, the `["bearer", token]`
                subprotocol pair, or an `Authorization: Bearer` header.
            path: the WebSocket path; defaults to `ws_path` (`/ws`). It may hold a query string.
            last_event_id: resume after this event id.
            channels: channels to subscribe to in the handshake (`?channels=a,b`), and so to resume
                with `last_event_id`. Their `SUBSCRIBED` (or `ERROR`) messages follow
                `CONNECTION_ESTABLISHED`: `await ws.expect("SUBSCRIBED", channel=...)`.
            params: more query parameters.
            headers: more handshake headers (e.g. `cookie`).
            subprotocols: subprotocols to offer.
            origin: the `Origin` header (none by default, like a non-browser client).
            wait_established: wait for `CONNECTION_ESTABLISHED` before the block runs.
            timeout: the bound of this socket's waits; defaults to the client's.
            send_mode: how the server's `send` behaves: `"instant"` completes at once, `"yield"`
                switches tasks first (as hypercorn's does), `"fail"` raises `OSError` on every data
                frame (a vanished peer).

        Yields:
            The open socket; it is closed when the block ends.

        Raises:
            WebSocketClosed: the server refused or closed the connection before `CONNECTION_ESTABLISHED`.
        """
        if user_id is not None and token is not None:
            raise TypeError("Pass user_id or token, not both")
        if claims is not None and user_id is None:
            raise TypeError("claims= go into the token minted for user_id; pass user_id")
        if user_id is not None:
            token = self.mint_token(user_id, **(claims or {}))
        url = urlsplit(path if path is not None else self.ws_path)
        query = parse_qsl(url.query, keep_blank_values=True)
        hdrs = [(k.lower(), v) for k, v in (headers or {}).items()]
        offered = list(subprotocols)
        if token is not None:
            query_param = self._token_query_param()
            if token_via == "query" and query_param is not None:
                query.append((query_param, token))
            elif token_via == "subprotocol":
                offered += ["bearer", token]
            else:
                hdrs.append(("authorization", f"Bearer {token}"))
        if last_event_id is not None:
            query.append(("last_event_id", last_event_id))
        if channels:
            if isinstance(channels, str):
                raise TypeError("channels= takes a list of channel names, e.g. ['team:42'], not one string")
            query.append(("channels", ",".join(channels)))
        query.extend((params or {}).items())
        if origin is not None:
            hdrs.append(("origin", origin))
        ws = PomoWebSocket(
            self.app,
            url.path or "/",
            urlencode(query, safe=":,@"),
            hdrs,
            offered,
            self.timeout if timeout is None else timeout,
            send_mode=send_mode,
        )
        self._sockets.add(ws)
        try:
            await ws._open(wait_established)
            yield ws
        finally:
            self._sockets.discard(ws)
            await ws.close()

    def _token_query_param(self) -> str | None:
        try:
            return self.settings.token_query_param
        except LookupError:
            return "token"


def _find_pomo(app: Any, depth: int = 0) -> PomoWS | None:
    from ._app import PomoWS

    if isinstance(app, PomoWS):
        return app
    if depth > 4:
        return None
    for plugin in getattr(app, "plugins", None) or ():  # Litestar's PomoWSPlugin
        pomo = getattr(plugin, "pomo", None)
        if isinstance(pomo, PomoWS):
            return pomo
    router = getattr(app, "router", None)
    for route in getattr(router, "routes", None) or getattr(app, "routes", None) or ():
        found = _find_pomo(getattr(route, "app", None), depth + 1)
        if found is not None:
            return found
    return None


class PomoWebSocket:
    """One in-process WebSocket to the app under test. Get it from `PomoTestClient.connect()`.

    Every `receive`/`expect` waits at most `timeout` seconds, then fails with `ReceiveTimeout`
    saying what it waited for. A close by the server raises `WebSocketClosed`.

    Attributes:
        established: the `CONNECTION_ESTABLISHED` message (when `connect` waited for it).
        last_id: the last cursor received (the `id` of an event, `CONNECTION_ESTABLISHED` or
            `RESYNC_REQUIRED`; not that of `SUBSCRIBED` or a retained event): pass it as
            `last_event_id` to resume.
        subprotocol: the subprotocol the server selected.
        close_code: the server's close code, once it closed.
        close_reason: the server's close reason, once it closed.
        violations: ASGI messages the app sent after its own close, a protocol error (should stay empty).

    For tests of the ASGI protocol itself it can also be built directly, started with `start()`, and
    read message by message with `receive_message()`; `send_mode` then makes it act like another server:
    `"yield"` switches tasks in every send (a server whose `send` awaits a queue or a drain, such as
    hypercorn), `"fail"` raises `OSError` on every data frame (a peer that vanished).
    """

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        app: ASGIApp,
        path: str,
        query_string: str | bytes = "",
        headers: Sequence[tuple[str, str]] = (),
        subprotocols: Sequence[str] = (),
        timeout: float = 5.0,
        *,
        send_mode: Literal["instant", "yield", "fail"] = "instant",
    ) -> None:
        self.timeout = timeout
        self.send_mode = send_mode
        self.violations: list[Message] = []
        self.established: dict[str, Any] | None = None
        self.last_id: str | None = None
        self.subprotocol: str | None = None
        self.close_code: int | None = None
        self.close_reason: str = ""
        self._app = app
        self._path = path
        self._to_app: asyncio.Queue[Message] = asyncio.Queue()
        self._to_client: asyncio.Queue[Message | None] = asyncio.Queue()
        self._task: asyncio.Future[None] | None = None
        self._accepted = False
        self._server_closed = False
        self._close_seen = False
        self._client_closed = False
        raw_headers = [
            (b"host", b"testserver"),
            (b"connection", b"upgrade"),
            (b"upgrade", b"websocket"),
            (b"sec-websocket-version", b"13"),
            (b"sec-websocket-key", secrets.token_urlsafe(16).encode()),
        ]
        subprotocols = list(subprotocols)
        if subprotocols:
            raw_headers.append((b"sec-websocket-protocol", ", ".join(subprotocols).encode()))
        raw_headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
        self._scope: Scope = {
            "type": "websocket",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "scheme": "ws",
            "server": ("testserver", 80),
            "client": ("testclient", 50000),
            "root_path": "",
            "path": path,
            "raw_path": path.encode(),
            "query_string": query_string if isinstance(query_string, bytes) else query_string.encode(),
            "headers": raw_headers,
            "subprotocols": subprotocols,
            "state": {},
            "extensions": {},
        }

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<PomoWebSocket {self._path} {state}>"

    @property
    def closed(self) -> bool:
        """Whether either side has closed the socket."""
        return self._server_closed or self._client_closed

    @property
    def scope(self) -> Scope:
        """The ASGI scope the app receives."""
        return self._scope

    # -- the app's side of the ASGI connection ---------------------------------------------------------

    async def _app_receive(self) -> Message:
        return await self._to_app.get()

    async def _app_send(self, message: Message) -> None:
        # By default it never suspends, like a socket whose buffer has room.
        if self.send_mode == "yield":
            await asyncio.sleep(0)
        if self._server_closed:
            self.violations.append(message)  # a send after the app's own close breaks the ASGI protocol
            if message["type"] == "websocket.close":
                return
            raise OSError("Send on a closed WebSocket")
        if self._client_closed:
            if message["type"] == "websocket.close":
                return
            raise OSError("Send on a closed WebSocket")
        if self.send_mode == "fail" and message["type"] == "websocket.send":
            raise OSError("Connection reset by peer")
        self._to_client.put_nowait(message)
        if message["type"] == "websocket.close":
            self._server_closed = True
            self.close_code = int(message.get("code", 1000))
            self.close_reason = str(message.get("reason") or "")
            # The server completes the close handshake and tells the app.
            self._to_app.put_nowait(
                {"type": "websocket.disconnect", "code": message.get("code", 1000), "reason": message.get("reason")}
            )

    async def _run(self) -> None:
        try:
            await self._app(self._scope, self._app_receive, self._app_send)
        finally:
            self._to_client.put_nowait(None)  # the app returned (or raised)

    # -- opening and closing ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the app's handler with a `websocket.connect` (once), without waiting for the handshake."""
        if self._task is None:
            self._to_app.put_nowait({"type": "websocket.connect"})
            self._task = asyncio.ensure_future(self._run())

    def feed(self, message: Message) -> None:
        """Hand the app one raw ASGI message, e.g. `{"type": "websocket.disconnect", "code": 1001}`."""
        self._to_app.put_nowait(message)

    def cancel(self) -> None:
        """Cancel the app's handler, as a server does when it drops a connection on its side."""
        if self._task is not None:
            self._task.cancel()

    async def finished(self, timeout: float | None = None) -> None:
        """Wait (bounded) for the app's handler to return, and re-raise its crash if it crashed."""
        assert self._task is not None, "start() the socket first"
        limit = self.timeout if timeout is None else timeout
        done, _ = await asyncio.wait({self._task}, timeout=limit)
        if not done:
            raise AssertionError(f"The app did not return within {limit} s on {self._path}")
        if not self._task.cancelled():
            self._task.result()

    async def receive_message(self, timeout: float | None = None) -> Message:
        """The next raw ASGI message the app sent (`websocket.accept`, `websocket.send`, `websocket.close`).

        Raises:
            ReceiveTimeout: nothing arrived within `timeout` (default: the socket's).
            WebSocketClosed: the app returned without sending anything more (its crash is re-raised).
        """
        message = await self._next_message("a message from the app", timeout)
        if message["type"] == "websocket.accept":
            self._accepted = True
        return message

    async def _open(self, wait_established: bool) -> None:
        self.start()
        message = await self._next_message("the handshake to be accepted", self.timeout)
        if message["type"] == "websocket.close":
            self._close_seen = True
            raise WebSocketClosed(self.close_code or 1000, self.close_reason, waiting_for="the handshake")
        if message["type"] != "websocket.accept":
            raise AssertionError(f"Expected websocket.accept, got {message!r}")
        self._accepted = True
        self.subprotocol = message.get("subprotocol")
        if wait_established:
            self.established = await self.expect("CONNECTION_ESTABLISHED")

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close from the client side and wait (bounded) for the app to return. Safe to call twice."""
        if not self._client_closed:
            self._client_closed = True
            if not self._server_closed:
                self._to_app.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})
        task = self._task
        if task is None or task.done():
            if task is not None and not task.cancelled():
                task.exception()  # retrieved: an app error was reported by receive() already, or never asked for
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), self.timeout)
        except asyncio.TimeoutError:
            await _cancel(task)
            raise AssertionError(
                f"The app did not return within {self.timeout} s after the client closed {self._path}"
            ) from None
        except Exception:  # the app's failure is not the test's business once the test closed the socket
            return

    # -- receiving ----------------------------------------------------------------------------------------

    async def _next_message(self, expected: str, timeout: float | None) -> Message:
        limit = self.timeout if timeout is None else timeout
        try:
            message = await asyncio.wait_for(self._to_client.get(), limit)
        except asyncio.TimeoutError:
            raise ReceiveTimeout(f"Timed out after {limit} s waiting for {expected} on {self._path}") from None
        if message is None:
            self._to_client.put_nowait(None)  # keep reporting it
            task = self._task
            if task is not None and task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
            if not self._accepted:
                raise WebSocketClosed(1006, "The app returned without accepting the handshake (HTTP 403)")
            raise WebSocketClosed(self.close_code or 1006, self.close_reason, waiting_for=expected)
        return message

    async def receive_text(self, timeout: float | None = None) -> str:
        """The next text frame, as sent.

        Raises:
            ReceiveTimeout: nothing arrived within `timeout` (default: the socket's).
            WebSocketClosed: the server closed the socket.
        """
        if self._close_seen:
            raise WebSocketClosed(self.close_code or 1000, self.close_reason, waiting_for="a message")
        message = await self._next_message("a message", timeout)
        if message["type"] == "websocket.close":
            self._close_seen = True
            raise WebSocketClosed(self.close_code or 1000, self.close_reason, waiting_for="a message")
        text = message.get("text")
        if text is None:
            raise AssertionError(f"Expected a text frame, got binary {message.get('bytes')!r}")
        return str(text)

    async def receive(self, timeout: float | None = None) -> dict[str, Any]:
        """The next message, decoded from JSON, heartbeats included.

        Raises:
            ReceiveTimeout: nothing arrived within `timeout` (default: the socket's).
            WebSocketClosed: the server closed the socket.
        """
        message: dict[str, Any] = json.loads(await self.receive_text(timeout))
        if isinstance(message, dict) and _is_cursor(message):
            self.last_id = message["id"]
        return message

    async def _receive_skipping(self, skip: Iterable[str], timeout: float | None, expected: str) -> dict[str, Any]:
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        skipped = frozenset(str(t) for t in skip)
        while True:
            remaining = deadline - time.monotonic()
            try:
                message = await self.receive(timeout=max(remaining, 0.0))
            except ReceiveTimeout:
                raise ReceiveTimeout(f"Timed out after {limit} s waiting for {expected} on {self._path}") from None
            if message.get("type") not in skipped:
                return message

    async def expect(
        self,
        type: str,
        data: Any = _ANY,
        *,
        user_id: str | None = _ANY,
        channel: str | None = _ANY,
        retained: bool = _ANY,
        timeout: float | None = None,
        skip: Iterable[str] = DEFAULT_SKIP,
    ) -> dict[str, Any]:
        """Receive the next message and assert its `type` (and `data`, `userId`, `channel`, `retained`, when given).

        Messages whose type is in `skip` (by default `HEARTBEAT`) are passed over. Use
        `unittest.mock.ANY` inside `data` for values you cannot know, such as generated ids.

        Args:
            type: the expected type, e.g. `"TASK_CREATED"` or `EventType.TASK_CREATED`.
            data: the expected `data`, compared with `==`.
            user_id: the expected `userId` (`None` for `broadcast_to_all`).
            channel: the expected channel: the envelope's `channel` for a channel event, `data.channel`
                for `SUBSCRIBED`, `UNSUBSCRIBED`, `PRESENCE*`, `RESYNC_REQUIRED` and `ERROR`
                (`None`: not a channel's).
            retained: whether the message must be the channel's retained event (`"retained": true`).
            timeout: seconds to wait; defaults to the socket's.
            skip: types to pass over.

        Returns:
            The message, decoded.

        Raises:
            AssertionError: another message arrived, or its data differ.
            ReceiveTimeout: nothing arrived in time.
            WebSocketClosed: the server closed the socket instead.
        """
        expected = f"a {type} event"
        try:
            message = await self._receive_skipping(skip, timeout, expected)
        except WebSocketClosed as exc:
            raise WebSocketClosed(exc.code, exc.reason, waiting_for=expected) from None
        if message.get("type") != str(type):
            raise AssertionError(f"Expected {expected}, got {message.get('type')!r}: {json.dumps(message)}")
        if data is not _ANY and not data == message.get("data"):
            raise AssertionError(
                f"{type} event data differ:\n  expected: {data!r}\n  received: {message.get('data')!r}"
            )
        if user_id is not _ANY and not user_id == message.get("userId"):
            raise AssertionError(f"{type} event for userId {message.get('userId')!r}, expected {user_id!r}")
        if channel is not _ANY and not channel == _channel_of(message):
            raise AssertionError(f"{type} event of channel {_channel_of(message)!r}, expected {channel!r}")
        if retained is not _ANY and bool(message.get("retained")) is not bool(retained):
            state = "a retained" if message.get("retained") else "a live"
            raise AssertionError(
                f"{type} event is {state} event, expected retained={retained!r}: {json.dumps(message)}"
            )
        return message

    async def expect_close(
        self,
        code: int | None = None,
        reason: str | None = None,
        *,
        timeout: float | None = None,
        skip_messages: bool = False,
    ) -> tuple[int, str]:
        """Wait for the server to close the socket, and assert the code and reason when given.

        Args:
            code: the expected close code, e.g. 1008.
            reason: the expected close reason.
            timeout: seconds to wait; defaults to the socket's.
            skip_messages: pass over messages that arrive first (e.g. a backlog before a 1013 close);
                by default any message fails the assertion.

        Returns:
            `(code, reason)`.
        """
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        closed: WebSocketClosed | None = None
        while closed is None:
            try:
                message = await self.receive(timeout=max(deadline - time.monotonic(), 0.0))
            except WebSocketClosed as exc:
                closed = exc
                continue
            except ReceiveTimeout:
                raise ReceiveTimeout(
                    f"Timed out after {limit} s waiting for the server to close {self._path}"
                ) from None
            if not skip_messages:
                raise AssertionError(f"Expected a close, got {message.get('type')!r}: {json.dumps(message)}")
        if code is not None and closed.code != code:
            raise AssertionError(f"Expected close code {code}, got {closed.code} ({closed.reason!r})")
        if reason is not None and closed.reason != reason:
            raise AssertionError(f"Expected close reason {reason!r}, got {closed.reason!r} (code {closed.code})")
        return closed.code, closed.reason

    async def assert_no_event(self, within: float = 0.1, *, skip: Iterable[str] = DEFAULT_SKIP) -> None:
        """Assert that nothing (but `skip` types) arrives for `within` seconds, e.g. for another user's event."""
        try:
            message = await self._receive_skipping(skip, within, "silence")
        except ReceiveTimeout:
            return
        raise AssertionError(f"Expected no event within {within} s, got {message.get('type')!r}: {json.dumps(message)}")

    # -- sending ------------------------------------------------------------------------------------------

    async def send_text(self, text: str) -> None:
        """Send one text frame."""
        self._check_open()
        self._to_app.put_nowait({"type": "websocket.receive", "text": text})
        await asyncio.sleep(0)

    async def send_bytes(self, data: bytes) -> None:
        """Send one binary frame."""
        self._check_open()
        self._to_app.put_nowait({"type": "websocket.receive", "bytes": data})
        await asyncio.sleep(0)

    async def send_json(self, message: Any) -> None:
        """Send one JSON text frame, e.g. `{"type": "PING"}`."""
        await self.send_text(json.dumps(message))

    async def ping(self, timeout: float | None = None) -> dict[str, Any]:
        """Send `PING` and expect `PONG` (heartbeats are passed over)."""
        await self.send_json({"type": "PING"})
        return await self.expect("PONG", timeout=timeout)

    # -- channels -----------------------------------------------------------------------------------------

    async def subscribe(
        self, channel: str, since: str | None = None, *, timeout: float | None = None
    ) -> dict[str, Any]:
        """Send `SUBSCRIBE` and expect `SUBSCRIBED` for `channel` (heartbeats are passed over).

        The channel's retained event, its `PRESENCE` (on a presence channel) and, with `since`, its
        missed events or a `RESYNC_REQUIRED` follow: `expect` them next.

        Args:
            channel: the channel, e.g. `"team:42"`.
            since: replay the channel's events after this event id.
            timeout: seconds to wait; defaults to the socket's.

        Returns:
            The `SUBSCRIBED` message (`data.presence` says whether the channel has presence).

        Raises:
            ChannelRefused: the server answered `ERROR` (e.g. `forbidden`); the socket stays open.
            AssertionError: another message arrived first.
        """
        data = {"channel": channel} if since is None else {"channel": channel, "since": since}
        return await self._channel_request("SUBSCRIBE", data, "SUBSCRIBED", timeout)

    async def unsubscribe(self, channel: str, *, timeout: float | None = None) -> dict[str, Any]:
        """Send `UNSUBSCRIBE` and expect `UNSUBSCRIBED` for `channel`; returns it."""
        return await self._channel_request("UNSUBSCRIBE", {"channel": channel}, "UNSUBSCRIBED", timeout)

    async def presence(self, channel: str, *, timeout: float | None = None) -> dict[str, Any]:
        """Ask for the presence of `channel` and expect the `PRESENCE` answer; returns it.

        Its `data` is `{"channel", "users": [{"userId", "connections"}, ...], "count"}`, or only the
        count (and `"truncated": true`) above `presence_max_members` users.

        Raises:
            ChannelRefused: `ERROR` `forbidden` (not subscribed) or `not_presence_channel`.
        """
        return await self._channel_request("PRESENCE", {"channel": channel}, "PRESENCE", timeout)

    async def _channel_request(
        self, kind: str, data: dict[str, Any], answer: str, timeout: float | None
    ) -> dict[str, Any]:
        channel = data["channel"]
        expected = f"{answer} for channel {channel!r}"
        await self.send_json({"type": kind, "data": data})
        try:
            message = await self._receive_skipping(DEFAULT_SKIP, timeout, expected)
        except WebSocketClosed as exc:
            raise WebSocketClosed(exc.code, exc.reason, waiting_for=expected) from None
        error = message.get("data") if message.get("type") == "ERROR" else None
        if isinstance(error, dict):
            raise ChannelRefused(channel, str(error.get("code")), str(error.get("message") or ""))
        if message.get("type") != answer or _channel_of(message) != channel:
            raise AssertionError(f"Expected {expected}, got {message.get('type')!r}: {json.dumps(message)}")
        return message

    def _check_open(self) -> None:
        if self._client_closed:
            raise RuntimeError("The WebSocket is closed")
        if self._server_closed:
            raise WebSocketClosed(self.close_code or 1000, self.close_reason, waiting_for="a send")
