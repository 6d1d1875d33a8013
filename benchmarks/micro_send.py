"""Micro-benchmark: server CPU per delivery of ways to fan one pre-encoded ``str`` out to N sockets.

Run ``python -m benchmarks micro [--n 1000] [--reps 30]`` (about a minute). It starts ONE uvicorn server (this
module's ``app``, pinned to core 0, websockets-sansio, no deflate) and connects N sockets to each of
three entry points, from this process pinned to core 1:

* ``/route``: a Starlette ``WebSocketRoute`` (what ``benchmarks/baseline_app.py`` does);
* ``/raw``: a raw ASGI websocket app at the top level (``send`` is uvicorn's own);
* ``/mount/``: the same raw app behind a Starlette ``Mount`` (``send`` is wrapped once by
  Starlette's ``ExceptionMiddleware``), which is where ``app.mount("/ws", pomo)`` puts the package.

Variants (``<entry>:<letter>``):

* ``a`` ``await ws.send_text(msg)`` (Starlette ``WebSocket``);
* ``b`` ``await send({"type": "websocket.send", "text": msg})``, a new dict per socket;
* ``c`` the same with ONE dict per event;
* ``d`` ``coro = send(m); coro.send(None)`` by hand, catching ``StopIteration`` (a send that did not
  complete at once is finished by a task, in order);
* ``e`` ``next(send(m).__await__(), SENTINEL)``.

The server measures its own thread CPU time (``time.thread_time_ns``) around each fan-out loop only,
so HTTP parsing and idle work are excluded; the driver also reports the whole-process delta from
/proc/<pid>/stat (shared out by loop time) and its kernel share. Each repetition is one HTTP trigger
of a few events, and every event goes through every variant in a rotating order, so variants are
compared within milliseconds of each other: the report gives medians of per-repetition ratios to
``route:a``, the baseline's loop. The client pauses reading during the fan-out (``--reading-client``
to keep it reading), so the server's writes never pay for waking it. Every delivery is counted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from collections.abc import Callable, Coroutine, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.routing import Mount, WebSocketRoute
from starlette.websockets import WebSocket

from benchmarks import _proc
from benchmarks._wsclient import ClientConn, Stats, connect, handshake_request

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Coroutine[Any, Any, Message]]
Send = Callable[[Message], Coroutine[Any, Any, None]]

VARIANTS = ("route:a", "raw:a", "raw:b", "raw:c", "raw:d", "raw:e", "mount:c", "mount:d")
ENTRY_PATHS = {"route": "/route", "raw": "/raw", "mount": "/mount/"}
SENTINEL = object()
ESTABLISHED = '{"type":"CONNECTION_ESTABLISHED","userId":null,"data":{},"timestamp":"1970-01-01T00:00:00.000Z"}'


# ------------------------------------------------------------------------------------------ server
@dataclass(eq=False)
class Slot:
    ws: WebSocket | None
    send: Send | None
    pending: asyncio.Task[None] | None = None


GROUPS: dict[str, list[Slot]] = {"route": [], "raw": [], "mount": []}
DEFERRED = [0]


class _Rest:
    """Awaitable that finishes a coroutine which already yielded ``first`` (exceptions are forwarded)."""

    def __init__(self, coro: Any, first: Any) -> None:
        self.coro = coro
        self.first = first

    def __await__(self) -> Generator[Any, Any, Any]:
        to_yield = self.first
        while True:
            try:
                sent = yield to_yield
            except BaseException as exc:
                try:
                    to_yield = self.coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    to_yield = self.coro.send(sent)
                except StopIteration as stop:
                    return stop.value


async def _finish(previous: asyncio.Task[None] | None, coro: Any, first: Any) -> None:
    if previous is not None:
        await asyncio.shield(previous)
    try:
        await _Rest(coro, first)
    except Exception:
        pass


async def _after(previous: asyncio.Task[None], send: Send, message: Message) -> None:
    await asyncio.shield(previous)
    try:
        await send(message)
    except Exception:
        pass


def _defer(slot: Slot, coro: Any, first: Any) -> None:
    DEFERRED[0] += 1
    previous = slot.pending if slot.pending is not None and not slot.pending.done() else None
    slot.pending = asyncio.ensure_future(_finish(previous, coro, first))


async def fan(kind: str, variant: str, msg: str) -> None:
    slots = GROUPS[kind][:]
    if variant == "a":
        for slot in slots:
            assert slot.ws is not None
            try:
                await slot.ws.send_text(msg)
            except Exception:
                pass
    elif variant == "b":
        for slot in slots:
            assert slot.send is not None
            try:
                await slot.send({"type": "websocket.send", "text": msg})
            except Exception:
                pass
    elif variant == "c":
        message = {"type": "websocket.send", "text": msg}
        for slot in slots:
            assert slot.send is not None
            try:
                await slot.send(message)
            except Exception:
                pass
    elif variant == "d":
        message = {"type": "websocket.send", "text": msg}
        for slot in slots:
            assert slot.send is not None
            if slot.pending is not None and not slot.pending.done():
                slot.pending = asyncio.ensure_future(_after(slot.pending, slot.send, message))
                continue
            coro = slot.send(message)
            try:
                first = coro.send(None)
            except StopIteration:
                continue
            except Exception:
                continue
            _defer(slot, coro, first)
    elif variant == "e":
        message = {"type": "websocket.send", "text": msg}
        for slot in slots:
            assert slot.send is not None
            if slot.pending is not None and not slot.pending.done():
                slot.pending = asyncio.ensure_future(_after(slot.pending, slot.send, message))
                continue
            it = slot.send(message).__await__()
            try:
                first = next(it, SENTINEL)
            except Exception:
                continue
            if first is not SENTINEL:
                _defer(slot, it, first)
    else:
        raise ValueError(variant)


def envelope(seq: int) -> str:
    # Encoded once per event, like the package does; the same str goes to every socket.
    data = json.dumps({"seq": seq, "t": time.time_ns()}, separators=(",", ":"))
    return f'{{"type":"BENCH","userId":null,"data":{data},"timestamp":"2026-01-01T00:00:00.000Z"}}'


async def _raw_ws(kind: str, scope: Scope, receive: Receive, send: Send) -> None:
    ws = WebSocket(scope, receive, send)  # type: ignore[arg-type]
    await ws.accept()
    await ws.send_text(ESTABLISHED)
    slot = Slot(ws, send)
    GROUPS[kind].append(slot)
    try:
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                break
    finally:
        GROUPS[kind].remove(slot)


async def route_endpoint(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_text(ESTABLISHED)
    slot = Slot(websocket, None)
    GROUPS["route"].append(slot)
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                break
    finally:
        GROUPS["route"].remove(slot)


async def mounted(scope: Scope, receive: Receive, send: Send) -> None:
    await _raw_ws("mount", scope, receive, send)


starlette_app = Starlette(routes=[WebSocketRoute("/route", route_endpoint), Mount("/mount", app=mounted)])


async def _http(scope: Scope, receive: Receive, send: Send) -> None:
    path = scope["path"]
    status, body = 200, b"{}"
    if path == "/fan":
        # Every event goes through every requested variant, in a rotating order, so that the
        # variants are compared within the same few milliseconds (this machine is noisy).
        query = dict(part.split("=", 1) for part in scope["query_string"].decode().split("&") if part)
        variants = query["variants"].split(",")
        count, seq = int(query["count"]), int(query["seq"])
        DEFERRED[0] = 0
        cpu = dict.fromkeys(variants, 0)
        deliveries = dict.fromkeys(variants, 0)
        for i in range(count):
            msg = envelope(seq + i)
            shift = i % len(variants)
            for variant in variants[shift:] + variants[:shift]:
                kind, letter = variant.split(":")
                t0 = time.thread_time_ns()
                await fan(kind, letter, msg)
                cpu[variant] += time.thread_time_ns() - t0
                deliveries[variant] += len(GROUPS[kind])
        body = json.dumps({"cpu_ns": cpu, "deliveries": deliveries, "deferred": DEFERRED[0]}).encode()
    elif path != "/ready":
        status, body = 404, b"{}"
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    elif scope["type"] == "http":
        await _http(scope, receive, send)
    elif scope["path"] == "/raw":
        await _raw_ws("raw", scope, receive, send)
    else:
        await starlette_app(scope, receive, send)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ driver
async def _drive(n: int, reps: int, fans: int, paused: bool) -> dict[str, list[dict[str, float]]]:
    _proc.raise_nofile(3 * n + 256)
    _proc.pin_self(_proc.CLIENT_CPU)
    loop = asyncio.get_running_loop()
    port = _proc.free_port()
    server = _proc.spawn(_proc.uvicorn_argv("benchmarks.micro_send:app", port, deflate=False), _proc.child_env())
    stats = Stats()
    conns: dict[str, list[ClientConn]] = {}
    per_kind = {kind: sum(1 for v in VARIANTS if v.startswith(kind + ":")) for kind in ENTRY_PATHS}
    results: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
    try:
        await _proc.wait_http_ready(port, "/ready", server, 30)
        sem = asyncio.Semaphore(64)

        async def one(path: str) -> ClientConn:
            async with sem:
                request = handshake_request(_proc.HOST, port, path, False)
                return await connect(loop, _proc.HOST, port, request, stats, 10)

        for kind, path in ENTRY_PATHS.items():
            conns[kind] = list(await asyncio.wait_for(asyncio.gather(*(one(path) for _ in range(n))), 120))
        everyone = [c for group in conns.values() for c in group]
        http = await _proc.Http(port).open()
        seq = 0
        for rep in range(reps + 1):  # repetition 0 is a warm-up and is discarded
            order = list(VARIANTS)
            random.Random(rep).shuffle(order)
            for kind, group in conns.items():
                for c in group:
                    c.count = 0
                    c.seqsum = 0
                    c.expect = fans * per_kind[kind]
            stats.remaining = len(everyone)
            stats.done = asyncio.Event()
            if paused:  # the server's writes then never wake the client up
                for c in everyone:
                    assert c.transport is not None
                    c.transport.pause_reading()
            before_user, before_sys = _proc.cpu_times(server.pid)
            status, body = await http.request("POST", f"/fan?variants={','.join(order)}&count={fans}&seq={seq}", 120)
            after_user, after_sys = _proc.cpu_times(server.pid)
            assert status == 200, body
            if paused:
                for c in everyone:
                    assert c.transport is not None
                    c.transport.resume_reading()
            reply = json.loads(body)
            seq += fans
            await asyncio.wait_for(stats.done.wait(), 120)
            received = sum(c.count for c in everyone)
            sent = sum(reply["deliveries"].values())
            if received != sent or sent != fans * n * len(VARIANTS):
                raise RuntimeError(f"lost deliveries: {received} received, {sent} sent")
            if rep:
                total_ns = sum(reply["cpu_ns"].values())
                process = (after_user + after_sys - before_user - before_sys) * 1e9
                for variant in VARIANTS:
                    results[variant].append(
                        {
                            "loop_us": reply["cpu_ns"][variant] / 1e3 / reply["deliveries"][variant],
                            # the process delta cannot be split by variant: share it out by loop time
                            "proc_us": process
                            * reply["cpu_ns"][variant]
                            / total_ns
                            / 1e3
                            / reply["deliveries"][variant],
                            "sys_share": (after_sys - before_sys)
                            / max(1e-9, after_user + after_sys - before_user - before_sys),
                            "deferred": reply["deferred"],
                        }
                    )
        await http.close()
    finally:
        for group in conns.values():
            for c in group:
                c.close()
        await asyncio.sleep(0.2)
        _proc.stop_process(server)
    return results


def summarize(results: dict[str, list[dict[str, float]]], base: str = "route:a") -> list[dict[str, Any]]:
    rows = []
    reps = len(results[base])
    for variant, runs in results.items():
        loop_ratios = [runs[i]["loop_us"] / results[base][i]["loop_us"] for i in range(reps)]
        proc_ratios = [runs[i]["proc_us"] / results[base][i]["proc_us"] for i in range(reps)]
        raw_ratios = [runs[i]["loop_us"] / results["raw:a"][i]["loop_us"] for i in range(reps)]
        rows.append(
            {
                "variant": variant,
                "loop_us": statistics.median(r["loop_us"] for r in runs),
                "loop_ratio": statistics.median(loop_ratios),
                "loop_ratio_min": min(loop_ratios),
                "loop_ratio_max": max(loop_ratios),
                "loop_ratio_raw_a": statistics.median(raw_ratios),
                "proc_us": statistics.median(r["proc_us"] for r in runs),
                "proc_ratio": statistics.median(proc_ratios),
                "sys_share": statistics.median(r["sys_share"] for r in runs),
                "deferred": sum(r["deferred"] for r in runs),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="sockets per entry point (3 entry points)")
    parser.add_argument("--reps", type=int, default=30, help="repetitions (after one warm-up), one HTTP trigger each")
    parser.add_argument("--fans", type=int, default=5, help="events per repetition; each goes through every variant")
    parser.add_argument(
        "--reading-client",
        action="store_true",
        help="let the client read during the fan-out (by default it pauses reading, so that the server's "
        "measurement excludes waking the client on every write)",
    )
    parser.add_argument("--json", help="also write the raw results to this file")
    parser.add_argument("--md", help="also write the table to this file")
    args = parser.parse_args(argv)
    results = asyncio.run(_drive(args.n, args.reps, args.fans, not args.reading_client))
    rows = summarize(results)
    lines = [
        f"N={args.n} sockets, {args.reps} repetitions x {args.fans} events, variants interleaved per event; medians",
        "",
        "| variant | loop µs/delivery | ratio to route:a | (min-max) | ratio to raw:a "
        "| process µs/delivery | ratio | kernel share |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['loop_us']:.2f} | {r['loop_ratio']:.3f} | "
            f"{r['loop_ratio_min']:.2f}-{r['loop_ratio_max']:.2f} | {r['loop_ratio_raw_a']:.3f} | "
            f"{r['proc_us']:.2f} | {r['proc_ratio']:.3f} | {r['sys_share']:.0%} |"
        )
    if any(r["deferred"] for r in rows):
        lines.append("")
        lines.append(
            f"note: sends paused by flow control, finished by a task: { {r['variant']: r['deferred'] for r in rows} }"
        )
    print("\n".join(lines))
    if args.md:
        Path(args.md).write_text("\n".join(lines) + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results, "summary": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
