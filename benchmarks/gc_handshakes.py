"""Diagnosis: how much of a handshake burst is garbage collection, on the memory backend and on Redis.

``python -m benchmarks gc-handshakes [--n 10000] [--rounds 4] [--redis URL]`` starts the package app
once per backend with a ``gc.callbacks`` probe (``BENCH_GC=1``), connects N connections (users have
2), then, each round and on each server in turn, closes 1,000 of them, waits for the server to
finish with them, and opens them again. It prints, per burst, handshakes/s, server CPU per
handshake, the part of it spent in garbage collection, and the full collections in the burst.
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


async def main(n: int, rounds: int, redis_url: str | None, pause: float) -> None:
    _proc.raise_nofile(4 * n + 1024)
    backends = ["memory", "redis"] if redis_url else ["memory"]
    gens = [run.LoadGen(i) for i in range(max(1, math.ceil(n / run.CONNS_PER_LOADGEN)))]
    sessions = [run.Session("pomo", run.Config(n, b, False), run.MODES["quick"], gens, redis_url) for b in backends]
    for s in sessions:
        s.extra_env = {"BENCH_GC": "1"}
    count = min(n, 1000)
    # Server CPU per handshake outside garbage collection, per backend.
    rest: dict[str, list[float]] = {b: [] for b in backends}
    try:
        for g in gens:
            await g.start()
        for s in sessions:
            await s.start_server()
            _, connected = await s.connect(s.slices)
            if connected != n:
                raise run.SessionFailed(f"{connected} of {n} connected")
        for r in range(rounds):
            for s in sessions:
                before = await gc_state(s.port)
                hs, cpu = await s.burst_handshakes(count, pause=pause)
                after = await gc_state(s.port)
                gc_us = (after["time"] - before["time"]) * 1e6 / count
                full = int(after["full"] - before["full"])
                full_s = after["full_time"] - before["full_time"]
                rest[s.config.backend].append(cpu - gc_us)
                print(
                    f"round {r + 1} {s.config.backend:6}: {hs:6,.0f} handshakes/s, {cpu:5,.0f} µs CPU each, "
                    f"{gc_us:4,.0f} µs of it collecting ({full} full, {full_s:.2f} s), "
                    f"{int(after['tracked']):,} objects tracked",
                    flush=True,
                )
        for backend, values in rest.items():
            print(f"{backend}: median CPU per handshake outside garbage collection {statistics.median(values):,.0f} µs")
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
    args = parser.parse_args(argv)
    asyncio.run(main(args.n, args.rounds, args.redis, args.pause))
    return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
