"""The browser side of the service: the try-it page at `/` and offline API docs.

The page (`service/static/`: plain HTML, CSS and JavaScript, no build step) uploads to
`/v1/superres` from the same origin, so it needs no CORS. `/docs` and `/redoc` are
FastAPI's pages with Swagger UI's and ReDoc's assets served from the pinned
`fastapi-offline` package instead of a public CDN: on an air-gapped GPU host the
default pages are blank. None of these routes is in the OpenAPI document.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib.resources import files
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse

from service.planner import ANY_SCALE, FIXED_SCALES
from service.settings import Settings

STATIC = Path(__file__).resolve().parent / "static"
# Swagger UI 5 and ReDoc as the fastapi-offline wheel ships them (version pinned in pyproject)
DOCS_ASSETS = Path(str(files("fastapi_offline") / "static"))
DOCS_ASSET_URL = "/docs/assets"

PAGE_FILES = {"app.js": "text/javascript", "style.css": "text/css", "video.js": "text/javascript"}
DOCS_FILES = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "redoc.standalone.js": "text/javascript",
    "favicon.png": "image/png",
}

# The page loads nothing but its own files, talks only to its own origin, and shows
# images it made from blob: URLs (the upload's preview and the result).
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "media-src blob:; "  # the video page plays its result from a blob: URL
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
# Swagger UI's page starts it with an inline script, and both UIs style inline; beyond
# that they get nothing but this origin (ReDoc's hard-coded logo URL on a CDN included:
# refused here, it hides itself). blob: images: Swagger UI's "try it out" shows the PNG.
DOCS_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: blob:; worker-src 'self' blob:; base-uri 'none'; "
    "frame-ancestors 'none'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": PAGE_CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate: a new release's page is seen at once
}


def install(app: FastAPI, settings: Settings) -> None:
    """Add the offline `/docs` and `/redoc`, and the page unless `IMDN_WEB_UI` is off.

    The app must be built with `docs_url=None, redoc_url=None` so that FastAPI's CDN
    pages are not there first.
    """
    app.include_router(_docs_router(app))
    if settings.web_ui:
        app.include_router(_page_router())


def page_config(settings: Settings) -> dict[str, Any]:
    """What the page needs to offer only what this server answers (all of it is also in
    the public OpenAPI document's scale schema)."""
    fixed = [s for s, name in FIXED_SCALES.items() if name in settings.models]
    return {
        "models": list(settings.models),
        "fixed_scales": [s for s in fixed if s <= settings.max_scale],
        "any_scale": ANY_SCALE in settings.models,
        "max_scale": settings.max_scale,
        "max_upload_bytes": settings.max_upload_bytes,
        "api_key_required": bool(settings.api_keys),
    }


def _page_router() -> APIRouter:
    router = APIRouter(include_in_schema=False)

    @router.api_route("/", methods=["GET", "HEAD"])
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html", headers=PAGE_HEADERS)

    @router.api_route("/video", methods=["GET", "HEAD"])
    async def video_page() -> FileResponse:  # service/static/video.html
        return FileResponse(STATIC / "video.html", media_type="text/html", headers=PAGE_HEADERS)

    @router.get("/ui/config")
    async def config(request: Request) -> JSONResponse:
        settings: Settings = request.app.state.settings
        return JSONResponse(page_config(settings), headers={"Cache-Control": "no-store"})

    for name, media_type in PAGE_FILES.items():
        router.add_api_route(
            f"/ui/{name}", _file_endpoint(STATIC / name, media_type), methods=["GET", "HEAD"]
        )
    return router


def _docs_router(app: FastAPI) -> APIRouter:
    """FastAPI's own Swagger UI and ReDoc pages, pointed at local assets."""
    router = APIRouter(include_in_schema=False)
    redirect_url = app.swagger_ui_oauth2_redirect_url  # FastAPI's default, kept

    @router.get("/docs")
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        html = get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{DOCS_ASSET_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{DOCS_ASSET_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{DOCS_ASSET_URL}/favicon.png",
            oauth2_redirect_url=f"{root}{redirect_url}" if redirect_url else None,
            init_oauth=app.swagger_ui_init_oauth,
            swagger_ui_parameters=app.swagger_ui_parameters,
        )
        html.headers["Content-Security-Policy"] = DOCS_CSP
        return html

    if redirect_url:

        @router.get(redirect_url)
        async def swagger_ui_redirect() -> HTMLResponse:
            return get_swagger_ui_oauth2_redirect_html()

    @router.get("/redoc")
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        html = get_redoc_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{DOCS_ASSET_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{DOCS_ASSET_URL}/favicon.png",
            with_google_fonts=False,
        )
        html.headers["Content-Security-Policy"] = DOCS_CSP
        return html

    for name, media_type in DOCS_FILES.items():
        router.add_api_route(
            f"{DOCS_ASSET_URL}/{name}",
            _file_endpoint(DOCS_ASSETS / name, media_type),
            methods=["GET", "HEAD"],
        )
    return router


def _file_endpoint(path: Path, media_type: str) -> Callable[[], Awaitable[FileResponse]]:
    """A GET endpoint for one fixed file (no path from the request reaches the disk)."""

    async def endpoint() -> FileResponse:
        return FileResponse(
            path,
            media_type=media_type,
            headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"},
        )

    endpoint.__name__ = f"static_{path.name.replace('.', '_').replace('-', '_')}"
    return endpoint
