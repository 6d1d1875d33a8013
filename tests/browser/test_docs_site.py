"""The built docs site in a real Chromium at a laptop's 1,366 px: no code cut off, no web fonts, no boxes."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("playwright.sync_api")

from playwright.sync_api import Browser  # after the skip check

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]
PAGES = ["", "quickstart/", "litestar/", "performance/", "demo/", "lifespan/", "observability/", "backends/"]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    out = tmp_path_factory.mktemp("site")
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    yield out


def test_no_page_asks_for_google_fonts(site: Path) -> None:
    for html in site.rglob("*.html"):
        text = html.read_text(encoding="utf-8")
        assert "fonts.googleapis.com" not in text and "fonts.gstatic.com" not in text, html


@pytest.mark.parametrize("path", PAGES)
def test_code_blocks_are_not_cut_off_at_1366_px(browser: Browser, site: Path, path: str, tmp_path: Path) -> None:
    context = browser.new_context(viewport={"width": 1366, "height": 768})
    try:
        page = context.new_page()
        requests: list[str] = []
        page.on("request", lambda request: requests.append(request.url))
        page.goto((site / path / "index.html").as_uri())
        page.wait_for_load_state("load")
        cut = page.evaluate(
            """() => [...document.querySelectorAll("pre > code")]
                .filter((code) => code.offsetParent !== null)
                .filter((code) => code.scrollWidth > code.clientWidth + 1
                    || code.getBoundingClientRect().right > window.innerWidth)
                .map((code) => code.innerText.slice(0, 80))"""
        )
        assert cut == [], f"{path or 'index'}: code blocks cut off at 1366 px: {cut}"
        assert not [url for url in requests if not url.startswith("file:")], "the page loaded something remote"
        if path == "quickstart/":
            # For a human look: POMO_WS_SCREENSHOT_DIR=/tmp/x pytest tests/browser/test_docs_site.py
            target = Path(os.environ.get("POMO_WS_SCREENSHOT_DIR", tmp_path))
            page.screenshot(path=str(target / "quickstart-1366.png"), full_page=True)
    finally:
        context.close()
