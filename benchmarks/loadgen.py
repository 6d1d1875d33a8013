"""A load-generator process: holds WebSocket connections and counts what they receive.

The driver (``benchmarks/run.py``) starts several of these, pinned to the client core, and talks to
each over stdin/stdout, one JSON object per line. Commands:

* ``connect``: mint tokens (untimed), then open the connections (bounded concurrency), each done
  when its first message (``CONNECTION_ESTABLISHED``) arrives;
* ``expect``: arm the per-connection counters for the next phase;
* ``wait``: wait (bounded) until every connection got its expected events, then check counts and
  seq checksums and return the latencies;
* ``close``: close every connection of a group, or its ``last`` few (bounded wait);
* ``subscribe``: send each connection its SUBSCRIBE (or UNSUBSCRIBE) messages, pipelined, with a
  bounded number of connections in flight, each done when every one is answered (``SUBSCRIBED``,
  ``UNSUBSCRIBED`` or ``ERROR``);
* ``counters``: the group's messages without a benchmark seq, by type (count and bytes), and how
  many contained the ``watch`` string; optionally reset them or set a new ``watch``;
* ``await_watched``: wait (bounded) until ``count`` messages contained the ``watch`` string;
* ``exit``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
import time
from typing import Any

import jwt

from benchmarks._proc import HOST
from benchmarks._wsclient import ClientConn, Stats, connect, handshake_request


def mint(secret: str, user_id: str, claims: dict[str, Any] | None = None) -> str:
    now = int(time.time())
    payload = {"userId": user_id, "iat": now, "exp": now + 3600, **(claims or {})}
    return jwt.encode(payload, secret, algorithm="HS256")


class Group:
    """The connections to one server (a driver may hold two servers' connections at once)."""

    def __init__(self) -> None:
        self.stats = Stats()
        self.conns: list[ClientConn] = []
        self.users: list[str] = []
        self.expected_sum: list[int] = []


class LoadGen:
    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.groups: dict[str, Group] = {}

    def group(self, msg: dict[str, Any]) -> Group:
        return self.groups.setdefault(msg.get("group", ""), Group())

    async def cmd_connect(self, msg: dict[str, Any]) -> dict[str, Any]:
        group = self.group(msg)
        port, path, deflate, secret = msg["port"], msg["path"], msg["deflate"], msg["secret"]
        users: list[str] = msg["users"]
        claims = msg.get("claims")
        requests = [
            handshake_request(HOST, port, f"{path}?token={mint(secret, uid, claims)}", deflate) for uid in users
        ]
        sem = asyncio.Semaphore(msg.get("concurrency", 64))
        timeout = float(msg.get("timeout", 30))
        errors: list[str] = []

        async def one(request: bytes) -> ClientConn | None:
            async with sem:
                try:
                    return await connect(self.loop, HOST, port, request, group.stats, timeout)
                except (OSError, asyncio.TimeoutError) as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                    return None

        t0 = time.time_ns()
        tasks = [asyncio.ensure_future(one(r)) for r in requests]
        # Bounded overall too: whatever has not connected by then counts as failed.
        _, pending = await asyncio.wait(tasks, timeout=float(msg.get("total_timeout", 300)))
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5)
            errors.append(f"{len(pending)} handshakes still pending after {msg.get('total_timeout', 300)} s")
        results = [t.result() if t.done() and not t.cancelled() and t.exception() is None else None for t in tasks]
        t1 = time.time_ns()
        for uid, conn in zip(users, results, strict=True):
            if conn is not None:
                group.conns.append(conn)
                group.users.append(uid)
        failed = sum(1 for r in results if r is None)
        return {"connected": len(group.conns), "failed": failed, "errors": errors[:5], "t0": t0, "t1": t1}

    def cmd_expect(self, msg: dict[str, Any]) -> dict[str, Any]:
        group = self.group(msg)
        group.stats.reset()
        group.stats.done = asyncio.Event()
        group.expected_sum = []
        remaining = 0
        for conn, uid in zip(group.conns, group.users, strict=True):
            if msg["kind"] == "all":
                seqs = range(msg["seq"], msg["seq"] + msg["count"])
            else:  # request i of R goes to user u{i % U}, with seq i
                seqs = range(int(uid[1:]), msg["requests"], msg["users"])
            conn.count = 0
            conn.seqsum = 0
            conn.expect = len(seqs)
            group.expected_sum.append(sum(seqs))
            if conn.expect:
                remaining += 1
        group.stats.remaining = remaining
        if remaining == 0:
            group.stats.done.set()
        return {"armed": remaining}

    async def cmd_wait(self, msg: dict[str, Any]) -> dict[str, Any]:
        group = self.group(msg)
        stats = group.stats
        assert stats.done is not None
        # Bounded twice: by the overall timeout, and by ``stall`` seconds without a new event.
        deadline = time.monotonic() + float(msg.get("timeout", 60))
        stall = float(msg.get("stall", 10))
        seen, last_progress = -1, time.monotonic()
        complete = False
        for _ in range(int(float(msg.get("timeout", 60)) / 0.1) + 1):
            try:
                await asyncio.wait_for(stats.done.wait(), 0.1)
                complete = True
                break
            except asyncio.TimeoutError:
                now = time.monotonic()
                if stats.events != seen:
                    seen, last_progress = stats.events, now
                if now - last_progress > stall or now > deadline:
                    break
        # Let stragglers (duplicates) arrive before checking; bounded and short.
        await asyncio.sleep(float(msg.get("settle", 0.05)))
        lost = extra = bad_sum = expected = received = 0
        for conn, want_sum in zip(group.conns, group.expected_sum, strict=True):
            expected += conn.expect
            received += conn.count
            if conn.count < conn.expect:
                lost += conn.expect - conn.count
            elif conn.count > conn.expect:
                extra += conn.count - conn.expect
            elif conn.seqsum != want_sum:
                bad_sum += 1
        return {
            "complete": complete and not lost and not extra and not bad_sum,
            "expected": expected,
            "received": received,
            "lost": lost,
            "extra": extra,
            "bad_checksum": bad_sum,
            "last_recv_ns": stats.last_recv_ns,
            "unexpected_close": stats.unexpected_close,
            "latencies": base64.b64encode(stats.latencies.tobytes()).decode() if msg.get("latencies") else "",
        }

    async def cmd_close(self, msg: dict[str, Any]) -> dict[str, Any]:
        names = list(self.groups) if msg.get("all") else [msg.get("group", "")]
        conns: list[ClientConn] = []
        users: list[str] = []
        last = msg.get("last")
        for name in names:
            if last:  # close only the group's last ``last`` connections; the group stays
                kept = self.groups[name]
                conns += kept.conns[-last:]
                users += kept.users[-last:]
                del kept.conns[-last:], kept.users[-last:]
                continue
            group = self.groups.pop(name, None)
            if group is not None:
                conns += group.conns
        for conn in conns:
            conn.close()
        pending = [c.closed for c in conns if not c.closed.done()]
        if pending:
            await asyncio.wait(pending, timeout=float(msg.get("timeout", 10)))
        aborted = 0
        for conn in conns:
            if not conn.closed.done() and conn.transport is not None:
                conn.transport.abort()
                aborted += 1
        await asyncio.sleep(0)
        return {"closed": len(conns), "aborted": aborted, "users": users}

    async def cmd_subscribe(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Connection i of the group sends ``channels[i]`` (SUBSCRIBE, or ``kind`` UNSUBSCRIBE), all at once.

        Returns when each connection has an answer per message (bounded), with the wall time.
        """
        group = self.group(msg)
        kind = msg.get("kind", "SUBSCRIBE")
        lists: list[list[str]] = msg["channels"]
        first = int(msg.get("first", 0))  # the index of the group's connection that gets lists[0]
        sem = asyncio.Semaphore(int(msg.get("concurrency", 64)))
        timeout = float(msg.get("timeout", 30))
        errors_before = group.stats.types.get("ERROR", 0)
        failed = 0

        async def one(conn: ClientConn, channels: list[str]) -> None:
            nonlocal failed
            async with sem:
                conn.answered = self.loop.create_future()
                conn.answers_wanted = conn.answers + len(channels)
                conn.send_texts(
                    [
                        json.dumps({"type": kind, "data": {"channel": c}}, separators=(",", ":")).encode()
                        for c in channels
                    ]
                )
                try:
                    await asyncio.wait_for(conn.answered, timeout)
                except asyncio.TimeoutError:
                    failed += 1
                conn.answered = None

        t0 = time.time_ns()
        pairs = [(group.conns[first + i], c) for i, c in enumerate(lists) if c]
        await asyncio.gather(*(one(conn, channels) for conn, channels in pairs))
        t1 = time.time_ns()
        return {
            "sent": sum(len(c) for _, c in pairs),
            "timed_out": failed,
            "errors": group.stats.types.get("ERROR", 0) - errors_before,
            "error_samples": group.stats.errors[:3],
            "t0": t0,
            "t1": t1,
        }

    def cmd_counters(self, msg: dict[str, Any]) -> dict[str, Any]:
        stats = self.group(msg).stats
        reply = {"types": dict(stats.types), "bytes": dict(stats.type_bytes), "watched": stats.watched}
        if msg.get("reset"):
            stats.reset_types()
        if "watch" in msg:
            stats.watch = msg["watch"].encode() if msg["watch"] else None
        return reply

    async def cmd_await_watched(self, msg: dict[str, Any]) -> dict[str, Any]:
        stats = self.group(msg).stats
        want = int(msg["count"])
        stats.watch_target = want
        stats.watch_reached = asyncio.Event()
        if stats.watched >= want:
            stats.watch_reached.set()
        try:
            await asyncio.wait_for(stats.watch_reached.wait(), float(msg.get("timeout", 30)))
        except asyncio.TimeoutError:
            pass
        finally:
            stats.watch_reached = None
        return {"watched": stats.watched, "complete": stats.watched >= want}


async def main() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 26)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    gen = LoadGen()
    out = sys.stdout
    while True:  # bounded by the driver: it sends "exit", or closes stdin
        line = await reader.readline()
        if not line:
            break
        msg = json.loads(line)
        cmd = msg["cmd"]
        try:
            if cmd == "connect":
                reply = await gen.cmd_connect(msg)
            elif cmd == "expect":
                reply = gen.cmd_expect(msg)
            elif cmd == "wait":
                reply = await gen.cmd_wait(msg)
            elif cmd == "close":
                reply = await gen.cmd_close(msg)
            elif cmd == "subscribe":
                reply = await gen.cmd_subscribe(msg)
            elif cmd == "counters":
                reply = gen.cmd_counters(msg)
            elif cmd == "await_watched":
                reply = await gen.cmd_await_watched(msg)
            elif cmd == "exit":
                await gen.cmd_close({"timeout": 2, "all": True})
                out.write(json.dumps({"bye": True}) + "\n")
                out.flush()
                break
            else:
                reply = {"error": f"unknown command {cmd!r}"}
        except Exception as exc:
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    asyncio.run(main())
