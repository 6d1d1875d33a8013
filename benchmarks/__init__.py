"""Benchmarks for starlette-pomo-ws: ``python -m benchmarks run --quick`` (see ``docs/performance.md``)."""
