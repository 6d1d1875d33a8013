"""A minimal WebSocket client for load generation.

The ``websockets`` asyncio client costs several times the server's CPU per received message, so a
single load-generator core could never keep up with the server. This client is an
``asyncio.Protocol`` that parses server frames by hand (they are unmasked and, in practice, never
fragmented), answers pings, decompresses permessage-deflate when it was negotiated, and counts the
benchmark events it receives. It is a load generator, not a general client: it only checks what
the benchmark needs.
"""

from __future__ import annotations

import asyncio
import re
import time
import zlib
from array import array

# Benchmark events carry ``"data": {"seq": <int>, "t": <time_ns at publish>}``.
_SEQ_T = re.compile(rb'"seq":\s*(\d+),\s*"t":\s*(\d+)')
# Every other message's type (the package's envelope is compact JSON and starts with it).
_TYPE = re.compile(rb'\{\s*"type":\s*"([^"]*)"')
_DEFLATE_TAIL = b"\x00\x00\xff\xff"
_NO_MASK = b"\x00\x00\x00\x00"  # a zero mask key is valid and makes masking a no-op


class Stats:
    """Counters shared by all connections of one load-generator process."""

    __slots__ = (
        "done",
        "errors",
        "events",
        "last_recv_ns",
        "latencies",
        "other",
        "remaining",
        "type_bytes",
        "types",
        "unexpected_close",
        "watch",
        "watch_reached",
        "watch_target",
        "watched",
    )

    def __init__(self) -> None:
        self.latencies = array("q")
        self.last_recv_ns = 0
        self.events = 0
        self.other = 0
        self.remaining = 0
        self.unexpected_close = 0
        self.done: asyncio.Event | None = None
        # Messages without a benchmark seq, by type: how many, and their payload bytes.
        self.types: dict[str, int] = {}
        self.type_bytes: dict[str, int] = {}
        self.errors: list[str] = []  # the first few ERROR payloads
        self.watch: bytes | None = None  # count the messages that contain this
        self.watched = 0
        self.watch_target = 0  # `watch_reached` is set once `watched` reaches it
        self.watch_reached: asyncio.Event | None = None

    def reset(self) -> None:
        self.latencies = array("q")
        self.last_recv_ns = 0
        self.events = 0
        self.other = 0

    def reset_types(self) -> None:
        self.types = {}
        self.type_bytes = {}
        self.watched = 0


def handshake_request(host: str, port: int, path: str, deflate: bool) -> bytes:
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
    ]
    if deflate:
        # What every browser offers.
        lines.append("Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class ClientConn(asyncio.Protocol):
    """One benchmark WebSocket connection."""

    def __init__(self, request: bytes, stats: Stats, loop: asyncio.AbstractEventLoop) -> None:
        self.request = request
        self.stats = stats
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.handshaken = False
        self.established = False
        self.opened: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.closing = False
        self.close_code: int | None = None
        self.decomp: zlib._Decompress | None = None  # type: ignore[name-defined]
        self.no_context_takeover = False
        self.deflate = False
        self.count = 0
        self.seqsum = 0
        self.expect = -1
        # SUBSCRIBE/UNSUBSCRIBE round trips: answers (SUBSCRIBED, UNSUBSCRIBED or ERROR) counted
        # until ``answers_wanted``, then ``answered`` resolves.
        self.answers = 0
        self.answers_wanted = 0
        self.answered: asyncio.Future[None] | None = None

    # asyncio.Protocol -------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(f"connection lost before CONNECTION_ESTABLISHED: {exc}"))
            self.opened.exception()  # mark it retrieved: connect() may already have given up on it
        if not self.closed.done():
            self.closed.set_result(None)
        if not self.closing:
            self.stats.unexpected_close += 1

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        if not self.handshaken:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            head = buf[:end].lower()
            if not head.startswith(b"http/1.1 101"):
                status = buf[: buf.find(b"\r\n")].decode("latin-1")
                if not self.opened.done():
                    self.opened.set_exception(ConnectionError(f"handshake refused: {status}"))
                self.closing = True
                assert self.transport is not None
                self.transport.close()
                return
            self.handshaken = True
            if b"permessage-deflate" in head:
                self.deflate = True
                self.no_context_takeover = b"server_no_context_takeover" in head
                self.decomp = zlib.decompressobj(-15)
            buf = buf[end + 4 :]
        now = time.time_ns()
        pos = 0
        n = len(buf)
        while n - pos >= 2:
            b0 = buf[pos]
            length = buf[pos + 1] & 0x7F
            hdr = 2
            if length == 126:
                if n - pos < 4:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                hdr = 4
            elif length == 127:
                if n - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                hdr = 10
            end = pos + hdr + length
            if end > n:
                break
            payload = buf[pos + hdr : end]
            pos = end
            opcode = b0 & 0x0F
            if opcode == 1:
                if b0 & 0x40:
                    if self.no_context_takeover:
                        self.decomp = zlib.decompressobj(-15)
                    assert self.decomp is not None
                    payload = self.decomp.decompress(payload + _DEFLATE_TAIL)
                self.on_text(payload, now)
            elif opcode == 9:  # ping: answer with a masked pong
                assert self.transport is not None
                self.transport.write(bytes((0x8A, 0x80 | len(payload))) + _NO_MASK + payload)
            elif opcode == 8:
                self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                assert self.transport is not None
                if not self.closing:
                    self.closing = True
                    self.stats.unexpected_close += 1
                    self.transport.write(b"\x88\x82" + _NO_MASK + payload[:2])
                self.transport.close()
            else:  # continuation frames and binary frames are not expected from the apps under test
                self.stats.other += 1
        self.buf = buf[pos:]
        self.stats.last_recv_ns = now

    # -----------------------------------------------------------------------------------------
    def on_text(self, payload: bytes, now: int) -> None:
        match = _SEQ_T.search(payload)
        if match is None:
            if not self.established:
                self.established = True
                if not self.opened.done():
                    self.opened.set_result(None)
            stats = self.stats
            stats.other += 1
            head = _TYPE.match(payload)
            kind = head[1].decode() if head else "?"
            stats.types[kind] = stats.types.get(kind, 0) + 1
            stats.type_bytes[kind] = stats.type_bytes.get(kind, 0) + len(payload)
            if stats.watch is not None and stats.watch in payload:
                stats.watched += 1
                if stats.watch_reached is not None and stats.watched >= stats.watch_target:
                    stats.watch_reached.set()
            if kind in ("SUBSCRIBED", "UNSUBSCRIBED", "ERROR"):
                if kind == "ERROR" and len(stats.errors) < 5:
                    stats.errors.append(payload[:300].decode(errors="replace"))
                self.answers += 1
                if self.answered is not None and self.answers >= self.answers_wanted and not self.answered.done():
                    self.answered.set_result(None)
            return
        self.count += 1
        self.seqsum += int(match[1])
        stats = self.stats
        stats.events += 1
        stats.latencies.append(now - int(match[2]))
        if self.count == self.expect:
            stats.remaining -= 1
            if stats.remaining == 0 and stats.done is not None:
                stats.done.set()

    def send_texts(self, texts: list[bytes]) -> None:
        """Send text frames (masked with a zero key), in one write."""
        assert self.transport is not None
        frames = []
        for text in texts:
            n = len(text)
            if n < 126:
                frames.append(bytes((0x81, 0x80 | n)) + _NO_MASK + text)
            else:
                frames.append(bytes((0x81, 0x80 | 126)) + n.to_bytes(2, "big") + _NO_MASK + text)
        self.transport.write(b"".join(frames))

    def close(self) -> None:
        """Start the closing handshake (1000)."""
        if self.transport is None or self.closing:
            return
        self.closing = True
        self.transport.write(b"\x88\x82" + _NO_MASK + (1000).to_bytes(2, "big"))


async def connect(
    loop: asyncio.AbstractEventLoop, host: str, port: int, request: bytes, stats: Stats, timeout: float
) -> ClientConn:
    """Open one connection and wait for its first text message (``CONNECTION_ESTABLISHED``)."""
    conn = ClientConn(request, stats, loop)
    await asyncio.wait_for(loop.create_connection(lambda: conn, host, port), timeout)
    try:
        await asyncio.wait_for(asyncio.shield(conn.opened), timeout)
    except BaseException:
        conn.closing = True
        if conn.transport is not None:
            conn.transport.abort()
        raise
    return conn


def now_ns() -> int:
    return time.time_ns()
