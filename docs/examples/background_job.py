"""Broadcast from a background job (no request, so no `request.state`): use `pomo.broadcaster`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette

from starlette_pomo_ws import BackendUnavailable, EventType, PomoWS

logger = logging.getLogger(__name__)
REMINDER_INTERVAL = float(os.environ.get("BREAK_REMINDER_SECONDS", "1500"))

pomo = PomoWS()


async def remind_breaks(interval: float) -> None:
    """Every `interval` seconds, tell every connected user to take a break."""
    while True:
        await asyncio.sleep(interval)
        try:
            await pomo.broadcaster.broadcast_to_all(EventType.NOTIFICATION, {"message": "Time for a break"})
        except BackendUnavailable:
            # A broadcast raises rather than dropping the event: decide here whether to retry or skip.
            logger.warning("Break reminder not sent: the backend is unavailable")


async def end_session(user_id: str, minutes: int) -> None:
    """Call this from anywhere (a scheduler, a queue consumer) while the app runs."""
    await pomo.broadcaster.broadcast_to_user(user_id, EventType.SESSION_END, {"minutes": minutes})


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
    async with pomo.lifespan(app) as state:
        job = asyncio.create_task(remind_breaks(REMINDER_INTERVAL))
        try:
            yield state
        finally:
            job.cancel()  # stop the job before pomo.lifespan stops the broadcaster
            with contextlib.suppress(asyncio.CancelledError):
                await job


app = Starlette(lifespan=lifespan)
app.mount("/ws", pomo)
