"""HTTP routes: thin functions over the engine, errors as `application/problem+json`.

`POST /v1/superres?scale=S` takes the image as the raw body or as a multipart
field `image`, reads it with a size cap and a read timeout, decodes it off the event
loop, runs it through the engine, and streams a PNG back, encoded as it is sent (whole,
with its length, to an HTTP/1.0 client), with a `Server-Timing` header for the stages
before the body. A client whose `Accept` prefers WebP or JPEG (`service/negotiation.py`)
gets that instead, encoded whole off the event loop and sent with a `Content-Length`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Collection, Iterator
from concurrent.futures import Executor
from functools import partial
from http import HTTPStatus
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from service import imaging
from service.batcher import Reservation
from service.engine import (
    FIXED_SCALES,
    DeadlineExceeded,
    DeviceOutOfMemory,
    Engine,
    EngineError,
    NotReady,
    QueueFull,
    ScaleNotServed,
    TooCostly,
    UpscaleResult,
)
from service.logs import ARRIVED, REQUEST_ID_HEADER, current_request_id
from service.machine import device_name
from service.metrics import UNROUTED, Metrics
from service.negotiation import MEDIA_TYPES, NotAcceptable, choose_format
from service.planner import ANY_SCALE
from service.report import MEASURES, Report, report_markdown, scale_key
from service.settings import Settings

log = logging.getLogger(__name__)

PROBLEM = "application/problem+json"
STREAM_CHUNK = 64 * 1024  # IDAT bytes per piece of the streamed PNG
DEFAULT_QUALITY = 90  # WebP and JPEG, when the request gives no `quality`
VARY = {"Vary": "Accept"}  # the format depends on it: caches must key on it
# what an upload may be labelled (imaging.decode): the bytes decide the format
UPLOAD_TYPES = (*imaging.ALLOWED_CONTENT_TYPES, "application/octet-stream")
UPLOAD_SCHEMA = {"type": "string", "format": "binary", "minLength": 1}
PROBLEM_SCHEMA = {
    "type": "object",
    "required": ["type", "title", "status", "reason", "detail"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "reason": {"type": "string"},
        "detail": {},
        "request_id": {"type": "string", "description": "the X-Request-ID of the request"},
    },
}


def problem_response(description: str) -> dict[str, Any]:
    """An OpenAPI response entry for a problem document."""
    return {"description": description, "content": {PROBLEM: {"schema": PROBLEM_SCHEMA}}}


READY_SCHEMA = {
    "type": "object",
    "required": ["status", "models"],
    "properties": {
        "status": {"const": "ready"},
        "models": {"type": "array", "items": {"type": "string"}},
    },
}
UNAUTHORIZED: dict[int | str, dict[str, Any]] = {401: problem_response("missing or wrong API key")}


class ProblemError(Exception):
    """A client-facing error with an HTTP status and a machine-readable reason."""

    def __init__(
        self, status: int, reason: str, detail: Any, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(str(detail))
        self.status, self.reason, self.detail, self.headers = status, reason, detail, headers


def problem(
    status: int, reason: str, detail: Any, headers: dict[str, str] | None = None
) -> Response:
    """An RFC 9457 problem document, with the request's ID (also as a header: an
    unexpected error is answered outside the middleware that adds it)."""
    rid = current_request_id()
    body = {
        "type": "about:blank",
        "title": HTTPStatus(status).phrase,
        "status": status,
        "reason": reason,
        "detail": detail,
    }
    if rid is not None:  # always, behind the request-ID middleware
        body["request_id"] = rid
        headers = {**(headers or {}), REQUEST_ID_HEADER: rid}
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)


def describe_precision(engine: Engine) -> str:
    """The loaded models' precision (one for all: the engine's)."""
    return engine.precision


# Dependencies


def _from_state(name: str) -> Any:
    """A dependency that hands a route the app's `name` (what `create_app` put in its state)."""

    def get(request: Request) -> Any:
        return getattr(request.app.state, name)

    return Depends(get)


EngineDep = Annotated[Engine, _from_state("engine")]
MetricsDep = Annotated[Metrics, _from_state("metrics")]
SettingsDep = Annotated[Settings, _from_state("settings")]
ReportDep = Annotated[Report, _from_state("report")]
# the bounded pool that decodes uploads (IMDN_DECODE_THREADS): not every core
DecoderDep = Annotated[Executor, _from_state("decoder")]


def require_api_key(request: Request, settings: SettingsDep) -> None:
    """With `IMDN_API_KEYS` set, a valid key is needed (Bearer token or X-API-Key)."""
    keys = settings.api_keys
    if not keys:
        return
    given = request.headers.get("x-api-key", "")
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    # compare against every key, always, so timing says nothing about which matched
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given.encode(), key.get_secret_value().encode())
    if not matched:
        raise ProblemError(
            401,
            "unauthorized",
            "a valid API key is required (Authorization: Bearer <key>)",
            headers={"WWW-Authenticate": "Bearer"},
        )


Authorized = [Depends(require_api_key)]


def require_ops_key(request: Request, settings: SettingsDep) -> None:
    """Health, readiness and metrics are open unless `IMDN_PROTECT_OPS_ROUTES` is set."""
    if settings.protect_ops_routes:
        require_api_key(request, settings)


OpsAuthorized = [Depends(require_ops_key)]


NUMERIC_QUERY = ("scale", "quality")
"""The query parameters that are numbers: each given at most once, without the `_` digit
separators that Python's float() and int() accept (`0_2` would be served as 2)."""


def require_plain_numbers(request: Request) -> None:
    """`scale` or `quality` given twice is ambiguous (which one did the client mean?): 422,
    not a guess; one written with `_` digit separators is not a number: 422, as `abc` is."""
    for name in NUMERIC_QUERY:
        given = request.query_params.getlist(name)
        if len(given) > 1:
            raise ProblemError(
                422,
                f"repeated_{name}",
                f"{name} is given {len(given)} times ({', '.join(given)}); give it once",
            )
        if given and "_" in given[0]:
            raise ProblemError(
                422,
                "invalid_request",
                [
                    {
                        "loc": ["query", name],
                        "msg": f"Input should be a number without '_', not {given[0]!r}",
                        "type": "number_parsing",
                    }
                ],
            )


# Reading the body


async def read_capped(request: Request, limit: int, timeout_s: float) -> bytes:
    """The request body, refusing (413) as soon as it passes `limit` bytes, and (408) when
    no piece of it arrives for `timeout_s`: a stalled client cannot hold its connection."""
    codings = [
        c.strip().lower()
        for value in request.headers.getlist("transfer-encoding")
        for c in value.split(",")
        if c.strip()
    ]
    if any(c != "chunked" for c in codings):  # gzip and the like: read as-is, it would be
        raise ProblemError(  # taken for the image, so refuse it (400, not a 5xx for alerts)
            400,
            "unsupported_transfer_coding",
            f"Transfer-Encoding {', '.join(codings)} is not supported: send the body as it "
            "is, or chunked",
            headers={"Connection": "close"},
        )
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ProblemError(413, "body_too_large", f"the body is {declared} bytes; limit {limit}")
    chunks, size = [], 0
    pieces = request.stream()
    while True:
        try:
            chunk = await asyncio.wait_for(anext(pieces), timeout_s)
        except StopAsyncIteration:
            break
        except TimeoutError:
            raise ProblemError(
                408,
                "body_timeout",
                f"no part of the body arrived for {timeout_s:g}s; send it without pauses",
                headers={"Connection": "close"},  # the rest of the body is never read
            ) from None
        size += len(chunk)
        if size > limit:
            raise ProblemError(413, "body_too_large", f"the body exceeds the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


async def image_from_request(
    request: Request, limit: int, timeout_s: float
) -> tuple[bytes, str | None]:
    """(image bytes, declared content type) from a raw body or a multipart field `image`."""
    content_type = request.headers.get("content-type")
    body = await read_capped(request, limit, timeout_s)
    if not content_type or not content_type.lower().startswith("multipart/form-data"):
        return body, content_type

    async def replay() -> AsyncGenerator[bytes, None]:
        yield body

    try:
        form = await MultiPartParser(request.headers, replay(), max_files=4, max_fields=16).parse()
    except MultiPartException as exc:
        raise ProblemError(400, "bad_multipart", f"the multipart body is malformed: {exc}") from exc
    images = form.getlist("image")
    if len(images) > 1:
        await form.close()
        raise ProblemError(
            422, "multiple_images", f"the multipart body has {len(images)} 'image' parts; send one"
        )
    field = images[0] if images else None
    if not isinstance(field, UploadFile):
        raise ProblemError(
            422, "missing_image_field", "a multipart body needs a file field named 'image'"
        )
    data = await field.read()
    await form.close()
    return data, field.content_type


def upload_digest(data: bytes) -> bytes:
    """A cheap identity of an upload (its length, first and last 64 KiB): the retry of a
    refused request sends the same bytes, and finds the place kept for it."""
    piece = 64 * 1024
    head = data if len(data) <= 2 * piece else data[:piece] + data[-piece:]
    return hashlib.blake2b(head, digest_size=16, salt=len(data).to_bytes(16, "big")).digest()


# Routes

T = TypeVar("T")

router = APIRouter()
"""Every route of the API; `install` adds them to an app with the error handlers."""


def install(app: FastAPI, *rooms: APIRouter) -> None:
    """Add the routes and the problem+json error handlers to `app`, and the routes of
    `rooms` (the HTTP side of other jobs, e.g. service/video/route.py) under them."""
    app.add_exception_handler(ProblemError, _problem_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected_error)
    app.include_router(router)
    for room in rooms:
        app.include_router(room)
    # a bare app (listing the routes) has no settings: document the defaults
    settings = getattr(app.state, "settings", None) or Settings.model_construct()
    routers = (router, *rooms)
    app.openapi = lambda: _document(app, settings, routers)  # type: ignore[method-assign]


BEARER_SCHEME = "bearerAuth"


def _document(
    app: FastAPI, settings: Settings, routers: tuple[APIRouter, ...] = (router,)
) -> dict[str, Any]:
    """The app's OpenAPI document with what depends on `settings`: the scales this server
    answers, and, only with keys set, an HTTP bearer scheme on the routes that need a key
    (so that /docs offers its Authorize button and sends it). Built once, then cached in
    `app.openapi_schema`, as FastAPI does."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = FastAPI.openapi(app)
    for path in ("/v1/superres", "/v1/superres/video"):  # images; videos (service/video/)
        if path not in schema["paths"]:
            continue
        (scale,) = (p for p in schema["paths"][path]["post"]["parameters"] if p["name"] == "scale")
        # where a field's json_schema_extra would go: before the title, which pydantic adds last
        title = scale["schema"].pop("title")
        scale["schema"].update(served_scales(settings.max_scale, settings.models), title=title)
    if not settings.api_keys:
        return schema
    guards: set[Callable[..., Any]] = {require_api_key}
    if settings.protect_ops_routes:
        guards.add(require_ops_key)
    protected = {
        (route.path, method.lower())
        for room in routers
        for route in room.routes
        if isinstance(route, APIRoute) and any(d.dependency in guards for d in route.dependencies)
        for method in route.methods or ()
    }
    schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
    schemes[BEARER_SCHEME] = {
        "type": "http",
        "scheme": "bearer",
        "description": "one of IMDN_API_KEYS (X-API-Key: <key> works too)",
    }
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            if (path, method) in protected:
                operation["security"] = [{BEARER_SCHEME: []}]
    return schema


def served_scales(max_scale: float, models: Collection[str]) -> dict[str, Any]:
    """JSON Schema of the scales a server with `models` answers: (1, max_scale] with IMDN_AS,
    less the integer scales whose fixed network is not loaded; without IMDN_AS only those."""
    fixed = {scale: name for scale, name in FIXED_SCALES.items() if scale <= max_scale}
    if ANY_SCALE not in models:
        return {"enum": [scale for scale, name in fixed.items() if name in models]}
    unserved = [scale for scale, name in fixed.items() if name not in models]
    schema: dict[str, Any] = {"exclusiveMinimum": 1, "maximum": max_scale}
    return {**schema, "not": {"enum": unserved}} if unserved else schema


@router.get(
    "/healthz",
    tags=["ops"],
    dependencies=OpsAuthorized,
    responses={
        503: problem_response("the device worker is wedged: restart the process"),
        **UNAUTHORIZED,
    },
)
async def healthz(engine: EngineDep, settings: SettingsDep) -> Response:
    """The process serves and its device worker is not wedged (liveness): 503 once one
    device call has run longer than `IMDN_LIVENESS_TIMEOUT_S`. A busy worker finishes
    calls one after another, each shorter than that, and stays live."""
    since = engine.device_busy_since()
    stuck = 0.0 if since is None else time.monotonic() - since
    if stuck > settings.liveness_timeout_s:
        return problem(
            503,
            "device_wedged",
            f"a device call has not returned for {stuck:.0f}s "
            f"(limit {settings.liveness_timeout_s:g}s)",
        )
    return JSONResponse({"status": "ok"})


@router.get(
    "/readyz",
    tags=["ops"],
    dependencies=OpsAuthorized,
    responses={
        200: {"content": {"application/json": {"schema": READY_SCHEMA}}},
        503: problem_response("models not warm yet, or the server is stopping"),
        **UNAUTHORIZED,
    },
)
async def readyz(engine: EngineDep) -> Response:
    """200 once every model is loaded and warm (readiness)."""
    if not engine.ready:
        return problem(503, "not_ready", "models are loading or the server is stopping")
    return JSONResponse({"status": "ready", "models": list(engine.models)})


@router.get(
    "/metrics",
    tags=["ops"],
    dependencies=OpsAuthorized,
    response_class=PlainTextResponse,
    responses={
        200: {
            "description": "the classic text format, or OpenMetrics when the Accept "
            "header asks for it",
            "content": {
                "text/plain": {"schema": {"type": "string"}},
                "application/openmetrics-text": {"schema": {"type": "string"}},
            },
        },
        **UNAUTHORIZED,
    },
)
async def metrics_route(request: Request, metrics: MetricsDep) -> Response:
    """Prometheus exposition."""
    body, content_type = metrics.render(request.headers.get("accept"))
    return Response(body, media_type=content_type)


@router.get("/v1/models", tags=["models"], dependencies=Authorized, responses=UNAUTHORIZED)
async def list_models(engine: EngineDep) -> dict[str, list[dict[str, Any]]]:
    """The loaded models: scale, parameters, depth, device, precision, the backend that
    runs them, and the largest batch warm-up found worth forming per crop shape measured
    ("HxW": crops; empty when nothing was measured: batches up to IMDN_MAX_BATCH_SIZE)."""
    return {
        "models": [
            {
                **m.descriptor.as_json(),
                "precision": describe_precision(engine),  # the tensors' dtype, or mixed
                "backend": m.backend,
                "max_batch": {f"{h}x{w}": n for (h, w), n in sorted(m.batch_limits.items())},
            }
            for m in engine.models.values()
        ]
    }


@router.get(
    "/v1/report",
    tags=["models"],
    dependencies=Authorized,
    responses={
        200: {
            "description": "JSON, or a Markdown table when the Accept header asks for it",
            "content": {
                "application/json": {"schema": {"type": "object"}},
                "text/markdown": {"schema": {"type": "string"}},
            },
        },
        **UNAUTHORIZED,
    },
)
async def report_route(request: Request, engine: EngineDep, report: ReportDep) -> Response:
    """Table 6 of the paper, live, per model and scale: parameters, depth, forward time
    and request time per image, peak memory in MiB; then per model, scale and frame size
    of the videos served, the same per frame (`videos`); with the device, the precision
    and what each figure measures."""
    rows = report.rows(m.descriptor for m in engine.models.values())
    videos = report.video_rows(engine.models)
    device, precision = device_name(engine.device), describe_precision(engine)
    if "text/markdown" in request.headers.get("accept", ""):
        text = report_markdown(rows, device=device, precision=precision, videos=videos)
        return PlainTextResponse(text, media_type="text/markdown")
    return JSONResponse(
        {
            "device": str(engine.device),
            "device_name": device,
            "precision": precision,
            "measures": MEASURES,
            "models": [r.as_dict() for r in rows],
            "videos": [v.as_dict() for v in videos],
        }
    )


RESULT_HEADERS = {
    name: {"description": text, "schema": {"type": kind}}
    for name, kind, text in (
        ("X-IMDN-Model", "string", "the network that ran: x2, x3, x4 or AS"),
        (
            "X-IMDN-Crops",
            "integer",
            "the crops the image ran as: 1 whole, 4 for the paper's ACS, more for tiles",
        ),
        (
            "Server-Timing",
            "string",
            "decode, prepare, queue, inference, readback, compose (and encode for WebP "
            "and JPEG), in ms",
        ),
    )
}


@router.post(
    "/v1/superres",
    tags=["superres"],
    dependencies=[*Authorized, Depends(require_plain_numbers)],
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {media_type: {} for media_type in MEDIA_TYPES.values()},
            "description": "the super-resolved image: PNG unless the Accept header "
            "prefers WebP or JPEG",
            "headers": RESULT_HEADERS,
        },
        **{
            code: problem_response(text)
            for code, text in (
                (400, "undecodable image"),
                (401, "missing or wrong API key"),
                (406, "Accept allows none of PNG, WebP, JPEG (JPEG: not for alpha)"),
                (408, "the body stalled: no part of it for body_read_timeout_s"),
                (413, "body, input or output too large"),
                (415, "unsupported image type"),
                (
                    422,
                    "bad or repeated scale, a scale whose model is not loaded, or a "
                    "multipart body without exactly one 'image' part",
                ),
                (429, "queue full: retry after Retry-After seconds"),
                (503, "not ready"),
                (504, "deadline exceeded"),
            )
        },
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                **{t: {"schema": UPLOAD_SCHEMA} for t in UPLOAD_TYPES},
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["image"],
                        "properties": {"image": UPLOAD_SCHEMA},
                    },
                    "encoding": {"image": {"contentType": ", ".join(UPLOAD_TYPES)}},
                },
            },
        }
    },
)
async def superres(
    request: Request,
    engine: EngineDep,
    metrics: MetricsDep,
    settings: SettingsDep,
    report: ReportDep,
    decoder: DecoderDep,
    # its range in the OpenAPI document depends on the settings: `_document` adds it
    scale: float = Query(
        description="output / input size, in (1, max_scale]; 2, 3 and 4 need their "
        "fixed-scale model loaded, any other scale IMDN_AS",
    ),
    quality: int = Query(
        DEFAULT_QUALITY,
        ge=1,
        le=100,
        description="WebP and JPEG quality; WebP at 100 is lossless. PNG ignores it",
    ),
) -> Response:
    """Super-resolve one image by `scale`; the answer is a PNG, or the WebP or JPEG
    that the Accept header prefers."""
    return await _superres(request, engine, metrics, settings, report, decoder, scale, quality)


async def _superres(
    request: Request,
    engine: Engine,
    metrics: Metrics,
    settings: Settings,
    report: Report,
    decoder: Executor,
    scale: float,
    quality: int = DEFAULT_QUALITY,
) -> Response:
    arrived = time.perf_counter()
    metrics.request_started()
    model, status, outcome = UNROUTED, 500, "error"
    streaming = False
    try:
        if not math.isfinite(scale) or not 1 < scale <= settings.max_scale:
            raise ProblemError(
                422, "scale_out_of_range", f"scale must be a number in (1, {settings.max_scale:g}]"
            )
        model = engine.model_name(scale)
        accept = request.headers.get("accept")
        fmt = _negotiate(accept, alpha=False)  # before the body is read: 406 costs nothing
        deadline = arrived + settings.request_timeout_s
        data, content_type = await image_from_request(
            request, settings.max_upload_bytes, settings.body_read_timeout_s
        )
        # priced from the headers, before any pixel is decoded: what cannot fit is refused
        # now, and what can keeps its place in the queue while it decodes
        height, width = await asyncio.to_thread(
            imaging.probe, data, content_type, max_pixels=settings.max_input_pixels
        )
        out_h, out_w = imaging.output_size(height, width, scale)
        imaging.check_output_pixels(out_h, out_w, settings.max_output_pixels)
        held = engine.hold(height, width, scale, deadline, who=(upload_digest(data), scale))
        try:
            t0 = time.perf_counter()
            decoded = await asyncio.get_running_loop().run_in_executor(
                decoder,
                partial(imaging.decode, data, content_type, max_pixels=settings.max_input_pixels),
            )
            decode_s = time.perf_counter() - t0
            metrics.observe_decode(decode_s)
            if decoded.alpha is not None:
                fmt = _negotiate(accept, alpha=True)
            result = await _upscale_watching_disconnect(
                request, engine, decoded, scale, deadline, held
            )
        finally:
            engine.release(held)
        t0 = time.perf_counter()
        pixels = await asyncio.to_thread(imaging.compose, decoded, result.image)
        composed = time.perf_counter()
        compose_s = composed - t0
        metrics.observe_pixels(model, decoded.width * decoded.height, out_w * out_h)
        stages = [
            ("decode", decode_s),
            ("prepare", result.prepare_seconds),
            ("queue", result.queue_seconds),
            ("inference", result.compute_seconds),
            ("readback", result.readback_seconds),
            ("compose", compose_s),
        ]
        headers = {"X-IMDN-Model": model, "X-IMDN-Crops": str(result.crops), **VARY}
        # the stream keeps the uint8 pixels, not `result` and its float output
        served_s, peak = composed - arrived, result.peak_memory_bytes
        forward_s = result.compute_seconds
        row_scale = scale_key(engine.models[model].descriptor, scale)
        metrics.observe_image_forward(model, forward_s)

        def record(encode_s: float) -> None:  # the report's time excludes the client's reading
            report.record(model, row_scale, served_s + encode_s, forward_s, peak)

        if fmt != "PNG":  # Pillow writes the whole file: buffered, with a Content-Length
            t0 = time.perf_counter()
            encoded = await asyncio.to_thread(
                imaging.encode_lossy, pixels, fmt, quality=quality, icc_profile=decoded.icc_profile
            )
            encode_s = time.perf_counter() - t0
            metrics.observe_encode(encode_s, format=fmt.lower())
            record(encode_s)
            headers["Server-Timing"] = _server_timing([*stages, ("encode", encode_s)])
            metrics.observe_time_to_first_byte(model, time.perf_counter() - arrived)
            status, outcome = 200, "ok"
            return Response(encoded, media_type=MEDIA_TYPES[fmt], headers=headers)
        # checked now, encoded as the body is sent: the first bytes leave once the first
        # rows are compressed, and the encode overlaps the client's reading
        png = imaging.encode_png(
            pixels,
            icc_profile=decoded.icc_profile,
            compress_level=settings.png_compress_level,
            chunk_bytes=STREAM_CHUNK,
            threads=settings.encode_threads,
        )
        # the encode runs after the headers are sent: it is in imdn_encode_seconds
        headers["Server-Timing"] = _server_timing(stages)
        body = _stream(png, model, arrived, metrics, record)
        status, outcome, streaming = 200, "ok", True
        if request.scope.get("http_version") == "1.0":
            # HTTP/1.0 has no chunked encoding (uvicorn would send it anyway): encode it
            # whole, off the event loop, and send it with its Content-Length (the time to
            # first byte recorded is then the time to the first encoded piece)
            whole = await asyncio.to_thread(b"".join, body)
            return Response(whole, media_type="image/png", headers=headers)
        return StreamingResponse(body, media_type="image/png", headers=headers)
    except imaging.ImageError as exc:
        status, outcome = exc.status, "client_error"
        metrics.count_error(exc.reason)
        raise ProblemError(exc.status, exc.reason, exc.detail) from exc
    except ProblemError as exc:
        status, outcome = exc.status, "client_error"
        metrics.count_error(exc.reason)
        raise
    except EngineError as exc:
        status, outcome = engine_error_status(exc)
        metrics.count_error(exc.reason)
        retry = {"Retry-After": f"{exc.retry_after_s:.0f}"} if isinstance(exc, QueueFull) else None
        raise ProblemError(status, exc.reason, str(exc), headers=retry) from exc
    except ClientDisconnect:  # gone mid-upload, or while its image was in the engine
        status, outcome = 499, "cancelled"
        metrics.count_error("client_disconnected")
        log.info("the client left before its answer; its request was dropped")
        return Response(status_code=499)  # nobody reads it; uvicorn drops it
    except asyncio.CancelledError:
        status, outcome = 499, "cancelled"
        metrics.count_error("client_disconnected")
        raise
    except Exception:  # answered 500 by _unexpected_error; counted here, with its model
        metrics.count_error("internal_error")
        raise
    finally:
        metrics.request_finished()
        request.scope[COUNTED] = True
        if not streaming:
            metrics.observe_request(model, status, outcome, time.perf_counter() - arrived)


def _negotiate(accept: str | None, *, alpha: bool) -> str:
    """The output format for `accept` (service/negotiation.py), or a 406 problem."""
    try:
        return choose_format(accept, alpha=alpha)
    except NotAcceptable as exc:
        raise ProblemError(406, "not_acceptable", str(exc), headers=VARY) from exc


def _server_timing(stages: list[tuple[str, float]]) -> str:
    return ", ".join(f"{name};dur={seconds * 1000:.1f}" for name, seconds in stages)


# The engine's errors say what went wrong; this table says what a client is told.
# TooCostly is 413: the request itself is too large for this server (its crops alone
# outlast the deadline at the measured throughput, or outnumber the queue), and sending
# it again will not help; 503 would tell the client to retry.
ENGINE_ERRORS: dict[type[EngineError], tuple[int, str]] = {
    ScaleNotServed: (422, "client_error"),
    TooCostly: (413, "rejected"),
    QueueFull: (429, "rejected"),
    DeadlineExceeded: (504, "timeout"),
    DeviceOutOfMemory: (503, "rejected"),
    NotReady: (503, "rejected"),
}


def engine_error_status(exc: EngineError) -> tuple[int, str]:
    """(HTTP status, request outcome) for an engine error; 500 for one not in the table."""
    for cls in type(exc).__mro__:
        if cls in ENGINE_ERRORS:
            return ENGINE_ERRORS[cls]
    return 500, "error"


async def _upscale_watching_disconnect(
    request: Request,
    engine: Engine,
    decoded: imaging.DecodedImage,
    scale: float,
    deadline: float,
    held: Reservation,
) -> UpscaleResult:
    """Run the upscale, cancelling it (and dropping its queued crops) if the client leaves."""
    return await until_disconnected(
        request,
        engine.upscale(decoded.pixels, scale, grey=decoded.grey, deadline=deadline, hold=held),
    )


async def until_disconnected(request: Request, awaitable: Awaitable[T]) -> T:
    """`awaitable`'s result, cancelling it if the client leaves first (`ClientDisconnect`)."""
    work = asyncio.ensure_future(awaitable)

    async def watch() -> None:
        while not work.done():
            if await request.is_disconnected():
                work.cancel()
                return
            await asyncio.sleep(0.1)

    watcher = asyncio.ensure_future(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if watcher.done() and not watcher.cancelled():  # the watcher cancelled the work
            raise ClientDisconnect() from None
        raise
    finally:
        watcher.cancel()


def _stream(
    png: Iterator[bytes],
    model: str,
    arrived: float,
    metrics: Metrics,
    encoded: Callable[[float], None],
) -> Iterator[bytes]:
    """Encode and send the PNG piece by piece (chunked: its length is known only at the end).

    Records the time to the first byte; once the last byte is out, the encode time (spent
    in the encoder, not waiting for the client), which `encoded` also gets, and the
    request. A client that leaves mid-body is counted as cancelled, an encoder failure
    as an error.
    """
    status, outcome = 499, "cancelled"
    encode_s, first = 0.0, True
    try:
        while True:
            t0 = time.perf_counter()
            chunk = next(png, None)
            encode_s += time.perf_counter() - t0
            if chunk is None:
                break
            if first:
                metrics.observe_time_to_first_byte(model, time.perf_counter() - arrived)
                first = False
            yield chunk
        metrics.observe_encode(encode_s)
        encoded(encode_s)
        status, outcome = 200, "ok"
    except Exception:
        status, outcome = 500, "error"
        log.exception("encoding the PNG failed after its headers were sent")
        raise
    finally:
        metrics.observe_request(model, status, outcome, time.perf_counter() - arrived)


# Error handlers: every error is a problem document, never an HTML page or a bare 500

COUNTED = "imdn.counted"
"""The scope key `_superres` sets once it has counted its request in the metrics."""


def _count_refusal(request: Request, status: int, reason: str) -> None:
    """Count a request refused outside the superres handler (a key, a route, a method,
    its query) under model "unrouted", so that no refusal escapes the request metrics;
    one the handler refused itself is counted there already."""
    metrics: Metrics | None = getattr(request.app.state, "metrics", None)
    if metrics is None or request.scope.get(COUNTED):
        return
    request.scope[COUNTED] = True
    arrived = request.scope.get(ARRIVED, time.perf_counter())
    metrics.observe_unrouted_refusal(status, reason, time.perf_counter() - arrived)


async def _problem_error(request: Request, exc: ProblemError) -> Response:
    _count_refusal(request, exc.status, exc.reason)
    return problem(exc.status, exc.reason, exc.detail, exc.headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    errors = [
        {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
        for e in exc.errors()
    ]
    _count_refusal(request, 422, "invalid_request")
    return problem(422, "invalid_request", errors)


_HTTP_REASONS = {404: "not_found", 405: "method_not_allowed"}


async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    reason = _HTTP_REASONS.get(exc.status_code, "http_error")
    _count_refusal(request, exc.status_code, reason)
    return problem(exc.status_code, reason, exc.detail, getattr(exc, "headers", None))


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    _count_refusal(request, 500, "internal_error")
    return problem(500, "internal_error", "an unexpected error occurred; it has been logged")
