"""`POST /v1/superres/video?scale=S`: a video in, the upscaled video streamed back.

The HTTP side of the video pipeline, kept out of `service/api.py` (a room of its own:
the route reads as one page). The body (raw, or a multipart field `video`) is spooled
to a temporary file under a byte cap (an MP4's index may sit at its end), probed, and
refused with a problem document before any frame runs if it is over a limit; then the
first fragment is made before the answer starts, so that anything wrong with the first
frame is a problem answer too. After the first byte, a deadline or a decode error cuts
the stream (no final empty chunk: the client can tell it is incomplete), counted in
`imdn_video_aborted_total` and logged. The temporary file goes whatever happens.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from pathlib import Path
from typing import Annotated, BinaryIO, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response, StreamingResponse
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from service import video
from service.api import (
    Authorized,
    EngineDep,
    ProblemError,
    SettingsDep,
    engine_error_status,
    problem_response,
    until_disconnected,
)
from service.engine import EngineError, QueueFull
from service.report import Report, scale_key
from service.video.errors import VideoError
from service.video.metrics import VideoMetrics

log = logging.getLogger(__name__)

VIDEO_TYPES = ("video/mp4", "video/quicktime", "video/webm", "video/x-matroska")
FRAMES_HEADER = "X-IMDN-Frames"
CodecName = Literal["h264", "hevc", "av1", "vp9"]

router = APIRouter()


def video_metrics(request: Request) -> VideoMetrics:
    """The app's video metrics (`create_app` registers them beside the image ones)."""
    metrics: VideoMetrics = request.app.state.video_metrics
    return metrics


@router.post(
    "/v1/superres/video",
    tags=["superres"],
    dependencies=Authorized,
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {"video/mp4": {}, "video/webm": {}},
            "description": "the upscaled video, streamed as its fragments are encoded; "
            f"{FRAMES_HEADER} gives the frame count",
        },
        **{
            code: problem_response(text)
            for code, text in (
                (400, "undecodable video"),
                (401, "missing or wrong API key"),
                (406, "Accept allows none of the codec's container"),
                (408, "the body stalled"),
                (413, "upload, frame size, frame count or duration over a limit"),
                (415, "not a video type or container we take; an animated image"),
                (422, "bad scale, codec or crf; no video stream, no frames, alpha"),
                (429, "queue full: retry after Retry-After seconds"),
                (501, "PyAV (the 'video' extra) is not installed"),
                (503, "not ready"),
                (504, "deadline exceeded before the first byte"),
            )
        },
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                **{t: {"schema": {"type": "string", "format": "binary"}} for t in VIDEO_TYPES},
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["video"],
                        "properties": {"video": {"type": "string", "format": "binary"}},
                    }
                },
            },
        }
    },
)
async def superres_video(
    request: Request,
    engine: EngineDep,
    settings: SettingsDep,
    scale: float = Query(description="as for images: 2, 3, 4, or any in (1, max] with IMDN_AS"),
    codec: Annotated[
        CodecName | None,
        Query(description="h264 (default), hevc, av1 (MP4) or vp9 (WebM); default from Accept"),
    ] = None,
    crf: int | None = Query(None, ge=0, le=63, description="quality: lower is better"),
) -> Response:
    """Upscale every frame of a video; the answer keeps its audio, timestamps, rotation,
    aspect and colour tags (docs/video.md)."""
    metrics = video_metrics(request)
    arrived = time.perf_counter()
    if not video.available():
        metrics.videos.labels(outcome="refused").inc()
        raise ProblemError(
            501, "video_unavailable", f"{video.INSTALL_HINT}, then restart the server"
        )
    from service.video.encode import CODECS
    from service.video.pipeline import VideoJob, VideoStats, upscale_video
    from service.video.probe import VideoLimits, probe

    path: Path | None = None
    try:
        if not math.isfinite(scale) or not 1 < scale <= settings.max_scale:
            raise ProblemError(
                422, "scale_out_of_range", f"scale must be a number in (1, {settings.max_scale:g}]"
            )
        model = engine.model_name(scale)
        chosen = CODECS[codec or _codec_from_accept(request.headers.get("accept"))]
        _check_accept(request.headers.get("accept"), chosen.media_type)
        if crf is not None and crf > chosen.max_crf:
            raise ProblemError(422, "bad_crf", f"crf for {chosen.name} is 0..{chosen.max_crf}")
        path = await spool(
            request,
            settings.video_max_upload_bytes,
            settings.body_read_timeout_s,
            settings.video_temp_dir,
        )
        info = await asyncio.to_thread(probe, path, VideoLimits.of(settings), scale)
        job = VideoJob.for_engine(engine, path, info, scale, chosen, crf, arrived)
        stats = VideoStats()
        stream = upscale_video(engine, job, stats)
        first = await _first_chunk(request, stream)
    except BaseException as exc:
        if path is not None:
            path.unlink(missing_ok=True)
        outcome = (
            "cancelled"
            if isinstance(exc, ClientDisconnect | asyncio.CancelledError)
            else ("refused")
        )
        metrics.videos.labels(outcome=outcome).inc()
        if isinstance(exc, VideoError):
            raise ProblemError(exc.status, exc.reason, exc.detail) from exc
        if isinstance(exc, EngineError):
            status, _ = engine_error_status(exc)
            retry = (
                {"Retry-After": f"{exc.retry_after_s:.0f}"} if isinstance(exc, QueueFull) else None
            )
            raise ProblemError(status, exc.reason, str(exc), headers=retry) from exc
        if isinstance(exc, ClientDisconnect):
            return Response(status_code=499)
        raise
    metrics.seconds_in.inc(info.duration_s)
    out_h, out_w = job.output_size
    headers = {
        FRAMES_HEADER: str(info.frames),
        "X-IMDN-Output-Size": f"{out_w}x{out_h}",
        "X-IMDN-Codec": f"{chosen.name} ({job.encoder})",
    }
    if stats.model:
        headers["X-IMDN-Model"] = stats.model
    if stats.dropped_streams:
        headers["X-IMDN-Dropped-Streams"] = ", ".join(stats.dropped_streams)
    report: Report = request.app.state.report
    row_scale = scale_key(engine.models[model].descriptor, scale)

    def record(seconds: float) -> None:  # a video streamed to its end: a Table 6 video row
        report.record_video(
            model,
            row_scale,
            (info.width, info.height),
            stats.frames,
            seconds,
            stats.forward_s,
            stats.peak_memory_bytes,
        )

    body = _body(first, stream, path, stats, metrics, arrived, record)
    return StreamingResponse(body, media_type=chosen.media_type, headers=headers)


def _codec_from_accept(accept: str | None) -> str:
    """vp9 (WebM) where Accept names video/webm before video/mp4, else h264."""
    if not accept:
        return "h264"
    types = [part.split(";")[0].strip().lower() for part in accept.split(",")]
    if "video/webm" in types and (
        "video/mp4" not in types or types.index("video/webm") < types.index("video/mp4")
    ):
        return "vp9"
    return "h264"


def _check_accept(accept: str | None, media_type: str) -> None:
    if not accept:
        return
    types = {part.split(";")[0].strip().lower() for part in accept.split(",")}
    if types & {media_type, "video/*", "*/*"}:
        return
    raise ProblemError(
        406, "not_acceptable", f"this codec's answer is {media_type}, which Accept excludes"
    )


async def spool(request: Request, limit: int, timeout_s: float, folder: Path | None) -> Path:
    """The body (raw, or the multipart field `video`) in a new temporary file, refused
    (413) past `limit` bytes and (408) after `timeout_s` without a piece; the file is
    removed if anything goes wrong."""
    content_type = (request.headers.get("content-type") or "").lower()
    multipart = content_type.startswith("multipart/form-data")
    media = content_type.split(";")[0].strip()
    if not multipart and media not in (*VIDEO_TYPES, "application/octet-stream", ""):
        raise ProblemError(
            415,
            "unsupported_video_type",
            f"content type {media!r} is not a video we take: {', '.join(VIDEO_TYPES)}",
        )
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ProblemError(413, "body_too_large", f"the body is {declared} bytes; limit {limit}")
    fd, name = tempfile.mkstemp(prefix="imdn-video-", suffix=".upload", dir=folder)
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as out:
            if multipart:
                await _spool_multipart(request, _capped(request, limit, timeout_s), out)
            else:
                async for chunk in _capped(request, limit, timeout_s):
                    out.write(chunk)
        if path.stat().st_size == 0:
            raise ProblemError(400, "empty_video", "the body is empty")
        return path
    except BaseException:
        path.unlink(missing_ok=True)
        raise


async def _capped(request: Request, limit: int, timeout_s: float) -> AsyncGenerator[bytes, None]:
    size = 0
    pieces = request.stream()
    while True:
        try:
            chunk = await asyncio.wait_for(anext(pieces), timeout_s)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise ProblemError(
                408,
                "body_timeout",
                f"no part of the body arrived for {timeout_s:g}s; send it without pauses",
                headers={"Connection": "close"},
            ) from None
        size += len(chunk)
        if size > limit:
            raise ProblemError(413, "body_too_large", f"the body exceeds the {limit}-byte limit")
        yield chunk


async def _spool_multipart(
    request: Request, body: AsyncGenerator[bytes, None], out: BinaryIO
) -> None:
    try:
        form = await MultiPartParser(request.headers, body, max_files=2, max_fields=16).parse()
    except MultiPartException as exc:
        raise ProblemError(400, "bad_multipart", f"the multipart body is malformed: {exc}") from exc
    try:
        fields = form.getlist("video")
        if len(fields) != 1 or not isinstance(fields[0], UploadFile):
            raise ProblemError(
                422, "missing_video_field", "a multipart body needs one file field named 'video'"
            )
        source = fields[0].file
        await asyncio.to_thread(lambda: shutil.copyfileobj(source, out))
    finally:
        await form.close()


async def _first_chunk(request: Request, stream: AsyncGenerator[bytes, None]) -> bytes:
    """The stream's first bytes (the header and first fragment), or the error before them;
    the work stops if the client leaves meanwhile."""
    try:
        return await until_disconnected(request, anext(stream, b""))
    except BaseException:
        await stream.aclose()
        raise


async def _body(
    first: bytes,
    stream: AsyncGenerator[bytes, None],
    path: Path,
    stats: object,
    metrics: VideoMetrics,
    arrived: float,
    record: Callable[[float], None],
) -> AsyncIterator[bytes]:
    from service.video.pipeline import VideoStats

    assert isinstance(stats, VideoStats)
    outcome = "cancelled"
    try:
        if first:
            yield first
        async for chunk in stream:
            yield chunk
        outcome = "ok"
    except (VideoError, EngineError) as exc:
        outcome = "aborted"
        reason = exc.reason
        metrics.aborted.labels(reason=reason).inc()
        log.warning("video stream cut after %d frames (%s): %s", stats.frames, reason, exc)
        raise
    except Exception as exc:
        outcome = "aborted"
        metrics.aborted.labels(reason="internal_error").inc()
        log.exception("video stream failed after %d frames", stats.frames)
        raise exc
    finally:
        stats.stop()  # at once: no await can run in a cancelled scope
        path.unlink(missing_ok=True)
        metrics.videos.labels(outcome=outcome).inc()
        if stats.frames:
            metrics.frames.labels(model=stats.model or "unknown").inc(stats.frames)
        metrics.seconds_out.inc(stats.seconds_out)
        for stage in ("decode", "queue", "compute", "encode"):
            metrics.stage_seconds.labels(stage=stage).inc(getattr(stats, f"{stage}_s"))
        if outcome == "ok":
            metrics.fps.observe(stats.frames_per_second())
            record(time.perf_counter() - arrived)
        metrics.duration.observe(time.perf_counter() - arrived)
