"""Diagnosis: what 10 channel subscriptions per connection keep alive in the server, by source line.

``python -m benchmarks channel-memory [--n N] [--fresh] [--redis URL]`` starts the package app with tracemalloc on
(``BENCH_TRACEMALLOC=1``), connects N connections (default 1,000), lets each send one message
first (a ``PRESENCE`` request answered ``ERROR``; ``--fresh`` skips it), takes a snapshot, subscribes
each to 10 channels of ``run.channel_layout``, and prints what is still allocated per connection.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys

from benchmarks import _proc, run


async def main(n: int, fresh: bool, redis_url: str | None) -> None:
    _proc.raise_nofile(2 * n + 1024)
    gens = [run.LoadGen(i) for i in range(max(1, math.ceil(n / run.CONNS_PER_LOADGEN)))]
    for g in gens:
        await g.start()
    backend = "redis" if redis_url else "memory"
    s = run.Session("pomo", run.Config(n, backend, False), run.MODES["quick"], gens, redis_url)
    s.group = s.name = "channels"
    s.claims = run.CHANNEL_CLAIMS
    s.extra_env = {"BENCH_TRACEMALLOC": "1"}
    try:
        await s.start_server()
        await s.connect(s.slices)
        if not fresh:
            lists = [[[run.PROBE_CHANNEL]] * len(sl) for sl in s.slices]
            await run.subscribe(s, lists, kind="PRESENCE", errors=True)
        await request(s.port, "start")
        layout = run.channel_layout(n)
        await run.subscribe(s, [[layout[g] for g in sl] for sl in s.slices])
        await asyncio.sleep(1)
        data = json.loads(await request(s.port, "diff"))
        print(f"N={n}, {backend}: {data['total'] / n:.0f} B per connection still allocated, by line:")
        for top in data["top"]:
            print(f"{top['bytes'] / n:8.1f} B/conn {top['count']:8d} objects  {top['where']}")
    finally:
        await s.stop()
        for g in gens:
            await g.stop()


async def request(port: int, action: str) -> bytes:
    return await _proc.request_once(port, "POST", f"/bench/tracemalloc?action={action}", 300)


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks channel-memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="connections (default 1,000)")
    parser.add_argument("--fresh", action="store_true", help="no first message: count what it keeps too")
    parser.add_argument("--redis", metavar="URL", help="the package on Redis at URL (flushed!) instead of memory")
    args = parser.parse_args(argv)
    asyncio.run(main(args.n, args.fresh, args.redis))
    return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
