"""Run `tests/e2e/matrix_app.py` under a real ASGI server, in a process of its own, on 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from ..conftest import SECRET, free_socket

ROOT = pathlib.Path(__file__).resolve().parents[2]
BIN = pathlib.Path(sys.executable).parent


def _uvicorn(ws: str, loop: str) -> list[str]:
    return [
        str(BIN / "uvicorn"),
        "tests.e2e.matrix_app:app",
        "--ws",
        ws,
        "--loop",
        loop,
        "--ws-per-message-deflate",
        "false",
        "--lifespan",
        "on",
        "--log-level",
        "warning",
        "--host",
        "127.0.0.1",
        "--port",
    ]


# Each entry: the command, up to the port number that follows it.
SERVERS: dict[str, list[str]] = {
    "uvicorn-sansio-asyncio": _uvicorn("websockets-sansio", "asyncio"),
    "uvicorn-sansio-uvloop": _uvicorn("websockets-sansio", "uvloop"),
    "uvicorn-wsproto-asyncio": _uvicorn("wsproto", "asyncio"),
    "uvicorn-wsproto-uvloop": _uvicorn("wsproto", "uvloop"),
    "hypercorn": [str(BIN / "hypercorn"), "tests.e2e.matrix_app:app", "--log-level", "warning", "--bind"],
    "granian": [
        str(BIN / "granian"),
        "--interface",
        "asgi",
        "--loop",
        "asyncio",
        "--log-level",
        "warning",
        "tests.e2e.matrix_app:app",
        "--host",
        "127.0.0.1",
        "--port",
    ],
    # daphne sends no lifespan events: the documented entry for it is `pomo.wrap(app)`.
    "daphne": [str(BIN / "daphne"), "-b", "127.0.0.1", "-v", "0", "tests.e2e.matrix_app:wrapped", "-p"],
}

# The settings every matrix server runs with (as a deployment sets them: in the environment).
SETTINGS = {
    "POMO_WS_JWT_SECRET": SECRET,
    "POMO_WS_SEND_QUEUE_SIZE": "50",
    "POMO_WS_SEND_TIMEOUT": "3",
    "POMO_WS_TOKEN_EXPIRY_WARNING": "1",
    "POMO_WS_MAX_CONNECTIONS_PER_USER": "64",
}


class ServerProcess:
    """One server process; `url()` and `http` address it, `stop()` sends it SIGTERM (a graceful shutdown)."""

    def __init__(self, name: str, env: dict[str, str] | None = None) -> None:
        self.name = name
        sock = free_socket()
        self.port = sock.getsockname()[1]
        sock.close()  # the server binds it again at once; nothing else on this machine races for it
        command = [*SERVERS[name], f"127.0.0.1:{self.port}" if name == "hypercorn" else str(self.port)]
        environment = {**os.environ, **SETTINGS, **(env or {})}
        environment.pop("POMO_WS_BACKEND_URL", None)
        self.log = open(os.devnull, "w")
        self.process = subprocess.Popen(command, cwd=ROOT, env=environment, stdout=self.log, stderr=subprocess.PIPE)

    def url(self, path: str = "/ws") -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, within: float = 20) -> None:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}: {self.stderr()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.http}/ws/health", timeout=1).status_code in (200, 503):
                    return
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not answer within {within} s: {self.stderr()}")

    def stderr(self) -> str:
        if self.process.poll() is None:
            return "(still running)"
        assert self.process.stderr is not None
        return self.process.stderr.read().decode(errors="replace")[-4000:]

    def stop(self, within: float = 15) -> int:
        """SIGTERM, then wait (bounded); SIGKILL if it hangs. Returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(within)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.log.close()
        assert self.process.stderr is not None
        self.process.stderr.close()
        return self.process.returncode


def require(name: str) -> None:
    """Every server of the matrix is installed by the `test` extra: under CI a missing one fails."""
    executable = SERVERS[name][0]
    if not os.path.exists(executable):
        message = f"{executable} is not installed (pip install -e '.[test]')"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


@contextlib.contextmanager
def serve(name: str, env: dict[str, str] | None = None) -> Iterator[ServerProcess]:
    require(name)
    server = ServerProcess(name, env)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
