"""Separate hosts: two app nodes and Redis, each in a network namespace of its own, joined by veth pairs.

One node's link to Redis is cut for 10 s while the other keeps publishing to the first node's users and
to a channel they subscribe to.
The test talks to the nodes over Unix sockets (they cross namespaces), so it needs no address outside
the namespaces it creates. Where namespaces cannot be made it is skipped with the reason; under CI
(`CI=true`), as root with `ip` installed, it fails instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator

import anyio
import httpx
import pytest
from websockets.asyncio.client import ClientConnection, unix_connect
from websockets.exceptions import ConnectionClosed

from ..conftest import SECRET, make_token

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

ROOT = pathlib.Path(__file__).resolve().parents[2]
CUT_SECONDS = 10
CHANNEL = "team:cut"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def _unavailable(reason: str) -> None:
    """Skip with the reason, except under CI as root with `ip` installed: there the test must run."""
    can = os.geteuid() == 0 and shutil.which("ip") is not None
    if os.environ.get("CI") == "true" and can:
        pytest.fail(f"network namespaces are required under CI but {reason}")
    pytest.skip(f"network namespaces unavailable: {reason}")


class Hosts:
    """Namespaces `<tag>r` (Redis), `<tag>a` and `<tag>b` (the nodes); veth pairs a<->r and b<->r."""

    def __init__(self) -> None:
        self.tag = f"ph{secrets.token_hex(3)}"
        self.namespaces = [f"{self.tag}{side}" for side in "rab"]
        self.made: list[str] = []

    def ns(self, side: str) -> str:
        return f"{self.tag}{side}"

    def link(self, side: str) -> str:
        """The Redis-side end of a node's veth pair: setting it down cuts that node off."""
        return f"{self.tag}r{side}"

    def create(self) -> None:
        for name in self.namespaces:
            _ip("netns", "add", name)
            self.made.append(name)
        for index, side in enumerate("ab", start=1):
            redis_end, node_end = self.link(side), f"{self.tag}{side}r"
            _ip("link", "add", redis_end, "type", "veth", "peer", "name", node_end)
            _ip("link", "set", redis_end, "netns", self.ns("r"))
            _ip("link", "set", node_end, "netns", self.ns(side))
            _ip("-n", self.ns("r"), "addr", "add", f"10.77.{index}.1/30", "dev", redis_end)
            _ip("-n", self.ns(side), "addr", "add", f"10.77.{index}.2/30", "dev", node_end)
            _ip("-n", self.ns("r"), "link", "set", redis_end, "up")
            _ip("-n", self.ns(side), "link", "set", node_end, "up")
        for name in self.namespaces:
            _ip("-n", name, "link", "set", "lo", "up")

    def redis_address(self, side: str) -> str:
        return f"10.77.{'ab'.index(side) + 1}.1"

    def cut(self, side: str) -> None:
        _ip("-n", self.ns("r"), "link", "set", self.link(side), "down")

    def heal(self, side: str) -> None:
        _ip("-n", self.ns("r"), "link", "set", self.link(side), "up")

    def destroy(self) -> None:
        for name in reversed(self.made):  # deleting a namespace deletes its veth ends too
            with contextlib.suppress(subprocess.SubprocessError):
                _ip("netns", "del", name)
        self.made.clear()


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    if sys.platform != "linux" or shutil.which("ip") is None:
        _unavailable("this is not Linux with iproute2 ('ip')")
    if os.geteuid() != 0:
        _unavailable("making network namespaces needs root")
    if shutil.which("redis-server") is None:
        _unavailable("redis-server is not installed")
    made = Hosts()
    try:
        made.create()
    except subprocess.CalledProcessError as exc:
        made.destroy()
        _unavailable(f"'ip {' '.join(exc.cmd[1:])}' failed: {exc.stderr.decode().strip()}")
    try:
        yield made
    finally:
        made.destroy()


class Process:
    def __init__(self, command: list[str], env: dict[str, str] | None = None) -> None:
        # Popen returns at once; the process starts in the background.
        self.process = subprocess.Popen(command, cwd=ROOT, env=env)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


@contextlib.asynccontextmanager
async def cluster(hosts: Hosts, directory: pathlib.Path) -> AsyncIterator[dict[str, pathlib.Path]]:
    """Redis in its namespace, and a uvicorn node in each other one, listening on a Unix socket."""
    started: list[Process] = []
    try:
        port = 6390
        command = ["ip", "netns", "exec", hosts.ns("r"), "redis-server", "--port", str(port)]
        command += ["--bind", f"{hosts.redis_address('a')} {hosts.redis_address('b')}", "--save", ""]
        command += ["--appendonly", "no", "--dir", str(directory), "--protected-mode", "no", "--loglevel", "warning"]
        redis = Process(command)
        started.append(redis)
        sockets = {side: directory / f"node-{side}.sock" for side in "ab"}
        prefix = f"pomo-ws-partition:{secrets.token_hex(4)}:"
        for side, path in sockets.items():
            env = {
                **os.environ,
                "POMO_WS_TEST_SECRET": SECRET,
                "POMO_WS_TEST_REDIS_URL": f"redis://{hosts.redis_address(side)}:{port}/0",
                "POMO_WS_TEST_KEY_PREFIX": prefix,
                "POMO_WS_TEST_SOCKET_TIMEOUT": "0.5",
                "POMO_WS_TEST_HEARTBEAT": "0.5",
            }
            command = ["ip", "netns", "exec", hosts.ns(side), sys.executable, "-m", "uvicorn"]
            command += ["tests.e2e.redis_app:app", "--uds", str(path), "--log-level", "warning"]
            command += ["--ws-per-message-deflate", "false"]
            started.append(Process(command, env))
        with anyio.fail_after(30):
            for path in sockets.values():
                while True:  # another process: poll until it serves
                    with contextlib.suppress(httpx.HTTPError, OSError):
                        async with http(path) as client:
                            if (await client.get("/ws/health")).json()["status"] == "ok":
                                break
                    await anyio.sleep(0.1)
        yield sockets
    finally:
        for process in reversed(started):
            process.stop()


def http(path: pathlib.Path) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(path)), base_url="http://node", timeout=5)


class Client:
    """One user's socket on a node, subscribed to `CHANNEL`: records every event (its user's and the
    channel's apart), and resumes from its last id, with its channel, after a 1012."""

    def __init__(self, path: pathlib.Path, user: str) -> None:
        self.path = path
        self.user = user
        self.numbers: list[int] = []
        self.channel_numbers: list[int] = []
        self.resyncs = 0
        self.closes: list[int | None] = []
        self.last_id: str | None = None
        self.ws: ClientConnection | None = None
        self.opened = anyio.Event()

    async def run(self) -> None:
        while True:
            query = f"token={make_token(self.user, channels=['team:*'])}&channels={CHANNEL}"
            if self.last_id is not None:
                query += f"&last_event_id={self.last_id}"
            try:
                async with unix_connect(str(self.path), f"ws://node/ws?{query}") as ws:
                    self.ws = ws
                    async for raw in ws:
                        event = json.loads(raw)
                        if event["type"] == "SUBSCRIBED":
                            self.opened.set()  # the channel's events follow from here
                        elif event["type"] == "RESYNC_REQUIRED":
                            self.resyncs += 1
                        elif event["type"] == "TASK_UPDATED":
                            received = self.channel_numbers if event.get("channel") == CHANNEL else self.numbers
                            received.append(event["data"]["n"])
                        if "id" in event and event["type"] != "HEARTBEAT":
                            self.last_id = event["id"]
            except ConnectionClosed as closed:
                self.closes.append(closed.rcvd.code if closed.rcvd else None)
                assert self.closes[-1] == 1012, f"closed with {closed.rcvd}"


async def status(path: pathlib.Path) -> str:
    async with http(path) as client:
        value: str = (await client.get("/ws/health")).json()["status"]
        return value


@pytest.fixture
def short_dir() -> Iterator[pathlib.Path]:
    """A directory with a short path: a Unix socket's path may have at most 107 bytes."""
    directory = pathlib.Path(tempfile.mkdtemp(prefix="pomo-ws-part-", dir="/tmp"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def test_a_node_cut_off_from_redis_keeps_its_sockets_and_catches_up(
    hosts: Hosts, short_dir: pathlib.Path
) -> None:
    await _partition(hosts, short_dir)


async def _partition(hosts: Hosts, directory: pathlib.Path) -> None:
    async with cluster(hosts, directory) as sockets:
        users = [f"cut-{n}" for n in range(3)]
        clients = [Client(sockets["a"], user) for user in users]
        returned: dict[str, list[int]] = {user: [] for user in users}
        returned_channel: list[int] = []  # the channel's events: every fourth publish
        publishing = anyio.Event()
        stop = anyio.Event()
        published_all = anyio.Event()
        statuses_during_cut: list[str] = []

        async def publish_from_b() -> None:
            n = 0
            async with http(sockets["b"]) as client:
                while not stop.is_set():
                    n += 1
                    user = users[n % len(users)]
                    target = {"channel": CHANNEL} if n % 4 == 0 else {"user": user}
                    response = await client.post("/publish", json={**target, "type": "TASK_UPDATED", "data": {"n": n}})
                    assert response.status_code == 200, "node B's link is up: its publishes must work"
                    (returned_channel if "channel" in target else returned[user]).append(n)
                    publishing.set()
                    await anyio.sleep(0.02)
            published_all.set()  # the last publish, in flight when stop was set, has returned

        async with anyio.create_task_group() as tg:
            for client in clients:
                tg.start_soon(client.run)
            with anyio.fail_after(10):
                for client in clients:
                    await client.opened.wait()
            tg.start_soon(publish_from_b)
            with anyio.fail_after(10):
                await publishing.wait()
            hosts.cut("a")
            cut_at = time.monotonic()
            before_cut = sum(len(n) for n in returned.values())
            channel_before_cut = len(returned_channel)
            with anyio.fail_after(CUT_SECONDS + 5):
                while time.monotonic() - cut_at < CUT_SECONDS:
                    statuses_during_cut.append(await status(sockets["a"]))
                    await anyio.sleep(0.2)
            sockets_up = [client.ws is not None and not client.closes for client in clients]
            during_cut = sum(len(n) for n in returned.values()) - before_cut
            channel_during_cut = len(returned_channel) - channel_before_cut
            # What node A's clients lack at the heal: the catch-up must bring it.
            missing_at_heal = sum(len(returned[c.user]) - len(c.numbers) for c in clients)
            channel_missing_at_heal = sum(len(returned_channel) - len(c.channel_numbers) for c in clients)
            hosts.heal("a")
            with anyio.fail_after(20):
                while await status(sockets["a"]) != "ok":  # noqa: ASYNC110  # another process's state
                    await anyio.sleep(0.1)
            marks = {user: len(numbers) for user, numbers in returned.items()}
            with anyio.fail_after(10):  # a few more events after the heal, then stop
                while any(len(returned[u]) < marks[u] + 3 for u in users):  # noqa: ASYNC110  # paced publisher
                    await anyio.sleep(0.05)
            stop.set()
            with anyio.fail_after(10):
                await published_all.wait()
            with anyio.fail_after(15):
                for client in clients:
                    while not client.resyncs and not (  # noqa: ASYNC110  # another process delivers
                        set(returned[client.user]) <= set(client.numbers)
                        and set(returned_channel) <= set(client.channel_numbers)
                    ):
                        await anyio.sleep(0.05)
            tg.cancel_scope.cancel()

    assert during_cut > 50, "node B kept publishing to node A's users during the cut"
    assert missing_at_heal > 50, "node A's clients cannot have heard node B during the cut"
    assert channel_during_cut > 25, "node B kept publishing to the channel during the cut"
    assert channel_missing_at_heal > 3 * 25, "node A's subscribers cannot have heard the channel during the cut"
    assert all(sockets_up), "node A's sockets must stay up while it cannot reach Redis"
    assert "degraded" in statuses_during_cut, f"node A never reported degraded: {statuses_during_cut}"
    for client in clients:
        got = client.numbers
        assert len(got) == len(set(got)), f"{client.user} got an event twice"
        assert set(got) <= set(returned[client.user]), f"{client.user} got another user's event"
        channel = client.channel_numbers
        assert len(channel) == len(set(channel)), f"{client.user} got a channel event twice"
        assert set(channel) <= set(returned_channel), f"{client.user} got a channel event nobody published"
        if not client.resyncs:
            assert set(got) == set(returned[client.user]), f"{client.user} has a silent gap"
            assert got == sorted(got), f"{client.user} got events out of order"
            assert set(channel) == set(returned_channel), f"{client.user} has a silent gap in {CHANNEL}"
            assert channel == sorted(channel), f"{client.user} got {CHANNEL}'s events out of order"
