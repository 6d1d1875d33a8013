"""The benchmark suite's smoke mode runs, counts every delivery, and fails on a lost message."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = [sys.executable, "-m", "benchmarks", "run"]

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the benchmark reads /proc and pins cores with taskset"
)


def smoke(app: str, out: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*BENCH, "--smoke", "--apps", app, "--no-channels", "--out", str(out), "--no-chart"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **(env or {})},
    )


def run_bench(out: Path, *options: str, timeout: float = 90) -> dict[str, Any]:
    """`python -m benchmarks run --smoke OPTIONS`, which must pass; its JSON results."""
    proc = subprocess.run(
        [*BENCH, "--smoke", *options, "--out", str(out), "--no-chart"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result: dict[str, Any] = json.loads((out / "smoke.json").read_text())
    return result


def the_paired_run(result: dict[str, Any]) -> dict[str, Any]:
    """The run's one paired run, which completed and lost nothing."""
    [run] = result["paired"]
    assert run["ok"], run.get("error")
    assert run["losses"] == 0
    return run  # type: ignore[no-any-return]


def run_smoke(app: str, out: Path) -> dict[str, object]:
    proc = smoke(app, out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result: dict[str, object] = json.loads((out / "smoke.json").read_text())
    return result


def check_sessions(result: dict[str, object], app: str) -> None:
    sessions = result["sessions"]
    assert isinstance(sessions, list)
    assert [s["app"] for s in sessions] == [app]
    for session in sessions:
        assert session["ok"], session.get("error")
        assert session["losses"] == 0
        assert session["fanout_deliveries"] > 0
        assert session["fanout_us"] > 0


def test_smoke_baseline(tmp_path: Path) -> None:
    check_sessions(run_smoke("baseline", tmp_path), "baseline")


def test_smoke_package(tmp_path: Path) -> None:
    check_sessions(run_smoke("pomo", tmp_path), "pomo")


def test_smoke_fails_on_a_lost_message(tmp_path: Path) -> None:
    """A server that drops one delivery in 97 makes the run exit non-zero."""
    proc = smoke("baseline", tmp_path, env={"BENCH_DROP_EVERY": "97"})
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    session = json.loads((tmp_path / "smoke.json").read_text())["sessions"][0]
    assert not session["ok"]
    assert session["losses"] > 0


def test_smoke_paired_rounds_measure_every_figure_for_every_server(tmp_path: Path) -> None:
    """Both apps and the floor app up at once: every paired figure has a value and a ratio, nothing is lost."""
    result = run_bench(tmp_path, "--no-sessions", "--floor", "--no-channels")
    run = the_paired_run(result)
    assert len(run["rounds"]) == 2
    # Every connection of every server was closed and reopened in each handshake burst.
    assert run["burst"]["handshakes"] == 100
    figures = result["paired_summary"]["N=100 deflate=off"]["figures"]
    for key in ("fanout_us", "p50_ms", "p99_ms", "handshakes_per_s", "handshake_cpu_us", "per_user_per_s"):
        for name in ("baseline-memory", "pomo-memory", "floor-memory"):
            assert figures[key][name] > 0, (key, name)
        assert figures[key]["pomo-memory/baseline"] > 0
        assert figures[key]["floor-memory/baseline"] > 0
    assert "### N=100 deflate=off (2 rounds)" in (tmp_path / "smoke.md").read_text()


def test_smoke_channel_run_measures_fanout_memory_subscribes_and_presence(tmp_path: Path) -> None:
    """The channel run: channel and all fan-out to the same connections, nothing lost; presence is O(members)."""
    result = run_bench(tmp_path, "--apps", "pomo", "--no-sessions")
    [run] = result["channels"]
    assert run["ok"], run.get("error")
    assert run["losses"] == 0
    assert len(run["rounds"]) == 2
    assert run["subscribes"] == 100 * 10
    summary = result["channels_summary"]["N=100"]
    for key in ("fanout_us", "p50_ms", "p99_ms"):
        assert summary[key]["all"] > 0 and summary[key]["channel"] > 0 and summary[key]["ratio"] > 0, key
    assert summary["subscribes_per_s"] > 0
    assert summary["channels"] == 10 and summary["members_per_channel"] == 100
    stages = summary["presence"]["stages"]
    assert [stage["members"] for stage in stages] == [2, 10, 20]
    for stage in stages:
        # Each change tells every member once, and the probe gets its own answer: members + 1.5 on average.
        assert stage["to_members_per_change"] == stage["members"]
        assert stage["messages_per_change"] == stage["members"] + 1.5
        assert stage["member_types"] == {
            "PRESENCE_JOIN": stage["changes"] // 2 * stage["members"],
            "PRESENCE_LEAVE": stage["changes"] // 2 * stage["members"],
        }
    assert "## Channels (issue 12)" in (tmp_path / "smoke.md").read_text()


@pytest.mark.redis
def test_smoke_redis_local_runs_its_own_redis_on_the_load_core_and_stops_it(tmp_path: Path) -> None:
    """`--redis local`: the package on a redis-server the benchmark starts (off the server's core), in the paired
    rounds and in the channel run, then stops it."""
    if shutil.which("redis-server") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("redis-server is missing (CI must install it)")
        pytest.skip("redis-server is not installed")
    result = run_bench(tmp_path, "--no-sessions", "--presence-members", "0", "--redis", "local", timeout=150)
    the_paired_run(result)
    figures = result["paired_summary"]["N=100 deflate=off"]["figures"]
    for key in ("fanout_us", "handshakes_per_s", "per_user_per_s"):
        assert figures[key]["pomo-redis"] > 0, key
        assert figures[key]["redis/memory"] > 0, key
    runs = {run["backend"]: run for run in result["channels"]}
    assert sorted(runs) == ["memory", "redis"]
    assert all(run["ok"] and run["losses"] == 0 for run in runs.values()), runs
    on_redis = result["channels_summary"]["N=100 redis"]
    assert on_redis["subscribes_per_s"] > 0
    assert on_redis["fanout_us"]["channel"] > 0 and on_redis["fanout_us"]["ratio"] > 0
    where = result["meta"]["redis_where"]
    match = re.fullmatch(r"its own redis-server on CPU 1 \(port (\d+)\)", where)
    assert match, where
    assert f"Redis: {where}" in (tmp_path / "smoke.md").read_text()
    # Stopped on the way out: nothing answers on its port any more.
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", int(match.group(1))), 1):
        pass


def test_gc_handshakes_freeze_adds_a_server_whose_connections_the_collector_no_longer_walks() -> None:
    """`python -m benchmarks gc-handshakes --freeze`: one more memory server calls `gc.freeze()` once its
    connections are open; the collector then tracks far fewer objects there, and the summary compares both."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "gc-handshakes",
            "--n",
            "200",
            "--rounds",
            "2",
            "--pause",
            "0.1",
            "--freeze",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    tracked: dict[str, list[int]] = {}
    for name, count in re.findall(r"^round \d+ (\S+)\s*:.*?([\d,]+) objects tracked$", proc.stdout, re.MULTILINE):
        tracked.setdefault(name, []).append(int(count.replace(",", "")))
    assert set(tracked) == {"pomo-memory", "pomo-memory-frozen"} and all(len(v) == 2 for v in tracked.values())
    # 200 open connections keep about 100 tracked objects each; frozen, they are out of every collection.
    assert max(tracked["pomo-memory-frozen"]) < min(tracked["pomo-memory"]) / 2, proc.stdout
    assert "frozen ÷ not frozen, handshakes/s" in proc.stdout


def test_redis_floor_compares_the_package_on_redis_with_memory_and_with_the_thinnest_client() -> None:
    """`python -m benchmarks redis-floor`: every burst delivers all its events (it raises otherwise), and
    the summary gives the node's CPU per call for each publisher, one at a time and 8 at once."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "redis-floor", "--n", "100", "--rounds", "2", "--calls", "200"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = re.findall(r"^\| (\d+) \| ([\d.]+) µs \| ([\d.]+) µs \| (-?[\d.]+) µs \| ([\d.]+) µs \|$", proc.stdout, re.M)
    assert [int(row[0]) for row in rows] == [1, 8], proc.stdout
    for _, memory, redis, _, floor in rows:
        # Every publisher did real work; a Redis round trip costs the node more than none.
        assert 0 < float(memory) < float(redis) and float(floor) > 0, proc.stdout
    line = r"^round \d callers=\d: CPU µs per call: memory [\d.]+, redis [\d.]+, floor [\d.]+$"
    rounds = re.findall(line, proc.stdout, re.M)
    assert len(rounds) == 4, proc.stdout
