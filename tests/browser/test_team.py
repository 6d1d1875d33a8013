"""The demo's teams in a real Chromium: a shared board and timer on a channel, presence, resume after offline."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import LiveServer

pytest.importorskip("playwright.sync_api")

from playwright.sync_api import Browser, BrowserContext, Page, expect

from .test_browser import FAST, messages, open_page, record_messages, wait_ready

pytestmark = pytest.mark.browser

# Refreshed only on request (POMO_WS_UPDATE_SCREENSHOT=1), so that a test run leaves the checkout as it was.
DOCS_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "img" / "demo-team.png"


@pytest.fixture
def contexts(browser: Browser) -> Iterator[list[BrowserContext]]:
    """Fresh browser contexts on demand (one per person: each has its own storage, so its own login)."""
    made: list[BrowserContext] = []
    yield made
    for context in made:
        context.close()


def person(browser: Browser, contexts: list[BrowserContext]) -> BrowserContext:
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    context.set_default_timeout(10_000)
    contexts.append(context)
    return context


def join(context: BrowserContext, server: LiveServer, user: str, errors: list[str]) -> Page:
    """Log in as `user` and wait until the page shows its team's channel (subscribed, presence known)."""
    page = open_page(context, server.url + "/" + FAST, errors)
    page.fill("#name", user)
    page.click("#login-form button")
    wait_team(page, user)
    return page


def wait_team(page: Page, user: str) -> None:
    wait_ready(page)
    expect(page.locator("#team")).to_be_visible()
    expect(page.locator(f'#here li[data-user-id="{user}"]')).to_have_count(1)


def here(page: Page) -> list[str]:
    return page.locator("#here li .name").all_inner_texts()


def board(page: Page) -> list[str]:
    return page.locator("#board li .title").all_inner_texts()


def board_events(page: Page, event_type: str) -> list[dict[str, Any]]:
    return [m for m in messages(page) if m["type"] == event_type]


def test_members_share_the_board_and_the_timer_and_another_team_sees_none_of_it(
    browser: Browser, contexts: list[BrowserContext], live_server: LiveServer, tmp_path: Path
) -> None:
    errors: list[str] = []
    alice = join(person(browser, contexts), live_server, "alice@focus", errors)
    bob = join(person(browser, contexts), live_server, "bob@focus", errors)
    carol = join(person(browser, contexts), live_server, "carol@other", errors)

    expect(alice.locator("#here li .name")).to_have_text(["alice@focus", "bob@focus"])  # bob's PRESENCE_JOIN
    assert here(bob) == ["alice@focus", "bob@focus"]
    assert here(carol) == ["carol@other"]
    expect(alice.locator("#here-count")).to_have_text("2")

    # The board: one member's change reaches the other at once.
    alice.fill("#board-title", "Plan the launch")
    alice.click("#add-board-task")
    expect(bob.locator("#board .title")).to_have_text(["Plan the launch"])
    bob.fill("#board-title", "Write the release notes")
    bob.click("#add-board-task")
    expect(alice.locator("#board .title")).to_have_text(["Plan the launch", "Write the release notes"])
    bob.locator("#board li", has_text="Plan the launch").locator("input[type=checkbox]").check()
    expect(alice.locator("#board li", has_text="Plan the launch")).to_have_class("completed")

    # The timer: the server decides the end; both pages count down to the same instant.
    alice.click("#team-start")
    for page in (alice, bob):
        expect(page.locator("#team-timer")).to_have_attribute("data-running", "true")
    ends_at = alice.locator("#team-timer").get_attribute("data-ends-at")
    assert ends_at and bob.locator("#team-timer").get_attribute("data-ends-at") == ends_at
    assert (
        abs(
            int(alice.locator("#team-timer").get_attribute("data-remaining") or 0)
            - int(bob.locator("#team-timer").get_attribute("data-remaining") or 0)
        )
        <= 1
    )
    expect(bob.locator("#team-timer-by")).to_have_text("started by alice@focus")

    # A member who opens a tab later gets the timer as the channel's retained state.
    erin = join(person(browser, contexts), live_server, "erin@focus", errors)
    expect(erin.locator("#team-timer")).to_have_attribute("data-ends-at", ends_at)
    expect(erin.locator("#event-log li[data-type=TEAM_TIMER][data-retained=true]")).to_have_count(1)
    expect(alice.locator("#here li .name")).to_have_text(["alice@focus", "bob@focus", "erin@focus"])

    # Who is focusing now: a member's own work session shows in everyone's list (not its task).
    live_server.api("bob@focus", "POST", "/api/tasks", {"title": "Bob's private task"})
    task = live_server.api("bob@focus", "GET", "/api/tasks")[0]
    live_server.api("bob@focus", "POST", "/api/sessions", {"type": "work", "taskId": task["id"]})
    expect(alice.locator('#here li[data-user-id="bob@focus"] .focusing')).to_have_count(1)
    assert alice.locator("#tasks li").count() == 0  # personal tasks stay personal
    assert alice.locator("text=Bob's private task").count() == 0

    # The other team: its own board only. Dave's task is the barrier that proves carol's page is live.
    live_server.api("dave@other", "POST", "/api/team/tasks", {"title": "Other team's task"})
    expect(carol.locator("#board .title")).to_have_text(["Other team's task"])
    expect(carol.locator("#team-timer")).to_have_attribute("data-running", "false")
    assert here(carol) == ["carol@other"]
    assert carol.locator("#event-log li[data-channel='team:focus']").count() == 0
    assert carol.locator("#event-log li", has_text="focus").count() == 0
    # And it may not subscribe to it: the server refuses, and the client forgets the channel.
    carol.evaluate("window.pomoSocket.subscribe('team:focus')")
    expect(carol.locator("#event-log li[data-type=ERROR]")).to_have_count(1)
    assert carol.evaluate("window.pomoSocket.channels") == ["team:other"]
    assert board(alice) == ["Plan the launch", "Write the release notes"]

    alice.wait_for_function("Number(document.querySelector('#team-timer').dataset.remaining) <= 1499", timeout=5_000)
    shot = DOCS_SCREENSHOT if os.environ.get("POMO_WS_UPDATE_SCREENSHOT") == "1" else tmp_path / "demo-team.png"
    alice.locator("#event-log").evaluate("(log) => log.closest('details').removeAttribute('open')")
    alice.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 0

    bob.click("#team-stop")
    for page in (alice, erin):
        expect(page.locator("#team-timer")).to_have_attribute("data-running", "false")
        expect(page.locator("#team-timer-by")).to_have_text("stopped by bob@focus")
    assert errors == []


def test_a_tab_that_was_offline_gets_every_missed_board_change_exactly_once(
    browser: Browser, contexts: list[BrowserContext], live_server: LiveServer
) -> None:
    errors: list[str] = []
    alice = join(person(browser, contexts), live_server, "alice@focus", errors)
    bob_context = person(browser, contexts)
    bob = join(bob_context, live_server, "bob@focus", errors)
    keep = live_server.api("alice@focus", "POST", "/api/team/tasks", {"title": "Before"})
    expect(bob.locator("#board .title")).to_have_text(["Before"])
    record_messages(bob)

    bob_context.set_offline(True)
    bob.evaluate("window.pomoSocket.drop()")
    expect(bob.locator("#ws-status")).to_have_attribute("data-status", "reconnecting")
    created = [
        live_server.api("alice@focus", "POST", "/api/team/tasks", {"title": f"Missed {i}"})["id"] for i in range(8)
    ]
    live_server.api("alice@focus", "POST", f"/api/team/tasks/{created[0]}/status", {"status": "completed"})
    live_server.api("alice@focus", "DELETE", f"/api/team/tasks/{keep['id']}")
    live_server.api("bob@focus", "POST", "/api/tasks", {"title": "Bob's own, also missed"})  # the user stream
    expect(alice.locator("#board li")).to_have_count(8)
    assert bob.locator("#ws-status").get_attribute("data-status") == "reconnecting"

    bob_context.set_offline(False)  # the browser's `online` event: the client reconnects at once
    expect(bob.locator("#ws-status")).to_have_attribute("data-status", "open")
    expect(bob.locator("#board .title")).to_have_text([f"Missed {i}" for i in range(8)])
    expect(bob.locator("#tasks .title")).to_have_text(["Bob's own, also missed"])
    expect(bob.locator(f'#board li[data-task-id="{created[0]}"]')).to_have_class("completed")

    # Live events flow after the replay; it is the barrier after which nothing more can arrive.
    live_server.api("alice@focus", "POST", "/api/team/tasks", {"title": "Live again"})
    expect(bob.locator("#board li")).to_have_count(9)
    replayed = [m["data"]["id"] for m in board_events(bob, "TEAM_TASK_CREATED")]
    assert replayed == [*created, replayed[-1]]  # each missed creation once, in order, then the live one
    assert len(board_events(bob, "TEAM_TASK_UPDATED")) == 1
    assert [m["data"]["taskId"] for m in board_events(bob, "TEAM_TASK_DELETED")] == [keep["id"]]
    assert len(board_events(bob, "TASK_CREATED")) == 1
    assert board_events(bob, "RESYNC_REQUIRED") == []
    welcome = board_events(bob, "CONNECTION_ESTABLISHED")
    assert len(welcome) == 1 and welcome[0]["data"].get("resumed", True)
    assert bob.evaluate("window.pomoSocket.channels") == ["team:focus"]
    assert errors == []


def test_closing_a_members_last_tab_removes_them_from_whos_here(
    browser: Browser, contexts: list[BrowserContext], live_server: LiveServer
) -> None:
    errors: list[str] = []
    alice_context = person(browser, contexts)
    first = join(alice_context, live_server, "alice@focus", errors)
    second = open_page(alice_context, live_server.url + "/" + FAST, errors)  # same storage: already logged in
    wait_team(second, "alice@focus")
    bob = join(person(browser, contexts), live_server, "bob@focus", errors)
    assert here(bob) == ["alice@focus", "bob@focus"]

    def alice_connections() -> Any:
        return bob.evaluate(
            """() => new Promise((resolve) => {
                 const off = window.pomoSocket.on("PRESENCE", (event) => {
                   off();
                   const alice = (event.data.users || []).find((user) => user.userId === "alice@focus");
                   resolve(alice ? alice.connections : 0);
                 });
                 window.pomoSocket.requestPresence("team:focus");
               })"""
        )

    assert alice_connections() == 2
    first.close()  # one of two tabs: alice is still here
    bob.wait_for_function(
        """() => new Promise((resolve) => {
             const off = window.pomoSocket.on("PRESENCE", (event) => {
               off();
               const alice = (event.data.users || []).find((user) => user.userId === "alice@focus");
               resolve(alice && alice.connections === 1);
             });
             window.pomoSocket.requestPresence("team:focus");
           })""",
        timeout=10_000,
        polling=200,
    )
    assert here(bob) == ["alice@focus", "bob@focus"]

    second.close()  # her last tab: she leaves
    expect(bob.locator("#here li .name")).to_have_text(["bob@focus"])
    expect(bob.locator("#here-count")).to_have_text("1")
    expect(bob.locator("#event-log li[data-type=PRESENCE_LEAVE]")).to_have_count(1)
    assert errors == []


def test_the_team_card_fits_a_phone(browser: Browser, live_server: LiveServer) -> None:
    from .test_phone import PHONE, assert_no_sideways_scroll, box, rows

    context = browser.new_context(viewport=PHONE, device_scale_factor=2, is_mobile=True, has_touch=True)
    context.set_default_timeout(10_000)
    try:
        errors: list[str] = []
        page = join(context, live_server, "ann@focus", errors)
        page.fill("#board-title", "A long enough title for the whole team to read on a phone")
        page.click("#add-board-task")
        expect(page.locator("#board .title")).to_have_count(1)
        page.click("#team-start")
        expect(page.locator("#team-timer")).to_have_attribute("data-running", "true")
        assert_no_sideways_scroll(page)
        title, add = box(page, "#board-title"), box(page, "#add-board-task")
        assert rows([title, add]) == 1, "the board's Add button dropped below the input"
        assert title["width"] >= 150
        assert errors == []
    finally:
        context.close()
