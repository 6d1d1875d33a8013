"""Every snippet in docs/examples runs: import it, connect in-process, broadcast, receive."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import importlib.metadata
import inspect
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from packaging.requirements import Requirement
from starlette.applications import Starlette
from starlette.testclient import TestClient

from starlette_pomo_ws import BackendUnavailable, NotStartedError, PomoWS, Settings
from starlette_pomo_ws.testing import ChannelRefused, PomoTestClient

from .conftest import SECRET, make_settings, make_token

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"
ROOT = EXAMPLES.parent.parent

LoadExample = Callable[[str], ModuleType]


@pytest.fixture
def load_example(monkeypatch: pytest.MonkeyPatch) -> Iterator[LoadExample]:
    """Import a fresh copy of an example module, with the secret in the environment as a user would set it."""
    monkeypatch.setenv("POMO_WS_JWT_SECRET", SECRET)
    monkeypatch.syspath_prepend(str(EXAMPLES))

    def load(name: str) -> ModuleType:
        monkeypatch.delitem(sys.modules, name, raising=False)
        return importlib.import_module(name)

    yield load


def test_every_example_is_exercised() -> None:
    """A new snippet needs a test here."""
    tested = {name.removeprefix("test_") for name, _ in inspect.getmembers(sys.modules[__name__], inspect.isfunction)}
    for path in EXAMPLES.glob("*.py"):
        assert path.stem in tested, f"docs/examples/{path.name} has no test_{path.stem} in {__name__}"


def test_every_example_is_shown_in_the_docs() -> None:
    pages = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "docs").glob("*.md"))
    for path in EXAMPLES.glob("*.py"):
        assert f"docs/examples/{path.name}" in pages, f"docs/examples/{path.name} is not included in any page"


def test_the_settings_page_lists_every_field() -> None:
    """Each field appears in the uvicorn-style format, with its environment variable and a default."""
    page = (ROOT / "docs" / "settings.md").read_text(encoding="utf-8")
    for field in dataclasses.fields(Settings):
        entry = f"* `{field.name}` (`POMO_WS_{field.name.upper()}`) \N{EN DASH} "
        assert entry in page, f"docs/settings.md has no entry for {field.name!r}"
        text = page.split(entry, 1)[1].split("\n* ", 1)[0].split("\n\n", 1)[0]
        assert "**Default:** *" in text, f"docs/settings.md gives no default for {field.name!r}"


def test_the_release_notes_are_the_changelog() -> None:
    """The docs show CHANGELOG.md itself, so the two cannot drift apart."""
    page = (ROOT / "docs" / "release-notes.md").read_text(encoding="utf-8")
    assert '--8<-- "CHANGELOG.md"' in page
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert "## [Unreleased]" in changelog


def _task_roundtrip(app: Any, path: str = "/tasks", **post: Any) -> None:
    token = make_token("alice")
    with TestClient(app) as client:
        with client.websocket_connect(f"/ws?token={token}") as ws:
            established = ws.receive_json()
            assert established["type"] == "CONNECTION_ESTABLISHED"
            response = client.post(path, json={"title": "Write the docs"}, **post)
            assert response.status_code == 201, response.text
            event = ws.receive_json()
        assert event["type"] == "TASK_CREATED"
        assert event["userId"] == "alice"
        assert event["data"]["title"] == "Write the docs"
        assert isinstance(event["id"], str)


def test_starlette_app(load_example: LoadExample) -> None:
    _task_roundtrip(load_example("starlette_app").app, headers={"x-user-id": "alice"})


def test_fastapi_app(load_example: LoadExample) -> None:
    _task_roundtrip(load_example("fastapi_app").app, headers={"x-user-id": "alice"})


def test_litestar_app(load_example: LoadExample) -> None:
    _task_roundtrip(load_example("litestar_app").app, headers={"x-user-id": "alice"})


def test_compose_lifespan(load_example: LoadExample) -> None:
    module = load_example("compose_lifespan")
    _task_roundtrip(module.app, path="/users/alice/tasks")
    with TestClient(module.app) as client:
        assert client.post("/users/bob/tasks", json={"title": "a"}).json() == {"count": 1}
        assert client.get("/ws/health").json()["status"] == "ok"


@pytest.mark.anyio
async def test_custom_auth(load_example: LoadExample) -> None:
    module = load_example("custom_auth")
    module.SESSIONS.update({"s-alice": ("alice", time.time() + 300), "s-old": ("alice", time.time() - 1)})
    async with PomoTestClient(module.app) as client:
        async with client.connect(path="/ws?session=s-alice", origin="https://app.example.com") as ws:
            assert ws.established is not None and ws.established["userId"] == "alice"
            await client.broadcaster.broadcast_to_user("alice", "SESSION_START", {"minutes": 25})
            await ws.expect("SESSION_START", data={"minutes": 25})
            module.SESSIONS["s-alice-2"] = ("alice", time.time() + 600)
            await ws.send_json({"type": "REFRESH_TOKEN", "data": {"token": "s-alice-2"}})
            refreshed = await ws.expect("TOKEN_REFRESHED")
            assert refreshed["data"]["expiresAt"].endswith("Z")
        async with client.connect(token="s-alice", token_via="header") as ws:
            assert ws.established is not None and ws.established["userId"] == "alice"
        for query, reason in [
            ("", "No authentication token provided"),
            ("?session=nope", "Invalid authentication token"),
            ("?session=s-old", "Authentication token expired"),
        ]:
            async with client.connect(path="/ws" + query, wait_established=False) as ws:
                await ws.expect_close(1008, reason)
        async with client.connect(
            path="/ws?session=s-alice", origin="https://evil.example", wait_established=False
        ) as ws:
            await ws.expect_close(1008, "Origin not allowed")


@pytest.mark.anyio
async def test_background_job(load_example: LoadExample, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BREAK_REMINDER_SECONDS", "0.05")
    module = load_example("background_job")
    async with PomoTestClient(module.app) as client, client.connect("alice") as ws:
        await ws.expect("NOTIFICATION", data={"message": "Time for a break"}, user_id=None)
        await module.end_session("alice", 25)
        await ws.expect("SESSION_END", data={"minutes": 25}, skip=("HEARTBEAT", "NOTIFICATION"))


@pytest.mark.anyio
async def test_background_job_survives_an_unavailable_backend(
    load_example: LoadExample, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("BREAK_REMINDER_SECONDS", "0.01")
    module = load_example("background_job")

    async def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise BackendUnavailable("down")

    async with PomoTestClient(module.app):
        monkeypatch.setattr(module.pomo.broadcaster, "broadcast_to_all", unavailable)
        with caplog.at_level("WARNING", logger=module.__name__):
            deadline = time.monotonic() + 2
            while "Break reminder not sent" not in caplog.text:
                assert time.monotonic() < deadline, "the job did not log the unavailable backend"
                await asyncio.sleep(0.01)


@pytest.mark.anyio
async def test_testing_example(load_example: LoadExample) -> None:
    load_example("starlette_app")
    module = load_example("testing_example")
    tests = [f for name, f in inspect.getmembers(module, inspect.iscoroutinefunction) if name.startswith("test_")]
    assert len(tests) == 4
    for test in tests:
        await test()


@pytest.mark.anyio
async def test_channels_app(load_example: LoadExample) -> None:
    """docs/channels.md: the shared team timer, presence, and membership the app decides on every (re)subscribe."""
    from unittest.mock import ANY

    module = load_example("channels_app")
    async with PomoTestClient(module.app) as client:
        async with client.connect("alice", channels=["team:42"]) as alice, client.connect("carol") as carol:
            assert (await alice.expect("SUBSCRIBED", channel="team:42"))["data"]["presence"] is True
            await alice.expect("PRESENCE", data={"channel": "team:42", "users": ANY, "count": 1})
            response = await client.http.post("/teams/42/timer", json={"minutes": 25})
            assert response.status_code == 201
            timer = {"phase": "focus", "minutes": 25}
            await alice.expect("TIMER_STARTED", data=timer, channel="team:42", user_id=None, retained=False)
            with pytest.raises(ChannelRefused) as refused:
                await carol.subscribe("team:42")  # not a member
            assert refused.value.code == "forbidden"

            async with client.connect("bob") as bob:  # a tab opened later gets the timer at once
                await bob.subscribe("team:42")
                await bob.expect("TIMER_STARTED", data=timer, channel="team:42", retained=True)
                await bob.expect("PRESENCE", channel="team:42")
                await alice.expect("PRESENCE_JOIN", data={"channel": "team:42", "userId": "bob"})
                assert (await client.http.get("/teams/42/presence")).json() == {"alice": 1, "bob": 1}

                await client.http.put("/teams/42/members/carol")  # carol's open tab joins, no SUBSCRIBE needed
                await carol.expect("SUBSCRIBED", channel="team:42")
                await carol.expect("TIMER_STARTED", retained=True)
                for member in (alice, bob):
                    await member.expect("PRESENCE_JOIN", data={"channel": "team:42", "userId": "carol"})

                await client.http.delete("/teams/42/members/bob")
                revoked = await bob.expect("UNSUBSCRIBED", channel="team:42")
                assert revoked["data"]["reason"] == "Removed from the team"
                await alice.expect("PRESENCE_LEAVE", data={"channel": "team:42", "userId": "bob"})
                cursor = bob.last_id
            # A resume re-authorizes every channel: bob is no longer a member.
            async with client.connect("bob", last_event_id=cursor, channels=["team:42"]) as bob:
                await bob.expect("ERROR", data={"code": "forbidden", "message": ANY, "channel": "team:42"})


def test_litestar_dependency(load_example: LoadExample) -> None:
    if not hasattr(pytest.importorskip("litestar.di"), "NamedDependency"):
        pytest.skip("NamedDependency needs Litestar 2.23 or later")
    app = load_example("litestar_dependency").app
    with TestClient(app) as client, client.websocket_connect(f"/ws/?token={make_token('alice')}") as ws:
        assert ws.receive_json()["type"] == "CONNECTION_ESTABLISHED"
        response = client.post("/announcements")
        assert response.status_code == 202, response.text
        event = ws.receive_json()
        assert (event["type"], event["userId"]) == ("NOTIFICATION", None)


@pytest.mark.anyio
async def test_the_lifespan_page_claims() -> None:
    """docs/lifespan.md: what happens when pomo.lifespan was never wired, and that starting twice is harmless."""
    pomo = PomoWS(make_settings())
    unwired = Starlette()
    unwired.mount("/ws", pomo)
    async with PomoTestClient(unwired, run_lifespan=False) as client:
        with pytest.raises(NotStartedError, match=r"pomo\.lifespan was never started"):
            await pomo.broadcaster.broadcast_to_user("u1", "TASK_CREATED")
        async with client.connect("u1", path="/ws/", wait_established=False) as ws:
            await ws.expect_close(1011, "Internal error")
        health = await client.http.get("/ws/health")
        assert health.status_code == 503 and "Lifespan composition" in health.json()["error"]

    wired = Starlette(lifespan=pomo.lifespan)
    wired.mount("/ws", pomo)
    async with PomoTestClient(wired) as client:
        async with pomo.lifespan(wired):  # a second start: counted, harmless
            pass
        assert pomo.broadcaster.running
        async with client.connect("u1", path="/ws") as ws:  # the bare path
            await client.broadcaster.broadcast_to_user("u1", "TASK_CREATED")
            await ws.expect("TASK_CREATED")
    assert not pomo.broadcaster.running


def test_the_wire_protocol_page_lists_every_error_code_and_close_reason() -> None:
    """Every `ERROR` code and close reason in the package's source is in docs/wire-protocol.md."""
    package = ROOT / "starlette_pomo_ws"
    source = "\n".join(p.read_text(encoding="utf-8") for p in package.glob("*.py"))
    page = (ROOT / "docs" / "wire-protocol.md").read_text(encoding="utf-8")
    codes = set(re.findall(r'_error\(\s*connection,\s*"([a-z_]+)"', source))
    assert {"invalid_json", "unknown_type", "rate_limited"} <= codes
    for code in codes:
        assert f"| `{code}` |" in page, f"ERROR code {code!r} is not in docs/wire-protocol.md"
    reasons = set(re.findall(r'(?:abort|_refuse)\([^)]*?(1\d{3}),\s*"([^"]+)"\)', source))
    assert ("1013", "Client too slow") in reasons
    for code, reason in reasons:
        row = next(
            (line for line in page.splitlines() if line.startswith(f"| {code} |") and f"`{reason}`" in line), None
        )
        assert row is not None, f"close {code} {reason!r} is not in the close-code table of docs/wire-protocol.md"


def test_the_readme_links_resolve() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\(((?:docs/)?[\w./-]+\.md)\)", readme)
    assert "docs/quickstart.md" in links
    for link in links:
        assert (ROOT / link).is_file(), f"README.md links to {link}, which does not exist"


@pytest.mark.anyio
async def test_ban_users(load_example: LoadExample, caplog: pytest.LogCaptureFixture) -> None:
    """`disconnect_user` alone does not revoke the token; the deny-list refuses the reconnect and the refresh."""
    module = load_example("ban_users")
    async with PomoTestClient(module.app) as client:
        token = client.mint_token("mallory")
        async with client.connect(token=token) as mallory, client.connect("alice") as alice:
            await mallory.send_json({"type": "REFRESH_TOKEN", "data": {"token": client.mint_token("mallory")}})
            await mallory.expect("TOKEN_REFRESHED")
            await module.ban("mallory")
            await mallory.expect_close(1000, "Banned")
            await alice.ping()
        with caplog.at_level("WARNING", logger="starlette_pomo_ws"):
            async with client.connect(token=token, wait_established=False) as again:
                await again.expect_close(1008, "Invalid authentication token")
        assert "user 'mallory' is banned" in caplog.text
        assert token not in caplog.text


# -- shell lines: run as written, against a real uvicorn ----------------------------------------------------

DOCS = ROOT / "docs"


def shell_commands(text: str) -> list[list[str]]:
    """The `$ ` commands of every console/bash block of a page, one list per block (continuations joined)."""
    blocks = []
    for match in re.finditer(r"^( *)```\s*(console|bash)\s*\n(.*?)^\1```", text, re.S | re.M):
        lines = textwrap.dedent(match.group(3)).splitlines()
        commands: list[str] = []
        for line in lines:
            if match.group(2) == "console" and not line.startswith("$ "):
                if commands and commands[-1].endswith("\\"):
                    commands[-1] = commands[-1][:-1] + line.strip()
                continue
            line = line.removeprefix("$ ")
            if commands and commands[-1].endswith("\\"):
                commands[-1] = commands[-1][:-1] + line.strip()
            elif line.strip():
                commands.append(line.strip())
        blocks.append(commands)
    return blocks


def all_commands() -> list[tuple[str, str]]:
    pages = [*sorted(DOCS.glob("*.md")), ROOT / "README.md"]
    return [(p.name, c) for p in pages for block in shell_commands(p.read_text(encoding="utf-8")) for c in block]


def pip_requirements(command: str) -> list[Requirement]:
    words = shlex.split(command.split(" #", 1)[0])
    assert words[:2] == ["pip", "install"], command
    requirements, skip = [], False
    for word in words[2:]:
        if skip or word.startswith("-"):
            skip = word in ("-e", "-r", "-c")
            continue
        requirements.append(Requirement(word))
    return requirements


DEV_TOOLS = {
    Requirement(line).name
    for line in (ROOT / "requirements-dev.txt").read_text(encoding="utf-8").splitlines()
    if line.strip() and not line.startswith("#")
}


def test_every_pip_install_line_names_installable_distributions_and_a_websocket_capable_uvicorn() -> None:
    """Each `pip install` in the docs resolves to distributions installed here (the suite's venv is built from
    the same names), each extra exists, and uvicorn always comes with a WebSocket library."""
    lines = [(page, c) for page, c in all_commands() if c.startswith("pip install")]
    assert any("uvicorn" in c for _, c in lines)
    ours = importlib.metadata.metadata("starlette-pomo-ws")
    for page, command in lines:
        for requirement in pip_requirements(command):
            if requirement.name == "starlette-pomo-ws":
                assert set(requirement.extras) <= set(ours.get_all("Provides-Extra") or []), (page, command)
                continue
            try:
                importlib.metadata.version(requirement.name)  # installed: the name is real
            except importlib.metadata.PackageNotFoundError:
                # The dev tools (requirements-dev.txt: the benchmark's matplotlib, ...) are real names
                # that scripts/test-matrix's venvs do not install.
                assert requirement.name in DEV_TOOLS, f"{page}: {command!r} names {requirement.name}, not installed"
            if requirement.name == "uvicorn":
                assert "standard" in requirement.extras, f"{page}: {command!r} installs uvicorn without WebSockets"
                needs = [Requirement(r) for r in importlib.metadata.requires("uvicorn") or []]
                standard = [r.name for r in needs if r.marker is not None and r.marker.evaluate({"extra": "standard"})]
                assert "websockets" in standard
                importlib.metadata.version("websockets")


def test_every_uvicorn_line_in_the_docs_is_a_valid_uvicorn_command() -> None:
    from uvicorn.main import main as uvicorn_main

    lines = [(page, c) for page, c in all_commands() if c.startswith("uvicorn ")]
    assert len(lines) >= 5
    for page, command in lines:
        words = shlex.split(command.split(" #", 1)[0])[1:]
        with uvicorn_main.make_context("uvicorn", words) as context:
            assert context.params["app"], (page, command)
            assert context.params["ws_per_message_deflate"] is False, f"{page}: {command!r} leaves compression on"


QUICKSTART_FRAMEWORKS = ["fastapi", "starlette", "litestar"]


def tab_block(text: str, needle: str) -> list[str]:
    return next(block for block in shell_commands(text) if any(needle in command for command in block))


def bash(script: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-ec", script], env=env, cwd=cwd, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("framework", QUICKSTART_FRAMEWORKS)
def test_the_quickstart_runs_as_written(framework: str, tmp_path: Path) -> None:
    """Save the tab's app, run the tab's commands, listen in two terminals, curl: both print the task."""
    from .cli_server import free_port, user_env

    page = (DOCS / "quickstart.md").read_text(encoding="utf-8")
    module = f"{framework}_app"
    assert f'--8<-- "docs/examples/{module}.py"' in page
    shutil.copy(EXAMPLES / f"{module}.py", tmp_path / f"{module}.py")
    env = user_env()
    env.pop("POMO_WS_JWT_SECRET")
    run_block = tab_block(page, f"uvicorn {module}:app")
    port = free_port()
    server_line = ""
    for command in run_block:
        if command.startswith("pip install"):
            pip_requirements(command)  # checked by the test above: not installed again here
        elif command.startswith("export "):
            variable = command.removeprefix("export ").split("=", 1)[0]
            exported = bash(f'{command}; echo "${{{variable}}}"', env, tmp_path)
            assert exported.returncode == 0, exported.stderr
            env[variable] = exported.stdout.strip()
        elif command.startswith("uvicorn "):
            server_line = command
        else:
            raise AssertionError(f"the test does not know how to run {command!r}")
    assert len(env["POMO_WS_JWT_SECRET"]) >= 32
    args = shlex.split(server_line)
    with subprocess.Popen(
        [*args, "--port", str(port)], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as server:
        try:
            assert server.stdout is not None
            for line in server.stdout:
                assert "No supported WebSocket library" not in line
                if "Uvicorn running on" in line:
                    break
            socket_block = tab_block(page, "pomo-ws listen")
            curl_block = tab_block(page, "curl ")
            setup = [c for c in socket_block if not c.startswith(("export POMO_WS_JWT_SECRET=...", "pomo-ws listen"))]
            listen = next(c for c in socket_block if c.startswith("pomo-ws listen"))
            assert socket_block[0].startswith("export POMO_WS_JWT_SECRET=..."), "the second terminal needs the key"
            script = "\n".join([*setup, "exec " + listen]).replace(":8000", f":{port}")
            listeners = [
                subprocess.Popen(
                    ["bash", "-ec", script], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
                )
                for _ in range(2)
            ]
            try:
                for listener in listeners:
                    assert listener.stdout is not None
                    established = json.loads(readline_within(listener.stdout, 20))
                    assert (established["type"], established["userId"]) == ("CONNECTION_ESTABLISHED", "alice")
                (curl,) = curl_block
                assert curl.startswith("curl ")
                posted = bash(curl.replace(":8000", f":{port}") + " --fail-with-body -sS", env, tmp_path)
                assert posted.returncode == 0, f"{curl!r} failed: {posted.stdout} {posted.stderr}"
                for listener in listeners:
                    assert listener.stdout is not None
                    event = json.loads(readline_within(listener.stdout, 20))
                    assert event["type"] == "TASK_CREATED" and event["data"]["title"] == "Write the docs"
                    assert event["data"] == json.loads(posted.stdout)
            finally:
                for listener in listeners:
                    listener.terminate()
                    _, status = listener.communicate(timeout=10)  # and closes its pipes
                    shown = re.findall(r"^-- .*$", page.split("pomo-ws listen ws://", 1)[1].split("```", 1)[0], re.M)
                    assert shown and all(line.encode() in status for line in shown), (shown, status)
        finally:
            server.terminate()
            server.wait(timeout=15)


# -- the docs site as a reader sees it ----------------------------------------------------------------------

EMOJI = re.compile("[\u2600-\u27bf\U0001f000-\U0001faff]")


def test_the_docs_use_no_emoji_that_render_as_boxes() -> None:
    """✅/❌ and friends need an emoji font; icons come from mkdocs-material as inline SVG (`:material-check:`)."""
    for page in DOCS.glob("*.md"):
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), start=1):
            assert not EMOJI.search(line), f"docs/{page.name}:{number} has an emoji: {line.strip()!r}"


def test_the_docs_site_loads_no_web_fonts() -> None:
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    assert re.search(r"^theme:\n(?:  .*\n)*?  font: false\b", config, re.M), "mkdocs.yml must set theme.font: false"


def tab_groups(text: str) -> list[list[str]]:
    """The titles of each set of content tabs (`=== "title"` at one indent, with only its content between)."""
    groups: list[list[str]] = []
    open_indent: int | None = None
    for line in text.splitlines():
        header = re.match(r'^( *)=== "([^"]+)"', line)
        if header:
            indent = len(header.group(1))
            if open_indent == indent:
                groups[-1].append(header.group(2))
            else:
                groups.append([header.group(2)])
                open_indent = indent
        elif line.strip() and open_indent is not None and len(line) - len(line.lstrip()) <= open_indent:
            open_indent = None  # back at the tabs' level: the set ended
    return groups


def test_fastapi_is_the_first_tab_wherever_it_is_a_tab() -> None:
    assert ["FastAPI", "Starlette", "Litestar"] in tab_groups((DOCS / "quickstart.md").read_text(encoding="utf-8"))
    for page in [*DOCS.glob("*.md"), ROOT / "README.md"]:
        for titles in tab_groups(page.read_text(encoding="utf-8")):
            if "FastAPI" in titles:
                assert titles[0] == "FastAPI", f"{page.name}: tabs {titles}"


def test_the_home_page_opens_with_prose_then_the_app_not_a_docstring() -> None:
    page = (DOCS / "index.md").read_text(encoding="utf-8")
    first_include = re.search(r'--8<-- "(docs/examples/[\w.]+?)(?::(\w+))?"', page)
    assert first_include is not None
    source = (ROOT / first_include.group(1)).read_text(encoding="utf-8")
    if first_include.group(2):
        start = f"# --8<-- [start:{first_include.group(2)}]"
        assert start in source
        source = source.split(start, 1)[1]
    assert not source.lstrip().startswith(('"""', "'''")), "the home page's snippet opens with a docstring"


def test_every_benchmarks_command_in_the_docs_uses_options_that_exist() -> None:
    lines = [c for _, c in all_commands() if c.startswith("python -m benchmarks")]
    assert lines
    helps: dict[str, str] = {}
    for command in lines:
        words = shlex.split(command.split(" #", 1)[0])
        sub = words[3]
        if sub not in helps:
            command_line = [sys.executable, "-m", "benchmarks", sub, "--help"]
            shown = subprocess.run(command_line, cwd=ROOT, capture_output=True, text=True, timeout=60)
            assert shown.returncode == 0, shown.stderr
            helps[sub] = shown.stdout
        for word in words[4:]:
            if word.startswith("--"):
                assert word.split("=", 1)[0] in helps[sub], f"{command!r}: {word} is not an option"


# -- Python blocks written in the pages: each runs as a file --------------------------------------------------

PY_BLOCK = re.compile(r"^( *)```\s*(?:python|\{ *\.python *\})\s*\n(.*?)^\1```", re.S | re.M)


# The names the pages use for the reader's own values, and the page's earlier imports: a block runs in the
# context a reader has reached on that page.
PRELUDE = """\
from starlette_pomo_ws import Settings as _Settings
SECRET = "docs-secret-0123456789-0123456789-0123456789"
app_settings = _Settings(jwt_secret=SECRET)
"""
IMPORT_LINE = re.compile(r"^(?:from \S+ import [^(\n]+|import [^\n]+)$", re.M)


def python_blocks() -> list[tuple[str, int, str]]:
    found = []
    for page in [*sorted(DOCS.glob("*.md")), ROOT / "README.md"]:
        text = page.read_text(encoding="utf-8")
        imports: list[str] = []
        for match in PY_BLOCK.finditer(text):
            code = textwrap.dedent(match.group(2))
            if "--8<--" in code:  # included examples run in the tests above
                continue
            context = "\n".join(imports)
            found.append((page.name, text[: match.start()].count("\n") + 1, f"{context}\n{code}" if context else code))
            imports += [line for line in IMPORT_LINE.findall(code) if "__future__" not in line]
    return found


def is_module(code: str) -> bool:
    try:
        compile(code, "<block>", "exec", dont_inherit=True)
    except SyntaxError:
        return False
    return True


BLOCKS = python_blocks()


@pytest.mark.parametrize(("page", "line", "code"), BLOCKS, ids=[f"{p}:{n}" for p, n, _ in BLOCKS])
def test_every_python_block_in_the_docs_runs(page: str, line: int, code: str, tmp_path: Path) -> None:
    """A whole block runs as a file (as a module, not `__main__`), next to the examples it may import.

    A fragment (a line of a Do/Don't tab: `await ...` or `yield ...` out of context) cannot run alone: it must
    at least compile as the body of an async function. A block that talks to the Quickstart's server on port
    8000 runs against a real one, with a real token, until it prints the event it is meant to print.
    """
    from .cli_server import user_env

    if not is_module(code):
        body = "\n".join(line for line in code.splitlines() if not IMPORT_LINE.fullmatch(line))
        wrapped = "async def fragment():\n" + textwrap.indent(body, "    ")
        compile(wrapped, f"{page}:{line}", "exec", dont_inherit=True)
        return
    for example in EXAMPLES.glob("*.py"):
        shutil.copy(example, tmp_path / example.name)
    env = user_env()
    for secret_file in re.findall(r'"/run/secrets/([\w.-]+)"', code):  # a key file the reader has
        (tmp_path / "run" / "secrets").mkdir(parents=True, exist_ok=True)
        (tmp_path / "run" / "secrets" / secret_file).write_text(SECRET + "\n", encoding="utf-8")
    code = PRELUDE + code.replace('"/run/secrets/', f'"{tmp_path}/run/secrets/')
    snippet = tmp_path / "snippet.py"
    runner = [sys.executable, "-c", "import runpy, sys; runpy.run_path(sys.argv[1], run_name='snippet')", "snippet.py"]
    if "127.0.0.1:8000" not in code or "asyncio.run(" not in code:
        snippet.write_text(code, encoding="utf-8")
        ran = subprocess.run(runner, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        missing = re.search(r"ModuleNotFoundError: No module named '([\w.]+)'", ran.stderr)
        if missing and f"pip install {missing.group(1).replace('_', '-')}" in code:
            pytest.skip(f"{page}:{line} needs {missing.group(1)}, which the block says to install")
        assert ran.returncode == 0, f"docs/{page}:{line} failed:\n{ran.stderr}"
        return
    # A client that runs for ever: against the Quickstart's Starlette app, until it shows a task.
    from .cli_server import uvicorn_cli

    with uvicorn_cli(tmp_path, ["starlette_app:app", "--ws-per-message-deflate", "false"], env=env) as server:
        live = code.replace("127.0.0.1:8000", f"127.0.0.1:{server.port}").replace('token="..."', "token=TOKEN")
        assert "token=TOKEN" in live, f"docs/{page}:{line}: the client's token is not a placeholder the test fills"
        snippet.write_text(f"TOKEN = {make_token('alice')!r}\n" + live, encoding="utf-8")
        with subprocess.Popen(runner, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as client:
            try:
                deadline = time.monotonic() + 20
                while "connection open" not in server.output:  # uvicorn's line for an accepted socket
                    assert client.poll() is None, client.communicate()[1].decode()
                    assert time.monotonic() < deadline, "the client did not connect"
                    time.sleep(0.02)
                import httpx

                task = {"title": "from the docs"}
                url = f"http://127.0.0.1:{server.port}/tasks"
                httpx.post(url, json=task, headers={"x-user-id": "alice"}).raise_for_status()
                assert client.stdout is not None
                printed = client.stdout.readline().decode()
                assert printed.startswith("event TASK_CREATED") and "from the docs" in printed, printed
            finally:
                client.terminate()
                client.communicate(timeout=10)


@pytest.mark.anyio
async def test_daphne_app(load_example: LoadExample) -> None:
    """Served as daphne serves it (no lifespan events), `pomo.wrap(app)` starts the lifespan on first use."""
    import httpx

    module = load_example("daphne_app")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=module.app), base_url="http://test") as bare:
        assert "error" in (await bare.get("/ws/health")).json()  # the bare app: nothing started it
    transport = httpx.ASGITransport(app=module.application)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        body = (await client.get("/ws/health")).json()
    assert body["status"] == "ok" and "error" not in body
    assert module.pomo.broadcaster.running


# -- the other shell lines ----------------------------------------------------------------------------------

KNOWN_VARIABLES = {f"POMO_WS_{f.name.upper()}" for f in dataclasses.fields(Settings)} | {
    "POMO_WS_JWT_SECRET_FILE",
    "POMO_WS_TOKEN",
}
# The Deployment page's server commands are the server matrix's own (tests/e2e/test_servers.py checks them).
CHECKED_ELSEWHERE = ("pip install", "uvicorn ", "python -m benchmarks", "curl ", "hypercorn ", "granian ", "daphne ")


def test_every_shell_line_in_the_docs_is_checked(tmp_path: Path) -> None:
    """`export`s name real variables and evaluate; `pomo-ws` lines parse; scripts exist; the rest run.

    `pip`, `uvicorn`, `python -m benchmarks` and the Quickstart's `curl` have their own tests above.
    """
    from starlette_pomo_ws.cli import build_parser

    from .cli_server import user_env

    env = user_env()
    token = make_token("alice")
    for page, command in all_commands():
        where = f"{page}: {command!r}"
        if command.startswith(CHECKED_ELSEWHERE):
            continue
        if command.startswith("export "):
            name = command.removeprefix("export ").split("=", 1)[0]
            assert name in KNOWN_VARIABLES, f"{where}: {name} is not a variable the package reads"
            assert bash(command, env, tmp_path).returncode == 0, where
        elif command.startswith(("python -c ", "TOKEN=$(")):
            ran = bash(command, env, tmp_path)
            assert ran.returncode == 0, f"{where}: {ran.stderr}"
        elif command.startswith("pomo-ws "):
            line = command.split(" |", 1)[0].split(" #", 1)[0]
            line = line.replace('"$(pomo-ws token alice)"', token).replace('"$TOKEN"', token)
            try:
                build_parser().parse_args(shlex.split(line)[1:])
            except SystemExit as exc:  # argparse's way to refuse
                raise AssertionError(f"{where} does not parse") from exc
        elif command.startswith("scripts/"):
            script = ROOT / command.split()[0]
            assert script.is_file() and os.access(script, os.X_OK), where
        else:
            raise AssertionError(f"{where}: no test knows how to check this line")


def readline_within(pipe: Any, seconds: float) -> bytes:
    """One line from a child's pipe, or an AssertionError after `seconds`."""
    import selectors

    line = b""
    deadline = time.monotonic() + seconds
    with selectors.DefaultSelector() as selector:
        selector.register(pipe, selectors.EVENT_READ)
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            assert left > 0 and selector.select(left), f"no line within {seconds} s (got {line!r})"
            chunk = os.read(pipe.fileno(), 1)
            assert chunk, f"the pipe closed (got {line!r})"
            line += chunk
    return line


def test_the_demo_page_shell_lines_run_against_pomo_ws_demo(tmp_path: Path) -> None:
    """`pomo-ws demo`, then the Demo page's `export POMO_WS_TOKEN=...` and `pomo-ws listen ... | jq`."""
    from .cli_server import free_port, user_env

    page = (DOCS / "demo.md").read_text(encoding="utf-8")
    (start,) = [c for c in tab_block(page, "pomo-ws demo") if c.startswith("pomo-ws demo")]
    listen_block = tab_block(page, "pomo-ws listen ws://127.0.0.1:8000/ws |")
    port = free_port()
    env = user_env()
    demo = subprocess.Popen(
        [*shlex.split(start.split(" #", 1)[0]), "--port", str(port), "--db", str(tmp_path / "demo.sqlite3")],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert demo.stdout is not None
        while b"Application startup complete" not in readline_within(demo.stdout, 30):
            pass
        # On a terminal jq writes each line at once; into a pipe it would wait for its end.
        script = "\n".join(listen_block).replace(":8000", f":{port}").replace("| jq ", "| jq --unbuffered ")
        listener = subprocess.Popen(
            ["bash", "-ec", script], cwd=tmp_path, env=env, stdout=subprocess.PIPE, start_new_session=True
        )
        try:
            assert listener.stdout is not None
            first = json.loads(readline_within(listener.stdout, 20))
            assert first["type"] == "CONNECTION_ESTABLISHED" and set(first) == {"type", "data"}, first
        finally:
            os.killpg(listener.pid, signal.SIGTERM)  # bash, pomo-ws and jq: the group this test started
            listener.communicate(timeout=10)
    finally:
        demo.terminate()
        demo.communicate(timeout=15)
