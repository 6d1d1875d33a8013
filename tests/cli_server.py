"""Run `uvicorn module:app` as a user would, in its own process, on a free loopback port."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from .conftest import SECRET

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class CLIServer:
    def __init__(self, process: subprocess.Popen[str], port: int, log: Path) -> None:
        self.process = process
        self.port = port
        self.log = log

    @property
    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def wait_for_output(self, text: str, within: float = 10, count: int = 1) -> str:
        deadline = time.monotonic() + within
        while self.output.count(text) < count:
            assert self.process.poll() is None, f"the server exited:\n{self.output}"
            assert time.monotonic() < deadline, f"{text!r} did not appear within {within} s:\n{self.output}"
            time.sleep(0.02)
        return self.output


def user_env(**extra: str) -> dict[str, str]:
    """The environment of a user's shell: the venv's scripts on PATH, the secret exported."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("POMO_WS_") or k == "POMO_WS_TEST_REDIS_URL"}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["POMO_WS_JWT_SECRET"] = SECRET
    env.update(extra)
    return env


@contextlib.contextmanager
def uvicorn_cli(
    cwd: Path, args: Sequence[str], *, env: dict[str, str] | None = None, ready: str = "Uvicorn running on"
) -> Iterator[CLIServer]:
    """Start `uvicorn ARGS --port P` in `cwd`; wait for `ready` (it listens) in its output; stop it with SIGTERM."""
    port = free_port()
    log = cwd / f"uvicorn-{port}.log"
    with log.open("w", encoding="utf-8") as out:
        process = subprocess.Popen(
            [str(VENV_BIN / "uvicorn"), *args, "--host", "127.0.0.1", "--port", str(port)],
            cwd=cwd,
            env=env or user_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    server = CLIServer(process, port, log)
    try:
        server.wait_for_output(ready, within=30)
        yield server
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:  # pragma: no cover - a stuck server
            process.kill()
            process.wait(timeout=5)
