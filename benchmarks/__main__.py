"""``python -m benchmarks run [--smoke | --quick | --full] ...`` and ``python -m benchmarks micro ...``."""

from __future__ import annotations

import sys

COMMANDS = ("run", "micro", "merge", "channel-memory", "gc-handshakes", "redis-floor")


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: python -m benchmarks run [--smoke | --quick | --full] [--redis URL] [options]")
        print("       python -m benchmarks merge results/A.json results/B.json --name full")
        print("       python -m benchmarks micro [--n 1000] [--reps 30]   (send-path micro-benchmark)")
        print("       python -m benchmarks channel-memory [--n 1000]   (what channel subscriptions keep, by line)")
        print("       python -m benchmarks gc-handshakes [--n 10000] [--redis URL]   (collection time in handshakes)")
        print("       python -m benchmarks redis-floor [--n 1000]   (publish CPU on Redis vs a bare client)")
        print("see `python -m benchmarks run --help` and docs/performance.md")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    if argv[0] == "micro":
        from benchmarks import micro_send

        return micro_send.main(argv[1:])
    if argv[0] == "channel-memory":
        from benchmarks import channel_memory

        return channel_memory.cli(argv[1:])
    if argv[0] == "gc-handshakes":
        from benchmarks import gc_handshakes

        return gc_handshakes.cli(argv[1:])
    if argv[0] == "redis-floor":
        from benchmarks import redis_floor

        return redis_floor.cli(argv[1:])
    from benchmarks import run

    if argv[0] == "merge":
        return run.merge(argv[1:])
    return run.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
