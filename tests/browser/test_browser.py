"""The demo in a real Chromium: cross-tab sync, lossless reconnect, resync after a restart, the timer."""

from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from starlette_pomo_ws.demo.store import Store

from .conftest import LiveServer

pytest.importorskip("playwright.sync_api")

# Imported after the skip check: Playwright is only in the browser test environment.
from playwright.sync_api import BrowserContext, Error as PlaywrightError, Page, expect

pytestmark = pytest.mark.browser

# Short backoff so that reconnects are quick; every wait below is bounded by these timeouts.
FAST = "?minDelay=50&maxDelay=500"
# The docs' screenshot is refreshed only on request (POMO_WS_UPDATE_SCREENSHOT=1), so that a test
# run leaves the checkout as it found it.
DOCS_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "img" / "demo.png"


def open_page(context: BrowserContext, url: str, errors: list[str]) -> Page:
    page = context.new_page()
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(url)
    return page


def log_in(context: BrowserContext, server: LiveServer, user: str, errors: list[str], path: str = "/") -> Page:
    page = open_page(context, server.url + path + FAST, errors)
    page.fill("#name", user)
    page.click("#login-form button")
    wait_ready(page)
    return page


def wait_ready(page: Page) -> None:
    expect(page.locator("#ws-status")).to_have_attribute("data-status", "open")
    page.wait_for_function("Number(document.body.dataset.synced || 0) >= 1", timeout=10_000)


def titles(page: Page) -> list[str]:
    return page.locator("#tasks .title").all_inner_texts()


def statuses(page: Page) -> list[str]:
    return page.locator("#status-history li").all_inner_texts()


def record_messages(page: Page) -> None:
    page.evaluate(
        "() => { window.__messages = []; window.pomoSocket.on('message', (e) => window.__messages.push(e)); }"
    )


def messages(page: Page) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = page.evaluate("() => window.__messages")
    return result


def test_two_tabs_of_one_user_sync_and_other_users_see_nothing(
    context: BrowserContext, live_server: LiveServer
) -> None:
    errors: list[str] = []
    first = log_in(context, live_server, "alice", errors)
    second = open_page(context, live_server.url + "/" + FAST, errors)  # same storage: already logged in
    wait_ready(second)
    other_context = context.browser.new_context() if context.browser else None
    assert other_context is not None
    try:
        bob = log_in(other_context, live_server, "bob", errors)

        first.fill("#task-title", "Write the report")
        first.click("#add-task")
        expect(second.locator("#tasks .title", has_text="Write the report")).to_have_count(1)
        expect(first.locator("#tasks .title", has_text="Write the report")).to_have_count(1)

        # Bob's task reaches Bob; a later task of Alice's proves that Alice's tabs never got Bob's.
        live_server.api("bob", "POST", "/api/tasks", {"title": "Bob's secret plan"})
        expect(bob.locator("#tasks .title", has_text="Bob's secret plan")).to_have_count(1)
        live_server.api("alice", "POST", "/api/tasks", {"title": "Barrier"})
        expect(second.locator("#tasks .title", has_text="Barrier")).to_have_count(1)
        assert titles(first) == titles(second) == ["Write the report", "Barrier"]
        assert titles(bob) == ["Bob's secret plan"]
        assert second.locator("#event-log li", has_text="Bob").count() == 0

        # Status and deletion travel too.
        task_id = second.locator("#tasks li").first.get_attribute("data-task-id")
        second.locator(f'#tasks li[data-task-id="{task_id}"] input[type=checkbox]').check()
        expect(first.locator(f'#tasks li[data-task-id="{task_id}"]')).to_have_class(re.compile(r"\bcompleted\b"))
        first.locator(f'#tasks li[data-task-id="{task_id}"] .delete').click()
        expect(second.locator("#tasks .title")).to_have_text(["Barrier"])
    finally:
        other_context.close()
    assert errors == []


def test_drop_while_publishing_delivers_every_event_exactly_once(
    context: BrowserContext, live_server: LiveServer
) -> None:
    errors: list[str] = []
    page = log_in(context, live_server, "alice", errors)
    record_messages(page)
    count = 40
    created: list[str] = []
    failures: list[BaseException] = []

    def publish() -> None:
        try:
            for i in range(count):
                created.append(live_server.api("alice", "POST", "/api/tasks", {"title": f"Task {i:02d}"})["id"])
                time.sleep(0.015)
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)

    publisher = threading.Thread(target=publish)
    publisher.start()
    try:
        for seen in (5, 20):
            page.wait_for_function(f"document.querySelectorAll('#tasks li').length >= {seen}", timeout=10_000)
            page.evaluate("window.pomoSocket.drop()")
    finally:
        publisher.join(30)
    assert not publisher.is_alive()
    assert failures == []

    log = page.locator("#event-log li[data-type=TASK_CREATED]")
    expect(log).to_have_count(count)
    expect(page.locator("#tasks li")).to_have_count(count)
    expect(page.locator("#ws-status")).to_have_attribute("data-status", "open")
    logged = [log.nth(i).get_attribute("data-key") for i in range(count)]
    assert sorted(key for key in logged if key) == sorted(created)
    assert len(set(logged)) == count
    assert titles(page) == [f"Task {i:02d}" for i in range(count)]
    assert page.locator("#event-log li[data-type=RESYNC_REQUIRED]").count() == 0

    history = statuses(page)
    assert history[:2] == ["connecting", "open"]
    assert history[2:] == ["reconnecting", "open"] * 2
    recorded = messages(page)
    welcomes = [m for m in recorded if m["type"] == "CONNECTION_ESTABLISHED"]
    assert len(recorded) >= count, [m["type"] for m in recorded]
    assert len(welcomes) == 2
    assert all(m["data"].get("resumed", True) for m in welcomes)
    assert errors == []


def test_restart_on_memory_backend_resyncs_the_task_list(context: BrowserContext, live_server: LiveServer) -> None:
    errors: list[str] = []
    page = log_in(context, live_server, "alice", errors)
    live_server.api("alice", "POST", "/api/tasks", {"title": "Keep me"})
    doomed = live_server.api("alice", "POST", "/api/tasks", {"title": "Deleted while down"})
    expect(page.locator("#tasks .title")).to_have_text(["Keep me", "Deleted while down"])

    live_server.stop()
    expect(page.locator("#ws-status")).to_have_attribute("data-status", "reconnecting")
    # Change the data behind the server's back: no event announces it, so only a refetch shows it.
    store = Store(live_server.db_path)
    assert store.delete_task("alice", doomed["id"])
    store.create_task("alice", "Added while down")
    store.close()
    live_server.start()

    expect(page.locator("#event-log li[data-type=RESYNC_REQUIRED]")).to_have_count(1)
    expect(page.locator("#tasks .title")).to_have_text(["Keep me", "Added while down"])
    expect(page.locator("#ws-status")).to_have_attribute("data-status", "open")
    assert statuses(page)[-2:] == ["reconnecting", "open"]

    # Live events flow again after the resync.
    live_server.api("alice", "POST", "/api/tasks", {"title": "After the restart"})
    expect(page.locator("#tasks .title")).to_have_text(["Keep me", "Added while down", "After the restart"])
    assert errors == []


def remaining(page: Page) -> int:
    return int(page.locator("#timer").get_attribute("data-remaining") or -1)


def test_timer_started_in_one_tab_shows_the_same_time_in_another(
    context: BrowserContext, live_server: LiveServer, tmp_path: Path
) -> None:
    errors: list[str] = []
    first = log_in(context, live_server, "alice", errors)
    second = open_page(context, live_server.url + "/" + FAST, errors)
    wait_ready(second)
    for title in ("Write the report", "Review pull requests", "Plan the sprint"):
        live_server.api("alice", "POST", "/api/tasks", {"title": title, "estimatedPomodoros": 2})
    expect(second.locator("#tasks li")).to_have_count(3)

    first.locator("#tasks li .focus").first.click()
    expect(second.locator("#timer")).to_have_attribute("data-running", "true")
    expect(first.locator("#timer")).to_have_attribute("data-running", "true")
    assert abs(remaining(first) - remaining(second)) <= 1
    assert 24 * 60 - 5 <= remaining(second) <= 25 * 60
    expect(second.locator("#session-type")).to_have_text("work")

    live_server.api("alice", "POST", "/api/notifications", {"message": "Focus time: notifications stay quiet"})
    expect(first.locator(".toast", has_text="Focus time")).to_have_count(1)
    first.wait_for_function("Number(document.querySelector('#timer').dataset.remaining) <= 1499", timeout=5_000)
    shot = DOCS_SCREENSHOT if os.environ.get("POMO_WS_UPDATE_SCREENSHOT") == "1" else tmp_path / "demo.png"
    first.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 0

    second.click("#stop")
    expect(first.locator("#timer")).to_have_attribute("data-running", "false")
    expect(first.locator("#timer")).to_have_text("25:00")
    assert errors == []


def test_websocket_test_page_pings_drops_and_broadcasts(context: BrowserContext, live_server: LiveServer) -> None:
    errors: list[str] = []
    log_in(context, live_server, "alice", errors)
    page = open_page(context, live_server.url + "/websocket-test" + FAST, errors)
    expect(page.locator("#ws-status")).to_have_attribute("data-status", "open")
    expect(page.locator("#log li[data-type=CONNECTION_ESTABLISHED]")).to_have_count(1)

    page.click("#ping")
    expect(page.locator("#log li[data-type=PONG]")).to_have_count(1)
    page.click("#notify")
    expect(page.locator("#log li[data-type=NOTIFICATION]")).to_have_count(1)
    page.click("#drop")
    expect(page.locator("#log li[data-status=reconnecting]")).to_have_count(1)
    expect(page.locator("#log li[data-type=CONNECTION_ESTABLISHED]")).to_have_count(2)
    expect(page.locator("#ws-status")).to_have_attribute("data-status", "open")
    expect(page.locator("#cursor")).not_to_have_text("\u2013")  # the placeholder, an en dash
    assert errors == []


def test_client_module_is_served_by_the_mount(context: BrowserContext, live_server: LiveServer) -> None:
    page = context.new_page()
    response = page.goto(live_server.url + "/ws/client.js")
    assert response is not None and response.ok
    assert "javascript" in (response.header_value("content-type") or "")
    try:
        exported = page.evaluate("import('/ws/client.js').then((m) => Object.keys(m).sort())")
    except PlaywrightError as exc:  # pragma: no cover - only on failure
        raise AssertionError(f"the module does not load: {exc}") from exc
    assert "PomoSocket" in exported
