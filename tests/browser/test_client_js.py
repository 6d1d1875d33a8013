"""`pomo-ws.js` in Chromium against a scripted fake WebSocket: what it does for each close code and message."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

from starlette_pomo_ws import Settings

from .conftest import SECRET, LiveServer

if TYPE_CHECKING:
    from playwright.sync_api import Browser

pytest.importorskip("playwright.sync_api")

from playwright.sync_api import BrowserContext, Page

pytestmark = pytest.mark.browser

# A fake WebSocket the test drives by hand, and a bounded `until`. Every scenario returns a plain object.
HARNESS = """
window.harness = async () => {
  const module = await import("/ws/client.js");
  class Fake {
    constructor(url, protocols) {
      this.url = url; this.protocols = protocols; this.readyState = 0; this.sent = []; this.closedWith = null;
      Fake.all.push(this);
    }
    send(data) { this.sent.push(JSON.parse(data)); }
    close(code, reason) { this.readyState = 3; this.closedWith = { code, reason }; }
    accept(id = "c0") {
      this.readyState = 1;
      this.deliver({ type: "CONNECTION_ESTABLISHED", userId: "u", data: {}, timestamp: "t", id });
    }
    deliver(event) { this.onmessage && this.onmessage({ data: JSON.stringify(event) }); }
    serverClose(code, reason = "") { this.readyState = 3; this.onclose && this.onclose({ code, reason }); }
  }
  Fake.all = [];
  const until = async (predicate, what, ms = 3000) => {
    const deadline = Date.now() + ms;
    while (!predicate()) {
      if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
      await new Promise((resolve) => setTimeout(resolve, 2));
    }
  };
  const make = (options = {}) => {
    Fake.all = [];
    const tokens = [];
    const socket = new module.PomoSocket("/ws", {
      WebSocket: Fake, minDelay: 5, maxDelay: 20, pingInterval: 0, random: () => 1,
      getToken: async ({ refresh, reason }) => { tokens.push({ refresh, reason }); return `tok${tokens.length}`; },
      ...options,
    });
    const statuses = [];
    const seen = [];
    socket.on("status", (s) => statuses.push(s));
    socket.on("message", (e) => seen.push(e.type + (e.id ? ":" + e.id : "")));
    return { socket, tokens, statuses, seen, fakes: Fake.all };
  };
  return { module, Fake, until, make };
};
"""


def run(page: Page, body: str) -> Any:
    """Run an async scenario with `h` (the harness) in scope; returns what it returns."""
    return page.evaluate(f"async () => {{ const h = await window.harness(); {body} }}")


@pytest.fixture(scope="module")
def harness_page(browser: Browser, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Page]:
    """One server and one page for the whole module: the scenarios share nothing but the module."""
    server = LiveServer(tmp_path_factory.mktemp("js") / "demo.sqlite3", Settings(jwt_secret=SECRET))
    server.start()
    context: BrowserContext = browser.new_context()
    context.set_default_timeout(10_000)
    try:
        page = context.new_page()
        page.goto(server.url + "/websocket-test")  # any page of the origin that serves /ws/client.js
        page.evaluate(HARNESS)
        yield page
    finally:
        context.close()
        server.stop()


@pytest.fixture
def page(harness_page: Page) -> Page:
    return harness_page


def test_token_goes_in_the_subprotocol_and_events_are_deduplicated_and_resumed(page: Page) -> None:
    result = run(
        page,
        """
        const t = h.make();
        t.socket.connect();
        await h.until(() => t.fakes.length === 1, "a socket");
        const first = t.fakes[0];
        first.accept("c0");
        first.deliver({ type: "TASK_CREATED", data: {}, id: "e1" });
        first.deliver({ type: "TASK_CREATED", data: {}, id: "e1" });
        first.deliver({ type: "HEARTBEAT", data: null });
        first.serverClose(1012, "Service Restart");
        await h.until(() => t.fakes.length === 2, "a reconnect");
        const second = t.fakes[1];
        second.accept("e1");
        second.deliver({ type: "TASK_CREATED", data: {}, id: "e1" });
        second.deliver({ type: "TASK_CREATED", data: {}, id: "e2" });
        second.serverClose(1000, "Disconnected by the server");
        return { urls: t.fakes.map((f) => f.url), protocols: first.protocols, seen: t.seen,
                 statuses: t.statuses, cursor: t.socket.lastEventId, tokens: t.tokens, count: t.fakes.length };
        """,
    )
    assert result["protocols"] == ["bearer", "tok1"]
    assert "token" not in result["urls"][0]
    assert "last_event_id" not in result["urls"][0]
    assert result["urls"][1].endswith("/ws?last_event_id=e1")
    assert result["seen"] == [
        "CONNECTION_ESTABLISHED:c0",
        "TASK_CREATED:e1",
        "HEARTBEAT",
        "CONNECTION_ESTABLISHED:e1",
        "TASK_CREATED:e2",
    ]
    assert result["statuses"] == ["connecting", "open", "reconnecting", "open", "closed"]
    assert result["cursor"] == "e2"
    assert result["tokens"] == [{"refresh": False, "reason": None}]  # reused across a non-auth reconnect
    assert result["count"] == 2


@pytest.mark.parametrize("code", [1001, 1006, 1011, 1012, 1013, 4321])
def test_reconnects_with_backoff_on(page: Page, code: int) -> None:
    result = run(
        page,
        f"""
        const t = h.make();
        const closes = [];
        t.socket.on("close", (c) => closes.push(c));
        t.socket.connect();
        await h.until(() => t.fakes.length === 1, "a socket");
        t.fakes[0].accept();
        t.fakes[0].serverClose({code}, "x");
        await h.until(() => t.fakes.length === 2, "a reconnect");
        t.socket.close();
        return {{ closes, status: t.socket.status }};
        """,
    )
    assert result["closes"] == [{"code": code, "reason": "x", "willReconnect": True, "delay": 5}]
    assert result["status"] == "closed"


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (1000, "Disconnected by the server"),
        (1008, "Origin not allowed"),
        (1008, "Too many connections for this user"),
        (1009, "Message too big"),
        (4000, ""),  # daphne's 1000
        (4009, ""),  # daphne's 1009
    ],
)
def test_stops_on(page: Page, code: int, reason: str) -> None:
    result = run(
        page,
        f"""
        const t = h.make();
        t.socket.connect();
        await h.until(() => t.fakes.length === 1, "a socket");
        t.fakes[0].accept();
        t.fakes[0].serverClose({code}, {reason!r});
        await new Promise((resolve) => setTimeout(resolve, 60));
        return {{ count: t.fakes.length, statuses: t.statuses, last: t.socket.lastClose }};
        """,
    )
    assert result == {
        "count": 1,
        "statuses": ["connecting", "open", "closed"],
        "last": {"code": code, "reason": reason},
    }


@pytest.mark.parametrize(
    "reason",
    [
        "No authentication token provided",
        "Invalid authentication token",
        "Authentication token expired",
        "Token is for another user",
    ],
)
def test_auth_close_fetches_a_fresh_token_then_gives_up_after_max_failures(page: Page, reason: str) -> None:
    result = run(
        page,
        f"""
        const t = h.make({{ maxAuthFailures: 2 }});
        t.socket.connect();
        for (let i = 1; i <= 3; i++) {{
          await h.until(() => t.fakes.length === i, "attempt " + i);
          t.fakes[i - 1].serverClose(1008, {reason!r});  // refused before CONNECTION_ESTABLISHED
        }}
        await new Promise((resolve) => setTimeout(resolve, 60));
        return {{ tokens: t.tokens, protocols: t.fakes.map((f) => f.protocols[1]), status: t.socket.status }};
        """,
    )
    assert result["tokens"] == [
        {"refresh": False, "reason": None},
        {"refresh": True, "reason": reason},
        {"refresh": True, "reason": reason},
    ]
    assert result["protocols"] == ["tok1", "tok2", "tok3"]
    assert result["status"] == "closed"


def test_too_many_messages_waits_the_long_backoff(page: Page) -> None:
    result = run(
        page,
        """
        const t = h.make({ throttledDelay: 150 });
        t.socket.connect();
        await h.until(() => t.fakes.length === 1, "a socket");
        t.fakes[0].accept();
        const closedAt = Date.now();
        t.fakes[0].serverClose(1008, "Too many messages");
        await h.until(() => t.fakes.length === 2, "a reconnect");
        const waited = Date.now() - closedAt;
        t.socket.close();
        return { waited, refreshed: t.tokens.length };
        """,
    )
    assert result["waited"] >= 140
    assert result["refreshed"] == 1


def test_full_jitter_backoff_grows_and_is_capped(page: Page) -> None:
    result = run(
        page,
        """
        const t = h.make({ minDelay: 2, maxDelay: 16 });
        const delays = [];
        t.socket.on("close", (c) => delays.push(c.delay));
        t.socket.connect();
        for (let i = 1; i <= 6; i++) {
          await h.until(() => t.fakes.length === i, "attempt " + i);
          t.fakes[i - 1].serverClose(1006, "");
        }
        t.socket.close();
        const jitter = h.make({ minDelay: 1000, maxDelay: 30000, random: () => 0.25 });
        let jittered = null;
        jitter.socket.on("close", (c) => { jittered = c.delay; });
        jitter.socket.connect();
        await h.until(() => jitter.fakes.length === 1, "a socket");
        jitter.fakes[0].serverClose(1006, "");
        const status = jitter.socket.status;
        jitter.socket.close();
        return { delays, status, jittered };
        """,
    )
    assert result["delays"] == [2, 4, 8, 16, 16, 16]
    assert result["status"] == "reconnecting"
    assert result["jittered"] == 250  # a uniform draw below the ceiling (1000 ms), not the ceiling


def test_token_expiring_is_answered_in_band(page: Page) -> None:
    result = run(
        page,
        """
        const t = h.make();
        t.socket.connect();
        await h.until(() => t.fakes.length === 1, "a socket");
        t.fakes[0].accept();
        t.fakes[0].deliver({ type: "TOKEN_EXPIRING", data: { expiresAt: "soon" } });
        await h.until(() => t.fakes[0].sent.length === 1, "REFRESH_TOKEN");
        t.fakes[0].deliver({ type: "TOKEN_REFRESHED", data: {} });
        t.socket.close();
        return { sent: t.fakes[0].sent, tokens: t.tokens, seen: t.seen };
        """,
    )
    assert result["sent"] == [{"type": "REFRESH_TOKEN", "data": {"token": "tok2"}}]
    assert result["tokens"][1] == {"refresh": True, "reason": "TOKEN_EXPIRING"}
    assert result["seen"][-2:] == ["TOKEN_EXPIRING", "TOKEN_REFRESHED"]


def test_half_open_connection_is_detected_and_replaced(page: Page) -> None:
    result = run(
        page,
        """
        const t = h.make({ pingInterval: 40, pongTimeout: 40 });
        t.socket.connect();
        await h.until(() => t.fakes.length === 1, "a socket");
        const first = t.fakes[0];
        first.accept("c0");
        await h.until(() => first.sent.length === 1, "a PING");
        first.deliver({ type: "PONG", data: null });  // alive: no replacement
        await h.until(() => first.sent.length === 2, "a second PING");
        // Now the network silently dies: no answer.
        await h.until(() => t.fakes.length === 2, "a replacement");
        const second = t.fakes[1];
        t.socket.close();
        return { sent: first.sent, closedWith: first.closedWith, url: second.url };
        """,
    )
    assert result["sent"] == [{"type": "PING"}, {"type": "PING"}]
    assert result["closedWith"] == {"code": 4000, "reason": "No response to PING"}
    assert result["url"].endswith("last_event_id=c0")


def test_resync_is_emitted_and_moves_the_cursor(page: Page) -> None:
    result = run(
        page,
        """
        const t = h.make({ lastEventId: "old" });
        const resyncs = [];
        t.socket.on("resync", (e) => resyncs.push(e.id));
        t.socket.connect();
        await h.until(() => t.fakes.length === 1, "a socket");
        t.fakes[0].accept("old");
        t.fakes[0].deliver({ type: "RESYNC_REQUIRED", data: {}, id: "new" });
        const cursor = t.socket.lastEventId;
        t.socket.close();
        return { url: t.fakes[0].url, resyncs, cursor };
        """,
    )
    assert result == {"url": result["url"], "resyncs": ["new"], "cursor": "new"}
    assert result["url"].endswith("last_event_id=old")


def test_listener_errors_and_token_provider_failures_do_not_break_the_socket(page: Page) -> None:
    result = run(
        page,
        """
        let calls = 0;
        const errors = [];
        window.addEventListener("error", (e) => { e.preventDefault(); });
        const getToken = async () => {
          calls += 1;
          if (calls === 1) throw new Error("offline");
          return "tok";
        };
        const t = h.make({ getToken });
        t.socket.on("error", (e) => errors.push(e.message || e.type));
        t.socket.on("TASK_CREATED", () => { throw new Error("listener bug"); });
        t.socket.connect();
        await h.until(() => t.fakes.length === 1, "a socket after the provider failed");
        t.fakes[0].accept();
        t.fakes[0].deliver({ type: "TASK_CREATED", data: {}, id: "e1" });
        t.fakes[0].deliver({ type: "ERROR", data: { code: "bad_json" } });
        t.fakes[0].deliver({ type: "TASK_CREATED", data: {}, id: "e2" });
        await new Promise((resolve) => setTimeout(resolve, 20));
        t.socket.close();
        return { errors, seen: t.seen, ping: t.socket.ping(), send: t.socket.send("X") };
        """,
    )
    assert result["errors"] == ["offline", "ERROR"]
    assert result["seen"][-3:] == ["TASK_CREATED:e1", "ERROR", "TASK_CREATED:e2"]
    assert result["ping"] is False
    assert result["send"] is False


def test_going_back_online_skips_the_backoff_and_connect_after_close_starts_fresh(page: Page) -> None:
    result = run(
        page,
        """
        const t = h.make({ minDelay: 60000, maxDelay: 60000 });
        t.socket.connect();
        await h.until(() => t.fakes.length === 1, "a socket");
        t.fakes[0].accept();
        t.fakes[0].serverClose(1006, "");
        window.dispatchEvent(new Event("online"));
        await h.until(() => t.fakes.length === 2, "an immediate reconnect");
        t.socket.close();
        window.dispatchEvent(new Event("online"));  // closed: ignored
        await new Promise((resolve) => setTimeout(resolve, 20));
        const afterClose = t.fakes.length;
        t.socket.connect();
        await h.until(() => t.fakes.length === 3, "a fresh connection");
        t.socket.close();
        return { afterClose, statuses: t.statuses };
        """,
    )
    assert result["afterClose"] == 2
    assert result["statuses"] == ["connecting", "open", "reconnecting", "closed", "connecting", "closed"]


def channels_of(url: str) -> str | None:
    from urllib.parse import parse_qs, urlsplit

    values = parse_qs(urlsplit(url).query).get("channels")
    return values[0] if values else None


def cursor_of(url: str) -> str | None:
    from urllib.parse import parse_qs, urlsplit

    values = parse_qs(urlsplit(url).query).get("last_event_id")
    return values[0] if values else None


def test_channels_resume_with_the_one_cursor_and_each_missed_event_arrives_once(page: Page) -> None:
    result = run(
        page,
        """
        const t = h.make();
        t.socket.subscribe("team:42").subscribe("board:7");
        t.socket.connect();
        await h.until(() => t.fakes.length === 1, "a socket");
        const first = t.fakes[0];
        first.accept("c0");
        const sentBeforeSubscribed = first.sent.length;
        first.deliver({ type: "SUBSCRIBED", userId: "u", data: { channel: "team:42", presence: true }, id: "s9" });
        first.deliver({ type: "TIMER", userId: null, data: { endsAt: 1 }, channel: "team:42", retained: true });
        first.deliver({ type: "SUBSCRIBED", userId: "u", data: { channel: "board:7", presence: false }, id: "s9" });
        const afterSubscribed = t.socket.lastEventId;
        first.deliver({ type: "CARD", userId: null, data: { n: 1 }, channel: "board:7", id: "e1" });
        first.deliver({ type: "TASK_CREATED", userId: "u", data: { channel: "not a channel" }, id: "e2" });
        first.serverClose(1006, "");
        await h.until(() => t.fakes.length === 2, "a reconnect");
        t.fakes[1].serverClose(1006, "");  // offline: the attempt fails before CONNECTION_ESTABLISHED
        await h.until(() => t.fakes.length === 3, "another attempt");
        const second = t.fakes[2];
        second.accept("e2");
        second.deliver({ type: "SUBSCRIBED", userId: "u", data: { channel: "team:42", presence: true }, id: "s10" });
        second.deliver({ type: "SUBSCRIBED", userId: "u", data: { channel: "board:7", presence: false }, id: "s10" });
        second.deliver({ type: "CARD", userId: null, data: { n: 1 }, channel: "board:7", id: "e1" });  // overlap
        second.deliver({ type: "CARD", userId: null, data: { n: 2 }, channel: "board:7", id: "e3" });
        second.deliver({ type: "TIMER", userId: null, data: { endsAt: 2 }, channel: "team:42", id: "e4" });
        const cursor = t.socket.lastEventId;
        t.socket.close();
        return { urls: t.fakes.map((f) => f.url), sentBeforeSubscribed, afterSubscribed, cursor,
                 seen: t.seen, channels: t.socket.channels };
        """,
    )
    first_url, failed_url, second_url = result["urls"]
    assert failed_url == second_url  # a failed attempt changes nothing: the channels still resume
    assert channels_of(first_url) == "team:42,board:7"  # a fresh handshake subscribes in the URL
    assert cursor_of(first_url) is None
    assert result["sentBeforeSubscribed"] == 0  # nothing to SUBSCRIBE by message
    assert result["afterSubscribed"] == "c0"  # neither SUBSCRIBED's id nor a retained event is a cursor
    assert cursor_of(second_url) == "e2"
    assert channels_of(second_url) == "team:42,board:7"
    assert result["seen"] == [
        "CONNECTION_ESTABLISHED:c0",
        "SUBSCRIBED:s9",
        "TIMER",
        "SUBSCRIBED:s9",
        "CARD:e1",
        "TASK_CREATED:e2",  # an app event whose data has a "channel" key is still delivered
        "CONNECTION_ESTABLISHED:e2",
        "SUBSCRIBED:s10",
        "SUBSCRIBED:s10",
        "CARD:e3",
        "TIMER:e4",
    ]
    assert result["cursor"] == "e4"
    assert result["channels"] == ["team:42", "board:7"]


def test_subscribe_and_unsubscribe_while_open_and_a_channel_added_offline_subscribes_by_message(page: Page) -> None:
    result = run(
        page,
        """
        const t = h.make();
        t.socket.connect();
        await h.until(() => t.fakes.length === 1, "a socket");
        const first = t.fakes[0];
        first.accept("c0");
        t.socket.subscribe("team:1");
        t.socket.subscribe("room:2", { since: "e0" });
        t.socket.subscribe("team:1");  // already held: nothing sent
        first.deliver({ type: "SUBSCRIBED", userId: "u", data: { channel: "team:1", presence: false }, id: "s1" });
        first.deliver({ type: "SUBSCRIBED", userId: "u", data: { channel: "room:2", presence: false }, id: "s1" });
        const left = t.socket.unsubscribe("room:2");
        const leftAgain = t.socket.unsubscribe("room:2");
        first.deliver({ type: "MSG", userId: null, data: {}, channel: "room:2", id: "e5" });  // in flight: dropped
        first.deliver({ type: "UNSUBSCRIBED", userId: "u", data: { channel: "room:2" } });
        first.serverClose(1012, "Service Restart");
        t.socket.subscribe("late:3");  // while reconnecting: it needs its retained state, not a resume
        await h.until(() => t.fakes.length === 2, "a reconnect");
        const second = t.fakes[1];
        second.accept("e5");
        const sent = second.sent;
        t.socket.close();
        return { sent1: first.sent, sent2: sent, url2: second.url, left, leftAgain, seen: t.seen,
                 cursor: t.socket.lastEventId, channels: t.socket.channels };
        """,
    )
    assert result["sent1"] == [
        {"type": "SUBSCRIBE", "data": {"channel": "team:1"}},
        {"type": "SUBSCRIBE", "data": {"channel": "room:2", "since": "e0"}},
        {"type": "UNSUBSCRIBE", "data": {"channel": "room:2"}},
    ]
    assert (result["left"], result["leftAgain"]) == (True, False)
    assert "MSG:e5" not in result["seen"]
    assert result["seen"][-2:] == ["UNSUBSCRIBED", "CONNECTION_ESTABLISHED:e5"]
    assert result["cursor"] == "e5"  # the dropped event still moved the cursor: it was received
    assert cursor_of(result["url2"]) == "e5"
    assert channels_of(result["url2"]) == "team:1"
    assert result["sent2"] == [{"type": "SUBSCRIBE", "data": {"channel": "late:3"}}]
    assert result["channels"] == ["team:1", "late:3"]


def test_the_server_revoking_or_refusing_a_channel_removes_it(page: Page) -> None:
    result = run(
        page,
        """
        const t = h.make({ lastEventId: "c0", channels: ["a", "b", "c"] });
        const gone = [];
        t.socket.on("unsubscribed", (channel, why) =>
          gone.push([channel, typeof why === "string" ? why : why.data.code]));
        const errors = [];
        t.socket.on("error", (e) => errors.push(e.data.code));
        t.socket.connect();
        await h.until(() => t.fakes.length === 1, "a socket");
        const first = t.fakes[0];
        first.accept("c0");
        first.deliver({ type: "SUBSCRIBED", userId: "u", data: { channel: "a", presence: false }, id: "s1" });
        first.deliver({ type: "ERROR", userId: "u", data: { code: "forbidden", message: "no", channel: "b" } });
        first.deliver({ type: "SUBSCRIBED", userId: "u", data: { channel: "c", presence: false }, id: "s1" });
        first.deliver({ type: "UNSUBSCRIBED", userId: "u", data: { channel: "c", reason: "Removed from the team" } });
        first.deliver({ type: "MSG", userId: null, data: {}, channel: "c", id: "e1" });
        first.deliver({ type: "ERROR", userId: "u", data: { code: "rate_limited", message: "slow down" } });
        t.socket.drop();
        await h.until(() => t.fakes.length === 2, "a reconnect");
        t.socket.close();
        return { url1: first.url, url2: t.fakes[1].url, gone, errors, channels: t.socket.channels, seen: t.seen };
        """,
    )
    assert channels_of(result["url1"]) == "a,b,c"  # given with lastEventId: resumed
    assert result["gone"] == [["b", "forbidden"], ["c", "Removed from the team"]]
    assert result["errors"] == ["forbidden", "rate_limited"]
    assert result["channels"] == ["a"]
    assert channels_of(result["url2"]) == "a"
    assert "MSG:e1" not in result["seen"]


def test_presence_is_tracked_from_presence_join_and_leave(page: Page) -> None:
    result = run(
        page,
        """
        const t = h.make();
        const updates = [];
        t.socket.on("presence", (channel, p) => updates.push([channel, p.count]));
        t.socket.subscribe("team:1").subscribe("big:1");
        t.socket.connect();
        await h.until(() => t.fakes.length === 1, "a socket");
        const ws = t.fakes[0];
        ws.accept("c0");
        const before = t.socket.presence("team:1");
        ws.deliver({ type: "SUBSCRIBED", userId: "me", data: { channel: "team:1", presence: true }, id: "s1" });
        ws.deliver({ type: "PRESENCE", userId: "me", data: { channel: "team:1",
                     users: [{ userId: "me", connections: 2 }, { userId: "ann", connections: 1 }], count: 2 } });
        const member = (type, userId) =>
          ({ type, userId: null, data: { channel: "team:1", userId }, channel: "team:1" });
        ws.deliver(member("PRESENCE_JOIN", "bob"));
        ws.deliver(member("PRESENCE_LEAVE", "ann"));
        const team = t.socket.presence("team:1");
        ws.deliver({ type: "SUBSCRIBED", userId: "me", data: { channel: "big:1", presence: true }, id: "s1" });
        ws.deliver({ type: "PRESENCE", userId: "me", data: { channel: "big:1", count: 500, truncated: true } });
        const big = t.socket.presence("big:1");
        const asked = t.socket.requestPresence("team:1");
        t.socket.unsubscribe("team:1");
        const after = t.socket.presence("team:1");
        t.socket.close();
        return { before, team, big, asked, after, updates, sent: ws.sent };
        """,
    )
    assert result["before"] is None
    assert result["team"] == {
        "channel": "team:1",
        "count": 2,
        "truncated": False,
        "users": [{"userId": "me", "connections": 2}, {"userId": "bob", "connections": 1}],
    }
    assert result["big"] == {"channel": "big:1", "count": 500, "truncated": True, "users": None}
    assert result["updates"] == [["team:1", 2], ["team:1", 3], ["team:1", 2], ["big:1", 500]]
    assert result["asked"] is True
    assert result["after"] is None
    assert result["sent"][-2:] == [
        {"type": "PRESENCE", "data": {"channel": "team:1"}},
        {"type": "UNSUBSCRIBE", "data": {"channel": "team:1"}},
    ]


def test_a_channel_resync_is_emitted_without_moving_the_cursor(page: Page) -> None:
    result = run(
        page,
        """
        const t = h.make();
        const resyncs = [];
        t.socket.on("resync", (e) => resyncs.push(e.data.channel || null));
        t.socket.connect();
        await h.until(() => t.fakes.length === 1, "a socket");
        const ws = t.fakes[0];
        ws.accept("c0");
        ws.deliver({ type: "TASK_CREATED", userId: "u", data: {}, id: "e1" });
        t.socket.subscribe("room:1", { since: "old" });
        ws.deliver({ type: "SUBSCRIBED", userId: "u", data: { channel: "room:1", presence: false }, id: "s5" });
        const why = { reason: "history_unavailable", channel: "room:1" };
        ws.deliver({ type: "RESYNC_REQUIRED", userId: "u", data: why, id: "s5" });
        ws.deliver({ type: "TASK_CREATED", userId: "u", data: {}, id: "e1" });  // still deduplicated
        const cursor = t.socket.lastEventId;
        t.socket.close();
        return { resyncs, cursor, seen: t.seen };
        """,
    )
    assert result["resyncs"] == ["room:1"]
    assert result["cursor"] == "e1"
    assert result["seen"].count("TASK_CREATED:e1") == 1
