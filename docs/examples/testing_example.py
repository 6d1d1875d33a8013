"""Tests for the Starlette quickstart app, with pytest, anyio and `starlette_pomo_ws.testing`.

POMO_WS_JWT_SECRET is set before the app is imported (in conftest.py, or your CI's environment).
"""

from __future__ import annotations

from unittest.mock import ANY

import pytest
from starlette_app import app

from starlette_pomo_ws.testing import PomoTestClient, WebSocketClosed

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the broadcaster runs on asyncio


async def test_a_new_task_reaches_every_tab() -> None:
    async with PomoTestClient(app) as client, client.connect("alice") as laptop, client.connect("alice") as phone:
        response = await client.http.post("/tasks", json={"title": "Write the docs"}, headers={"x-user-id": "alice"})
        assert response.status_code == 201
        task = {"id": ANY, "title": "Write the docs", "completed": False}
        await laptop.expect("TASK_CREATED", data=task)
        await phone.expect("TASK_CREATED", data=task)


async def test_other_users_see_nothing() -> None:
    async with PomoTestClient(app) as client, client.connect("bob") as bob:
        await client.http.post("/tasks", json={"title": "Private"}, headers={"x-user-id": "alice"})
        await bob.assert_no_event(within=0.1)


async def test_a_reconnecting_tab_gets_what_it_missed() -> None:
    async with PomoTestClient(app) as client:
        async with client.connect("alice") as tab:
            cursor = tab.last_id  # CONNECTION_ESTABLISHED's id: a valid cursor even before any event
        await client.broadcaster.broadcast_to_user("alice", "TASK_DELETED", {"id": "t1"})
        async with client.connect("alice", last_event_id=cursor) as tab:
            assert tab.established is not None and tab.established["data"]["resumed"] is True
            await tab.expect("TASK_DELETED", data={"id": "t1"})


async def test_a_forged_token_is_refused() -> None:
    async with PomoTestClient(app) as client:
        with pytest.raises(WebSocketClosed) as refused:
            async with client.connect(token="not-a-jwt"):
                pass
        assert (refused.value.code, refused.value.reason) == (1008, "Invalid authentication token")
