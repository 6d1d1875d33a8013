"""FastAPI: the same two lines; handlers get the broadcaster with `Depends(get_broadcaster)`.

Run it with `POMO_WS_JWT_SECRET=... uvicorn fastapi_app:app --ws-per-message-deflate false`.
"""

# --8<-- [start:app]
from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import Depends, FastAPI, Header
from pydantic import BaseModel

from starlette_pomo_ws import Broadcaster, EventType, PomoWS, get_broadcaster

pomo = PomoWS()  # Settings.from_env()

app = FastAPI(lifespan=pomo.lifespan)
app.mount("/ws", pomo)


class NewTask(BaseModel):
    title: str


class Task(NewTask):
    id: str
    completed: bool = False


@app.post("/tasks", status_code=201)
async def create_task(
    body: NewTask,
    x_user_id: Annotated[str, Header()],  # a stand-in for your app's own authentication
    broadcaster: Annotated[Broadcaster, Depends(get_broadcaster)],
) -> Task:
    task = Task(id=str(uuid.uuid4()), title=body.title)
    await broadcaster.broadcast_to_user(x_user_id, EventType.TASK_CREATED, task)  # pydantic models are converted
    return task


# --8<-- [end:app]
