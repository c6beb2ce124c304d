"""Probe a spooled upload before any pixel work: which streams, which codec, what size,
rate, duration and frame count, and whether the first frame decodes.

Sizes and declared counts are checked against the limits from the headers alone (a
header that declares a huge frame size or frame count in a tiny file is refused
before anything is decoded); then the video packets are counted by demuxing only (no
decoding, no pixels), so the frame count the answer announces is the real one; then
the first frame is decoded, which gives its pixel format, rotation and colour tags.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

import av
import av.error

from service.imaging import output_size
from service.video.errors import VideoError, too_large, undecodable, unprocessable, unsupported

if TYPE_CHECKING:
    from service.settings import Settings

CONTAINERS = {"mov,mp4,m4a,3gp,3g2,mj2": "mp4/mov", "matroska,webm": "matroska/webm"}
"""FFmpeg demuxers we accept (the content types of the route name the same families)."""
ANIMATED_IMAGES = {"gif", "webp_pipe", "apng", "png_pipe", "image2", "gif_pipe", "jpeg_pipe"}


@dataclass(frozen=True)
class VideoLimits:
    max_input_pixels: int
    max_output_pixels: int
    max_frames: int
    max_duration_s: float

    @classmethod
    def of(cls, settings: Settings) -> VideoLimits:
        """The server's IMDN_VIDEO_MAX_* limits."""
        return cls(
            settings.video_max_input_pixels,
            settings.video_max_output_pixels,
            settings.video_max_frames,
            settings.video_max_duration_s,
        )


@dataclass(frozen=True)
class VideoInfo:
    """What the pipeline needs to know of the upload, all read before the first frame runs."""

    container: str  # FFmpeg's demuxer name
    codec: str
    width: int  # the decoded frame's size (before rotation: rotation is metadata)
    height: int
    frames: int  # video packets counted in the file
    duration_s: float
    rate: Fraction | None  # average frame rate, where the file says
    time_base: Fraction
    pix_fmt: str
    bits: int  # bits per component of the decoded frames (8, 10, 12)
    rotation: int  # degrees, the display matrix's (0 when none)
    sample_aspect_ratio: Fraction | None
    color_primaries: int
    color_trc: int
    colorspace: int  # the matrix
    color_range: int  # 1 limited (MPEG), 2 full (JPEG), 0 unspecified
    video_index: int
    other_streams: dict[int, str] = field(default_factory=dict)  # index -> "audio:aac"...


def probe(path: Path, limits: VideoLimits, scale: float) -> VideoInfo:
    """The upload's facts, or a `VideoError` (400/413/415/422) saying why not."""
    try:
        container = av.open(str(path), metadata_errors="ignore")
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as exc:
        raise undecodable(f"not a video FFmpeg can read, or a truncated one: {exc}") from None
    with container:
        fmt = container.format.name
        if fmt in ANIMATED_IMAGES:
            raise unsupported(
                f"this is an image ({fmt}), not a video: send an animated GIF/WebP/APNG as "
                "MP4 or WebM (ffmpeg -i anim.gif anim.mp4), or a still to /v1/superres",
                "animated_image",
            )
        if fmt not in CONTAINERS:
            raise unsupported(f"container {fmt!r} is not accepted; send MP4, MOV, WebM or MKV")
        if not container.streams.video:
            raise unprocessable("the file has no video stream", "no_video_stream")
        stream = container.streams.video[0]
        ctx = stream.codec_context
        width, height = ctx.width, ctx.height
        _check_size(width, height, scale, limits)
        declared = stream.frames
        if declared > limits.max_frames:
            raise too_large(
                f"the file declares {declared} frames; limit {limits.max_frames}", "too_many_frames"
            )
        others = {
            s.index: f"{s.type}:{s.codec_context.name if s.codec_context else '?'}"
            for s in container.streams
            if s.index != stream.index
        }
        frames, duration = _count(container, stream, limits)
        if frames == 0:
            raise unprocessable("the video stream has no frames", "no_frames")
        try:
            container.seek(0)
            first = next(container.decode(stream), None)
        except (av.error.FFmpegError, StopIteration) as exc:
            raise undecodable(f"the first frame does not decode: {exc}") from None
        if first is None:
            raise undecodable("no frame of the video stream decodes")
        if any(c.is_alpha for c in first.format.components):
            raise unprocessable(
                f"the video has an alpha channel ({first.format.name}); transparency in "
                "video is not kept by this service: flatten it first",
                "alpha_unsupported",
            )
        _check_size(first.width, first.height, scale, limits)
        rate = stream.average_rate
        return VideoInfo(
            container=fmt,
            codec=ctx.name,
            width=first.width,
            height=first.height,
            frames=frames,
            duration_s=duration,
            rate=Fraction(rate) if rate else None,
            time_base=Fraction(stream.time_base or Fraction(1, 90000)),
            pix_fmt=first.format.name,
            bits=max(c.bits for c in first.format.components),
            rotation=int(first.rotation or 0),
            sample_aspect_ratio=Fraction(ctx.sample_aspect_ratio)
            if ctx.sample_aspect_ratio
            else None,
            color_primaries=int(first.color_primaries or 2),
            color_trc=int(first.color_trc or 2),
            colorspace=int(first.colorspace or 2),
            color_range=int(first.color_range or 0),
            video_index=stream.index,
            other_streams=others,
        )


def _check_size(width: int, height: int, scale: float, limits: VideoLimits) -> None:
    if width < 1 or height < 1:
        raise undecodable(f"the video stream declares no frame size ({width}x{height})")
    if width * height > limits.max_input_pixels:
        raise too_large(
            f"frames are {width}x{height} = {width * height} pixels; "
            f"limit {limits.max_input_pixels}",
            "too_many_pixels",
        )
    out_h, out_w = output_size(height, width, scale)
    if out_h * out_w > limits.max_output_pixels:
        raise too_large(
            f"output frames would be {out_w}x{out_h} = {out_h * out_w} pixels; "
            f"limit {limits.max_output_pixels}",
            "output_too_large",
        )


def _count(
    container: av.container.InputContainer, stream: av.VideoStream, limits: VideoLimits
) -> tuple[int, float]:
    """(video packets, seconds from the first timestamp to the end of the last frame),
    demuxing only; refused as soon as either passes its limit."""
    frames, first, last = 0, math.inf, -math.inf
    tb = float(stream.time_base or Fraction(1, 90000))
    try:
        for packet in container.demux(stream):
            if packet.size == 0:  # the demuxer's flush packet
                continue
            frames += 1
            if frames > limits.max_frames:
                raise too_large(
                    f"the video has more than {limits.max_frames} frames", "too_many_frames"
                )
            if packet.pts is not None:
                first = min(first, packet.pts * tb)
                last = max(last, (packet.pts + max(packet.duration or 0, 0)) * tb)
                if last - first > limits.max_duration_s:
                    raise too_large(
                        f"the video is longer than {limits.max_duration_s:g}s", "too_long"
                    )
    except av.error.FFmpegError as exc:
        raise undecodable(f"the file is damaged after {frames} frames: {exc}") from None
    duration = max(0.0, last - first) if frames and math.isfinite(first) else 0.0
    return frames, duration


__all__ = ["VideoError", "VideoInfo", "VideoLimits", "probe"]
