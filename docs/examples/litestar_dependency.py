"""Litestar 2.23 and later: ask for the plugin's `broadcaster` dependency by name."""

from __future__ import annotations

from litestar import Litestar, post
from litestar.di import NamedDependency

from starlette_pomo_ws import Broadcaster, PomoWS
from starlette_pomo_ws.litestar import PomoWSPlugin

pomo = PomoWS()


@post("/announcements", status_code=202)
async def announce(broadcaster: NamedDependency[Broadcaster]) -> None:
    await broadcaster.broadcast_to_all("NOTIFICATION", {"message": "Maintenance at 22:00 UTC"})


app = Litestar(route_handlers=[announce], plugins=[PomoWSPlugin(pomo)])
