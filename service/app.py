"""The FastAPI application factory: the lifespan starts and stops the engine."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from service import api, webui
from service.engine import Engine
from service.metrics import Metrics
from service.report import Report
from service.settings import Settings

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app. Models load in the lifespan, so `/readyz` is 503 until they are warm."""
    settings = settings or Settings()
    metrics = Metrics()
    engine = Engine(settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        log.info("ready: %s on %s (%s)", ", ".join(engine.models), engine.device, engine.dtype)
        try:
            yield
        finally:
            await engine.stop()

    app = FastAPI(
        docs_url=None,  # service/webui.py serves /docs and /redoc with local assets
        redoc_url=None,
        title="IMDN super-resolution",
        version="0.1.0",
        description="Image super-resolution with IMDN (ACM MM 2019): PNG in any of the "
        "usual formats, a PNG back at any scale in (1, max].",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.report = Report()
    api.install(app)
    webui.install(app, settings)
    if settings.cors_origins:  # no CORS headers at all unless origins are configured
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type"],
            expose_headers=["Server-Timing", "X-IMDN-Model", "X-IMDN-Crops", "Retry-After"],
            max_age=600,
        )
    return app
