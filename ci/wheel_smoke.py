"""Run inside a venv that has only the wheel: the package imports without extras, and the example serves.

It drives `docs/examples/starlette_app.py` with plain ASGI messages (no test client, no server), the
way a server would: lifespan startup, a WebSocket handshake with a token, a broadcast over HTTP,
and the lifespan shutdown.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

import jwt

SECRET = "wheel-smoke-secret-0123456789-0123456789"
os.environ["POMO_WS_JWT_SECRET"] = SECRET

import starlette_pomo_ws  # noqa: E402  (after the environment is set)

for optional in ("redis", "litestar", "prometheus_client", "uvicorn"):
    assert optional not in sys.modules, f"importing the package imported {optional}"
root = Path(starlette_pomo_ws.__file__).parent
assert (root / "py.typed").is_file(), "py.typed is missing from the wheel"
assert (root / "static" / "pomo-ws.js").is_file(), "the browser client is missing from the wheel"

spec = importlib.util.spec_from_file_location("starlette_app", sys.argv[1])
assert spec is not None and spec.loader is not None
example = importlib.util.module_from_spec(spec)
spec.loader.exec_module(example)
app = example.app


async def call(scope: dict[str, Any], inbox: list[dict[str, Any]]) -> list[dict[str, Any]]:
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for message in inbox:
        queue.put_nowait(message)
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await asyncio.wait_for(app(scope, queue.get, send), 10)
    return sent


async def main() -> None:
    lifespan_in: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    lifespan_out: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    lifespan_state: dict[str, Any] = {}

    lifespan_scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": lifespan_state}
    lifespan = asyncio.ensure_future(app(lifespan_scope, lifespan_in.get, lifespan_out.put))
    lifespan_in.put_nowait({"type": "lifespan.startup"})
    started = await asyncio.wait_for(lifespan_out.get(), 10)
    assert started["type"] == "lifespan.startup.complete", started
    state = lifespan_state
    assert state["broadcaster"] is example.pomo.broadcaster

    token = jwt.encode({"userId": "alice", "exp": 4102444800}, SECRET, algorithm="HS256")
    ws_in: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    ws_out: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def ws_send(message: dict[str, Any]) -> None:
        ws_out.put_nowait(message)

    ws_scope = {
        "type": "websocket", "asgi": {"version": "3.0"}, "path": "/ws", "raw_path": b"/ws", "root_path": "",
        "query_string": f"token={token}".encode(), "headers": [], "subprotocols": [], "state": dict(state),
    }  # fmt: skip
    ws_in.put_nowait({"type": "websocket.connect"})
    socket = asyncio.ensure_future(app(ws_scope, ws_in.get, ws_send))
    assert (await asyncio.wait_for(ws_out.get(), 5))["type"] == "websocket.accept"
    hello = json.loads((await asyncio.wait_for(ws_out.get(), 5))["text"])
    assert hello["type"] == "CONNECTION_ESTABLISHED", hello

    http_scope = {
        "type": "http", "asgi": {"version": "3.0"}, "method": "POST", "path": "/tasks", "raw_path": b"/tasks",
        "root_path": "", "query_string": b"", "headers": [(b"x-user-id", b"alice")], "state": dict(state),
    }  # fmt: skip
    sent = await call(http_scope, [{"type": "http.request", "body": b'{"title": "ship it"}', "more_body": False}])
    assert sent[0]["status"] == 201, sent
    event = json.loads((await asyncio.wait_for(ws_out.get(), 5))["text"])
    assert (event["type"], event["data"]["title"]) == ("TASK_CREATED", "ship it"), event

    ws_in.put_nowait({"type": "websocket.disconnect", "code": 1000})
    await asyncio.wait_for(socket, 5)
    lifespan_in.put_nowait({"type": "lifespan.shutdown"})
    await asyncio.wait_for(lifespan, 10)
    print("wheel smoke test: ok")


asyncio.run(main())
