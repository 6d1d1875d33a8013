"""The `pomo-ws` command: mint a dev token, run the demo, listen to a stream.

```
pomo-ws token alice --ttl 600 [--secret=KEY | --secret-file PATH] [--channel 'team:*' ...]
pomo-ws demo --port 8000 [--redis redis://localhost:6379/0]
pomo-ws listen ws://127.0.0.1:8000/ws --token "$TOKEN" [--channel team:42 ...]
```

Exit codes: 0 on success, 1 when something fails at run time (a taken port, a refused
connection), 2 for a usage or configuration error (a missing secret), 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import os
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any

from ._settings import Settings
from .exceptions import ConfigurationError

__all__ = ["main"]

PROG = "pomo-ws"
_NO_SECRET = (
    "no JWT secret is configured. Set POMO_WS_JWT_SECRET (or JWT_SECRET) to the key your server signs tokens "
    "with, or pass --secret. `pomo-ws demo` generates one and prints it."
)


class CLIError(Exception):
    """A failure to report as `pomo-ws: error: ...` with an exit code."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than zero")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0-65535)")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="starlette-pomo-ws: authenticated WebSocket fan-out. Mint dev tokens, run the demo, listen.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    token = commands.add_parser(
        "token",
        help="mint a development token for a user",
        description="Mint an HS256 token for USER with the configured secret (POMO_WS_JWT_SECRET or JWT_SECRET). "
        "Prints the token alone, so that TOKEN=$(pomo-ws token alice) works.",
    )
    token.add_argument("user", metavar="USER", help="the user id to put in the token")
    token.add_argument("--ttl", type=_positive, default=3600, metavar="S", help="lifetime in seconds (default 3600)")
    token.add_argument(
        "--secret",
        help="the HMAC secret (default: POMO_WS_JWT_SECRET, JWT_SECRET or POMO_WS_JWT_SECRET_FILE); a secret that "
        "starts with '-' works too, best written --secret=-KEY",
    )
    token.add_argument("--secret-file", metavar="PATH", help="read the HMAC secret from this file")
    token.add_argument(
        "--channel",
        action="append",
        default=[],
        metavar="PATTERN",
        help="put this channel, or prefix pattern ending in '*' (e.g. 'team:42:*'), in the token's channels claim "
        "(repeatable); servers without authorize_channel let the token subscribe to these",
    )

    demo = commands.add_parser(
        "demo",
        help="run the Pomofocus demo app",
        description="Run the demo (tasks, a synced timer, /websocket-test) with uvicorn. Its login issues a token "
        "for any name, so it signs with a secret generated for this run (never JWT_SECRET), answers loopback Host "
        "names only and binds loopback only, unless the flags below say otherwise.",
    )
    demo.add_argument("--host", default="127.0.0.1", help="the interface to bind (default 127.0.0.1)")
    demo.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow a --host that is not loopback (anyone who reaches it can log in as anyone)",
    )
    demo.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="also answer this Host name (repeatable; '*' answers any; default 127.0.0.1, localhost, ::1)",
    )
    demo.add_argument(
        "--use-env-secret",
        action="store_true",
        help="sign with POMO_WS_JWT_SECRET (or POMO_WS_JWT_SECRET_FILE) instead of a generated secret",
    )
    demo.add_argument("--port", type=_port, default=8000, help="the port to bind (default 8000)")
    demo.add_argument("--redis", metavar="URL", help="use Redis, e.g. redis://localhost:6379/0 (default: memory)")
    demo.add_argument("--db", default=None, metavar="PATH", help="the SQLite file (default ./pomo-demo.sqlite3)")
    demo.add_argument(
        "--user", default="demo", help="the user of the printed token (default demo; NAME@TEAM is a member of TEAM)"
    )
    demo.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"], help="uvicorn's"
    )

    listen = commands.add_parser(
        "listen",
        help="print the events of a stream as they arrive",
        description="Connect, print every event as one JSON line, and reconnect with resume (last_event_id) "
        "when the connection drops. Status lines go to stderr.",
    )
    listen.add_argument("url", metavar="URL", help="the WebSocket URL, e.g. ws://127.0.0.1:8000/ws")
    listen.add_argument("--token", help="the token (default: $POMO_WS_TOKEN)")
    listen.add_argument("--last-event-id", metavar="ID", help="resume after this event id")
    listen.add_argument(
        "--channel",
        action="append",
        default=[],
        metavar="NAME",
        help="subscribe to this channel too, e.g. team:42 (repeatable); reconnects resume it with the one cursor",
    )
    listen.add_argument("--count", type=int, metavar="N", help="exit after printing N events")
    listen.add_argument(
        "--max-retries", type=int, default=None, metavar="N", help="give up after N failed attempts in a row"
    )
    listen.add_argument("--quiet", action="store_true", help="no status lines on stderr")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(_join_secret(list(sys.argv[1:] if argv is None else argv)))
    try:
        if args.command == "token":
            return _token(args)
        if args.command == "demo":
            return _demo(args)
        return _listen(args)
    except CLIError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.code
    except ConfigurationError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _join_secret(argv: list[str]) -> list[str]:
    """Turn `--secret VALUE` into `--secret=VALUE`, so that a secret starting with '-' is not taken for an option.

    `secrets.token_urlsafe()` starts with '-' about once in 64 secrets.
    """
    joined: list[str] = []
    index = 0
    while index < len(argv):
        if argv[index] == "--secret" and index + 1 < len(argv):
            joined.append(f"--secret={argv[index + 1]}")
            index += 2
            continue
        if argv[index] == "--":
            joined += argv[index:]
            break
        joined.append(argv[index])
        index += 1
    return joined


def _settings() -> Settings:
    try:
        return Settings.from_env()
    except ConfigurationError as exc:
        raise CLIError(str(exc), 2) from exc


# -- token ------------------------------------------------------------------------------------------


def _token(args: argparse.Namespace) -> int:
    from .testing import mint_token

    settings = _settings()
    if args.secret is not None and args.secret_file is not None:
        raise CLIError("pass --secret or --secret-file, not both.", 2)
    if args.secret is not None:
        settings = settings.replace(jwt_secret=args.secret)
    elif args.secret_file is not None:
        try:
            with open(args.secret_file, encoding="utf-8") as fh:
                settings = settings.replace(jwt_secret=fh.read().strip())
        except OSError as exc:
            raise CLIError(f"cannot read --secret-file {args.secret_file!r}: {exc.strerror}", 2) from exc
    if not settings.jwt_secret:
        raise CLIError(_NO_SECRET, 2)
    if "-----BEGIN" in settings.jwt_secret or not settings.jwt_algorithms[0].startswith("HS"):
        raise CLIError(
            "minting a token needs an HMAC secret (HS256/HS384/HS512); the configured algorithms are "
            f"{', '.join(settings.jwt_algorithms)}. Sign RS256/ES256/EdDSA tokens with your private key.",
            2,
        )
    try:
        settings.check(custom_authenticate=False)
    except ConfigurationError as exc:
        raise CLIError(f"the server would refuse this secret, so no token was minted: {exc}", 2) from exc
    for pattern in args.channel:
        _check_pattern(pattern)
    now = int(time.time())
    claims: dict[str, Any] = {"channels": args.channel} if args.channel else {}
    token = mint_token(settings, args.user, ttl=args.ttl, iat=now, **claims)
    print(token)
    return 0


def _check_pattern(pattern: str) -> None:
    from .client import _check_channel

    prefix = pattern.removesuffix("*")
    if not prefix and pattern:
        return  # "*": every channel
    try:
        _check_channel(prefix)
    except ValueError as exc:
        raise CLIError(f"--channel: {exc}", 2) from None


# -- demo -------------------------------------------------------------------------------------------


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind the listening socket ourselves, so that a taken port is a clear error, not a traceback."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise CLIError(f"cannot resolve --host {host!r}: {exc.strerror}") from exc
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise CLIError(
                f"port {port} on {host} is already in use. Stop the other server or pass another --port "
                f"(for example --port {port + 1 if port < 65535 else 8000})."
            ) from exc
        if exc.errno == errno.EACCES:
            raise CLIError(f"no permission to bind port {port} on {host}; use a port above 1023.") from exc
        raise CLIError(f"cannot bind {host}:{port}: {exc.strerror}") from exc
    sock.set_inheritable(True)
    return sock


def display_host(host: str) -> str:
    """The host to put in a URL: a wildcard address becomes loopback, an IPv6 address gets brackets."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _demo(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError as exc:  # pragma: no cover - uvicorn is in the demo and test extras
        raise CLIError("the demo needs uvicorn: pip install 'starlette-pomo-ws[demo]'") from exc
    from .demo.app import DEFAULT_DB_PATH, create_app
    from .demo.tokens import LOOPBACK_HOSTS, demo_settings, demo_token, is_loopback

    if not is_loopback(args.host) and not args.allow_remote:
        raise CLIError(
            f"refusing to bind --host {args.host}: the demo's login issues a token for any name to anyone who can "
            "reach it. Pass --allow-remote to do it anyway, on a network you trust.",
            2,
        )
    try:
        settings, generated = demo_settings(use_env_secret=args.use_env_secret)
    except ConfigurationError as exc:
        raise CLIError(str(exc), 2) from exc
    if args.use_env_secret and generated:
        raise CLIError("--use-env-secret: POMO_WS_JWT_SECRET (or POMO_WS_JWT_SECRET_FILE) is not set.", 2)
    if args.redis:
        settings = settings.replace(backend_url=args.redis)
    settings.check(custom_authenticate=False)
    allowed_hosts = [*LOOPBACK_HOSTS, *args.allowed_host]
    if not is_loopback(args.host) and args.host not in ("0.0.0.0", "::", ""):
        allowed_hosts.append(args.host)
    sock = bind_socket(args.host, args.port)
    port = sock.getsockname()[1]
    shown = display_host(args.host)
    base = f"http://{shown}:{port}"
    token = demo_token(settings, args.user, ttl=24 * 3600, iat=int(time.time()))
    app = create_app(settings, db_path=args.db or DEFAULT_DB_PATH, allowed_hosts=allowed_hosts)

    lines = [""]
    if generated:
        lines += [
            "The demo signs its tokens with a development secret generated for this run:",
            f"  export POMO_WS_JWT_SECRET={settings.jwt_secret}",
            "Tokens signed with it stop working when the demo stops, unless you export it and pass --use-env-secret.",
            "",
        ]
    lines += [
        "Warning: the demo's login issues a token for any name to anyone who can reach it. Never expose it.",
        f"It answers Host {', '.join(allowed_hosts)}.",
        "",
    ]
    lines += [
        f"Pomofocus demo:      {base}/",
        f"WebSocket test page: {base}/websocket-test",
        f"Backend:             {'redis' if args.redis else 'memory'}   Database: {args.db or DEFAULT_DB_PATH}",
        "",
        f"A token for user {args.user!r} (valid 24 h):",
        f"  {token}",
        "",
        "Try it from a terminal:",
        f'  wscat -c "ws://{shown}:{port}/ws?token={token}"',
        f"  {PROG} listen ws://{shown}:{port}/ws --token {token}",
        "Or in a browser console on the demo page:",
        f'  const ws = new WebSocket("ws://{shown}:{port}/ws", ["bearer", "{token}"]);',
        "  ws.onmessage = (e) => console.log(JSON.parse(e.data));",
        "",
    ]
    print("\n".join(lines), flush=True)
    config = uvicorn.Config(
        app,
        log_level=args.log_level,
        ws_per_message_deflate=False,  # permessage-deflate costs ~23 us per delivery and 38 KiB per socket
        lifespan="on",
    )
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 0


# -- listen -----------------------------------------------------------------------------------------


def print_status(state: str, detail: dict[str, Any]) -> None:
    """Print a status change of `listen` on stderr, e.g. `-- reconnecting (closed 1012), retrying in 0.4 s`."""
    extra = ""
    if detail.get("code") is not None:
        extra = f" (closed {detail['code']} {detail.get('reason') or ''}".rstrip() + ")"
    if detail.get("delay") is not None:
        extra += f", retrying in {detail['delay']:.1f} s"
    print(f"-- {state}{extra}", file=sys.stderr, flush=True)


def _listen(args: argparse.Namespace) -> int:
    token = args.token or os.environ.get("POMO_WS_TOKEN")
    if not token:
        raise CLIError("pass --token (or set POMO_WS_TOKEN); `pomo-ws token USER` mints one.", 2)
    if args.count is not None and args.count < 1:
        raise CLIError("--count must be 1 or more.", 2)
    for channel in args.channel:
        if channel.endswith("*"):
            raise CLIError(f"--channel {channel!r}: listen subscribes to channel names, not patterns.", 2)
        _check_pattern(channel)
    return asyncio.run(_listen_async(args, token))


async def _listen_async(args: argparse.Namespace, token: str) -> int:
    from .client import ConnectionRefused, PomoClient

    client = PomoClient(
        args.url,
        token=token,
        last_event_id=args.last_event_id,
        max_retries=args.max_retries,
        on_status=None if args.quiet else print_status,
        channels=args.channel,
    )
    printed = 0
    try:
        async for event in client:
            print(json.dumps(event, ensure_ascii=False), flush=True)
            printed += 1
            if args.count is not None and printed >= args.count:
                await client.close()
                break
    except ConnectionRefused as exc:
        raise CLIError(str(exc)) from exc
    if not args.quiet and client.last_event_id:
        channels = "".join(f" --channel {channel}" for channel in client.channels)
        print(f"-- resume with --last-event-id {client.last_event_id}{channels}", file=sys.stderr, flush=True)
    return 0
