"""daphne sends no lifespan events: serve `pomo.wrap(app)`, which runs the app's lifespan on first use.

Run it with `POMO_WS_JWT_SECRET=<at least 32 random bytes> daphne daphne_app:application`.
"""

from __future__ import annotations

from starlette.applications import Starlette

from starlette_pomo_ws import PomoWS

pomo = PomoWS()
app = Starlette(lifespan=pomo.lifespan)  # unchanged: the same two lines as under any other server
app.mount("/ws", pomo)

application = pomo.wrap(app)  # what daphne serves
