"""The benchmark driver: ``python -m benchmarks run [--smoke | --quick | --full] [--redis URL]``.

For each configuration (N connections, backend, permessage-deflate on or off) and each repetition,
it starts the baseline app and the package app in turn (the order alternates between repetitions),
each under its own uvicorn pinned to core 0, and drives them from load-generator processes pinned
to core 1. Every session runs the same phases:

1. ``handshake``: N connections with a JWT each (users have 2 connections), done when
   ``CONNECTION_ESTABLISHED`` arrives: handshakes/s and server CPU µs per handshake;
2. ``idle``: server RSS delta ÷ N, after 1 s idle;
3. ``fanout``: B ``broadcast_to_all`` through ``POST /bench/all?count=5`` with 2 requests in flight:
   server CPU µs per delivery (from /proc/<pid>/task/*/schedstat), deliveries/s, client CPU;
4. ``latency``: paced single broadcasts (about 1/3 of capacity): publish-to-receipt p50/p99;
5. ``per_user``: R ``broadcast_to_user`` through ``POST /bench/user/{uid}`` from 8 keep-alive HTTP
   connections: broadcasts/s and server CPU µs per request;
6. ``churn`` (not in smoke): close all and reconnect, twice: RSS after each cycle.

Then, per repetition, the *paired rounds* (the headline figures): the baseline, the package (each
backend, and with ``--metrics`` once more with its metrics on) and the floor app
(``benchmarks/floor_app.py``, the thinnest loop a mounted app can have) all hold N connections at
once. Each round runs one burst of a kind on every server in rotating order, then the next kind:
fan-out, paced latency, per-user requests, and closing then reopening up to 1,000 connections
(handshakes). Ratios are taken within a round, between bursts about a second apart, so the
machine's drift between sessions (±30 % over minutes on a shared VM) cancels; the reported ratio
is the median over all rounds of all repetitions. Server CPU comes from the scheduler's
nanosecond count (``/proc/<pid>/task/*/schedstat``).

Then, per N, the *channel run* (issue 12, ``channels_run``; ``--no-channels`` skips it): one package
server whose connections each SUBSCRIBE to 10 channels (subscribes/s, added RSS per connection) and
to ``bench:all``, then paired rounds of ``broadcast_to_all`` and ``broadcast_to_channel`` bursts to
the same connections (CPU per delivery and latency, channel ÷ all), and for the first N a presence
phase: messages the server sends per join/leave of one presence channel of up to 1,000 members.

Every expected delivery is counted (and seq checksums compared): one lost or extra message fails
the run (exit status 1). Results go to ``benchmarks/results/<mode>.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import _proc

SECRET = "benchmark-secret-at-least-32-bytes-long!"
RESULTS = Path(__file__).resolve().parent / "results"
CONNS_PER_LOADGEN = 2500
HANDSHAKE_CONCURRENCY = 64
FANOUT_BATCH = 5  # broadcasts per HTTP trigger
FANOUT_WINDOW = 2  # HTTP triggers in flight
PER_USER_HTTP_CONNS = 8
APP_MODULES = {
    "baseline": "benchmarks.baseline_app:app",
    "pomo": "benchmarks.pomo_app:app",
    "pomo-metrics": "benchmarks.pomo_app:app",  # the same app with Settings(metrics=True)
    "pomo-wrap": "benchmarks.pomo_app:app",  # the same app behind `pomo.wrap(app)`
    "floor": "benchmarks.floor_app:app",  # the thinnest mounted loop: a reference, not a competitor
}
METRICS_TARGET = 1.05  # issue 7: metrics on costs at most 5 % more fan-out CPU than metrics off

# The targets of issue 5, as ratios to the baseline in the same run.
TARGETS = {
    "fanout_us": ("<=", {1000: 0.85, 10000: 0.90}),
    "rss_per_conn": ("<=", {10000: 1.15}),
    "handshakes_per_s": (">=", 0.9),
    "per_user_per_s": (">=", 0.9),
    "p99_ms": ("<=", 1.0),
}
REDIS_TARGET = 1.1  # redis fan-out µs per delivery ÷ memory, N=1,000


@dataclass
class Mode:
    name: str
    sizes: list[int]
    reps: int
    fanout_deliveries: int  # B = max(20, this // N) broadcasts
    latency_events: int
    per_user_requests: int  # rounded up to a multiple of the number of users
    churn_cycles: int
    deflate: list[bool] = field(default_factory=lambda: [False])
    stall: float = 10.0  # seconds without any new delivery before a phase counts as lossy
    paired_rounds: int = 8
    paired_deliveries: int = 20_000  # per fan-out burst
    paired_user_requests: int = 2_000  # per per-user burst (rounded up to a multiple of the users)
    paired_handshakes: int = 1_000  # connections closed and reopened per handshake burst (at most N)
    paired_latency_events: int = 10  # paced broadcasts per latency burst (a third of it at N=10,000)
    server: str = "uvicorn"  # the ASGI server every app runs under (--server)
    presence_members: int = 1_000  # members of the one presence channel (the channel run of the first N)
    presence_cycles: int = 5  # probe join + leave per presence stage
    channel_deliveries: int = 100_000  # per fan-out burst of the channel run


MODES = {
    "smoke": Mode(
        "smoke",
        [100],
        1,
        2_000,
        5,
        200,
        0,
        stall=3.0,
        paired_rounds=2,
        paired_user_requests=200,
        paired_latency_events=5,
        presence_members=20,
        presence_cycles=2,
        channel_deliveries=5_000,
    ),
    "quick": Mode("quick", [1000], 1, 100_000, 30, 2_000, 2, paired_rounds=6, paired_deliveries=100_000),
    "full": Mode(
        "full", [1000, 10000], 3, 200_000, 30, 5_000, 2, [False, True], paired_rounds=6, paired_deliveries=100_000
    ),
}


class SessionFailed(RuntimeError):
    pass


# ------------------------------------------------------------------------------------ load generators
class LoadGen:
    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        argv = _proc.pinned(_proc.CLIENT_CPU, [sys.executable, "-m", "benchmarks.loadgen"])
        self.proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=_proc.child_env(),
            limit=1 << 26,
            preexec_fn=_proc.die_with_parent,
        )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def call(self, msg: dict[str, Any], timeout: float) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write((json.dumps(msg) + "\n").encode())
        await self.proc.stdin.drain()
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        except asyncio.TimeoutError:
            # Its late reply would answer the next command: replace the process instead.
            await self.restart()
            raise SessionFailed(
                f"load generator {self.index}: no reply to {msg['cmd']!r} within {timeout:.0f} s"
            ) from None
        if not line:
            raise SessionFailed(f"load generator {self.index} exited")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise SessionFailed(f"load generator {self.index}: {reply['error']}")
        return reply

    async def restart(self) -> None:
        assert self.proc is not None
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()  # our own child, by its PID
            await asyncio.wait_for(self.proc.wait(), 10)
        await self.start()

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        with contextlib.suppress(Exception):
            await self.call({"cmd": "exit"}, 10)
        try:
            await asyncio.wait_for(self.proc.wait(), 5)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await asyncio.wait_for(self.proc.wait(), 5)


async def call_all(gens: list[LoadGen], msgs: list[dict[str, Any]], timeout: float) -> list[dict[str, Any]]:
    return list(await asyncio.gather(*(g.call(m, timeout) for g, m in zip(gens, msgs, strict=True))))


def client_cpu(gens: list[LoadGen]) -> float:
    return sum(_proc.cpu_seconds(g.pid) for g in gens) + _proc.cpu_seconds(os.getpid())


# ------------------------------------------------------------------------------------------- session
@dataclass
class Config:
    n: int
    backend: str  # "memory" or "redis"
    deflate: bool

    @property
    def key(self) -> str:
        return f"N={self.n} {self.backend} deflate={'on' if self.deflate else 'off'}"


def quantile(sorted_values: array[int] | list[int], q: float) -> float:
    if not sorted_values:
        return math.nan
    return float(sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))])


class Session:
    """One server process (one app, one configuration) driven through every phase."""

    def __init__(self, app: str, config: Config, mode: Mode, gens: list[LoadGen], redis_url: str | None) -> None:
        self.app = app
        self.config = config
        self.mode = mode
        self.all_gens = gens
        self.redis_url = redis_url
        self.port = _proc.free_port()
        self.server: subprocess.Popen[bytes] | None = None
        self.log = tempfile.NamedTemporaryFile(prefix=f"bench-{app}-", suffix=".log", delete=False)
        n = config.n
        self.nproc = max(1, math.ceil(n / CONNS_PER_LOADGEN))
        self.gens = gens[: self.nproc]
        bounds = [round(i * n / self.nproc) for i in range(self.nproc + 1)]
        self.slices = [list(range(bounds[i], bounds[i + 1])) for i in range(self.nproc)]
        self.users = n // 2
        self.result: dict[str, Any] = {"app": app, "config": config.key, "n": n}
        self.group = self.name = f"{app}-{config.backend}"
        self.seq = 0
        self.claims: dict[str, Any] | None = None  # extra JWT claims for every connection (the channel runs)
        self.extra_env: dict[str, str] = {}

    # -- process control -------------------------------------------------------------------------
    async def start_server(self) -> None:
        env = {"BENCH_JWT_SECRET": SECRET, **self.extra_env}
        if self.app == "pomo-metrics":
            env["BENCH_METRICS"] = "1"
        if self.app == "pomo-wrap":
            env["BENCH_WRAP"] = "1"
        if self.app in ("pomo", "pomo-metrics", "pomo-wrap"):
            env["BENCH_BACKEND_URL"] = (
                self.redis_url if self.config.backend == "redis" and self.redis_url else "memory://"
            )
            if self.config.backend == "redis":
                flush_redis(env["BENCH_BACKEND_URL"])
        argv = _proc.server_argv(self.mode.server, APP_MODULES[self.app], self.port, self.config.deflate)
        self.server = _proc.spawn(argv, _proc.child_env(env), self.log)
        await _proc.wait_http_ready(self.port, "/bench/ready", self.server, 60)

    def server_log_tail(self) -> str:
        with contextlib.suppress(OSError):
            self.log.flush()
            return Path(self.log.name).read_text(errors="replace")[-3000:]
        return ""

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await call_all(self.gens, [{"cmd": "close", "timeout": 10, "group": self.group}] * self.nproc, 30)
        if self.server is not None:
            _proc.stop_process(self.server)
        self.log.close()
        if self.server is not None and self.server.returncode not in (0, -15, None):
            self.result.setdefault("warnings", []).append(f"server exit status {self.server.returncode}")
        with contextlib.suppress(OSError):
            os.unlink(self.log.name)

    def server_cpu(self) -> float:
        assert self.server is not None
        return _proc.tree_cpu_seconds(self.server.pid)

    def server_rss(self) -> int:
        assert self.server is not None
        return _proc.tree_rss_bytes(self.server.pid)

    # -- helpers ---------------------------------------------------------------------------------
    async def connect(self, indexes: list[list[int]], prefix: str = "u") -> tuple[float, int]:
        """Connect ``indexes[i]`` from load generator i (users have 2 connections): (wall s, connected)."""
        return await self.connect_users([[f"{prefix}{g // 2}" for g in idx] for idx in indexes])

    async def connect_users(self, users: list[list[str]]) -> tuple[float, int]:
        msgs = [
            {
                "cmd": "connect",
                "group": self.group,
                "port": self.port,
                "path": "/ws",
                "deflate": self.config.deflate,
                "secret": SECRET,
                "users": mine,
                "claims": self.claims,
                "concurrency": HANDSHAKE_CONCURRENCY,
                "timeout": 30,
                "total_timeout": 60 + len(mine) * 0.1,
            }
            for mine in users
        ]
        longest = max(len(u) for u in users)
        replies = await call_all(self.gens[: len(users)], msgs, 90 + longest * 0.1)
        failed = sum(r["failed"] for r in replies)
        if failed:
            raise SessionFailed(f"{failed} handshakes failed, e.g. {replies[0]['errors'] or replies[-1]['errors']}")
        t0 = min(r["t0"] for r in replies)
        t1 = max(r["t1"] for r in replies)
        return (t1 - t0) / 1e9, sum(r["connected"] for r in replies)

    async def close_all(self) -> None:
        await call_all(self.gens, [{"cmd": "close", "timeout": 10, "group": self.group}] * self.nproc, 60)

    async def expect(self, msg: dict[str, Any]) -> None:
        await call_all(self.gens, [{"cmd": "expect", "group": self.group, **msg}] * self.nproc, 30)

    async def wait(self, deliveries: int, phase: str, latencies: bool) -> tuple[dict[str, Any], array[int]]:
        timeout = 60 + deliveries * 1e-4
        msg = {"cmd": "wait", "group": self.group, "timeout": timeout, "stall": self.mode.stall, "latencies": latencies}
        replies = await call_all(self.gens, [msg] * self.nproc, timeout + 30)
        merged: dict[str, Any] = {
            key: sum(r[key] for r in replies)
            for key in ("expected", "received", "lost", "extra", "bad_checksum", "unexpected_close")
        }
        merged["complete"] = all(r["complete"] for r in replies)
        merged["last_recv_ns"] = max(r["last_recv_ns"] for r in replies)
        lat = array("q")
        for r in replies:
            if r["latencies"]:
                lat.frombytes(base64.b64decode(r["latencies"]))
        losses = merged["lost"] + merged["extra"] + merged["bad_checksum"]
        self.result.setdefault("losses", 0)
        self.result["losses"] += losses
        if not merged["complete"] or merged["received"] != deliveries:
            raise SessionFailed(
                f"{phase}: {merged['received']} of {deliveries} deliveries received "
                f"(lost {merged['lost']}, extra {merged['extra']}, bad checksums {merged['bad_checksum']}, "
                f"unexpected closes {merged['unexpected_close']})"
            )
        return merged, lat

    # -- phases ----------------------------------------------------------------------------------
    async def run(self) -> dict[str, Any]:
        n = self.config.n
        mode = self.mode
        try:
            await self.start_server()
            # Warm-up: a few connections and one broadcast, so lazy imports and first-use
            # allocations are not counted as per-connection memory.
            await self.connect([list(range(20))], prefix="w")
            gens, nproc = self.gens, self.nproc
            self.gens, self.nproc = gens[:1], 1
            await self.expect({"kind": "all", "seq": self.seq, "count": 1})
            await self.trigger_all(1)
            await self.wait(20, "warm-up", latencies=False)
            await self.close_all()
            self.gens, self.nproc = gens, nproc
            await asyncio.sleep(0.3)

            # 1. handshakes + 2. idle memory
            rss0 = self.server_rss()
            cpu0 = self.server_cpu()
            wall, connected = await self.connect(self.slices)
            cpu1 = self.server_cpu()
            if connected != n:
                raise SessionFailed(f"{connected} of {n} connected")
            self.result["handshakes_per_s"] = n / wall
            self.result["handshake_cpu_us"] = (cpu1 - cpu0) * 1e6 / n
            await asyncio.sleep(1.0)
            rss1 = self.server_rss()
            self.result["rss_per_conn"] = (rss1 - rss0) / n
            self.result["rss_connected_mib"] = rss1 / 2**20

            await self.phase_fanout()
            await self.phase_latency()
            await self.phase_per_user()
            if mode.churn_cycles:
                await self.phase_churn(rss1)
            self.result["ok"] = True
        except Exception as exc:
            self.result["ok"] = False
            self.result["error"] = f"{type(exc).__name__}: {exc}"
            self.result["server_log"] = self.server_log_tail()
        finally:
            await self.stop()
        return self.result

    async def trigger_all(
        self, broadcasts: int, batch: int = FANOUT_BATCH, window: int = FANOUT_WINDOW, target: str = "/bench/all"
    ) -> None:
        """POST /bench/all (or ``target``) in batches, with ``window`` requests in flight."""
        seqs = list(range(self.seq, self.seq + broadcasts, batch))
        end = self.seq + broadcasts
        self.seq = end

        async def worker(my: list[int]) -> None:
            http = await _proc.Http(self.port).open()
            try:
                for s in my:
                    status, body = await http.request("POST", f"{target}?count={min(batch, end - s)}&seq={s}", 120)
                    if status != 200:
                        raise SessionFailed(f"POST {target}: {status} {body[:200]!r}")
            finally:
                await http.close()

        await asyncio.gather(*(worker(seqs[i::window]) for i in range(window)))

    async def burst(self, broadcasts: int, target: str = "/bench/all") -> float:
        """One fan-out burst for the paired measurement: server CPU µs per delivery."""
        deliveries = broadcasts * self.config.n
        await self.expect({"kind": "all", "seq": self.seq, "count": broadcasts})
        cpu0 = self.server_cpu()
        await self.trigger_all(broadcasts, target=target)
        await self.wait(deliveries, "paired fan-out", latencies=False)
        return (self.server_cpu() - cpu0) * 1e6 / deliveries

    async def phase_fanout(self) -> None:
        n = self.config.n
        broadcasts = max(20, self.mode.fanout_deliveries // n)
        broadcasts = math.ceil(broadcasts / FANOUT_BATCH) * FANOUT_BATCH
        deliveries = broadcasts * n
        await self.expect({"kind": "all", "seq": self.seq, "count": broadcasts})
        cpu0, ccpu0 = self.server_cpu(), client_cpu(self.all_gens)
        t0 = time.time_ns()
        await self.trigger_all(broadcasts)
        merged, lat = await self.wait(deliveries, "fanout", latencies=True)
        cpu1, ccpu1 = self.server_cpu(), client_cpu(self.all_gens)
        wall = (merged["last_recv_ns"] - t0) / 1e9
        lat = array("q", sorted(lat))
        r = self.result
        r["fanout_broadcasts"] = broadcasts
        r["fanout_deliveries"] = deliveries
        r["fanout_us"] = (cpu1 - cpu0) * 1e6 / deliveries
        r["fanout_per_s"] = deliveries / wall
        r["fanout_server_util"] = (cpu1 - cpu0) / wall
        r["fanout_client_util"] = (ccpu1 - ccpu0) / wall
        r["fanout_client_us"] = (ccpu1 - ccpu0) * 1e6 / deliveries
        r["client_bound"] = r["fanout_client_util"] >= 0.9 and r["fanout_server_util"] < 0.9
        r["fanout_sat_p50_ms"] = quantile(lat, 0.5) / 1e6
        r["fanout_sat_p99_ms"] = quantile(lat, 0.99) / 1e6

    def latency_plan(self, events: int) -> tuple[int, float]:
        n = self.config.n
        events = events if n <= 1000 else max(5, events // 3)
        # About a third of the baseline's capacity on this machine, the same for both apps.
        return events, max(0.01, n * (200e-6 if self.config.deflate else 80e-6))

    async def phase_latency(self) -> None:
        events, interval = self.latency_plan(self.mode.latency_events)
        p50, p99 = await self.burst_latency(events, interval)
        self.result["latency_events"] = events
        self.result["latency_interval_ms"] = interval * 1e3
        self.result["p50_ms"] = p50
        self.result["p99_ms"] = p99

    async def burst_latency(self, events: int, interval: float, target: str = "/bench/all") -> tuple[float, float]:
        """``events`` single broadcasts ``interval`` s apart: publish-to-receipt p50 and p99, in ms."""
        n = self.config.n
        await self.expect({"kind": "all", "seq": self.seq, "count": events})
        http = await _proc.Http(self.port).open()
        try:
            start = time.monotonic()
            for i in range(events):
                delay = start + i * interval - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                status, body = await http.request("POST", f"{target}?count=1&seq={self.seq + i}", 60)
                if status != 200:
                    raise SessionFailed(f"POST {target}: {status} {body[:200]!r}")
        finally:
            await http.close()
        self.seq += events
        _, lat = await self.wait(events * n, "latency", latencies=True)
        lat = array("q", sorted(lat))
        return quantile(lat, 0.5) / 1e6, quantile(lat, 0.99) / 1e6

    async def phase_per_user(self) -> None:
        users = self.users
        requests = math.ceil(max(users, self.mode.per_user_requests) / users) * users
        per_s, cpu_us = await self.burst_per_user(requests)
        self.result["per_user_requests"] = requests
        self.result["per_user_per_s"] = per_s
        self.result["per_user_cpu_us"] = cpu_us

    async def burst_per_user(self, requests: int) -> tuple[float, float]:
        """``requests`` per-user broadcasts from 8 keep-alive HTTP connections: (requests/s, server CPU µs each)."""
        users = self.users
        await self.expect({"kind": "user", "requests": requests, "users": users})
        cpu0 = self.server_cpu()
        t0 = time.time_ns()

        async def worker(start: int) -> None:
            http = await _proc.Http(self.port).open()
            try:
                for i in range(start, requests, PER_USER_HTTP_CONNS):
                    status, body = await http.request("POST", f"/bench/user/u{i % users}?seq={i}", 60)
                    if status != 200:
                        raise SessionFailed(f"POST /bench/user: {status} {body[:200]!r}")
            finally:
                await http.close()

        await asyncio.gather(*(worker(c) for c in range(PER_USER_HTTP_CONNS)))
        merged, _ = await self.wait(requests * 2, "per_user", latencies=False)
        cpu1 = self.server_cpu()
        wall = (max(merged["last_recv_ns"], time.time_ns()) - t0) / 1e9
        return requests / wall, (cpu1 - cpu0) * 1e6 / requests

    async def burst_handshakes(self, count: int, pause: float = 0.3) -> tuple[float, float]:
        """Close the last ``count`` connections (spread over the load generators), then open them again.

        Returns (handshakes/s, server CPU µs per handshake), both over the reconnection only.
        """
        share = [count // self.nproc + (1 if i < count % self.nproc else 0) for i in range(self.nproc)]
        msgs = [{"cmd": "close", "timeout": 10, "group": self.group, "last": k} for k in share]
        replies = await call_all(self.gens, msgs, 60)
        await asyncio.sleep(pause)  # let the server finish with the closed sockets before measuring
        cpu0 = self.server_cpu()
        wall, connected = await self.connect_users([r["users"] for r in replies])
        cpu_us = (self.server_cpu() - cpu0) * 1e6 / count
        if connected != self.config.n:
            raise SessionFailed(f"{connected} of {self.config.n} connected after reconnecting {count}")
        return count / wall, cpu_us

    async def phase_churn(self, rss_first: int) -> None:
        samples = []
        # At 10,000 connections each cycle costs a minute on a loaded 2-core machine: one cycle there.
        for _ in range(self.mode.churn_cycles if self.config.n <= 1000 else 1):
            await self.close_all()
            await asyncio.sleep(0.5)
            closed = self.server_rss()
            await self.connect(self.slices)
            await asyncio.sleep(0.5)
            samples.append({"closed_mib": closed / 2**20, "connected_mib": self.server_rss() / 2**20})
        self.result["churn"] = samples
        last = samples[-1]["connected_mib"] * 2**20
        self.result["churn_growth_per_conn"] = (last - rss_first) / self.config.n


async def paired_run(
    n: int,
    deflate: bool,
    backends: list[str],
    mode: Mode,
    gens: list[LoadGen],
    redis_url: str | None,
    rep: int,
    metrics: bool = False,
    floor: bool = False,
    wrap: bool = False,
) -> dict[str, Any]:
    """Every figure with every server up at once, in short bursts and rotating order.

    Sessions run minutes apart, and on a shared machine the CPU speed drifts by ±30 % over minutes.
    Here the baseline and the package (each backend) hold N connections each, and each round runs one
    burst of each kind per server (fan-out, paced latency, per-user requests, reconnecting a slice of
    the connections), seconds apart: the ratio of two bursts in one round cancels most drift.
    """
    sessions = [Session("baseline", Config(n, "memory", deflate), mode, gens, redis_url)]
    sessions += [Session("pomo", Config(n, b, deflate), mode, gens, redis_url) for b in backends]
    if metrics:  # the package again, with its Prometheus metrics on
        sessions.append(Session("pomo-metrics", Config(n, "memory", deflate), mode, gens, redis_url))
    if wrap:  # the package again, behind `pomo.wrap(app)`: WebSockets skip Starlette's routing
        sessions.append(Session("pomo-wrap", Config(n, "memory", deflate), mode, gens, redis_url))
    if floor:  # the thinnest loop any mounted app can have: where the package's floor is
        sessions.append(Session("floor", Config(n, "memory", deflate), mode, gens, redis_url))
    broadcasts = max(FANOUT_BATCH, math.ceil(mode.paired_deliveries / n / FANOUT_BATCH) * FANOUT_BATCH)
    users = n // 2
    user_requests = math.ceil(mode.paired_user_requests / users) * users
    handshakes = min(n, mode.paired_handshakes)
    latency_events, interval = sessions[0].latency_plan(mode.paired_latency_events)
    result: dict[str, Any] = {"kind": "paired", "n": n, "deflate": deflate, "rep": rep, "rounds": [], "losses": 0}
    try:
        for s in sessions:
            await s.start_server()
            _, connected = await s.connect(s.slices)
            if connected != n:
                raise SessionFailed(f"{s.app}: {connected} of {n} connected")
        for r in range(mode.paired_rounds + 1):  # round 0 warms up
            order = sessions[r % len(sessions) :] + sessions[: r % len(sessions)]
            row: dict[str, dict[str, float]] = {key: {} for key, *_ in PAIRED_FIGURES}
            # One kind of burst on every server, then the next kind: bursts compared with each other
            # run back to back, about a second apart.
            for s in order:
                row["fanout_us"][s.name] = await s.burst(broadcasts)
            for s in order:
                row["p50_ms"][s.name], row["p99_ms"][s.name] = await s.burst_latency(latency_events, interval)
            for s in order:
                row["per_user_per_s"][s.name], row["per_user_cpu_us"][s.name] = await s.burst_per_user(user_requests)
            for s in order:
                row["handshakes_per_s"][s.name], row["handshake_cpu_us"][s.name] = await s.burst_handshakes(handshakes)
            if r:
                result["rounds"].append(row)
        result["burst"] = {
            "broadcasts": broadcasts,
            "latency_events": latency_events,
            "latency_interval_ms": interval * 1e3,
            "per_user_requests": user_requests,
            "handshakes": handshakes,
        }
        result["ok"] = True
    except Exception as exc:
        result["ok"] = False
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["server_log"] = "\n".join(s.server_log_tail() for s in sessions)
    finally:
        for s in sessions:
            result["losses"] += s.result.get("losses", 0)
            await s.stop()
    return result


# ------------------------------------------------------------------------------------------ channels
CHANNEL_CLAIMS = {"channels": ["bench:*", "presence:*"]}  # the token's `channels` claim: the default path
FAN_CHANNEL = "bench:all"
CHANNELS_PER_CONN = 10
MEMBERS_PER_CHANNEL = 100
_STRIDES = (1, 3, 7, 9, 11, 13, 17, 19, 21, 23)  # coprime to 10^k: each is a permutation of the connections
PRESENCE_CHANNEL = "presence:room"
PROBE_CHANNEL = "bench:none"  # never subscribed: a PRESENCE request for it is answered ERROR forbidden
CHANNEL_TARGETS = {"fanout_ratio": 1.05, "added_bytes_per_conn": 1024}


def channel_layout(n: int, prefix: str = "bench:m") -> list[list[str]]:
    """Connection g's 10 channels: 10 different partitions of the N connections into channels of 100.

    Channel ``{prefix}{k}.{b}`` holds the connections whose position in permutation k (g -> g·a_k mod N)
    falls in block b: N/10 channels of 100 members (1,000 at N=10,000), and two connections share at
    most a few channels, as members of different teams, rooms and boards do.
    """
    blocks = max(1, n // MEMBERS_PER_CHANNEL)
    strides = [a if math.gcd(a, n) == 1 else 1 for a in _STRIDES[:CHANNELS_PER_CONN]]
    return [[f"{prefix}{k}.{(g * a) % n * blocks // n}" for k, a in enumerate(strides)] for g in range(n)]


async def channels_run(
    n: int,
    mode: Mode,
    gens: list[LoadGen],
    rep: int,
    presence_members: int,
    backend: str = "memory",
    redis_url: str | None = None,
) -> dict[str, Any]:
    """The channel figures of issue 12, on one package server (deflate off) on `backend`.

    1. N connections (users have 2) with a `channels` claim; RSS after 1 s idle;
    2. each SUBSCRIBEs to 10 channels of ``channel_layout``, pipelined, 64 connections in flight:
       subscribes/s, server CPU per subscribe, and after 1 s the added RSS per connection;
    3. each SUBSCRIBEs to ``bench:all``; then paired rounds: one ``broadcast_to_all`` burst and one
       ``broadcast_to_channel("bench:all")`` burst (rotating order) to the same N connections, then
       paced single events of each: CPU per delivery and latency, as ratios channel ÷ all per round;
    4. presence (when ``presence_members``): members join one presence channel in stages; at each
       stage a probe connection joins and leaves, and every message the server sends is counted.
    """
    s = Session("pomo", Config(n, backend, False), mode, gens, redis_url)
    s.group = s.name = f"channels-{backend}"
    s.claims = CHANNEL_CLAIMS
    s.extra_env = {"BENCH_PRESENCE_MAX": str(max(100, presence_members + 10))}
    broadcasts = max(FANOUT_BATCH, math.ceil(mode.channel_deliveries / n / FANOUT_BATCH) * FANOUT_BATCH)
    latency_events, interval = s.latency_plan(mode.paired_latency_events)
    target = f"/bench/channel/{FAN_CHANNEL}"
    result: dict[str, Any] = {"kind": "channels", "n": n, "backend": backend, "rep": rep, "rounds": [], "losses": 0}
    layout = channel_layout(n)
    try:
        await s.start_server()
        # Warm-up on 20 connections: every code path once, so that first-use allocations are not
        # counted as per-connection memory.
        gen0 = gens[0]
        group0, gens0 = s.group, s.gens
        s.group, s.gens, s.nproc = "channels-warm", gens[:1], 1
        await s.connect([list(range(20))], prefix="w")
        await subscribe(s, [channel_layout(20, "bench:warm")[:20]], kind="SUBSCRIBE")
        await subscribe(s, [[[FAN_CHANNEL]] * 20])
        await s.expect({"kind": "all", "seq": s.seq, "count": 5})
        await s.trigger_all(5, target=target)
        await s.wait(100, "channel warm-up", latencies=False)
        await s.close_all()
        s.group, s.gens, s.nproc = group0, gens0, len(gens0)
        await asyncio.sleep(0.3)

        _, connected = await s.connect(s.slices)
        if connected != n:
            raise SessionFailed(f"{connected} of {n} connected")
        await asyncio.sleep(1.0)
        rss_fresh = s.server_rss()
        # One client message each first (a PRESENCE request for a channel not held: ERROR forbidden), so
        # that the memory any connection keeps once it has spoken is not counted as the channels' cost.
        await subscribe(s, [[[PROBE_CHANNEL]] * len(sl) for sl in s.slices], kind="PRESENCE", errors=True)
        await asyncio.sleep(1.0)
        rss0 = s.server_rss()
        cpu0 = s.server_cpu()
        wall = await subscribe(s, [[layout[g] for g in sl] for sl in s.slices])
        cpu1 = s.server_cpu()
        subscribes = n * CHANNELS_PER_CONN
        result["subscribes"] = subscribes
        result["subscribes_per_s"] = subscribes / wall
        result["subscribe_cpu_us"] = (cpu1 - cpu0) * 1e6 / subscribes
        await asyncio.sleep(1.0)
        rss1 = s.server_rss()
        result["rss_fresh_mib"] = rss_fresh / 2**20
        result["rss_unsubscribed_mib"] = rss0 / 2**20
        result["rss_subscribed_mib"] = rss1 / 2**20
        result["added_bytes_per_conn"] = (rss1 - rss0) / n
        result["first_message_bytes_per_conn"] = (rss0 - rss_fresh) / n
        result["channels"] = len({c for cs in layout for c in cs})
        result["members_per_channel"] = n * CHANNELS_PER_CONN / result["channels"]

        await subscribe(s, [[[FAN_CHANNEL]] * len(sl) for sl in s.slices])
        kinds = [("all", "/bench/all"), ("channel", target)]
        for r in range(mode.paired_rounds + 1):  # round 0 warms up
            order = kinds if r % 2 else kinds[::-1]
            row: dict[str, dict[str, float]] = {"fanout_us": {}, "p50_ms": {}, "p99_ms": {}}
            for name, path in order:
                row["fanout_us"][name] = await s.burst(broadcasts, path)
            for name, path in order:
                row["p50_ms"][name], row["p99_ms"][name] = await s.burst_latency(latency_events, interval, path)
            if r:
                result["rounds"].append(row)
        result["burst"] = {"broadcasts": broadcasts, "latency_events": latency_events, "interval_ms": interval * 1e3}
        if presence_members:
            result["presence"] = await presence_phase(s, gen0, presence_members, mode)
        result["ok"] = True
    except Exception as exc:
        result["ok"] = False
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["server_log"] = s.server_log_tail()
    finally:
        result["losses"] += s.result.get("losses", 0)
        with contextlib.suppress(Exception):
            await gens[0].call({"cmd": "close", "timeout": 10, "group": "presence"}, 30)
            await gens[0].call({"cmd": "close", "timeout": 10, "group": "presence-probe"}, 30)
        await s.stop()
    return result


async def subscribe(
    s: Session, lists: list[list[list[str]]], kind: str = "SUBSCRIBE", group: str = "", errors: bool = False
) -> float:
    """Load generator i sends ``lists[i][j]`` from its connection j: the wall time until all are answered.

    Every answer must be a success, or with ``errors`` an ERROR.
    """
    msgs = [
        {"cmd": "subscribe", "group": group or s.group, "kind": kind, "channels": mine, "timeout": 30} for mine in lists
    ]
    longest = max(sum(len(c) for c in mine) for mine in lists)
    replies = await call_all(s.gens[: len(lists)], msgs, 120 + longest * 0.01)
    problems = [r for r in replies if r["timed_out"] or r["errors"] != (r["sent"] if errors else 0)]
    if problems:
        r = problems[0]
        raise SessionFailed(f"{kind}: {r['timed_out']} unanswered, {r['errors']} errors, e.g. {r['error_samples']}")
    return (max(r["t1"] for r in replies) - min(r["t0"] for r in replies)) / 1e9


async def presence_phase(s: Session, gen: LoadGen, members: int, mode: Mode) -> dict[str, Any]:
    """Members join one presence channel in stages; at each stage a probe joins and leaves ``cycles`` times.

    Counts every message the server sends per change (to the members and to the probe) and its
    CPU per change: O(members) when the counts grow linearly with the members.
    """
    cycles = mode.presence_cycles
    members_group, probe_group = "presence", "presence-probe"
    users = [f"p{i}" for i in range(members)]
    for group, who in ((members_group, users), (probe_group, ["probe"])):
        msg = {
            "cmd": "connect",
            "group": group,
            "port": s.port,
            "path": "/ws",
            "deflate": False,
            "secret": SECRET,
            "users": who,
            "claims": CHANNEL_CLAIMS,
            "concurrency": HANDSHAKE_CONCURRENCY,
            "timeout": 30,
            "total_timeout": 60 + len(who) * 0.1,
        }
        reply = await gen.call(msg, 90 + len(who) * 0.1)
        if reply["failed"]:
            raise SessionFailed(f"presence: {reply['failed']} handshakes failed, e.g. {reply['errors']}")

    async def send(group: str, kind: str, lists: list[list[str]], first: int = 0) -> None:
        msg = {"cmd": "subscribe", "group": group, "kind": kind, "channels": lists, "first": first}
        reply = await gen.call({**msg, "concurrency": 16, "timeout": 30}, 120)
        if reply["timed_out"] or reply["errors"]:
            raise SessionFailed(f"presence {kind}: {reply}")

    watched = 0

    async def cycle() -> None:
        """The probe joins, every member hears it; the probe leaves, every member hears it."""
        nonlocal watched
        for kind in ("SUBSCRIBE", "UNSUBSCRIBE"):
            await send(probe_group, kind, [[PRESENCE_CHANNEL]])
            watched += joined
            reply = await gen.call({"cmd": "await_watched", "group": members_group, "count": watched}, 60)
            if not reply["complete"]:
                raise SessionFailed(f"presence: {reply['watched']} of {watched} members told of the probe")

    stages = sorted({max(1, members // 10), max(1, members // 2), members})
    joined = 0
    out: dict[str, Any] = {"members": members, "cycles": cycles, "stages": []}
    for stage in stages:
        await send(members_group, "SUBSCRIBE", [[PRESENCE_CHANNEL]] * (stage - joined), first=joined)
        joined = stage
        await gen.call({"cmd": "counters", "group": members_group, "reset": True, "watch": '"userId":"probe"'}, 10)
        watched = 0
        await cycle()  # its messages come after the last join's: from here on, only the probe's changes count
        for group in (members_group, probe_group):
            await gen.call({"cmd": "counters", "group": group, "reset": True}, 10)
        watched = 0
        cpu0 = s.server_cpu()
        for _ in range(cycles):
            await cycle()
        cpu_us = (s.server_cpu() - cpu0) * 1e6
        told = await gen.call({"cmd": "counters", "group": members_group}, 10)
        probe = await gen.call({"cmd": "counters", "group": probe_group}, 10)
        changes = 2 * cycles
        sent = sum(told["types"].values()) + sum(probe["types"].values())
        out["stages"].append(
            {
                "members": stage,
                "changes": changes,
                "messages_per_change": sent / changes,
                "to_members_per_change": sum(told["types"].values()) / changes,
                "bytes_per_change": (sum(told["bytes"].values()) + sum(probe["bytes"].values())) / changes,
                "presence_snapshot_bytes": probe["bytes"].get("PRESENCE", 0) / cycles,
                "cpu_us_per_change": cpu_us / changes,
                "member_types": told["types"],
                "probe_types": probe["types"],
            }
        )
    return out


def summarize_channels(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per N: medians over every round of every repetition (ratios: channel ÷ all within a round)."""
    out: dict[str, Any] = {}
    for run in runs:
        if not run.get("ok"):
            continue
        backend = run.get("backend", "memory")
        key = f"N={run['n']}" if backend == "memory" else f"N={run['n']} {backend}"
        entry = out.setdefault(key, {"n": run["n"], "backend": backend, "rounds": [], "runs": []})
        entry["rounds"] += run["rounds"]
        entry["runs"].append(run)
    for entry in out.values():
        rounds, runs = entry.pop("rounds"), entry.pop("runs")
        entry["rounds"] = len(rounds)
        for key in ("fanout_us", "p50_ms", "p99_ms"):
            entry[key] = {
                "all": statistics.median(r[key]["all"] for r in rounds),
                "channel": statistics.median(r[key]["channel"] for r in rounds),
                "ratio": statistics.median(r[key]["channel"] / r[key]["all"] for r in rounds),
                "range": (
                    min(r[key]["channel"] / r[key]["all"] for r in rounds),
                    max(r[key]["channel"] / r[key]["all"] for r in rounds),
                ),
            }
        for key in ("subscribes_per_s", "subscribe_cpu_us", "added_bytes_per_conn", "first_message_bytes_per_conn"):
            entry[key] = statistics.median(r[key] for r in runs)
        entry["channels"] = runs[0]["channels"]
        entry["members_per_channel"] = runs[0]["members_per_channel"]
        presence = [r["presence"] for r in runs if r.get("presence")]
        if presence:
            entry["presence"] = presence[0]
    return out


def channels_markdown(csum: dict[str, Any]) -> list[str]:
    if not csum:
        return []
    lines = [
        "## Channels (issue 12)",
        "",
        "One package server (on each backend) with N connections that each subscribed to 10 channels "
        f"(N/10 channels of {MEMBERS_PER_CHANNEL} members; `channel_layout` in `benchmarks/run.py`) and to "
        f'`{FAN_CHANNEL}`. Each round runs a `broadcast_to_all` burst and a `broadcast_to_channel("{FAN_CHANNEL}")` '
        "burst to the same N connections, then paced single events of each; ratios are channel ÷ all per round, "
        "medians over rounds. *Added memory* is the RSS added by the 10 subscriptions per connection (after 1 s "
        "idle), divided by N, over connections that have each sent one message already (a `PRESENCE` request "
        "answered `ERROR`); *first message* is what that one message added over fresh connections (the server "
        "keeps the last message a connection received until its next one).",
        "",
        "| N | backend | rounds | fan-out CPU, all | channel | **ratio** | (min-max) | target | p50 all / channel | "
        "p99 all / channel | subscribes/s | CPU/subscribe | added memory/conn | target | first message |",
        "| ---: | --- | ---: | ---: | ---: | ---: | --- | --- | --- | --- | ---: | ---: | ---: | --- | ---: |",
    ]
    for e in csum.values():
        f = e["fanout_us"]
        ok = f["ratio"] <= CHANNEL_TARGETS["fanout_ratio"]
        mem = e["added_bytes_per_conn"]
        mem_ok = mem <= CHANNEL_TARGETS["added_bytes_per_conn"]
        lines.append(
            f"| {e['n']:,} | {e.get('backend', 'memory')} | {e['rounds']} | {f['all']:.2f} µs | "
            f"{f['channel']:.2f} µs | **{f['ratio']:.3f}** | "
            f"{f['range'][0]:.2f}-{f['range'][1]:.2f} | ≤ {CHANNEL_TARGETS['fanout_ratio']} {'✅' if ok else '❌'} | "
            f"{e['p50_ms']['all']:.2f} / {e['p50_ms']['channel']:.2f} ms | "
            f"{e['p99_ms']['all']:.2f} / {e['p99_ms']['channel']:.2f} ms | {e['subscribes_per_s']:,.0f} | "
            f"{e['subscribe_cpu_us']:.0f} µs | **{mem:,.0f} B** | ≤ 1 KiB {'✅' if mem_ok else '❌'} | "
            f"{e['first_message_bytes_per_conn']:,.0f} B |"
        )
    lines.append("")
    for e in csum.values():
        pres = e.get("presence")
        if not pres:
            continue
        lines += [
            f"### Presence: one presence channel, up to {pres['members']:,} members (with the N={e['n']:,} run)",
            "",
            f"At each stage a probe connection joins and leaves the channel {pres['cycles']} times; every message the "
            "server sends per change is counted (to the members: `PRESENCE_JOIN`/`PRESENCE_LEAVE`; to the probe: "
            "`SUBSCRIBED` + one `PRESENCE` list, or `UNSUBSCRIBED`).",
            "",
            "| members | messages per change | ÷ members | to the members | bytes per change | PRESENCE list | "
            "CPU per change | CPU per member told |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for st in pres["stages"]:
            lines.append(
                f"| {st['members']:,} | {st['messages_per_change']:,.1f} | "
                f"{st['messages_per_change'] / st['members']:.3f} | "
                f"{st['to_members_per_change']:,.1f} | {st['bytes_per_change']:,.0f} | "
                f"{st['presence_snapshot_bytes']:,.0f} B | {st['cpu_us_per_change']:,.0f} µs | "
                f"{st['cpu_us_per_change'] / st['members']:.1f} µs |"
            )
        lines.append("")
    return lines


def summarize_paired(paired: list[dict[str, Any]]) -> dict[str, Any]:
    """Per (N, deflate) and figure: medians of per-round values and ratios, over every round of every repetition."""
    out: dict[str, Any] = {}
    for p in paired:
        if not p.get("ok"):
            continue
        key = f"N={p['n']} deflate={'on' if p['deflate'] else 'off'}"
        entry = out.setdefault(key, {"n": p["n"], "deflate": p["deflate"], "rounds": []})
        entry["rounds"] += p["rounds"]
    for entry in out.values():
        rounds = entry.pop("rounds")
        entry["rounds"] = len(rounds)
        entry["figures"] = {}
        for fkey, *_ in PAIRED_FIGURES:
            values = [r[fkey] for r in rounds if fkey in r]
            names = sorted({name for v in values for name in v})
            fig: dict[str, Any] = {}
            for name in names:
                fig[name] = statistics.median(v[name] for v in values if name in v)
                if name != "baseline-memory":
                    ratios = [v[name] / v["baseline-memory"] for v in values if name in v and v["baseline-memory"]]
                    if ratios:
                        fig[f"{name}/baseline"] = statistics.median(ratios)
                        fig[f"{name}/baseline range"] = (min(ratios), max(ratios))
            both = [v for v in values if "pomo-redis" in v and "pomo-memory" in v]
            if both:
                fig["redis/memory"] = statistics.median(v["pomo-redis"] / v["pomo-memory"] for v in both)
            with_metrics = [v for v in values if "pomo-metrics-memory" in v and "pomo-memory" in v]
            if with_metrics:
                fig["metrics/no-metrics"] = statistics.median(
                    v["pomo-metrics-memory"] / v["pomo-memory"] for v in with_metrics
                )
            entry["figures"][fkey] = fig
    return out


def flush_redis(url: str) -> None:
    """Empty the benchmark's own Redis database (db 14 by default) so every session starts alike."""
    import redis  # the benchmark only needs redis-py for the Redis configurations

    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        client.flushdb()
    finally:
        client.close()


# -------------------------------------------------------------------------------------------- report
FIGURES = [
    # key, label, unit, better
    ("fanout_us", "fan-out server CPU", "µs/delivery", "lower"),
    ("fanout_per_s", "fan-out deliveries/s", "1/s", "higher"),
    ("p50_ms", "latency p50", "ms", "lower"),
    ("p99_ms", "latency p99", "ms", "lower"),
    ("handshakes_per_s", "handshakes/s (JWT)", "1/s", "higher"),
    ("handshake_cpu_us", "server CPU per handshake", "µs", "lower"),
    ("rss_per_conn", "idle memory per connection", "KiB", "lower"),
    ("per_user_per_s", "per-user broadcasts/s (HTTP)", "1/s", "higher"),
    ("per_user_cpu_us", "server CPU per per-user request", "µs", "lower"),
    ("fanout_client_us", "client CPU per delivery", "µs", "lower"),
]
# What each paired round measures, per server.
PAIRED_FIGURES = [
    f
    for f in FIGURES
    if f[0]
    in ("fanout_us", "p50_ms", "p99_ms", "handshakes_per_s", "handshake_cpu_us", "per_user_per_s", "per_user_cpu_us")
]


def _fmt(key: str, value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if key == "rss_per_conn":
        return f"{value / 1024:.1f}"
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def target_for(key: str, n: int) -> tuple[str, float] | None:
    if key not in TARGETS:
        return None
    op, spec = TARGETS[key]
    if isinstance(spec, dict):
        return (op, spec[n]) if n in spec else None
    return op, spec


def summarize(sessions: list[dict[str, Any]], configs: list[Config]) -> dict[str, Any]:
    """Medians per (config, app) and medians of per-repetition ratios to the baseline."""
    by: dict[tuple[str, str, int], dict[str, Any]] = {}
    for s in sessions:
        by[(s["config"], s["app"], s["rep"])] = s
    reps = sorted({s["rep"] for s in sessions})
    out: dict[str, Any] = {}
    for cfg in configs:
        base_key = Config(cfg.n, "memory", cfg.deflate).key
        entry: dict[str, Any] = {"n": cfg.n, "backend": cfg.backend, "deflate": cfg.deflate, "figures": {}}
        for key, *_ in FIGURES:
            base_vals, pomo_vals, ratios = [], [], []
            for rep in reps:
                b = by.get((base_key, "baseline", rep))
                p = by.get((cfg.key, "pomo", rep))
                if b and b.get("ok") and key in b:
                    base_vals.append(b[key])
                if p and p.get("ok") and key in p:
                    pomo_vals.append(p[key])
                if b and p and b.get("ok") and p.get("ok") and key in b and key in p and b[key]:
                    ratios.append(p[key] / b[key])
            entry["figures"][key] = {
                "baseline": statistics.median(base_vals) if base_vals else None,
                "pomo": statistics.median(pomo_vals) if pomo_vals else None,
                "ratio": statistics.median(ratios) if ratios else None,
                "ratio_min": min(ratios) if ratios else None,
                "ratio_max": max(ratios) if ratios else None,
                "reps": len(ratios),
            }
        if cfg.backend == "redis":
            mem_key = Config(cfg.n, "memory", cfg.deflate).key
            rr = []
            for rep in reps:
                m, r = by.get((mem_key, "pomo", rep)), by.get((cfg.key, "pomo", rep))
                if m and r and m.get("ok") and r.get("ok"):
                    rr.append(r["fanout_us"] / m["fanout_us"])
            entry["redis_vs_memory"] = statistics.median(rr) if rr else None
        bound = [
            s.get("client_bound")
            for s in sessions
            if s["config"] in (cfg.key, base_key) and s.get("ok") and s["app"] in ("pomo", "baseline")
        ]
        entry["client_bound"] = f"{sum(1 for b in bound if b)}/{len(bound)}"
        out[cfg.key] = entry
    return out


def rep_label(rep: int) -> str:
    """``rep 2``, or ``run 3 rep 1`` for results merged from several runs."""
    return f"run {rep // 1000 + 1} rep {rep % 1000 + 1}" if rep >= 1000 else f"rep {rep + 1}"


def verdict(key: str, ratio: float | None, n: int) -> str:
    target = target_for(key, n)
    if target is None or ratio is None:
        return ""
    op, value = target
    ok = ratio <= value if op == "<=" else ratio >= value
    return f"{op} {value:g} {'✅' if ok else '❌'}"


def _fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def paired_markdown(psum: dict[str, Any]) -> list[str]:
    lines = [
        "## Paired rounds (the headline figures)",
        "",
        "All servers up at once, N connections each. Each round runs, per server and in rotating order, one burst of "
        "each kind: `broadcast_to_all` fan-out, paced single broadcasts (latency), per-user requests, and closing "
        "then reopening a slice of the connections (handshakes). Values are medians over all rounds of all "
        "repetitions; ratios are medians of per-round ratios, so the machine's drift between rounds cancels. "
        "*Floor* is `benchmarks/floor_app.py`, the thinnest loop an app mounted in a Starlette router can have "
        "(no guarantees at all): what no mounted app can go below.",
        "",
    ]
    for key, e in psum.items():
        lines.append(f"### {key} ({e['rounds']} rounds)")
        lines.append("")
        lines.append(
            "| figure | unit | baseline | package | ratio | (min-max) | target | floor ÷ baseline "
            "| package on Redis | Redis ÷ memory | metrics on ÷ off | `pomo.wrap` ÷ baseline |"
        )
        lines.append("| --- | --- | ---: | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |")
        for fkey, label, unit, _better in PAIRED_FIGURES:
            f = e["figures"].get(fkey, {})
            if "baseline-memory" not in f:
                continue
            ratio = f.get("pomo-memory/baseline")
            lo, hi = f.get("pomo-memory/baseline range", (math.nan, math.nan))
            # The fan-out targets are for permessage-deflate off: with it on, compressing each delivery dominates.
            target = "" if e["deflate"] and fkey == "fanout_us" else verdict(fkey, ratio, e["n"])
            floor = f.get("floor-memory/baseline")
            rvm = f.get("redis/memory")
            rvm_txt = _fmt_ratio(rvm)
            if rvm is not None and fkey == "fanout_us" and e["n"] == 1000:
                rvm_txt = f"**{rvm:.3f}** (≤ {REDIS_TARGET} {'✅' if rvm <= REDIS_TARGET else '❌'})"
            met = f.get("metrics/no-metrics")
            met_txt = _fmt_ratio(met)
            if met is not None and fkey == "fanout_us":
                met_txt = f"**{met:.3f}** (≤ {METRICS_TARGET} {'✅' if met <= METRICS_TARGET else '❌'})"
            lines.append(
                f"| {label} | {unit} | {_fmt(fkey, f['baseline-memory'])} | {_fmt(fkey, f.get('pomo-memory'))} | "
                f"{'-' if ratio is None else f'**{ratio:.3f}**'} | {lo:.2f}-{hi:.2f} | {target} | "
                f"{_fmt_ratio(floor)} | {_fmt(fkey, f.get('pomo-redis'))} | {rvm_txt} | "
                f"{met_txt} | {_fmt_ratio(f.get('pomo-wrap-memory/baseline'))} |"
            )
        lines.append("")
    return lines


def markdown(
    summary: dict[str, Any],
    meta: dict[str, Any],
    sessions: list[dict[str, Any]],
    paired: list[dict[str, Any]] | None = None,
    channels: list[dict[str, Any]] | None = None,
) -> str:
    lines = [
        f"# Benchmark results: {meta['mode']}",
        "",
        f"{meta['started']} · {meta['machine']} · Python {meta['python']} · {server_label(meta)} "
        f"· Starlette {meta['starlette']} · repetitions: {meta['reps']} (interleaved) · "
        f"server pinned to CPU {_proc.SERVER_CPU}, {meta['loadgens']} load-generator process(es) + driver on CPU "
        f"{_proc.CLIENT_CPU}{' · Redis: ' + meta['redis_where'] if meta.get('redis_where') else ''} · "
        f"command: `{meta['command']}`",
        "",
        "Values are medians over repetitions; **ratio** is the median of per-repetition ratios package ÷ baseline "
        "(baseline = the thinnest Starlette fan-out, `benchmarks/baseline_app.py`, same run, same load).",
        "",
    ]
    paired = paired or []
    channels = channels or []
    failed = [s for s in sessions if not s.get("ok")]
    losses = sum(s.get("losses", 0) for s in sessions + paired + channels)
    runs = f"{len(sessions)} sessions, {len(paired)} paired runs and {len(channels)} channel runs"
    lines.append(
        f"**Losses: {losses}** in {runs}; failed: {sum(1 for s in sessions + paired + channels if not s.get('ok'))}."
    )
    lines.append("")
    psum = summarize_paired(paired)
    if psum:
        lines += paired_markdown(psum)
    lines += channels_markdown(summarize_channels(channels))
    if psum:
        lines.append("## Every figure, session by session")
        lines.append("")
        lines.append(
            "Each session is one server run through every phase; sessions of one repetition run one after "
            "the other, so these ratios carry the machine's drift between sessions."
        )
        lines.append("")
    for key, entry in summary.items():
        lines.append(f"## {key}")
        lines.append("")
        extra = f" · client-bound sessions: {entry['client_bound']}"
        if entry.get("redis_vs_memory") is not None:
            rvm = entry["redis_vs_memory"]
            if entry["n"] == 1000:
                target = f"target ≤ {REDIS_TARGET} {'✅' if rvm <= REDIS_TARGET else '❌'}"
            else:
                target = f"the target ≤ {REDIS_TARGET} is set at N=1,000"
            extra += f" · Redis ÷ memory fan-out CPU: **{rvm:.3f}** ({target})"
        lines.append(extra.lstrip(" ·"))
        lines.append("")
        lines.append("| figure | unit | baseline | package | ratio | (min-max) | target |")
        lines.append("| --- | --- | ---: | ---: | ---: | --- | --- |")
        for fkey, label, unit, _better in FIGURES:
            f = entry["figures"][fkey]
            ratio = f["ratio"]
            rng = f"{f['ratio_min']:.2f}-{f['ratio_max']:.2f}" if ratio is not None and f["reps"] > 1 else ""
            lines.append(
                f"| {label} | {unit} | {_fmt(fkey, f['baseline'])} | {_fmt(fkey, f['pomo'])} | "
                f"{'-' if ratio is None else f'**{ratio:.3f}**'} | {rng} | {verdict(fkey, ratio, entry['n'])} |"
            )
        lines.append("")
    churn = [s for s in sessions if s.get("churn")]
    if churn:
        lines.append("## Memory over connect/disconnect churn")
        lines.append("")
        lines.append("| session | connected, MiB | after each close, MiB | after each reconnect, MiB | growth/conn |")
        lines.append("| --- | ---: | --- | --- | ---: |")
        for s in churn:
            closed = ", ".join(f"{c['closed_mib']:.1f}" for c in s["churn"])
            conn = ", ".join(f"{c['connected_mib']:.1f}" for c in s["churn"])
            lines.append(
                f"| {s['app']} {s['config']} {rep_label(s['rep'])} | {s['rss_connected_mib']:.1f} | {closed} | "
                f"{conn} | {s['churn_growth_per_conn']:.0f} B |"
            )
        lines.append("")
    if failed:
        lines.append("## Failed sessions")
        lines.append("")
        for s in failed:
            lines.append(f"- {s['app']} {s['config']} rep {s['rep']}: {s.get('error')}")
        lines.append("")
    for p in paired:
        if not p.get("ok"):
            lines.append(f"- paired N={p['n']} deflate={p['deflate']} rep {p['rep']}: {p.get('error')}")
            lines.append("")
    for c in channels:
        if not c.get("ok"):
            lines.append(f"- channels N={c['n']} rep {c['rep']}: {c.get('error')}")
            lines.append("")
    lines.append(
        "Server CPU is the uvicorn process's run time (user + system, `/proc/<pid>/task/*/schedstat`) "
        "over the phase, divided by deliveries (or handshakes, or requests). "
        "A session is *client-bound* when the load generators used "
        "≥ 90 % of their core while the server used < 90 % of its; CPU per delivery stays comparable either way. "
        "Latency p50/p99 is publish (`time.time_ns()` in the HTTP handler) to receipt, over paced broadcasts."
    )
    lines.append("")
    return "\n".join(lines)


def chart(summary: dict[str, Any], path: Path, title: str, psum: dict[str, Any] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(summary)
    shown = [
        ("fanout_us", "fan-out CPU/delivery (lower is better)"),
        ("p99_ms", "p99 latency (lower)"),
        ("rss_per_conn", "idle memory/conn (lower)"),
        ("handshakes_per_s", "handshakes/s (higher)"),
        ("per_user_per_s", "per-user broadcasts/s (higher)"),
    ]
    psum = psum or {}
    labels = [k.replace("N=", "").replace(" ", "\n").replace("deflate=", "deflate ") for k in keys]

    def figure(k: str, fkey: str, name: str) -> float:
        """A paired-round median when the run has one, else the session-by-session one."""
        e = summary[k]
        p = psum.get(f"N={e['n']} deflate={'on' if e['deflate'] else 'off'}", {}).get("figures", {}).get(fkey, {})
        backend = f"pomo-{e['backend']}"
        wanted = {"ratio": f"{backend}/baseline", "pomo": backend, "baseline": "baseline-memory"}[name]
        if wanted in p:
            return float(p[wanted])
        value = e["figures"].get(fkey, {}).get(name)
        return float(value) if value is not None else 0.0

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.4), gridspec_kw={"width_ratios": [3, 2]})
    ax = axes[0]
    width = 0.8 / len(shown)
    for i, (fkey, label) in enumerate(shown):
        values = [figure(k, fkey, "ratio") for k in keys]
        xs = [j + (i - (len(shown) - 1) / 2) * width for j in range(len(keys))]
        ax.bar(xs, values, width, label=label)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("package ÷ baseline (median of ratios)")
    ax.set_title("Ratios to the thinnest Starlette fan-out (1.0 = baseline)")
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    ax = axes[1]
    base = [figure(k, "fanout_us", "baseline") for k in keys]
    pomo = [figure(k, "fanout_us", "pomo") for k in keys]
    xs = list(range(len(keys)))

    def floor_us(k: str) -> float:
        e = summary[k]
        p = psum.get(f"N={e['n']} deflate={'on' if e['deflate'] else 'off'}", {})
        return float(p.get("figures", {}).get("fanout_us", {}).get("floor-memory", 0.0))

    floor = [floor_us(k) for k in keys]
    width = 0.27 if any(floor) else 0.4
    ax.bar(
        [x - width for x in xs] if any(floor) else [x - 0.2 for x in xs],
        base,
        width,
        label="baseline (send_text loop)",
        color="#999999",
    )
    ax.bar(xs if any(floor) else [x + 0.2 for x in xs], pomo, width, label="starlette-pomo-ws", color="#d9534f")
    if any(floor):
        ax.bar([x + width for x in xs], floor, width, label="floor (thinnest mounted loop)", color="#5bc0de")
    ax.set_xticks(xs)
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("server CPU µs per delivery")
    ax.set_title("Fan-out cost" + (", paired rounds" if psum else "") + " (lower is better)")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3)
    fig.suptitle(title + ("; paired-round medians where measured" if psum else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def configs_of(sessions: list[dict[str, Any]]) -> list[Config]:
    seen: dict[str, Config] = {}
    for s in sessions:
        n, backend, deflate = s["n"], s["config"].split()[1], s["config"].endswith("deflate=on")
        if s["app"] == "pomo" or backend == "memory":
            seen.setdefault(s["config"], Config(n, backend, deflate))
    return sorted(seen.values(), key=lambda c: (c.deflate, c.n, c.backend))


def write_outputs(
    meta: dict[str, Any],
    sessions: list[dict[str, Any]],
    out: Path,
    stem: str,
    chart_too: bool,
    paired: list[dict[str, Any]] | None = None,
    channels: list[dict[str, Any]] | None = None,
) -> tuple[str, dict[str, Any]]:
    paired = [{k: v for k, v in p.items() if k != "server_log"} for p in paired or []]
    channels = [{k: v for k, v in c.items() if k != "server_log"} for c in channels or []]
    summary = summarize(sessions, configs_of(sessions))
    psum = summarize_paired(paired)
    csum = summarize_channels(channels)
    out.mkdir(parents=True, exist_ok=True)
    clean = [{k: v for k, v in s.items() if k != "server_log"} for s in sessions]
    data = {
        "meta": meta,
        "summary": summary,
        "paired_summary": psum,
        "channels_summary": csum,
        "sessions": clean,
        "paired": paired,
        "channels": channels,
    }
    (out / f"{stem}.json").write_text(json.dumps(data, indent=1))
    md = markdown(summary, meta, clean, paired, channels)
    (out / f"{stem}.md").write_text(md)
    apps = {s["app"] for s in sessions}
    if chart_too and {"baseline", "pomo"} <= apps:
        try:
            title = f"{stem}: {meta['started'][:10]}, medians; {server_label(meta)}, 2 cores"
            chart(summary, out / f"{stem}.png", title, psum)
        except ImportError:
            print("matplotlib is not installed: no chart", file=sys.stderr)
    return md, summary


def merge(argv: list[str]) -> int:
    """``python -m benchmarks merge A.json B.json ... --name full``: one table and chart from several runs."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks merge")
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--name", required=True)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    sessions: list[dict[str, Any]] = []
    paired: list[dict[str, Any]] = []
    channels: list[dict[str, Any]] = []
    metas = []
    for index, path in enumerate(args.files):
        data = json.loads(path.read_text())
        metas.append(data["meta"])
        # Ratios pair sessions of the same repetition of the same run: keep the runs' repetitions apart.
        for s in data["sessions"] + data.get("paired", []) + data.get("channels", []):
            s["rep"] += 1000 * index
        sessions += data["sessions"]
        paired += data.get("paired", [])
        channels += data.get("channels", [])
    meta = dict(metas[0])
    meta["mode"] = args.name
    meta["reps"] = "/".join(str(m["reps"]) for m in metas)
    meta["loadgens"] = max(m["loadgens"] for m in metas)
    meta["command"] = " + ".join(f"`{m['command']}`" for m in metas).strip("`")
    meta["started"] = ", ".join(sorted({m["started"] for m in metas}))
    md, _ = write_outputs(meta, sessions, args.out, args.name, chart_too=True, paired=paired, channels=channels)
    print(md)
    return 0


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks run", description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--smoke", action="store_const", dest="mode", const="smoke", help="N=100, for CI (< 1 min)")
    group.add_argument("--quick", action="store_const", dest="mode", const="quick", help="N=1000, memory, 1 rep")
    group.add_argument("--full", action="store_const", dest="mode", const="full", help="the whole matrix")
    parser.add_argument("--apps", default="baseline,pomo", help="comma-separated: baseline, pomo")
    parser.add_argument("--n", help="comma-separated connection counts (overrides the mode)")
    parser.add_argument("--reps", type=int, help="interleaved repetitions (overrides the mode)")
    parser.add_argument(
        "--redis",
        metavar="URL",
        help="also run the package on Redis, e.g. redis://127.0.0.1:6379/14 (flushed!), or `local`: a redis-server of "
        "the benchmark's own, pinned to the load generators' core (as on a host of its own, it takes no CPU from the "
        "server under test)",
    )
    parser.add_argument("--deflate", choices=["off", "on", "both"], help="permessage-deflate (overrides the mode)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for <mode>.json/.md/.png")
    parser.add_argument("--name", help="file name stem (default: the mode)")
    parser.add_argument("--no-chart", action="store_true")
    parser.add_argument(
        "--metrics", action="store_true", help="add the package with metrics on to the paired bursts (issue 7)"
    )
    parser.add_argument(
        "--wrap", action="store_true", help="add the package behind `pomo.wrap(app)` to the paired bursts (issue 11)"
    )
    parser.add_argument("--no-paired", action="store_true", help="skip the paired rounds")
    parser.add_argument(
        "--server", choices=_proc.SERVERS, default="uvicorn", help="the ASGI server every app runs under"
    )
    parser.add_argument(
        "--floor",
        action=argparse.BooleanOptionalAction,
        help="add the floor app (the thinnest mounted loop) to the paired rounds (default: on, off in smoke)",
    )
    parser.add_argument("--no-sessions", action="store_true", help="only the paired rounds (and the channel runs)")
    parser.add_argument(
        "--presence-members", type=int, help="members of the presence phase (overrides the mode; 0: no presence)"
    )
    parser.add_argument(
        "--channels",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the channel run per N (issue 12): channel ÷ all fan-out, subscribe memory and rate, presence",
    )
    parser.add_argument(
        "--check-targets", action="store_true", help="exit with status 2 when a target of issue 5 is missed"
    )
    parser.set_defaults(mode="quick")
    return parser.parse_args(argv)


def server_label(meta: dict[str, Any]) -> str:
    server = meta.get("server", "uvicorn")
    if server == "uvicorn":
        return f"uvicorn {meta['uvicorn']} websockets-sansio"
    from importlib.metadata import version

    return f"{server} {version(server)}"


async def amain(args: argparse.Namespace, redis_label: str | None = None) -> int:
    mode = dataclasses.replace(MODES[args.mode], server=args.server)
    if args.presence_members is not None:
        mode = dataclasses.replace(mode, presence_members=args.presence_members)
    sizes = [int(x) for x in args.n.split(",")] if args.n else mode.sizes
    reps = args.reps or mode.reps
    deflates = {"off": [False], "on": [True], "both": [False, True]}[args.deflate] if args.deflate else mode.deflate
    apps = [a.strip() for a in args.apps.split(",") if a.strip()]
    backends = ["memory"] + (["redis"] if args.redis and "pomo" in apps else [])
    # The paired rounds hold every server's connections at once: up to 5 x N sockets over the load generators.
    _proc.raise_nofile(5 * max(sizes) + 1024)
    _proc.pin_self(_proc.CLIENT_CPU)

    import starlette
    import uvicorn

    meta = {
        "mode": args.name or mode.name,
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
        "python": platform.python_version(),
        "uvicorn": uvicorn.__version__,
        "server": args.server,
        "starlette": starlette.__version__,
        "reps": reps,
        "apps": apps,
        "redis": bool(args.redis),
        # Where Redis runs: a server the benchmark started on the load generators' core, or one it was given
        # (its CPU time then comes from wherever the kernel schedules it, the server's core included).
        "redis_where": (redis_label or "the one at --redis, unpinned") if args.redis else None,
        "loadgens": max(1, math.ceil(max(sizes) / CONNS_PER_LOADGEN)),
        "command": "python -m benchmarks run " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["run"] else sys.argv[1:]),
    }
    gens = [LoadGen(i) for i in range(meta["loadgens"])]
    sessions: list[dict[str, Any]] = []
    paired: list[dict[str, Any]] = []
    channels: list[dict[str, Any]] = []
    try:
        for g in gens:
            await g.start()
        for rep in range(reps):
            for n in sizes:
                for deflate in deflates:
                    plan = [("baseline", "memory")] if "baseline" in apps else []
                    plan += [("pomo", b) for b in backends] if "pomo" in apps else []
                    if rep % 2:
                        plan.reverse()  # interleave: alternate which app runs first
                    for app, backend in [] if args.no_sessions else plan:
                        cfg = Config(n, backend, deflate)
                        t0 = time.monotonic()
                        print(f"[rep {rep + 1}/{reps}] {app:8} {cfg.key} ...", end=" ", flush=True)
                        result = await Session(app, cfg, mode, gens, args.redis).run()
                        result["rep"] = rep
                        sessions.append(result)
                        if result["ok"]:
                            print(
                                f"fan-out {result['fanout_us']:.2f} µs/delivery, {result['fanout_per_s']:,.0f}/s, "
                                f"p99 {result['p99_ms']:.1f} ms, {result['handshakes_per_s']:,.0f} handshakes/s, "
                                f"{result['rss_per_conn'] / 1024:.1f} KiB/conn, "
                                f"{result['per_user_per_s']:,.0f} per-user/s ({time.monotonic() - t0:.0f} s)",
                                flush=True,
                            )
                        else:
                            print(f"FAILED: {result['error']}", flush=True)
                            if result.get("server_log"):
                                print(result["server_log"], file=sys.stderr)
                        # Written after every session, so that an interrupted run keeps what it measured.
                        write_outputs(
                            meta, sessions, args.out, meta["mode"], chart_too=False, paired=paired, channels=channels
                        )
                    if "pomo" in apps and "baseline" in apps and not args.no_paired:
                        t0 = time.monotonic()
                        print(f"[rep {rep + 1}/{reps}] paired   N={n} deflate={deflate} ...", end=" ", flush=True)
                        floor = args.floor if args.floor is not None else mode.name != "smoke"
                        p = await paired_run(
                            n,
                            deflate,
                            backends,
                            mode,
                            gens,
                            args.redis,
                            rep,
                            metrics=args.metrics,
                            floor=floor,
                            wrap=args.wrap,
                        )
                        paired.append(p)
                        if p["ok"]:
                            ratios = [
                                r["fanout_us"]["pomo-memory"] / r["fanout_us"]["baseline-memory"] for r in p["rounds"]
                            ]
                            print(
                                f"fan-out package ÷ baseline per round: {', '.join(f'{x:.2f}' for x in ratios)} "
                                f"({time.monotonic() - t0:.0f} s)",
                                flush=True,
                            )
                        else:
                            print(f"FAILED: {p['error']}", flush=True)
                            print(p.get("server_log", ""), file=sys.stderr)
                        write_outputs(
                            meta, sessions, args.out, meta["mode"], chart_too=False, paired=paired, channels=channels
                        )
                # The channel run on each backend: on Redis, every subscribe and every channel event crosses it.
                for backend in backends if "pomo" in apps and args.channels else []:
                    t0 = time.monotonic()
                    print(f"[rep {rep + 1}/{reps}] channels N={n} {backend} ...", end=" ", flush=True)
                    members = mode.presence_members if rep == 0 and n == sizes[0] and backend == "memory" else 0
                    c = await channels_run(n, mode, gens, rep, members, backend, args.redis)
                    channels.append(c)
                    if c["ok"]:
                        ratios = [r["fanout_us"]["channel"] / r["fanout_us"]["all"] for r in c["rounds"]]
                        print(
                            f"channel ÷ all fan-out per round: {', '.join(f'{x:.2f}' for x in ratios)}; "
                            f"{c['subscribes_per_s']:,.0f} subscribes/s; "
                            f"{c['added_bytes_per_conn']:,.0f} B/conn for 10 channels ({time.monotonic() - t0:.0f} s)",
                            flush=True,
                        )
                    else:
                        print(f"FAILED: {c['error']}", flush=True)
                        print(c.get("server_log", ""), file=sys.stderr)
                    write_outputs(
                        meta, sessions, args.out, meta["mode"], chart_too=False, paired=paired, channels=channels
                    )
    finally:
        for g in gens:
            await g.stop()
    md, summary = write_outputs(
        meta, sessions, args.out, meta["mode"], chart_too=not args.no_chart, paired=paired, channels=channels
    )
    print()
    print(md)
    failed = [s for s in sessions + paired + channels if not s.get("ok")]
    if failed or any(s.get("losses") for s in sessions + paired + channels):
        return 1
    if args.check_targets:
        for entry in summary.values():
            for key in TARGETS:
                if verdict(key, entry["figures"][key]["ratio"], entry["n"]).endswith("❌"):
                    return 2
        for pentry in summarize_paired(paired).values():
            for key in TARGETS:
                if pentry["deflate"] and key == "fanout_us":
                    continue
                ratio = pentry["figures"].get(key, {}).get("pomo-memory/baseline")
                if verdict(key, ratio, pentry["n"]).endswith("❌"):
                    return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.redis != "local":
        return asyncio.run(amain(args))
    with _proc.own_redis(_proc.CLIENT_CPU) as url:
        args.redis = url
        port = url.rsplit(":", 1)[1].split("/")[0]
        return asyncio.run(amain(args, redis_label=f"its own redis-server on CPU {_proc.CLIENT_CPU} (port {port})"))


if __name__ == "__main__":
    sys.exit(main())
