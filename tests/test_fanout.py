"""Many clients in one process (httpx-ws over ASGI, asgi-lifespan): fan-out is exact and encodes once."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import anyio
import httpx
import pytest
from asgi_lifespan import LifespanManager
from httpx_ws import aconnect_ws
from httpx_ws.transport import ASGIWebSocketTransport

from starlette_pomo_ws import PomoWS, _events

from .conftest import make_app, make_settings, make_token

pytestmark = pytest.mark.anyio

USERS = 10
TABS = 3


async def test_many_tabs_many_users_no_leak_and_one_encoding(monkeypatch: pytest.MonkeyPatch) -> None:
    pomo = PomoWS(make_settings())
    encodings: list[Any] = []
    real_dumps = _events.dumps

    def counting_dumps(value: Any) -> str:
        encodings.append(value)
        return real_dumps(value)

    monkeypatch.setattr("starlette_pomo_ws._broadcaster.dumps", counting_dumps)
    async with (
        LifespanManager(make_app(pomo)) as manager,
        ASGIWebSocketTransport(app=manager.app) as transport,
        httpx.AsyncClient(transport=transport, base_url="http://test") as client,
        contextlib.AsyncExitStack() as stack,
    ):
        sockets = {}
        for user in range(USERS):
            for tab in range(TABS):
                ws: Any = await stack.enter_async_context(aconnect_ws(f"/ws?token={make_token(f'user{user}')}", client))
                with anyio.fail_after(5):
                    assert json.loads(await ws.receive_text())["type"] == "CONNECTION_ESTABLISHED"
                sockets[(user, tab)] = ws
        assert pomo.broadcaster.total_connection_count() == USERS * TABS
        broadcaster = pomo.broadcaster
        for user in range(USERS):
            await broadcaster.broadcast_to_user(f"user{user}", "TASK_CREATED", {"owner": user})
        await broadcaster.broadcast_to_all("NOTIFICATION", {"message": "everyone"})
        for (user, _tab), ws in sockets.items():
            with anyio.fail_after(5):
                own = json.loads(await ws.receive_text())
                everyone = json.loads(await ws.receive_text())
            assert own["data"] == {"owner": user}, "each tab gets its own user's event and no one else's"
            assert everyone["type"] == "NOTIFICATION" and everyone["userId"] is None
        # One encoding per event, however many sockets received it.
        assert len(encodings) == USERS + 1
