"""An app for the multi-process tests: every node reads its Redis URL and key prefix from the environment."""

from __future__ import annotations

import os

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from starlette_pomo_ws import PomoWS, Settings
from starlette_pomo_ws.backends.redis import RedisBackend
from tests.conftest import make_app

settings = Settings(
    jwt_secret=os.environ["POMO_WS_TEST_SECRET"],
    max_connections_per_user=int(os.environ.get("POMO_WS_TEST_MAX_CONNECTIONS", "32")),
    backend_url=os.environ["POMO_WS_TEST_REDIS_URL"],
)
backend = RedisBackend(
    settings.backend_url,
    key_prefix=os.environ["POMO_WS_TEST_KEY_PREFIX"],
    # The partition tests shorten these, so that a cut shows within a second or two.
    socket_timeout=float(os.environ.get("POMO_WS_TEST_SOCKET_TIMEOUT", "2")),
    heartbeat_interval=float(os.environ.get("POMO_WS_TEST_HEARTBEAT", "5")),
)
pomo = PomoWS(settings, backend=backend)


async def counts(request: Request) -> JSONResponse:
    broadcaster = request.state.broadcaster
    user = request.query_params["user"]
    return JSONResponse(
        {
            "local": broadcaster.user_connection_count(user),
            "user": await broadcaster.cluster_user_connection_count(user),
            "total": await broadcaster.cluster_total_connection_count(),
        }
    )


async def logout(request: Request) -> JSONResponse:
    await request.state.broadcaster.disconnect_user(request.query_params["user"], reason="Logged out")
    return JSONResponse({})


app = make_app(pomo)  # the tests' smallest app: the two lines and POST /publish
app.router.routes += [Route("/counts", counts), Route("/logout", logout, methods=["POST"])]
