"""Wiring mistakes explain themselves under the real uvicorn CLI: a forgotten lifespan or plugin, or
the memory backend in several workers."""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from starlette_pomo_ws import PomoWS
from starlette_pomo_ws._lifespan import route_loaded_apps, server_workers
from starlette_pomo_ws.testing import PomoTestClient

from .cli_server import uvicorn_cli
from .conftest import make_settings, make_token

UNWIRED = {
    "starlette": """
        from starlette.applications import Starlette
        from starlette_pomo_ws import PomoWS

        pomo = PomoWS()
        app = Starlette()  # lifespan=pomo.lifespan forgotten
        app.mount("/ws", pomo)
    """,
    "fastapi": """
        from fastapi import FastAPI
        from starlette_pomo_ws import PomoWS

        pomo = PomoWS()
        app = FastAPI()  # lifespan=pomo.lifespan forgotten
        app.mount("/ws", pomo)
    """,
}


async def close_of(url: str, token: str) -> tuple[int, str]:
    with anyio.fail_after(10):
        async with connect(url, subprotocols=["bearer", token]) as ws:  # type: ignore[list-item]
            try:
                await ws.recv()
            except ConnectionClosed as exc:
                assert exc.rcvd is not None
                return exc.rcvd.code, exc.rcvd.reason
    raise AssertionError("the socket was not closed")  # pragma: no cover


@pytest.mark.parametrize("framework", sorted(UNWIRED))
def test_a_forgotten_lifespan_fails_loudly_at_the_bare_path_too(framework: str, tmp_path: Path) -> None:
    """Under `--workers`/`--reload` uvicorn imports the app in its event loop: `/ws` is routed from the start.

    A single uvicorn process imports it before its loop runs; there the first request through the mount
    (`/ws/`, `/ws/health`, `/ws/client.js`) routes `/ws`.
    """
    (tmp_path / "unwired.py").write_text(textwrap.dedent(UNWIRED[framework]), encoding="utf-8")
    token = make_token("alice")
    args = ["unwired:app", "--ws-per-message-deflate", "false"]
    with uvicorn_cli(tmp_path, [*args, "--workers", "2"]) as server:
        server.wait_for_output("Application startup complete", within=30, count=2)
        for _ in range(2):  # whichever worker takes it
            code, reason = asyncio.run(close_of(f"ws://127.0.0.1:{server.port}/ws", token))
            assert (code, reason) == (1011, "Internal error")
        output = server.wait_for_output("NotStartedError: ", count=2)
        assert "pomo.lifespan was never started" in output and token not in output
    with uvicorn_cli(tmp_path, args) as server:
        for path in ("/ws/", "/ws"):
            code, reason = asyncio.run(close_of(f"ws://127.0.0.1:{server.port}{path}", token))
            assert (code, reason) == (1011, "Internal error"), path
        output = server.wait_for_output("NotStartedError: ", count=2)
        assert token not in output
        health = httpx.get(f"http://127.0.0.1:{server.port}/ws/health")
        assert health.status_code == 503 and "pomo.lifespan is not wired" in health.json()["error"]


def test_a_litestar_app_without_the_plugin_says_so_at_startup(tmp_path: Path) -> None:
    (tmp_path / "noplugin.py").write_text(
        textwrap.dedent("""
            from litestar import Litestar, get
            from starlette_pomo_ws import PomoWS

            pomo = PomoWS()

            @get("/")
            async def index() -> str:
                return "ok"

            app = Litestar(route_handlers=[index])  # plugins=[PomoWSPlugin(pomo)] forgotten
        """),
        encoding="utf-8",
    )
    with uvicorn_cli(tmp_path, ["noplugin:app", "--reload"]) as server:
        output = server.wait_for_output("does not use PomoWSPlugin")
        assert "The Litestar app noplugin:app does not use PomoWSPlugin" in output
        assert 'plugins=[PomoWSPlugin(pomo, path="/ws")]' in output


@pytest.mark.anyio
async def test_a_litestar_mount_without_the_lifespan_closes_with_1011() -> None:
    """Mounting by hand with Litestar's `asgi()` but no plugin: both paths explain themselves."""
    from litestar import Litestar, asgi

    from starlette_pomo_ws._types import Receive, Scope, Send

    pomo = PomoWS(make_settings())

    @asgi("/ws", is_mount=True, copy_scope=True)
    async def mount(scope: Scope, receive: Receive, send: Send) -> None:
        await pomo(scope, receive, send)

    app = Litestar(route_handlers=[mount])
    async with PomoTestClient(app, run_lifespan=False, settings=pomo.settings) as client:
        for path in ("/ws", "/ws/"):
            async with client.connect("u1", path=path, wait_established=False) as ws:
                await ws.expect_close(1011, "Internal error")
        assert (await client.http.get("/ws/health")).status_code == 503


def test_a_request_through_the_mount_routes_the_bare_path() -> None:
    """Without the lifespan, and outside an event loop, the first request reaching pomo routes `/ws`."""
    pomo = PomoWS(make_settings())
    app = Starlette()
    app.mount("/ws", pomo)
    from starlette.testclient import TestClient

    with TestClient(app) as client:
        assert len(app.routes) == 1
        assert client.get("/ws/health").status_code == 503
        assert [type(route).__name__ for route in app.routes] == ["WebSocketRoute", "Mount"]


@pytest.mark.anyio
async def test_apps_made_in_a_running_loop_get_the_bare_path_once_imported(monkeypatch: pytest.MonkeyPatch) -> None:
    unrouted = Starlette(routes=[Mount("/ws", app=PomoWS(make_settings()))])  # under pytest: no scan
    await asyncio.sleep(0)
    assert len(unrouted.routes) == 1
    monkeypatch.setattr("sys.argv", ["/venv/bin/uvicorn", "app:app", "--reload"])
    pomo = PomoWS(make_settings())  # inside the loop, as uvicorn imports an app with --reload or --workers
    app = Starlette(routes=[Mount("/ws", app=pomo)])
    import sys
    import types

    module = types.ModuleType("pomo_ws_wiring_probe")
    module.app = app  # type: ignore[attr-defined]
    sys.modules[module.__name__] = module
    try:
        await asyncio.sleep(0)  # the import is done: the scheduled look at the loaded apps runs
        assert [type(route).__name__ for route in app.routes] == ["WebSocketRoute", "Mount"]
        route_loaded_apps(pomo)  # idempotent
        assert len(app.routes) == 2
    finally:
        del sys.modules[module.__name__]


@pytest.mark.parametrize(
    ("argv", "environ", "expected"),
    [
        (["/venv/bin/uvicorn", "app:app", "--workers", "2"], {}, ("uvicorn", 2)),
        (["/venv/lib/python3.11/site-packages/uvicorn/__main__.py", "app:app", "--workers=3"], {}, ("uvicorn", 3)),
        (["/venv/bin/uvicorn", "app:app"], {"WEB_CONCURRENCY": "4"}, ("uvicorn", 4)),
        (["/venv/bin/uvicorn", "app:app", "--workers", "2", "--reload"], {}, ("uvicorn", 1)),
        (["/venv/bin/uvicorn", "app:app"], {}, ("uvicorn", 1)),
        (["/venv/bin/gunicorn", "-w", "4", "-k", "uvicorn_worker.UvicornWorker", "app:app"], {}, ("gunicorn", 4)),
        (["/venv/bin/gunicorn", "-w8", "app:app"], {}, ("gunicorn", 8)),
        (["/venv/bin/hypercorn", "--workers", "x", "app:app"], {}, None),
        (["/venv/bin/pytest", "-w", "2"], {"WEB_CONCURRENCY": "4"}, None),
        ([], {}, None),
    ],
)
def test_server_workers_reads_the_supervisors_command_line(
    argv: list[str], environ: dict[str, str], expected: tuple[str, int] | None
) -> None:
    assert server_workers(argv, environ) == expected


def test_the_memory_backend_in_two_uvicorn_workers_warns_in_each(tmp_path: Path) -> None:
    (tmp_path / "wired.py").write_text(
        textwrap.dedent("""
            from starlette.applications import Starlette
            from starlette_pomo_ws import PomoWS

            pomo = PomoWS()
            app = Starlette(lifespan=pomo.lifespan)
            app.mount("/ws", pomo)
        """),
        encoding="utf-8",
    )
    with uvicorn_cli(tmp_path, ["wired:app", "--workers", "2"]) as server:
        output = server.wait_for_output("The memory backend runs in one of 2 uvicorn workers", within=30, count=2)
        assert output.count("The memory backend runs in one of 2 uvicorn workers") == 2, output
        assert "POMO_WS_BACKEND_URL=redis://" in output
    with uvicorn_cli(tmp_path, ["wired:app"]) as server:
        assert "The memory backend runs" not in server.output


class _Proxy:
    """A module attribute whose `__class__` raises, as an unbound werkzeug LocalProxy does."""

    @property  # type: ignore[misc]
    def __class__(self) -> type:
        raise RuntimeError("unbound")


@pytest.mark.anyio
async def test_the_litestar_hint_names_only_apps_without_any_plugin(caplog: pytest.LogCaptureFixture) -> None:
    import sys
    import types

    from litestar import Litestar

    from starlette_pomo_ws.litestar import PomoWSPlugin

    other = PomoWS(make_settings())
    module = types.ModuleType("pomo_ws_litestar_probe")
    # logging_config=None: Litestar would otherwise configure logging, and drop the handler caplog reads.
    plugged = Litestar(route_handlers=[], plugins=[PomoWSPlugin(other)], logging_config=None)
    module.with_plugin = plugged  # type: ignore[attr-defined]
    module.proxy = _Proxy()  # type: ignore[attr-defined]
    sys.modules[module.__name__] = module
    try:
        with caplog.at_level("ERROR", logger="starlette_pomo_ws"):
            route_loaded_apps(PomoWS(make_settings()))  # another app's plugin: not this one's business
            assert "does not use PomoWSPlugin" not in caplog.text
            module.bare = Litestar(route_handlers=[], logging_config=None)  # type: ignore[attr-defined]
            route_loaded_apps(PomoWS(make_settings()))
            assert "The Litestar app pomo_ws_litestar_probe:bare does not use PomoWSPlugin" in caplog.text
            assert "with_plugin" not in caplog.text
            caplog.clear()
            route_loaded_apps(other)  # mounted by its plugin: nothing to say
            assert "does not use PomoWSPlugin" not in caplog.text
    finally:
        del sys.modules[module.__name__]
