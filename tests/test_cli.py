"""The `pomo-ws` CLI (token, demo, listen) and the reference client it uses."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import jwt
import pytest
import uvicorn

from starlette_pomo_ws import PomoWS, cli
from starlette_pomo_ws.cli import display_host, main, print_status
from starlette_pomo_ws.client import ConnectionRefused, PomoClient

from .conftest import SECRET, make_app, make_settings, make_token, run_server, wait_until


@pytest.fixture
def env_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POMO_WS_JWT_SECRET", SECRET)


@pytest.fixture
def no_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("POMO_WS_JWT_SECRET", raising=False)
    monkeypatch.delenv("JWT_SECRET", raising=False)


# -- help and usage -------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [[], ["token"], ["demo"], ["listen"]])
def test_help_everywhere(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: pomo-ws")
    if not argv:
        for command in ("token", "demo", "listen"):
            assert command in out


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["nope"],
        ["token"],
        ["token", "u", "--ttl", "0"],
        ["token", "u", "--ttl", "x"],
        ["demo", "--port", "x"],
        ["demo", "--port", "70000"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "usage: pomo-ws" in capsys.readouterr().err


def test_python_dash_m_runs_the_cli() -> None:
    import runpy

    with pytest.raises(SystemExit) as exc:
        runpy.run_module("starlette_pomo_ws", run_name="__main__", alter_sys=False)
    assert exc.value.code == 2  # no command given


# -- token ----------------------------------------------------------------------------------------


@pytest.mark.usefixtures("env_secret")
def test_token_mints_a_token_the_server_accepts(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["token", "alice", "--ttl", "60"]) == 0
    token = capsys.readouterr().out.strip()
    claims = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert claims["userId"] == "alice"
    assert claims["exp"] - claims["iat"] == 60


@pytest.mark.usefixtures("env_secret")
def test_token_with_channels_mints_a_channels_claim(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["token", "alice", "--channel", "team:42", "--channel", "board:7:*", "--channel", "*"]) == 0
    claims = jwt.decode(capsys.readouterr().out.strip(), SECRET, algorithms=["HS256"])
    assert claims["channels"] == ["team:42", "board:7:*", "*"]
    assert main(["token", "alice"]) == 0
    assert "channels" not in jwt.decode(capsys.readouterr().out.strip(), SECRET, algorithms=["HS256"])


@pytest.mark.usefixtures("env_secret")
@pytest.mark.parametrize("pattern", ["team 42", "team,42", "", "**", "x" * 201])
def test_token_refuses_a_channel_that_cannot_be_one(pattern: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["token", "alice", "--channel", pattern]) == 2
    assert "pomo-ws: error: --channel: Invalid channel name" in capsys.readouterr().err


@pytest.mark.usefixtures("no_secret")
def test_token_without_a_secret_says_how_to_set_one(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["token", "alice"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pomo-ws: error: no JWT secret is configured")
    assert "POMO_WS_JWT_SECRET" in err


@pytest.mark.usefixtures("no_secret")
def test_token_with_a_secret_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["token", "bob", "--secret", SECRET]) == 0
    assert jwt.decode(capsys.readouterr().out.strip(), SECRET, algorithms=["HS256"])["userId"] == "bob"


def test_token_refuses_a_public_key_setup(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("POMO_WS_JWT_SECRET", "-----BEGIN PUBLIC KEY-----")
    monkeypatch.setenv("POMO_WS_JWT_ALGORITHMS", "RS256")
    assert main(["token", "alice"]) == 2
    assert "HMAC" in capsys.readouterr().err


@pytest.mark.usefixtures("no_secret")
@pytest.mark.parametrize("form", ["separate", "joined"])
def test_token_with_a_secret_that_starts_with_a_dash(form: str, capsys: pytest.CaptureFixture[str]) -> None:
    """About 1 in 64 `token_urlsafe(48)` secrets starts with '-'; argparse took it for an option."""
    secret = "-" + SECRET
    argv = ["token", "bob", "--secret", secret] if form == "separate" else ["token", "bob", f"--secret={secret}"]
    assert main(argv) == 0
    assert jwt.decode(capsys.readouterr().out.strip(), secret, algorithms=["HS256"])["userId"] == "bob"


@pytest.mark.usefixtures("no_secret")
def test_token_with_a_secret_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "secret"
    path.write_text("-" + SECRET + "\n")
    assert main(["token", "bob", "--secret-file", str(path)]) == 0
    assert jwt.decode(capsys.readouterr().out.strip(), "-" + SECRET, algorithms=["HS256"])["userId"] == "bob"
    assert main(["token", "bob", "--secret-file", str(tmp_path / "missing")]) == 2
    assert "cannot read --secret-file" in capsys.readouterr().err
    assert main(["token", "bob", "--secret-file", str(path), "--secret", SECRET]) == 2
    assert "not both" in capsys.readouterr().err


@pytest.mark.usefixtures("no_secret")
def test_token_refuses_a_secret_the_server_would_refuse(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["token", "alice", "--secret", "short"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "the server would refuse this secret" in captured.err
    assert "'jwt_secret' is 5 bytes long" in captured.err


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.1", "example.com"])
def test_demo_refuses_a_public_host_without_allow_remote(host: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--host", host, "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert f"refusing to bind --host {host}" in err
    assert "--allow-remote" in err


def test_demo_with_allow_remote_binds_a_public_address(capsys: pytest.CaptureFixture[str], env_secret: None) -> None:
    """--allow-remote lifts the refusal; 192.0.2.1 (TEST-NET) is not on this machine, so the bind then fails."""
    assert main(["demo", "--host", "192.0.2.1", "--allow-remote", "--port", "0"]) == 1
    assert "cannot bind 192.0.2.1:0" in capsys.readouterr().err


@pytest.mark.usefixtures("no_secret")
def test_demo_use_env_secret_needs_the_secret(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("JWT_SECRET", SECRET)  # never read by the demo, even with the flag
    assert main(["demo", "--port", "0", "--use-env-secret"]) == 2
    assert "POMO_WS_JWT_SECRET" in capsys.readouterr().err


def test_malformed_environment_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("POMO_WS_HEARTBEAT_INTERVAL", "often")
    assert main(["token", "alice", "--secret", SECRET]) == 2
    assert "POMO_WS_HEARTBEAT_INTERVAL" in capsys.readouterr().err


# -- demo -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra", [[], ["--redis", "redis://127.0.0.1:1/0"]])
def test_demo_on_a_taken_port_is_a_clear_error(
    capsys: pytest.CaptureFixture[str], env_secret: None, extra: list[str]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["demo", "--port", str(port), *extra]) == 1
    err = capsys.readouterr().err
    assert f"port {port} on 127.0.0.1 is already in use" in err
    assert "--port" in err


def test_demo_with_an_unknown_host(capsys: pytest.CaptureFixture[str], env_secret: None) -> None:
    assert main(["demo", "--host", "no-such-host.invalid", "--allow-remote", "--port", "0"]) == 1
    assert "cannot resolve --host" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("errno_", "message"), [(13, "no permission to bind port"), (99, "cannot bind 127.0.0.1:8000: boom")]
)
def test_demo_bind_errors_are_clear(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], env_secret: None, errno_: int, message: str
) -> None:
    class Refusing(socket.socket):
        def bind(self, address: Any) -> None:
            raise OSError(errno_, "boom")

    monkeypatch.setattr("starlette_pomo_ws.cli.socket.socket", Refusing)
    assert main(["demo", "--port", "8000"]) == 1
    assert message in capsys.readouterr().err


def test_demo_refuses_a_short_secret(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("POMO_WS_JWT_SECRET", "short")
    assert main(["demo", "--port", "0", "--use-env-secret"]) == 2
    assert "Setting 'jwt_secret' is 5 bytes long" in capsys.readouterr().err


def test_ctrl_c_exits_130(monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(args: Any) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_token", interrupted)
    assert main(["token", "alice"]) == 130


@pytest.mark.parametrize(
    ("host", "shown"),
    [("0.0.0.0", "127.0.0.1"), ("", "127.0.0.1"), ("::", "[::1]"), ("::1", "[::1]"), ("[::1]", "[::1]"), ("h", "h")],
)
def test_display_host(host: str, shown: str) -> None:
    assert display_host(host) == shown


def test_print_status(capsys: pytest.CaptureFixture[str]) -> None:
    print_status("open", {})
    print_status("reconnecting", {"code": 1012, "reason": "", "delay": 0.42})
    print_status("closed", {"code": 1008, "reason": "Origin not allowed"})
    assert capsys.readouterr().err.splitlines() == [
        "-- open",
        "-- reconnecting (closed 1012), retrying in 0.4 s",
        "-- closed (closed 1008 Origin not allowed)",
    ]


@pytest.fixture
def captured_servers(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[uvicorn.Server]]:
    """Record the uvicorn servers that `pomo-ws demo` starts, so a test can stop them."""
    servers: list[uvicorn.Server] = []
    original = uvicorn.Server.run

    def run(self: uvicorn.Server, sockets: list[socket.socket] | None = None) -> None:
        servers.append(self)
        original(self, sockets=sockets)

    monkeypatch.setattr(uvicorn.Server, "run", run)
    yield servers
    for server in servers:
        server.should_exit = True


def test_demo_generates_a_secret_prints_a_token_and_serves(
    captured_servers: list[uvicorn.Server],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With another app's key in JWT_SECRET (and POMO_WS_JWT_SECRET), the demo still signs with its own."""
    monkeypatch.setenv("JWT_SECRET", SECRET)
    monkeypatch.setenv("POMO_WS_JWT_SECRET", SECRET)
    result: list[int] = []
    thread = threading.Thread(
        target=lambda: result.append(
            main(["demo", "--port", "0", "--db", str(tmp_path / "d.sqlite3"), "--log-level", "warning"])
        )
    )
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not (captured_servers and captured_servers[0].started):
            assert thread.is_alive() and time.monotonic() < deadline, "the demo did not start"
            time.sleep(0.01)
        out = capsys.readouterr().out
        assert "a development secret generated for this run" in out
        assert "issues a token for any name to anyone who can reach it" in out
        secret = out.split("export POMO_WS_JWT_SECRET=", 1)[1].split()[0]
        assert secret != SECRET
        url = out.split("Pomofocus demo:", 1)[1].split()[0]
        token = out.split("A token for user 'demo' (valid 24 h):", 1)[1].split()[0]
        assert jwt.decode(token, secret, algorithms=["HS256"])["userId"] == "demo"
        assert f'wscat -c "ws://{url.split("//")[1].rstrip("/")}/ws?token={token}"' in out
        assert '["bearer", "' in out
        health = httpx.get(url + "ws/health", timeout=5)
        assert health.json()["status"] == "ok"
        tasks = httpx.get(url + "api/tasks", headers={"Authorization": f"Bearer {token}"}, timeout=5)
        assert tasks.status_code == 200
        login = httpx.post(url + "api/login", json={"name": "admin"}, headers={"Host": "evil.example"}, timeout=5)
        assert login.status_code == 400, "DNS rebinding: a foreign Host must not get a token"
        assert any(r.levelname == "WARNING" and "token for any name" in r.getMessage() for r in caplog.records), (
            "the demo logs that its login issues tokens for anyone"
        )
    finally:
        for server in captured_servers:
            server.should_exit = True
        thread.join(15)
    assert not thread.is_alive()
    assert result == [0]


# -- listen and the reference client --------------------------------------------------------------

pytest_anyio = pytest.mark.anyio


@pytest.mark.usefixtures("no_secret")
def test_listen_needs_a_token(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("POMO_WS_TOKEN", raising=False)
    assert main(["listen", "ws://127.0.0.1:1/ws"]) == 2
    assert "--token" in capsys.readouterr().err
    assert main(["listen", "ws://127.0.0.1:1/ws", "--token", "t", "--count", "0"]) == 2


@pytest_anyio
async def test_listen_prints_events_as_json_lines(pomo: PomoWS, capsys: pytest.CaptureFixture[str]) -> None:
    out, err = [], []

    def opened() -> bool:
        captured = capsys.readouterr()
        out.append(captured.out)
        err.append(captured.err)
        return "-- open" in "".join(err)

    async with run_server(make_app(pomo)) as server:
        argv = ["listen", server.url("/ws"), "--token", make_token("u1"), "--count", "3"]
        async with anyio.create_task_group() as tg:
            codes: list[int] = []
            done = anyio.Event()

            async def run_cli() -> None:
                codes.append(await anyio.to_thread.run_sync(main, argv, abandon_on_cancel=True))
                done.set()

            tg.start_soon(run_cli)
            # Events count from the position in CONNECTION_ESTABLISHED: publish once the CLI has it.
            await wait_until(opened, what="the CLI to print '-- open'")
            await pomo.broadcaster.broadcast_to_user("u1", "NOTIFICATION", {"message": "one"})
            await pomo.broadcaster.broadcast_to_all("NOTIFICATION", {"message": "two"})
            with anyio.fail_after(5):
                await done.wait()
    assert codes == [0]
    opened()
    lines = [json.loads(line) for line in "".join(out).splitlines()]
    assert [e["type"] for e in lines] == ["CONNECTION_ESTABLISHED", "NOTIFICATION", "NOTIFICATION"]
    assert [e["data"]["message"] for e in lines[1:]] == ["one", "two"]
    assert f"--last-event-id {lines[-1]['id']}" in "".join(err)


@pytest_anyio
async def test_listen_with_channels_and_a_token_from_pomo_ws_token(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`pomo-ws token --channel 'team:*'` mints what a server without authorize_channel checks."""
    monkeypatch.setenv("POMO_WS_JWT_SECRET", SECRET)
    assert main(["token", "u1", "--channel", "team:*"]) == 0
    token = capsys.readouterr().out.strip()
    pomo = PomoWS(make_settings())
    out, err = [], []

    def read() -> str:
        captured = capsys.readouterr()
        out.append(captured.out)
        err.append(captured.err)
        return "".join(out)

    async with run_server(make_app(pomo)) as server:
        argv = ["listen", server.url("/ws"), "--token", token, "--channel", "team:1", "--channel", "board:1"]
        async with anyio.create_task_group() as tg:
            codes: list[int] = []
            done = anyio.Event()

            async def run_cli() -> None:
                codes.append(await anyio.to_thread.run_sync(main, [*argv, "--count", "5"], abandon_on_cancel=True))
                done.set()

            tg.start_soon(run_cli)
            await wait_until(lambda: '"SUBSCRIBED"' in read(), what="the CLI to print SUBSCRIBED")
            await pomo.broadcaster.broadcast_to_channel("board:1", "TIMER_STARTED", {"n": 0})  # not subscribed
            await pomo.broadcaster.broadcast_to_channel("team:1", "TIMER_STARTED", {"n": 1})
            await pomo.broadcaster.broadcast_to_user("u1", "NOTIFICATION", {"n": 2})
            with anyio.fail_after(5):
                await done.wait()
    assert codes == [0]
    read()
    lines = [json.loads(line) for line in "".join(out).splitlines()]
    assert [e["type"] for e in lines] == [
        "CONNECTION_ESTABLISHED",
        "SUBSCRIBED",
        "ERROR",
        "TIMER_STARTED",
        "NOTIFICATION",
    ]
    assert lines[1]["data"]["channel"] == "team:1"
    assert (lines[2]["data"]["code"], lines[2]["data"]["channel"]) == ("forbidden", "board:1")
    assert (lines[3]["channel"], lines[3]["data"]) == ("team:1", {"n": 1})
    # The refused channel is dropped: the resume line names the channels that resume.
    assert f"-- resume with --last-event-id {lines[-1]['id']} --channel team:1\n" in "".join(err)


@pytest.mark.usefixtures("no_secret")
@pytest.mark.parametrize(("channel", "message"), [("team:*", "not patterns"), ("a b", "Invalid channel name")])
def test_listen_refuses_a_channel_that_is_no_name(
    channel: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["listen", "ws://127.0.0.1:1/ws", "--token", "t", "--channel", channel]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.usefixtures("no_secret")
def test_listen_reports_a_refused_token(capsys: pytest.CaptureFixture[str]) -> None:
    async def scenario() -> None:
        async with run_server(make_app(PomoWS(make_settings()))) as server:
            code = await anyio.to_thread.run_sync(main, ["listen", server.url("/ws"), "--token", "bad", "--quiet"])
            assert code == 1

    anyio.run(scenario)
    assert "1008 Invalid authentication token" in capsys.readouterr().err


async def _next(events: Any) -> dict[str, Any]:
    with anyio.fail_after(5):
        event: dict[str, Any] = await events.__anext__()
        return event


@pytest_anyio
async def test_client_resumes_after_a_drop_exactly_once(pomo: PomoWS) -> None:
    statuses: list[str] = []
    async with run_server(make_app(pomo)) as server:
        client = PomoClient(
            server.http + "/ws",  # http:// is mapped to ws://
            token=make_token("u1"),
            min_delay=0.05,
            on_status=lambda status, detail: statuses.append(status),
        )
        events = client.events()
        first = await _next(events)
        assert first["type"] == "CONNECTION_ESTABLISHED"
        assert client.last_event_id == first["id"]
        await pomo.broadcaster.broadcast_to_user("u1", "TASK_CREATED", {"n": 1})
        assert (await _next(events))["data"] == {"n": 1}

        client._ws.transport.abort()  # a network failure: no close frame
        await pomo.broadcaster.broadcast_to_user("u1", "TASK_CREATED", {"n": 2})
        await pomo.broadcaster.broadcast_to_user("u1", "TASK_CREATED", {"n": 3})
        welcome = await _next(events)
        assert welcome["type"] == "CONNECTION_ESTABLISHED"
        assert welcome["data"].get("resumed", True)
        seen = [(await _next(events))["data"]["n"], (await _next(events))["data"]["n"]]
        await pomo.broadcaster.broadcast_to_user("u1", "TASK_CREATED", {"n": 4})
        seen.append((await _next(events))["data"]["n"])
        assert seen == [2, 3, 4]
        assert "reconnecting" in statuses

        await pomo.broadcaster.disconnect_user("u1")
        with anyio.fail_after(5):
            rest = [event async for event in events]
        assert rest == []
        assert client.close_code == 1000
    assert statuses[0] == "connecting"
    assert statuses[-1] == "closed"


@pytest_anyio
async def test_client_with_a_bad_cursor_gets_resync(pomo: PomoWS) -> None:
    async with run_server(make_app(pomo)) as server:
        client = PomoClient(server.url("/ws"), token=make_token("u1"), last_event_id="not-a-cursor")
        assert "not-a-cursor" in client.connect_url()
        events = client.events()
        assert (await _next(events))["type"] == "CONNECTION_ESTABLISHED"
        resync = await _next(events)
        assert resync["type"] == "RESYNC_REQUIRED"
        assert client.last_event_id == resync["id"]
        await client.send("PING")
        assert (await _next(events))["type"] == "PONG"
        await client.close()
        with anyio.fail_after(5):
            assert [event async for event in events] == []


@pytest_anyio
async def test_client_gets_a_fresh_token_after_an_auth_close_and_refreshes_in_band() -> None:
    pomo = PomoWS(make_settings(token_expiry_warning=2.5))
    calls: list[bool] = []

    async def provider(refresh: bool) -> str:
        calls.append(refresh)
        if len(calls) == 1:
            return "garbage"
        return make_token("u1", ttl=3)

    async with run_server(make_app(pomo)) as server:
        client = PomoClient(server.url("/ws"), token_provider=provider, min_delay=0.01)
        events = client.events()
        assert (await _next(events))["type"] == "CONNECTION_ESTABLISHED"
        assert calls == [False, True]
        assert (await _next(events))["type"] == "TOKEN_EXPIRING"
        assert (await _next(events))["type"] == "TOKEN_REFRESHED"
        assert calls == [False, True, True]
        await client.close()
        with anyio.fail_after(5):
            assert [event async for event in events] == []


@pytest_anyio
async def test_client_gives_up_after_max_retries() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = PomoClient(f"ws://127.0.0.1:{port}/ws", token="t", max_retries=1, min_delay=0.01)
    with anyio.fail_after(5), pytest.raises(ConnectionRefused) as exc:
        async for _ in client:
            pass
    assert exc.value.code == 1006
    assert repr(client) == f"PomoClient(url='ws://127.0.0.1:{port}/ws', last_event_id=None)"


def test_client_needs_a_token_and_maps_urls() -> None:
    with pytest.raises(ValueError, match="token"):
        PomoClient("ws://x/ws")
    client = PomoClient("https://example.com/ws?token=abc&last_event_id=old", token="t", last_event_id="new")
    assert client.connect_url() == "wss://example.com/ws?token=abc&last_event_id=new"
    assert "abc" not in repr(client)


@pytest_anyio
async def test_client_stops_when_the_user_has_too_many_connections() -> None:
    pomo = PomoWS(make_settings(max_connections_per_user=1))
    async with run_server(make_app(pomo)) as server:
        holder = PomoClient(server.url("/ws"), token=make_token("u1"))
        held = holder.events()
        assert (await _next(held))["type"] == "CONNECTION_ESTABLISHED"
        statuses: list[tuple[str, dict[str, Any]]] = []
        client = PomoClient(server.url("/ws"), token=make_token("u1"), on_status=lambda s, d: statuses.append((s, d)))
        with anyio.fail_after(5), pytest.raises(ConnectionRefused) as exc:
            async for _ in client:
                pass
        assert (exc.value.code, exc.value.reason) == (1008, "Too many connections for this user")
        assert statuses[-1] == ("closed", {"code": 1008, "reason": "Too many connections for this user"})
        await holder.close()
        await held.aclose()


@pytest_anyio
async def test_client_parsing_and_deduplication_without_a_server() -> None:
    client = PomoClient("ws://127.0.0.1:1/ws", token="t", dedup_size=2)
    await client.close()  # not connected: nothing to do
    with pytest.raises(ConnectionError):
        await client.send("PING")
    assert client._parse("{nope") is None
    assert client._parse("[1]") is None
    assert client._parse('{"type": 1}') is None
    assert client._accept({"type": "HEARTBEAT"})
    assert client._accept({"type": "X", "id": "a"})
    assert not client._accept({"type": "X", "id": "a"})
    assert client._accept({"type": "X", "id": "b"})
    assert client._accept({"type": "X", "id": "c"})  # "a" falls out of the window
    assert client._accept({"type": "X", "id": "a"})
    assert client.last_event_id == "a"
    assert client._accept({"type": "CONNECTION_ESTABLISHED", "id": "c"})  # a cursor, never deduplicated
    assert client.last_event_id == "c"
