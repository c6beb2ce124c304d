"""The try-it page at `/` and the offline `/docs`, in a real Chromium against a real server.

The browser tests drive Debian's Chromium through Playwright (tests/browser.py) and
skip with the reason where either is missing; the HTTP tests need neither.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import numpy as np
import pytest
from PIL import Image

from service.settings import Settings
from tests.browser import GuardedPage, chromium, guarded_page
from tests.live import LiveServer, live_server

if TYPE_CHECKING:  # Playwright is optional: tests/browser.py skips without it
    from playwright.sync_api import Browser, Page

API_PATHS = {
    "/healthz",
    "/readyz",
    "/metrics",
    "/v1/models",
    "/v1/report",
    "/v1/superres",
    "/v1/superres/video",
}


@pytest.fixture(scope="module")
def server(weights_dir: Path) -> Iterator[LiveServer]:
    """One small model keeps each browser run to a second or two on the CPU."""
    # batches bounded by crops alone, so that two requests for one image run as the same
    # batches and answer the same bytes (CPU kernels round differently per batch size)
    settings = Settings(
        weights_dir=weights_dir, models=["x3"], warmup=False, max_batch_seconds=3600
    )
    with live_server(settings) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as b:
        yield b


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _small_png(datasets_dir: Path, folder: Path) -> Path:
    """A 40×56 crop of a Set5 image as a PNG file: quick to super-resolve."""
    with Image.open(datasets_dir / "Set5" / "HR" / "bird.bmp") as img:
        arr = np.asarray(img.convert("RGB"))[100:140, 80:136]
    path = folder / "bird-crop.png"
    path.write_bytes(_png(arr))
    return path


def _record_progress(page: Page) -> None:
    """Keep every text the progress line shows in `window.progressSeen`, every value of
    the bar (null: indeterminate) in `window.barSeen`, and every stage marked current in
    `window.stagesSeen`."""
    page.evaluate(
        """() => {
          const text = document.getElementById("progress-text");
          const bar = document.getElementById("progress");
          window.progressSeen = [];
          window.barSeen = [];
          window.stagesSeen = [];
          new MutationObserver(() => {
            window.progressSeen.push(text.textContent);
            window.barSeen.push(bar.hasAttribute("value") ? bar.value : null);
          }).observe(text, {childList: true, characterData: true, subtree: true});
          new MutationObserver(() => {
            const current = document.querySelector("#stages [aria-current=step]");
            const name = current ? current.dataset.stage : null;
            if (name && window.stagesSeen.at(-1) !== name) window.stagesSeen.push(name);
          }).observe(document.getElementById("stages"), {attributes: true, subtree: true});
        }"""
    )


def _posts(g: GuardedPage) -> int:
    return sum(r.method == "POST" for r in g.requests)


def _run_and_wait(page: Page, what: str) -> None:
    page.click("#run")
    page.wait_for_selector(f"{what}:not([hidden])")
    page.wait_for_selector("#run:not([disabled])")


# Over HTTP: what is served, and what is not


def test_the_page_is_served_with_its_own_files_only(client: httpx.Client) -> None:
    r = client.get("/")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    for directive in ("default-src 'none'", "script-src 'self'", "connect-src 'self'"):
        assert directive in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    assert not re.search(r"(src|href)=\"(https?:)?//", r.text), "the page loads something remote"
    for asset, media_type in (("/ui/app.js", "text/javascript"), ("/ui/style.css", "text/css")):
        assert f'"{asset}"' in r.text
        a = client.get(asset)
        assert a.status_code == 200 and a.headers["content-type"].startswith(media_type)
        assert len(a.content) > 1000
    assert client.head("/").status_code == 200
    assert client.get("/ui/config").json() == {
        "models": ["x3"],
        "fixed_scales": [3],
        "any_scale": False,
        "max_scale": 8.0,
        "max_upload_bytes": 50 * 1024 * 1024,
        "api_key_required": False,
    }
    # the page's routes stay out of the API's description
    assert set(client.get("/openapi.json").json()["paths"]) == API_PATHS


def test_docs_assets_are_served_by_the_service(client: httpx.Client) -> None:
    for page in ("/docs", "/redoc"):
        html = client.get(page).text
        urls = re.findall(r"(?:src|href)=\"([^\"]+)\"", html)
        assert urls, page
        assert all(u.startswith(("/docs/assets/", "/openapi.json")) for u in urls), urls
        assert "'/openapi.json'" in html or '"/openapi.json"' in html
        for url in urls:
            r = client.get(url)
            assert r.status_code == 200, url
            assert len(r.content) > 1000, url
    js = client.get("/docs/assets/swagger-ui-bundle.js")
    assert js.headers["content-type"].startswith("text/javascript")
    assert b"SwaggerUIBundle" in js.content
    assert client.get("/docs/oauth2-redirect").status_code == 200


def test_web_ui_off_leaves_the_api_and_docs(weights_dir: Path) -> None:
    settings = Settings(weights_dir=weights_dir, models=["x3"], warmup=False, web_ui=False)
    with live_server(settings) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        for path in ("/", "/ui/app.js", "/ui/config"):
            r = c.get(path)
            assert r.status_code == 404, path
            assert r.headers["content-type"] == "application/problem+json"
        assert c.get("/docs").status_code == 200
        assert c.get("/healthz").status_code == 200


# In the browser


def test_page_upscales_a_set5_image_x3_and_downloads_it(
    server: LiveServer, client: httpx.Client, browser: Browser, datasets_dir: Path, tmp_path: Path
) -> None:
    source = datasets_dir / "Set5" / "HR" / "woman.bmp"  # 228×344: not square
    with Image.open(source) as img:
        w, h = img.size
    with guarded_page(browser) as g:
        page = g.page
        page.goto(server.url)
        page.locator("#server-info", has_text="models x3").wait_for()  # /ui/config read
        assert page.is_disabled(".preset[data-scale='2']")  # x2 is not loaded here
        assert page.is_hidden("#key-panel")  # this server has no API keys
        page.set_input_files("#file", source)
        page.click(".preset[data-scale='3']")
        _record_progress(page)
        # an upload slow enough to report progress along the way (the file is 230 kB)
        cdp = page.context.new_cdp_session(page)
        cdp.send("Network.enable")
        cdp.send(
            "Network.emulateNetworkConditions",
            {"offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": 4e5},
        )
        page.click("#run")
        assert page.get_attribute("#main", "aria-busy") == "true"  # still running
        page.wait_for_selector("#result:not([hidden])")
        assert page.get_attribute("#main", "aria-busy") == "false"
        assert page.is_hidden("#error") and page.is_hidden("#progress-box")
        shown = page.evaluate("window.progressSeen")
        percents = [int(m[1]) for t in shown if (m := re.fullmatch(r"uploading (\d+) %", t))]
        assert any(0 < p < 100 for p in percents), shown
        assert percents == sorted(percents) and percents[-1] == 100, shown
        # the upload's progress on a determinate bar, then the wait for the server
        bar = page.evaluate("window.barSeen")
        uploading = [v for t, v in zip(shown, bar, strict=True) if t.startswith("uploading ")]
        assert all(v is not None for v in uploading) and max(uploading) == 1, (shown, bar)
        assert shown.index("running on the server…") > shown.index("uploading 100 %"), shown
        assert page.evaluate("window.stagesSeen")[:2] == ["upload", "server"]

        natural = page.eval_on_selector("#after", "i => [i.naturalWidth, i.naturalHeight]")
        assert natural == [3 * w, 3 * h]
        before = page.eval_on_selector("#before", "i => [i.naturalWidth, i.naturalHeight]")
        assert before == [w, h]
        # before and after are laid out at the same size: the slider compares like with like
        boxes = [page.locator(sel).bounding_box() for sel in ("#before", "#after")]
        assert boxes[0] == boxes[1] and boxes[0] is not None and boxes[0]["width"] > 100
        assert page.inner_text("#fact-model") == "x3"
        assert f"{3 * w} × {3 * h} px from {w} × {h}" in page.inner_text("#fact-size")
        timing = page.inner_text("#fact-timing")
        stages = ("decode", "prepare", "queue", "inference", "readback", "compose")
        assert [part.split()[0] for part in timing.split(" · ")] == list(stages), timing
        assert page.inner_text("#download") == "Download PNG"

        page.fill("#slider", "30")
        assert page.eval_on_selector("#stage", "s => s.style.getPropertyValue('--split')") == "30%"
        page.screenshot(path=tmp_path / "page.png", full_page=True)

        with page.expect_download() as info:
            page.click("#download")
        download = info.value
        assert download.suggested_filename == "woman_x3.png"
        data = Path(download.path()).read_bytes()
        assert not g.outside() and not g.refused

    with Image.open(io.BytesIO(data)) as img:
        assert (img.format, img.size) == ("PNG", (3 * w, 3 * h))
        shown = np.asarray(img.convert("RGB"))
    # the page hands over exactly what the API answers for the same file
    direct = client.post(
        "/v1/superres?scale=3", content=source.read_bytes(), headers={"Content-Type": "image/bmp"}
    )
    assert direct.status_code == 200
    assert np.array_equal(shown, np.asarray(Image.open(io.BytesIO(direct.content)).convert("RGB")))
    with Image.open(tmp_path / "page.png") as shot:
        assert shot.format == "PNG" and shot.width >= 800


def test_page_refuses_what_it_can_and_words_the_servers_refusals(
    server: LiveServer, client: httpx.Client, browser: Browser, datasets_dir: Path, tmp_path: Path
) -> None:
    """A non-image or a bad scale is refused before sending, with no broken image; the
    server's refusals read as sentences, its own words below; an error clears the last
    result; and a good file still goes through afterwards."""
    good = _small_png(datasets_dir, tmp_path)
    svg = tmp_path / "drawing.svg"
    svg.write_text('<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"/>')
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with guarded_page(browser) as g:
        page = g.page
        page.goto(server.url)
        page.locator("#server-info", has_text="models x3").wait_for()  # /ui/config read
        page.set_input_files("#file", good)
        page.fill("#scale", "3")
        _run_and_wait(page, "#result")
        assert _posts(g) == 1

        # refused here: not sent, no broken preview, and the last result gone
        for path in (svg, text):
            page.set_input_files("#file", path)
            page.wait_for_selector("#error:not([hidden])")
            assert page.inner_text("#error-title") == (
                f"{path.name} is not an image this service reads."
            )
            assert "PNG, JPEG, WebP, BMP or TIFF" in page.inner_text("#error-detail")
            assert page.is_hidden("#input-thumb") and page.is_hidden("#result")
            assert page.get_attribute("#after", "src") is None
            assert page.is_disabled("#run")
        assert _posts(g) == 1
        page.set_input_files("#file", good)
        page.fill("#scale", "1e9")
        page.click("#run")
        page.wait_for_selector("#error:not([hidden])")
        assert page.inner_text("#error-title").startswith(
            "The scale must be a number above 1 and at most 8"
        )
        assert page.inner_text("#error-meta") == "not sent" and _posts(g) == 1

        # the server's refusal: a sentence, then what the server said
        page.fill("#scale", "3")
        _run_and_wait(page, "#result")
        page.set_input_files("#file", truncated)
        page.wait_for_selector("#result", state="hidden")  # a new file: the old result goes
        _run_and_wait(page, "#error")
        problem = client.post(
            "/v1/superres?scale=3",
            content=truncated.read_bytes(),
            headers={"Content-Type": "image/png"},
        ).json()
        assert page.inner_text("#error-title") == (
            "The file could not be read as an image: it may be damaged or cut short."
        )
        assert page.inner_text("#error-detail") == f"The server said: {problem['detail']}"
        assert page.inner_text("#error-meta") == "HTTP 400 · undecodable"
        assert page.is_hidden("#result")
        # the browser shows what it can of a file cut short; a broken image, never
        assert page.eval_on_selector("#input-thumb", "i => i.hidden || i.naturalWidth > 0")
        assert _posts(g) == 3

        # an error after a result clears it (the result is not left under the error)
        page.set_input_files("#file", good)
        _run_and_wait(page, "#result")
        page.fill("#scale", "2")  # x2 is not loaded here: the page knows, the server too
        page.click("#run")
        page.wait_for_selector("#error:not([hidden])")
        assert page.inner_text("#error-title") == "This server cannot upscale ×2: it takes 3 only."
        assert page.is_hidden("#result") and page.get_attribute("#after", "src") is None
        page.fill("#scale", "3")
        _run_and_wait(page, "#result")
        assert page.is_hidden("#error")
        natural = page.eval_on_selector("#after", "i => [i.naturalWidth, i.naturalHeight]")
        assert natural == [3 * 56, 3 * 40]
        assert not g.outside() and not g.refused


def test_page_checks_the_servers_upload_limit_before_sending(
    weights_dir: Path, browser: Browser, datasets_dir: Path
) -> None:
    source = datasets_dir / "Set5" / "HR" / "woman.bmp"  # 230 kB
    settings = Settings(
        weights_dir=weights_dir, models=["x3"], warmup=False, max_upload_bytes=100_000
    )
    with live_server(settings) as srv, guarded_page(browser) as g:
        page = g.page
        page.goto(srv.url)
        page.locator("#server-info", has_text="files up to 97.7 kB").wait_for()
        page.set_input_files("#file", source)
        page.wait_for_selector("#error:not([hidden])")  # said as soon as it is chosen
        size = f"{source.stat().st_size / 1024:.1f} kB"
        expected = f"The file is too large: {size}; this server takes up to 97.7 kB."
        assert page.inner_text("#error-title") == expected
        page.click("#run")
        assert page.inner_text("#error-meta") == "not sent"
        assert page.inner_text("#error-title") == expected
        assert _posts(g) == 0


def test_page_output_formats(
    server: LiveServer, client: httpx.Client, browser: Browser, datasets_dir: Path, tmp_path: Path
) -> None:
    image = _small_png(datasets_dir, tmp_path)
    with guarded_page(browser) as g:
        page = g.page
        page.goto(server.url)
        page.locator("#server-info", has_text="models x3").wait_for()
        page.set_input_files("#file", image)
        assert page.is_hidden("#quality-field")  # PNG has no quality
        for fmt, quality, name, ext in (
            ("webp", "100", "WebP", "webp"),
            ("jpeg", "70", "JPEG", "jpg"),
        ):
            page.select_option("#format", fmt)
            page.fill("#quality", quality)
            _run_and_wait(page, "#result")
            assert page.inner_text("#download") == f"Download {name}"
            assert page.inner_text("#fact-size").endswith(f" {name}")
            with page.expect_download() as info:
                page.click("#download")
            assert info.value.suggested_filename == f"bird-crop_x3.{ext}"
            data = Path(info.value.path()).read_bytes()
            direct = client.post(
                f"/v1/superres?scale=3&quality={quality}",
                content=image.read_bytes(),
                headers={"Content-Type": "image/png", "Accept": f"image/{fmt}"},
            )
            assert data == direct.content  # what the API answers for that format and quality
        post = [r for r in g.requests if r.method == "POST"][-1]
        assert "quality=70" in post.url and post.headers["accept"].startswith("image/jpeg")
        page.select_option("#format", "png")
        assert page.is_hidden("#quality-field")


def test_page_fits_the_window_and_the_slider_matches_the_image(
    server: LiveServer, browser: Browser, datasets_dir: Path, tmp_path: Path
) -> None:
    """A 1280 px window, the same at 200 % browser zoom (640 CSS px) and a phone: never
    wider than the window at any image zoom; the slider's thumb sits on the divider."""
    with Image.open(datasets_dir / "Set5" / "HR" / "woman.bmp") as img:
        source = tmp_path / "woman-long-name-that-does-not-wrap-by-itself-at-all.png"
        img.crop((0, 0, 228, 160)).save(source)  # ×3 is 684×480: twice that, wider than 1280
    with guarded_page(browser) as g:
        page = g.page
        page.goto(server.url)
        page.locator("#server-info", has_text="models x3").wait_for()
        page.set_input_files("#file", source)
        _run_and_wait(page, "#result")
        for width, height in ((1280, 800), (640, 400), (375, 667)):
            page.set_viewport_size({"width": width, "height": height})
            for zoom in ("fit", "1", "2"):
                page.select_option("#zoom", zoom)
                wide = page.evaluate("document.documentElement.scrollWidth")
                assert wide <= width, (width, zoom, wide)
            page.select_option("#zoom", "fit")
            page.locator("#slider").scroll_into_view_if_needed()
            stage = page.locator("#stage").bounding_box()
            assert stage is not None and stage["x"] >= 0 and stage["x"] + stage["width"] <= width
            slider = page.locator("#slider").bounding_box()
            assert slider is not None
            for percent in (10, 50, 85):
                x = stage["x"] + percent / 100 * stage["width"]
                page.mouse.click(x, slider["y"] + slider["height"] / 2)  # the track, under x
                value = float(page.input_value("#slider"))
                assert abs(value - percent) < 100 / stage["width"] + 0.2, (width, percent, value)
                divider = page.locator("#divider").bounding_box()
                assert divider is not None
                assert abs(divider["x"] + divider["width"] / 2 - x) <= 1.5, (width, divider, x)


def test_page_asks_for_the_api_key_and_sends_it_as_bearer(
    weights_dir: Path, browser: Browser, datasets_dir: Path, tmp_path: Path
) -> None:
    image = _small_png(datasets_dir, tmp_path)
    settings = Settings(
        weights_dir=weights_dir, models=["x3", "AS"], warmup=False, api_keys=["browser-key"]
    )
    with live_server(settings) as srv, guarded_page(browser) as g:
        page = g.page
        page.goto(srv.url)
        page.wait_for_selector("#key-panel:not([hidden])")  # asked before any upload
        # IMDN_AS takes any scale but 2 and 4, which need their own (absent) networks
        assert page.inner_text("#scale-hint") == "any value in (1, 8] except 2, 4"
        enabled = page.eval_on_selector_all(".preset", "bs => bs.map(b => !b.disabled)")
        assert enabled == [False, True, False]
        page.set_input_files("#file", image)
        page.click("#run")  # no key yet: the server's 401, and the key field focused
        page.wait_for_selector("#error:not([hidden])")
        assert page.inner_text("#error-title") == "This server needs an API key: enter it above."
        assert "API key" in page.inner_text("#error-detail")
        assert page.inner_text("#error-meta") == "HTTP 401 · unauthorized"
        assert page.evaluate("document.activeElement.id") == "api-key"

        page.fill("#api-key", "wrong-key")
        page.click("#run")
        page.wait_for_selector("#error-title:text('The API key was refused')")
        assert page.inner_text("#error-title") == "The API key was refused: check it and try again."

        page.fill("#api-key", "browser-key")
        page.click("#run")
        page.wait_for_selector("#result:not([hidden])")
        natural = page.eval_on_selector("#after", "i => [i.naturalWidth, i.naturalHeight]")
        assert natural == [3 * 56, 3 * 40]
        posts = [r for r in g.requests if r.method == "POST"]
        assert [r.headers.get("authorization") for r in posts] == [
            None,
            "Bearer wrong-key",
            "Bearer browser-key",
        ]
        # kept for this tab only
        assert page.evaluate("sessionStorage.getItem('imdn.apiKey')") == "browser-key"
        assert page.evaluate("localStorage.length") == 0


def test_docs_render_and_work_with_no_request_leaving_loopback(
    server: LiveServer, client: httpx.Client, browser: Browser, datasets_dir: Path, tmp_path: Path
) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    operations = sum(len(methods) for methods in paths.values())
    with guarded_page(browser) as g:
        page = g.page
        page.goto(f"{server.url}/docs")
        page.wait_for_selector(".opblock")
        assert page.locator(".opblock").count() == operations
        images = re.compile(r"/v1/superres\s*$")  # not /v1/superres/video
        assert page.locator(".opblock-summary-path", has_text=images).count() == 1
        # and it works: "try it out" on /v1/superres shows the PNG the server made
        post = page.locator(".opblock-post").filter(
            has=page.locator(".opblock-summary-path", has_text=images)
        )
        post.locator(".opblock-summary").click()
        post.get_by_role("button", name="Try it out").click()
        post.locator("tr[data-param-name='scale'] select").select_option("3")
        post.locator("input[type=file]").set_input_files(_small_png(datasets_dir, tmp_path))
        post.get_by_role("button", name="Execute").click()
        shown = post.locator(".live-responses-table img")
        shown.wait_for()
        size = shown.evaluate("i => i.decode().then(() => [i.naturalWidth, i.naturalHeight])")
        assert size == [3 * 56, 3 * 40]
        swagger_urls = g.urls()
        # Swagger UI asks for nothing elsewhere, not even something a CSP would refuse
        assert all(u.startswith(f"{server.url}/") for u in swagger_urls), swagger_urls
        assert f"{server.url}/docs/assets/swagger-ui-bundle.js" in swagger_urls
        assert f"{server.url}/openapi.json" in swagger_urls

        page.goto(f"{server.url}/redoc")
        redoc_operations = page.locator("[id*='/operation/']")  # ReDoc: one section each
        redoc_operations.first.wait_for()
        assert redoc_operations.count() == operations
        assert f"{server.url}/docs/assets/redoc.standalone.js" in g.urls()
        # ReDoc's bundle names a logo on its CDN: the page's CSP refuses it in the browser
        assert not g.outside(), g.outside()
        assert not g.refused, g.refused
