"""The same benchmark endpoints as ``baseline_app.py``, built on starlette-pomo-ws with its real defaults.

``BENCH_BACKEND_URL`` selects the backend (``memory://`` by default, ``redis://127.0.0.1:6379/14``).

Run: ``uvicorn benchmarks.pomo_app:app --ws websockets-sansio --ws-per-message-deflate false``.
"""

from __future__ import annotations

import gc
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
WRAP = os.environ.get("BENCH_WRAP") == "1"  # the `pomo-wrap` variant: `app = pomo.wrap(app)`
# The channel phases: `presence:*` channels have presence, with JOIN/LEAVE up to this many members.
PRESENCE_MAX = int(os.environ.get("BENCH_PRESENCE_MAX", "0"))
CHANNELS = {"presence_channels": ("presence:*",), "presence_max_members": PRESENCE_MAX} if PRESENCE_MAX else {}

TRACEMALLOC = os.environ.get("BENCH_TRACEMALLOC") == "1"  # diagnosis of memory per connection
if TRACEMALLOC:
    import tracemalloc

    tracemalloc.start()

pomo = PomoWS(Settings(jwt_secret=SECRET, backend_url=BACKEND_URL, metrics=METRICS, **CHANNELS))


async def bench_all(request: Request) -> JSONResponse:
    count = int(request.query_params.get("count", "1"))
    seq = int(request.query_params.get("seq", "0"))
    broadcaster = request.state.broadcaster
    for i in range(count):
        await broadcaster.broadcast_to_all("BENCH", {"seq": seq + i, "t": time.time_ns()})
    return JSONResponse({"sent": count})


async def bench_channel(request: Request) -> JSONResponse:
    channel = request.path_params["name"]
    count = int(request.query_params.get("count", "1"))
    seq = int(request.query_params.get("seq", "0"))
    broadcaster = request.state.broadcaster
    for i in range(count):
        await broadcaster.broadcast_to_channel(channel, "BENCH", {"seq": seq + i, "t": time.time_ns()})
    return JSONResponse({"sent": count})


async def bench_user(request: Request) -> JSONResponse:
    user_id = request.path_params["uid"]
    seq = int(request.query_params.get("seq", "0"))
    await request.state.broadcaster.broadcast_to_user(user_id, "BENCH", {"seq": seq, "t": time.time_ns()})
    return JSONResponse({"sent": 1})


async def bench_tracemalloc(request: Request) -> JSONResponse:
    """Diagnosis only (``BENCH_TRACEMALLOC=1``): ``?action=start`` takes a snapshot, ``?action=diff`` lists
    what was allocated since and is still alive, by source line."""
    import tracemalloc

    gc.collect()
    if request.query_params.get("action") == "start":
        request.app.state.snapshot = tracemalloc.take_snapshot()
        return JSONResponse({"started": True})
    stats = tracemalloc.take_snapshot().compare_to(request.app.state.snapshot, "lineno")
    top = [{"where": str(s.traceback), "bytes": s.size_diff, "count": s.count_diff} for s in stats[:25]]
    return JSONResponse({"total": sum(s.size_diff for s in stats), "top": top})


async def ready(request: Request) -> JSONResponse:
    return JSONResponse({"connections": request.state.broadcaster.total_connection_count()})


GC_PROBE = os.environ.get("BENCH_GC") == "1"  # diagnosis: time spent in garbage collection
_gc = {"time": 0.0, "start": 0.0, "full": 0, "full_time": 0.0}
if GC_PROBE:

    def _probe(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            _gc["start"] = time.perf_counter()
        else:
            spent = time.perf_counter() - _gc["start"]
            _gc["time"] += spent
            if info["generation"] == 2:
                _gc["full"] += 1
                _gc["full_time"] += spent

    gc.callbacks.append(_probe)


async def bench_gc(request: Request) -> JSONResponse:
    if request.query_params.get("freeze"):  # what `gc.freeze()` after start-up would do for a user
        gc.freeze()
    if request.query_params.get("types"):  # what the collector tracks, by type: where a connection's objects are
        counts: dict[str, int] = {}
        for obj in gc.get_objects():
            name = f"{type(obj).__module__}.{type(obj).__qualname__}"
            counts[name] = counts.get(name, 0) + 1
        top = sorted(counts.items(), key=lambda item: -item[1])[:40]
        return JSONResponse({"tracked": sum(counts.values()), "types": top})
    collections = [stats["collections"] for stats in gc.get_stats()]
    return JSONResponse({**_gc, "tracked": len(gc.get_objects()), "counts": gc.get_count(), "collections": collections})


starlette_app = Starlette(
    lifespan=pomo.lifespan,
    routes=[
        Route("/bench/all", bench_all, methods=["POST"]),
        Route("/bench/user/{uid}", bench_user, methods=["POST"]),
        Route("/bench/channel/{name}", bench_channel, methods=["POST"]),
        Route("/bench/ready", ready),
    ]
    + ([Route("/bench/tracemalloc", bench_tracemalloc, methods=["POST"])] if TRACEMALLOC else [])
    + ([Route("/bench/gc", bench_gc)] if GC_PROBE else []),
)
starlette_app.mount("/ws", pomo)
# The documented setup, or with the optional top-level entry, whose WebSockets skip Starlette's routing and
# exception wrapper on the way to the package (docs/deployment.md).
app = pomo.wrap(starlette_app) if WRAP else starlette_app
