"""The FastAPI application factory: the lifespan starts and stops the engine."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from service import api, webui
from service.engine import Engine
from service.logs import RequestContextMiddleware
from service.metrics import Metrics
from service.report import Report
from service.settings import Settings
from service.video import route as video_route
from service.video.metrics import VideoMetrics

log = logging.getLogger(__name__)


ExceptionHandler = Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object]


def _quiet_cancellations(previous: ExceptionHandler | None) -> ExceptionHandler:
    """The loop's exception handler, less one false alarm: a future that ended cancelled and
    that nobody awaited any more (the engine's batch futures of a request whose client left,
    `_GatheringFuture exception was never retrieved`) is a normal event, logged at DEBUG.
    Everything else goes to the previous handler (asyncio's logs it as an ERROR)."""

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if isinstance(context.get("exception"), asyncio.CancelledError):
            log.debug("cancelled work dropped unawaited: %s", context.get("message"))
        elif previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    return handle


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app. Models load in the lifespan, so `/readyz` is 503 until they are warm."""
    settings = settings or Settings()
    metrics = Metrics.from_settings(settings)
    engine = Engine(settings, metrics)
    metrics.watch_device(engine.device)
    decoder = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="imdn-decode")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # kept to the loop's end: the dropped futures may be collected after the lifespan
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(_quiet_cancellations(loop.get_exception_handler()))
        await engine.start()
        for m in engine.models.values():
            metrics.model_facts(m.descriptor)
        log.info("ready: %s on %s (%s)", ", ".join(engine.models), engine.device, engine.precision)
        try:
            yield
        finally:
            await engine.stop()
            decoder.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        docs_url=None,  # service/webui.py serves /docs and /redoc with local assets
        redoc_url=None,
        title="IMDN super-resolution",
        version="0.1.0",
        description="Image super-resolution with IMDN (ACM MM 2019): an image in any of "
        "the usual formats (PNG, JPEG, WebP, BMP, TIFF) in, the same image larger back as "
        "PNG, WebP or JPEG, as the Accept header prefers, at any scale in (1, max].",
        lifespan=lifespan,
        # no redirects: '/v1/superres/' is a 404, not a 307 to a URL built from the Host header
        redirect_slashes=False,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.report = Report()
    app.state.decoder = decoder
    app.state.video_metrics = VideoMetrics(metrics.registry, settings.video_timeout_s)
    api.install(app, video_route.router)  # POST /v1/superres/video (service/video/)
    webui.install(app, settings)
    if settings.cors_origins:  # no CORS headers at all unless origins are configured
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type", "X-Request-ID"],
            expose_headers=[
                "Server-Timing",
                "X-IMDN-Model",
                "X-IMDN-Crops",
                "Retry-After",
                "X-Request-ID",
                "X-IMDN-Frames",  # videos (service/video/route.py)
                "X-IMDN-Output-Size",
                "X-IMDN-Codec",
                "X-IMDN-Dropped-Streams",
            ],
            max_age=600,
        )
    # outermost of the app's middleware, so CORS answers carry a request ID too
    app.add_middleware(
        RequestContextMiddleware,
        access=settings.access_log,
        ops_routes=settings.access_log_ops_routes,
    )
    return app
