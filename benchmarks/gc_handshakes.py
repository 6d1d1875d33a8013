"""Diagnosis: how much of a handshake burst is garbage collection, on the memory backend and on Redis.

``python -m benchmarks gc-handshakes [--n 10000] [--rounds 4] [--redis URL] [--freeze]`` starts the
package app once per backend with a ``gc.callbacks`` probe (``BENCH_GC=1``), connects N connections
(users have 2), then, each round and on each server in turn, closes 1,000 of them, waits for the
server to finish with them, and opens them again. It prints, per burst, handshakes/s, server CPU per
handshake, the part of it spent in garbage collection, and the full collections in the burst.

With ``--freeze``, one more memory-backend server calls ``gc.freeze()`` once its N connections are
open (what docs/performance.md suggests doing after start-up), and the summary compares the two.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import sys

from benchmarks import _proc, run


async def gc_state(port: int) -> dict[str, float]:
    state: dict[str, float] = json.loads(await _proc.request_once(port, "GET", "/bench/gc"))
    return state


async def main(n: int, rounds: int, redis_url: str | None, pause: float, freeze: bool = False) -> None:
    _proc.raise_nofile(4 * n + 1024)
    backends = ["memory", "redis"] if redis_url else ["memory"]
    gens = [run.LoadGen(i) for i in range(max(1, math.ceil(n / run.CONNS_PER_LOADGEN)))]
    sessions = [run.Session("pomo", run.Config(n, b, False), run.MODES["quick"], gens, redis_url) for b in backends]
    frozen: run.Session | None = None
    if freeze:
        frozen = run.Session("pomo", run.Config(n, "memory", False), run.MODES["quick"], gens, None)
        frozen.group = frozen.name = "pomo-memory-frozen"
        sessions.append(frozen)
    for s in sessions:
        s.extra_env = {"BENCH_GC": "1"}
    count = min(n, 1000)
    # Per server: handshakes/s, and server CPU per handshake in and outside garbage collection.
    figures: dict[str, dict[str, list[float]]] = {s.name: {"hs": [], "gc": [], "rest": []} for s in sessions}
    try:
        for g in gens:
            await g.start()
        for s in sessions:
            await s.start_server()
            _, connected = await s.connect(s.slices)
            if connected != n:
                raise run.SessionFailed(f"{connected} of {n} connected")
            if s is frozen:
                await _proc.request_once(s.port, "GET", "/bench/gc?freeze=1")
        for r in range(rounds):
            for s in sessions:
                before = await gc_state(s.port)
                hs, cpu = await s.burst_handshakes(count, pause=pause)
                after = await gc_state(s.port)
                gc_us = (after["time"] - before["time"]) * 1e6 / count
                full = int(after["full"] - before["full"])
                full_s = after["full_time"] - before["full_time"]
                for key, value in (("hs", hs), ("gc", gc_us), ("rest", cpu - gc_us)):
                    figures[s.name][key].append(value)
                print(
                    f"round {r + 1} {s.name:18}: {hs:6,.0f} handshakes/s, {cpu:5,.0f} µs CPU each, "
                    f"{gc_us:4,.0f} µs of it collecting ({full} full, {full_s:.2f} s), "
                    f"{int(after['tracked']):,} objects tracked",
                    flush=True,
                )
        for name, values in figures.items():
            hs, gc_us, rest = (statistics.median(values[key]) for key in ("hs", "gc", "rest"))
            print(f"{name}: median {hs:,.0f} handshakes/s; CPU per handshake: {gc_us:,.0f} µs GC, {rest:,.0f} µs else")
        if frozen is not None:
            plain, cold = figures["pomo-memory"]["hs"], figures["pomo-memory-frozen"]["hs"]
            ratio = statistics.median(b / a for a, b in zip(plain, cold, strict=True))
            print(f"frozen ÷ not frozen, handshakes/s: median of per-round ratios {ratio:.3f}")
    finally:
        for s in sessions:
            await s.stop()
        for g in gens:
            await g.stop()


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks gc-handshakes", description=__doc__)
    parser.add_argument("--n", type=int, default=10_000, help="connections held open (default 10,000)")
    parser.add_argument("--rounds", type=int, default=4, help="bursts per server (default 4)")
    parser.add_argument("--redis", default=None, help="also run on Redis at this URL (its database is flushed)")
    parser.add_argument("--pause", type=float, default=0.3, help="seconds between the closes and the reconnects")
    parser.add_argument("--freeze", action="store_true", help="add a memory server that calls gc.freeze() once full")
    args = parser.parse_args(argv)
    asyncio.run(main(args.n, args.rounds, args.redis, args.pause, args.freeze))
    return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
