"""The demo on a phone (390 px, an iPhone 12-15): a tidy header, and the task form on one line."""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any

import pytest

from .conftest import LiveServer

pytest.importorskip("playwright.sync_api")

from playwright.sync_api import Browser, FloatRect, Page, ViewportSize, expect  # after the skip check

pytestmark = pytest.mark.browser

PHONE: ViewportSize = {"width": 390, "height": 844}


def box(page: Page, selector: str) -> FloatRect:
    found = page.locator(selector).bounding_box()
    assert found is not None, f"{selector} is not visible"
    return found


def rows(boxes: list[FloatRect]) -> int:
    """How many visual lines the boxes sit on (boxes whose vertical middles differ by under 8 px share one)."""
    middles = sorted(b["y"] + b["height"] / 2 for b in boxes)
    return 1 + sum(1 for a, b in itertools.pairwise(middles) if b - a > 8)


def assert_tidy_header(page: Page) -> None:
    title, nav, status = (box(page, f"header {s}") for s in ("h1", "nav", "#ws-status"))
    header = box(page, "header")
    # Two clean lines at most: the title with the status pill, then the links.
    assert abs((title["y"] + title["height"] / 2) - (status["y"] + status["height"] / 2)) < 8, (title, status)
    assert rows([title, nav, status]) <= 2
    assert header["height"] <= 100, header
    for part in (title, nav, status):
        assert part["x"] >= 0 and part["x"] + part["width"] <= PHONE["width"], part
    title_lines = page.evaluate(
        "() => { const h = document.querySelector('header h1');"
        " return Math.round(h.getBoundingClientRect().height / parseFloat(getComputedStyle(h).lineHeight)); }"
    )
    assert title_lines == 1, "the title wraps"


def assert_no_sideways_scroll(page: Page) -> None:
    width: Any = page.evaluate("() => document.documentElement.scrollWidth")
    assert width <= PHONE["width"], f"the page is {width} px wide"


def test_the_demo_fits_a_phone(browser: Browser, live_server: LiveServer, tmp_path: Path) -> None:
    context = browser.new_context(viewport=PHONE, device_scale_factor=2, is_mobile=True, has_touch=True)
    context.set_default_timeout(10_000)
    try:
        page = context.new_page()
        page.goto(live_server.url + "/")
        page.fill("#name", "ann")
        page.click("#login-form button")
        expect(page.locator("#ws-status")).to_have_attribute("data-status", "open")
        page.fill("#task-title", "Write the phone test")
        page.click("#add-task")
        expect(page.locator("#tasks .title")).to_have_text(["Write the phone test"])

        assert_tidy_header(page)
        assert_no_sideways_scroll(page)
        title, estimate, add = (box(page, s) for s in ("#task-title", "#task-estimate", "#add-task"))
        assert rows([title, estimate, add]) == 1, "the Add button dropped below the input"
        assert add["x"] + add["width"] <= PHONE["width"] - 16, add
        assert title["width"] >= 150, "the title input is too narrow to type in"
        shots = Path(os.environ.get("POMO_WS_SCREENSHOT_DIR", tmp_path))
        page.screenshot(path=str(shots / "demo-390.png"), full_page=True)

        page.goto(live_server.url + "/websocket-test")
        expect(page.locator("#ws-status")).to_have_attribute("data-status", "open")
        assert_tidy_header(page)
        assert_no_sideways_scroll(page)
        page.screenshot(path=str(shots / "websocket-test-390.png"), full_page=True)
    finally:
        context.close()


def test_the_websocket_test_page_logged_out(browser: Browser, live_server: LiveServer) -> None:
    """The logo stays, every button is disabled, and the "app page" link has the demo's colour."""
    context = browser.new_context(viewport=PHONE)
    context.set_default_timeout(10_000)
    try:
        page = context.new_page()
        page.goto(live_server.url + "/websocket-test")
        expect(page.locator("#need-login")).to_be_visible()
        expect(page.locator("header h1 .logo")).to_be_visible()
        for button in page.locator(".buttons button").all():
            expect(button).to_be_disabled()
        link = page.locator("#need-login a")
        colour = link.evaluate("(a) => getComputedStyle(a).color")
        assert colour == "rgb(186, 73, 73)", colour  # --red, not the browser's default blue
        assert_tidy_header(page)
        page.goto(live_server.url + "/")
        page.fill("#name", "ann")
        page.click("#login-form button")
        expect(page.locator("#ws-status")).to_have_attribute("data-status", "open")
        page.goto(live_server.url + "/websocket-test")
        for button in page.locator(".buttons button").all():
            expect(button).to_be_enabled()
    finally:
        context.close()
