"""Headless Chromium for the page tests (Debian's chromium driven by Playwright, installed by
.ci/install-browser): the ``browser`` fixture lives in conftest.py, ``Page`` here."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

SCREENSHOTS = Path(os.environ.get("GIG_REPORT_SCREENSHOTS", Path(__file__).parent / "report_browser" / "screenshots"))


CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _chromium() -> str | None:
    for candidate in (os.environ.get("GIG_CHROMIUM"), shutil.which("chromium"), "/usr/bin/chromium"):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def launch_browser():
    """Yield a launched Chromium, or skip the test when Playwright or chromium is missing."""
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="Playwright is not installed (.ci/install-browser)", exc_type=ImportError
    )
    executable = _chromium()
    if executable is None:
        pytest.skip("no chromium found (.ci/install-browser installs Debian's)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield b
        b.close()


class Page:
    """A page of the report with its console errors collected."""

    def __init__(self, browser, index: Path):
        self.page = browser.new_page(viewport={"width": 1400, "height": 950})
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type in ("error", "warning") else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("dialog", lambda d: (self.errors.append(f"dialog: {d.message}"), d.dismiss()))
        self.page.goto(index.resolve().as_uri(), wait_until="load")
        self.page.wait_for_function("document.body.getAttribute('data-graph-ready')", timeout=15000)

    def shot(self, name: str) -> None:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(SCREENSHOTS / f"{name}.png"))

    def node_point(self, node_id: str) -> tuple[float, float]:
        p = self.page.evaluate(
            """id => { const n = window.gigReport.cy.getElementById(id); const p = n.renderedPosition();
            const r = document.getElementById('cy').getBoundingClientRect(); return [r.left + p.x, r.top + p.y]; }""",
            node_id,
        )
        return p[0], p[1]
