from __future__ import annotations

import json
import time

import anyio
import pytest
from websockets.asyncio.client import connect

from starlette_pomo_ws import PomoWS

from .conftest import make_app, make_settings, make_token, run_server

pytestmark = pytest.mark.anyio


async def test_heartbeat_after_silence_from_one_shared_timer() -> None:
    pomo = PomoWS(make_settings(heartbeat_interval=0.3))
    async with run_server(make_app(pomo)) as server:
        async with (
            connect(server.url(f"/ws?token={make_token('a')}")) as a,
            connect(server.url(f"/ws?token={make_token('b')}")) as b,
        ):
            for ws in (a, b):
                assert json.loads(await ws.recv())["type"] == "CONNECTION_ESTABLISHED"
            started = time.monotonic()
            with anyio.fail_after(3):
                heartbeat = json.loads(await a.recv())
            assert heartbeat["type"] == "HEARTBEAT"
            assert heartbeat["userId"] == "a"
            assert "id" not in heartbeat
            assert time.monotonic() - started >= 0.2, "no heartbeat before the silence"
            with anyio.fail_after(3):
                assert json.loads(await b.recv())["type"] == "HEARTBEAT"
            # One ticker serves every connection: no task per connection.
            assert pomo.broadcaster._ticker is not None


async def test_zero_heartbeat_interval_disables_heartbeats() -> None:
    pomo = PomoWS(make_settings(heartbeat_interval=0))
    async with run_server(make_app(pomo)) as server:
        async with connect(server.url(f"/ws?token={make_token('a')}")) as ws:
            await ws.recv()
            with anyio.move_on_after(0.5) as scope:
                await ws.recv()
            assert scope.cancelled_caught, "heartbeat_interval=0 sends no HEARTBEAT"
