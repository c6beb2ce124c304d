"""Retake the README's picture of the try-it page (docs/img/try-it-page.png).

    IMDN_SHARED_DIR=../shared python -m tests.screenshot

A real server with the four models (no warm-up) and the tests' Chromium (tests/browser.py):
Set5's butterfly at ×4, the slider at 45 %, the whole page at 900 px wide. Retake it when
the page changes.
"""

from __future__ import annotations

from pathlib import Path

from service.settings import Settings
from service.shared import DATASETS, WEIGHTS
from tests.browser import chromium, guarded_page
from tests.live import live_server

ROOT = Path(__file__).resolve().parent.parent
PICTURE = ROOT / "docs" / "img" / "try-it-page.png"
WIDTH, HEIGHT = 900, 820


def retake(picture: Path = PICTURE) -> None:
    settings = Settings(weights_dir=WEIGHTS, warmup=False)
    with live_server(settings) as srv, chromium() as browser, guarded_page(browser) as g:
        page = g.page
        page.set_viewport_size({"width": WIDTH, "height": HEIGHT})
        page.goto(srv.url)
        page.locator("#server-info", has_text="models").wait_for()
        page.set_input_files("#file", DATASETS / "Set5" / "HR" / "butterfly.bmp")
        page.wait_for_selector("#input-thumb:not([hidden])")
        page.click(".preset[data-scale='4']")
        page.click("#run")  # a first run loads the kernels: the second's times are typical
        page.wait_for_selector("#result:not([hidden])")
        page.wait_for_selector("#run:not([disabled])")
        page.click("#run")
        page.wait_for_selector("#run:not([disabled])")
        page.wait_for_selector("#result:not([hidden])")
        page.fill("#slider", "45")
        page.mouse.move(0, 0)
        page.evaluate("window.scrollTo(0, 0)")
        picture.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=picture, full_page=True)
        assert not g.outside() and not g.refused


if __name__ == "__main__":
    retake()
    print(PICTURE)
