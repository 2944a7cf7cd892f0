"""Headless Chromium through Playwright, for looking at generated pages as a user would."""

from __future__ import annotations

import shutil
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome")


def chromium_path() -> str | None:
    """The system Chromium, if installed (Playwright's own browser download needs a CDN)."""
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def screenshot(url: str, out: Path, *, width: int = 1200, height: int = 900) -> dict:
    """Open ``url`` in headless Chromium, save a full-page PNG and return page facts a
    readability check needs: title, text, page width and the boxes of the charts."""
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    if executable is None:
        raise RuntimeError("Chromium is not installed (apt-get install chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.goto(url)
            page.screenshot(path=str(out), full_page=True)
            return {
                "title": page.title(),
                "text": page.inner_text("body"),
                "scroll_width": page.evaluate("document.documentElement.scrollWidth"),
                "charts": [page.locator("section.chart svg").nth(i).bounding_box()
                           for i in range(page.locator("section.chart svg").count())],
            }
        finally:
            browser.close()
