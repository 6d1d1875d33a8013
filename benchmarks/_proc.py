"""Process helpers: start and stop the processes we own, read their CPU time and memory from /proc."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
SERVER_CPU = 0
CLIENT_CPU = 1


def cpu_times(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of a process (all its threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    fields = data[data.rindex(b")") + 2 :].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def family(pid: int) -> list[int]:
    """A process and its descendants (granian serves from a worker process it spawns)."""
    pids, index = [pid], 0
    while index < len(pids):
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{pids[index]}/task"):
                with contextlib.suppress(OSError), open(f"/proc/{pids[index]}/task/{task}/children") as f:
                    pids.extend(int(child) for child in f.read().split())
        index += 1
    return pids


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and its descendants."""
    return sum(cpu_seconds(member) for member in family(pid))


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of a process and its descendants."""
    total = 0
    for member in family(pid):
        with contextlib.suppress(OSError, RuntimeError):
            total += rss_bytes(member)
    return total


def cpu_seconds(pid: int) -> float:
    """CPU seconds a process has run (user + system, all its threads), to the nanosecond.

    From the scheduler's own count in ``/proc/<pid>/task/*/schedstat``: utime and stime in
    ``/proc/<pid>/stat`` tick at 10 ms, too coarse for bursts of a fraction of a second.
    Falls back to them where schedstat is missing.
    """
    total = 0
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(FileNotFoundError):  # a thread that just ended
                with open(f"/proc/{pid}/task/{task}/schedstat", "rb") as f:
                    total += int(f.read().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        total = 0
    if total:
        return total / 1e9
    user, system = cpu_times(pid)
    return user + system


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def raise_nofile(wanted: int) -> int:
    """Raise RLIMIT_NOFILE's soft limit (inherited by the children) as far as the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def pinned(cpu: int, argv: list[str]) -> list[str]:
    """Prefix argv with ``taskset -c cpu`` when the machine has that core (taskset execs, so the PID stays)."""
    if shutil.which("taskset") and cpu < (os.cpu_count() or 1):
        return ["taskset", "-c", str(cpu), *argv]
    return argv


@contextlib.contextmanager
def own_redis(cpu: int) -> Iterator[str]:
    """A ``redis-server`` of the benchmark's own on a free port, pinned to core `cpu`; yields its URL.

    It runs at a higher priority than the load generators it shares the core with (``nice -n -10``, where
    the user may), so that it answers when asked, as a Redis on a host of its own does, instead of waiting
    for a load generator's time slice to end. No persistence. Stopped by its PID on the way out.
    """
    port = free_port()
    argv = ["redis-server", "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no"]
    if os.geteuid() == 0 and shutil.which("nice"):
        argv = ["nice", "-n", "-10", *argv]  # nice execs: the PID stays redis-server's
    proc = spawn(pinned(cpu, argv), child_env(), subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {proc.returncode} before it answered")
            with contextlib.suppress(OSError), socket.create_connection((HOST, port), 1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"redis-server on port {port} did not answer within 10 s")
            time.sleep(0.05)
        yield f"redis://{HOST}:{port}/0"
    finally:
        stop_process(proc)


def pin_self(cpu: int) -> None:
    with contextlib.suppress(OSError, AttributeError, ValueError):
        if cpu < (os.cpu_count() or 1):
            os.sched_setaffinity(0, {cpu})


def die_with_parent() -> None:
    """``preexec_fn`` for our children: SIGTERM them if the driver dies (PR_SET_PDEATHSIG survives exec)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 == PR_SET_PDEATHSIG


def spawn(argv: list[str], env: dict[str, str], log: Any = None) -> subprocess.Popen[bytes]:
    """Start a child that dies with us; fork+exec returns at once, and Popen gives the PID for /proc."""
    return subprocess.Popen(argv, env=env, stdout=log, stderr=log, preexec_fn=die_with_parent)


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("PYTHONHASHSEED", "0")
    if extra:
        env.update(extra)
    return env


SERVERS = ("uvicorn", "hypercorn", "granian")


def server_argv(server: str, app: str, port: int, deflate: bool) -> list[str]:
    """The command that serves `app` (``module:attr``) on `port`, pinned to the server core."""
    if server == "uvicorn":
        return uvicorn_argv(app, port, deflate)
    if server == "hypercorn":
        # hypercorn negotiates permessage-deflate only when the client offers it (our load generators do
        # only with --deflate on).
        argv = [sys.executable, "-m", "hypercorn", app, "--bind", f"{HOST}:{port}", "--log-level", "warning"]
        return pinned(SERVER_CPU, [*argv, "--backlog", "4096", "--graceful-timeout", "5"])
    if server == "granian":
        argv = [sys.executable, "-m", "granian", "--interface", "asgi", "--host", HOST, "--port", str(port)]
        argv += ["--loop", "uvloop", "--log-level", "warning", "--backlog", "4096", "--workers", "1", app]
        return pinned(SERVER_CPU, argv)
    raise ValueError(f"unknown server {server!r}; choose one of {', '.join(SERVERS)}")


def uvicorn_argv(app: str, port: int, deflate: bool, extra: list[str] | None = None) -> list[str]:
    argv = [
        sys.executable,
        "-m",
        "uvicorn",
        app,
        "--host",
        HOST,
        "--port",
        str(port),
        "--ws",
        "websockets-sansio",
        "--ws-per-message-deflate",
        "true" if deflate else "false",
        "--log-level",
        "warning",
        "--no-access-log",
        "--timeout-graceful-shutdown",
        "5",
        "--backlog",
        "4096",
    ]
    return pinned(SERVER_CPU, argv + (extra or []))


async def wait_http_ready(port: int, path: str, proc: subprocess.Popen[bytes] | None, timeout: float) -> None:
    """Poll ``GET path`` until it answers 200, the process dies, or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    for _ in range(int(timeout / 0.05) + 1):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready")
        if time.monotonic() > deadline:
            break
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), 1)
            try:
                writer.write(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
                status = await asyncio.wait_for(reader.readline(), 2)
                if b" 200 " in status:
                    return
                last = RuntimeError(status.decode("latin-1").strip())
            finally:
                writer.close()
        except (OSError, asyncio.TimeoutError) as exc:
            last = exc
        await asyncio.sleep(0.05)
    raise TimeoutError(f"server on port {port} not ready after {timeout}s: {last}")


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Stop one process we started, by its PID: SIGTERM, a bounded wait, then SIGKILL."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)


class Http:
    """A tiny keep-alive HTTP/1.1 client for triggering broadcasts (cheap on the load-generator core)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> Http:
        self.reader, self.writer = await asyncio.wait_for(asyncio.open_connection(HOST, self.port), 5)
        return self

    async def request(self, method: str, path: str, timeout: float = 30.0) -> tuple[int, bytes]:
        assert self.reader is not None and self.writer is not None
        self.writer.write(f"{method} {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 0\r\n\r\n".encode())
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), timeout)
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        body = await asyncio.wait_for(self.reader.readexactly(length), timeout) if length else b""
        return status, body

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.writer.wait_closed(), 2)


async def request_once(port: int, method: str, path: str, timeout: float = 30.0) -> bytes:
    """One request on a fresh connection (the server drops idle keep-alives); the body of a 200."""
    http = await Http(port).open()
    try:
        status, body = await http.request(method, path, timeout)
    finally:
        await http.close()
    if status != 200:
        raise RuntimeError(f"{method} {path}: {status} {body[:200]!r}")
    return body
