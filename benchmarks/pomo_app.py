"""The same benchmark endpoints as ``baseline_app.py``, built on starlette-pomo-ws with its real defaults.

``BENCH_BACKEND_URL`` selects the backend (``memory://`` by default, ``redis://127.0.0.1:6379/14``).

Run: ``uvicorn benchmarks.pomo_app:app --ws websockets-sansio --ws-per-message-deflate false``.
"""

from __future__ import annotations

import os
import time

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from starlette_pomo_ws import PomoWS, Settings

SECRET = os.environ.get("BENCH_JWT_SECRET", "benchmark-secret-at-least-32-bytes-long!")
BACKEND_URL = os.environ.get("BENCH_BACKEND_URL", "memory://")

METRICS = os.environ.get("BENCH_METRICS") == "1"  # the `pomo-metrics` variant of the benchmark

pomo = PomoWS(Settings(jwt_secret=SECRET, backend_url=BACKEND_URL, metrics=METRICS))


async def bench_all(request: Request) -> JSONResponse:
    count = int(request.query_params.get("count", "1"))
    seq = int(request.query_params.get("seq", "0"))
    broadcaster = request.state.broadcaster
    for i in range(count):
        await broadcaster.broadcast_to_all("BENCH", {"seq": seq + i, "t": time.time_ns()})
    return JSONResponse({"sent": count})


async def bench_user(request: Request) -> JSONResponse:
    user_id = request.path_params["uid"]
    seq = int(request.query_params.get("seq", "0"))
    await request.state.broadcaster.broadcast_to_user(user_id, "BENCH", {"seq": seq, "t": time.time_ns()})
    return JSONResponse({"sent": 1})


async def ready(request: Request) -> JSONResponse:
    return JSONResponse({"connections": request.state.broadcaster.total_connection_count()})


app = Starlette(
    lifespan=pomo.lifespan,
    routes=[
        Route("/bench/all", bench_all, methods=["POST"]),
        Route("/bench/user/{uid}", bench_user, methods=["POST"]),
        Route("/bench/ready", ready),
    ],
)
app.mount("/ws", pomo)
