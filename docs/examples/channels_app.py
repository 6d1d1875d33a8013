"""Channels: a shared team timer, with presence, and team membership that the app decides.

Run it with `POMO_WS_JWT_SECRET=<at least 32 random bytes> uvicorn channels_app:app --ws-per-message-deflate false`.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from starlette_pomo_ws import Broadcaster, PomoWS, Principal, Settings

# A stand-in for your database: team id -> its members' user ids.
TEAMS: dict[str, set[str]] = {"42": {"alice", "bob"}}


async def authorize_channel(principal: Principal, channel: str) -> bool:
    """Asked on every SUBSCRIBE and on every resume (`?channels=`), so a removed member stays out."""
    kind, _, team = channel.partition(":")
    return kind == "team" and principal.user_id in TEAMS.get(team, set())


# Settings.from_env() reads POMO_WS_JWT_SECRET and the rest; presence is on for the team channels.
pomo = PomoWS(Settings.from_env(presence_channels=("team:*",)), authorize_channel=authorize_channel)


async def start_timer(request: Request) -> JSONResponse:
    team = request.path_params["team"]
    timer = {"phase": "focus", "minutes": (await request.json())["minutes"]}
    broadcaster: Broadcaster = request.state.broadcaster
    # retain=True: the timer is the channel's state; a member who opens a tab later gets it at once.
    event = await broadcaster.broadcast_to_channel(f"team:{team}", "TIMER_STARTED", timer, retain=True)
    return JSONResponse({"id": event.id, **timer}, status_code=201)


async def add_member(request: Request) -> JSONResponse:
    team, user_id = request.path_params["team"], request.path_params["user"]
    TEAMS.setdefault(team, set()).add(user_id)  # first: a reconnect re-authorizes the channel
    await request.state.broadcaster.subscribe_user(user_id, f"team:{team}")  # the user's open tabs join now
    return JSONResponse({"members": sorted(TEAMS[team])})


async def remove_member(request: Request) -> JSONResponse:
    team, user_id = request.path_params["team"], request.path_params["user"]
    TEAMS.get(team, set()).discard(user_id)
    await request.state.broadcaster.unsubscribe_user(user_id, f"team:{team}", reason="Removed from the team")
    return JSONResponse({"members": sorted(TEAMS.get(team, set()))})


async def who_is_here(request: Request) -> JSONResponse:
    broadcaster: Broadcaster = request.state.broadcaster
    return JSONResponse(await broadcaster.presence(f"team:{request.path_params['team']}"))


app = Starlette(
    lifespan=pomo.lifespan,
    routes=[
        Route("/teams/{team}/timer", start_timer, methods=["POST"]),
        Route("/teams/{team}/members/{user}", add_member, methods=["PUT"]),
        Route("/teams/{team}/members/{user}", remove_member, methods=["DELETE"]),
        Route("/teams/{team}/presence", who_is_here),
    ],
)
app.mount("/ws", pomo)
