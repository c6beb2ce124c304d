"""Tiny video files made with PyAV for the video tests (nothing is shipped)."""

from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np

TIME_BASE = Fraction(1, 1000)


def frame_pixels(i: int, h: int, w: int) -> np.ndarray:
    """A frame with edges and colour that change from frame to frame."""
    y, x = np.mgrid[0:h, 0:w]
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = (x * 255 // max(1, w - 1)).astype(np.uint8)
    img[..., 1] = ((y * 7 + i * 23) % 256).astype(np.uint8)
    img[h // 4 : 3 * h // 4, (i % w) // 2 + w // 4 : (i % w) // 2 + w // 2, 2] = 220
    return img


def make_clip(
    *,
    width: int = 32,
    height: int = 24,
    frames: int = 12,
    vfr: bool = True,
    audio: str | None = "aac",
    rotation: int = 0,
    container: str = "mp4",
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    sample_aspect_ratio: Fraction | None = None,
    start_ms: int = 0,
    b_frames: int = 0,
) -> tuple[bytes, list[float]]:
    """(file bytes, each frame's time in seconds). VFR: every third gap is 100 ms, the
    others 40 ms; the first frame at `start_ms`. The audio is a 440 Hz tone as long as
    the video."""
    buf = io.BytesIO()
    out = av.open(buf, "w", format=container)
    vs = out.add_stream(codec, rate=25)
    vs.width, vs.height, vs.pix_fmt = width, height, pix_fmt
    vs.time_base = TIME_BASE
    vs.codec_context.time_base = TIME_BASE
    vs.codec_context.max_b_frames = b_frames
    vs.codec_context.color_primaries = vs.codec_context.color_trc = 1
    vs.codec_context.colorspace = 1
    if sample_aspect_ratio is not None:
        vs.codec_context.sample_aspect_ratio = sample_aspect_ratio
    if rotation:
        vs.set_display_rotation(rotation)
    aus = out.add_stream(audio, rate=48000) if audio else None
    if aus is not None:
        aus.layout = "mono"
    times, pts = [], start_ms
    for i in range(frames):
        f = av.VideoFrame.from_ndarray(frame_pixels(i, height, width), format="rgb24")
        f.pts, f.time_base = pts, TIME_BASE
        times.append(pts / 1000)
        pts += 100 if (vfr and i % 3 == 2) else 40
        for p in vs.encode(f.reformat(format=pix_fmt, dst_colorspace=1)):
            out.mux(p)
    for p in vs.encode():
        out.mux(p)
    if aus is not None:
        samples = (pts - start_ms) * 48
        for start in range(0, samples, 960):
            k = min(960, samples - start)
            t = np.arange(start, start + k) / 48000
            tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]
            af = av.AudioFrame.from_ndarray(tone, format="fltp", layout="mono")
            af.sample_rate, af.time_base = 48000, Fraction(1, 48000)
            af.pts = start + start_ms * 48
            for p in aus.encode(af):
                out.mux(p)
        for p in aus.encode():
            out.mux(p)
    out.close()
    return buf.getvalue(), times


def audio_packets(data: bytes) -> list[bytes]:
    with av.open(io.BytesIO(data)) as c:
        if not c.streams.audio:
            return []
        return [bytes(p) for p in c.demux(c.streams.audio[0]) if p.dts is not None]


def decoded_frames(data: bytes) -> list[av.VideoFrame]:
    with av.open(io.BytesIO(data)) as c:
        return list(c.decode(video=0))
