"""Debian's Chromium driven by Playwright, for tests of the pages the service serves.

Playwright's Python package talks to the system's `chromium` (`make system-tools`
installs Debian's package); its own browser downloads are never used. Tests skip
with the reason when either is missing. A page from `guarded_page` refuses, and
records, every request that would leave loopback.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page, Request, Route

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",  # tests run as root in CI
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
LOCAL_SCHEMES = ("data", "blob", "about")  # never leave the browser


@contextmanager
def chromium() -> Iterator[Browser]:
    """A headless Chromium for the block; skips when it or Playwright is not installed."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Playwright's Python package is not installed (pip install -e '.[dev]')")
    binary = shutil.which("chromium")
    if binary is None:
        pytest.skip("the chromium binary is not on PATH (`make system-tools` installs it)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=binary, args=CHROMIUM_ARGS, timeout=60_000
        )
        try:
            yield browser
        finally:
            browser.close()


@dataclass
class GuardedPage:
    """A page and the requests it made: every URL, and those refused for leaving loopback."""

    page: Page
    requests: list[Request] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)

    def urls(self) -> list[str]:
        return [r.url for r in self.requests]

    def outside(self) -> list[str]:
        """What left, or tried to leave, loopback (see `outside_loopback`)."""
        return outside_loopback(self.requests)


@contextmanager
def guarded_page(browser: Browser, *, timeout_ms: float = 120_000) -> Iterator[GuardedPage]:
    """A fresh page (own context: own storage and downloads) whose non-loopback requests
    are aborted and recorded in `refused`."""
    context = browser.new_context(accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(timeout_ms)
    guarded = GuardedPage(page)

    def guard(route: Route) -> None:
        url = route.request.url
        if urlsplit(url).hostname == "127.0.0.1":
            route.continue_()
        else:
            guarded.refused.append(url)
            route.abort()

    def record(request: Request) -> None:
        guarded.requests.append(request)

    page.route("**/*", guard)
    page.on("request", record)
    try:
        yield guarded
    finally:
        context.close()


def outside_loopback(requests: list[Request]) -> list[str]:
    """The URLs of `requests` that were sent to any host but 127.0.0.1: those the page's
    Content-Security-Policy refused never reached the network, and are not counted."""
    return [
        r.url
        for r in requests
        if urlsplit(r.url).scheme not in LOCAL_SCHEMES
        and urlsplit(r.url).hostname != "127.0.0.1"
        and r.failure != "csp"
    ]
