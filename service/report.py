"""Table 6 of the paper, live: per model and scale, parameters, depth, time per image
and peak memory, each figure saying what it measures; and per model, scale and frame
size, the same figures per frame of the videos served.

The HTTP layer records each served image here, and the video route each completed
video; `/v1/report` renders them as JSON or Markdown. `imdn bench` renders its offline
measurements with the same table.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from models.networks.descriptor import ModelDescriptor

WINDOW = 10_000  # images kept per (model, scale) for the mean and quantiles
MAX_SCALES = 64  # (model, scale) rows kept; IMDN_AS scales beyond are pooled as "other"
MAX_VIDEO_ROWS = 64  # (model, scale, frame size) rows kept; others pooled as "other", "other"
MIB = 2**20

MEASURES: dict[str, str] = {
    "parameters": "learnable parameters of the network",
    "depth": "conv layers on the network's longest path",
    "requests": "images served with 200 since the start",
    "forward_*_seconds": "per image: device compute (synchronised) of the batches that "
    "carried its crops, as the paper times a network; a batch shared with other images "
    f"counts whole for each. Mean, median and 95th percentile of the last {WINDOW:,} images",
    "request_*_seconds": "per image: from the request's arrival to its PNG encoded (body "
    "read, decode, queue wait, forward, stitching, encode), without the client's reading "
    "of the response. Same statistics",
    "peak_memory_mib": "largest per-batch peak among the images served, in MiB (2^20 "
    "bytes): on CUDA the allocator's peak of allocated device memory (weights, inputs, "
    "activations, outputs); on the CPU the process's resident high-water mark during "
    "the batch (the whole process, so an upper bound)",
    "video_frame_size": "the input frames' width x height as decoded (before any rotation "
    "tag, which is metadata); each row is one model, scale and frame size",
    "video_videos": "videos of that row streamed to their end (200, the stream complete)",
    "video_frames": "frames of those videos upscaled and encoded",
    "video_forward_*_seconds": "per frame: device compute (synchronised) of the batches "
    "that carried the frame's crops (a batch shared with other frames or images counts "
    f"whole for each). Mean, median and 95th percentile of the last {WINDOW:,} frames",
    "video_request_*_seconds": "per frame: a video's whole time, from the request's arrival "
    "to its last fragment encoded (upload spooled, probe, decode, queue wait, forward, "
    "encode, overlapping; the stream is paced by the client's reading), divided by its "
    f"frames: one value per video. Same statistics, over the last {WINDOW:,} videos",
    "video_peak_memory_mib": "largest per-batch peak among those videos' frames, in MiB, "
    "measured as for images (peak_memory_mib)",
}


def scale_key(model: ModelDescriptor, scale: float) -> str:
    """A row's scale: a fixed model's own, or IMDN_AS's requested scale to 2 decimals."""
    return f"{round(scale, 2):g}" if model.any_scale else str(model.scale)


@dataclass
class _Stats:
    requests: int = 0
    seconds: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    forward: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    peak_memory_bytes: int = 0


@dataclass(frozen=True)
class ReportRow:
    model: str
    scale: str
    parameters: int
    depth: int
    requests: int
    forward_mean_seconds: float | None
    forward_p50_seconds: float | None
    forward_p95_seconds: float | None
    request_mean_seconds: float | None
    request_p50_seconds: float | None
    request_p95_seconds: float | None
    peak_memory_mib: float | None

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


@dataclass
class _VideoStats:
    videos: int = 0
    frames: int = 0
    forward: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    per_frame: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    peak_memory_bytes: int = 0


@dataclass(frozen=True)
class VideoReportRow:
    model: str
    scale: str
    frame_size: str  # "WxH", or "other" for a row pooled past MAX_VIDEO_ROWS
    videos: int
    frames: int
    forward_mean_seconds: float | None
    forward_p50_seconds: float | None
    forward_p95_seconds: float | None
    request_mean_seconds: float | None
    request_p50_seconds: float | None
    request_p95_seconds: float | None
    peak_memory_mib: float | None

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def _summary(values: Iterable[float]) -> tuple[float | None, float | None, float | None]:
    a = np.asarray(list(values), dtype=np.float64)
    if not a.size:
        return None, None, None
    return float(a.mean()), float(np.percentile(a, 50)), float(np.percentile(a, 95))


class Report:
    """Per (model, scale) running statistics of served images (thread-safe)."""

    def __init__(self) -> None:
        self._stats: dict[tuple[str, str], _Stats] = {}
        self._videos: dict[tuple[str, str, str], _VideoStats] = {}
        self._lock = threading.Lock()

    def record(
        self,
        model: str,
        scale: str,
        seconds: float,
        forward_seconds: float,
        peak_memory_bytes: int,
    ) -> None:
        """One served image: `scale` from `scale_key`, its request and forward times."""
        with self._lock:
            key = (model, scale)
            if key not in self._stats and len(self._stats) >= MAX_SCALES:
                key = (model, "other")
            stats = self._stats.setdefault(key, _Stats())
            stats.requests += 1
            stats.seconds.append(seconds)
            stats.forward.append(forward_seconds)
            stats.peak_memory_bytes = max(stats.peak_memory_bytes, peak_memory_bytes)

    def record_video(
        self,
        model: str,
        scale: str,
        frame_size: tuple[int, int],
        frames: int,
        seconds: float,
        forward_seconds: Iterable[float],
        peak_memory_bytes: int,
    ) -> None:
        """One video streamed to its end: `frame_size` (W, H) as decoded, its frame count
        and whole time, its frames' forward times (the last WINDOW are enough), the
        largest batch peak of its frames."""
        if frames < 1:
            return
        with self._lock:
            key = (model, scale, f"{frame_size[0]}x{frame_size[1]}")
            if key not in self._videos and len(self._videos) >= MAX_VIDEO_ROWS:
                key = (model, "other", "other")
            stats = self._videos.setdefault(key, _VideoStats())
            stats.videos += 1
            stats.frames += frames
            stats.forward.extend(forward_seconds)
            stats.per_frame.append(seconds / frames)
            stats.peak_memory_bytes = max(stats.peak_memory_bytes, peak_memory_bytes)

    def video_rows(self, models: Iterable[str]) -> list[VideoReportRow]:
        """Rows of the videos served, by model in `models`' order, then scale, then
        frame pixels (pooled rows last); none for a model that served no video."""

        def order(key: tuple[str, str, str]) -> tuple[bool, float, int, str]:
            _, scale, size = key
            if size == "other":
                return True, 0.0, 0, size
            w, h = (int(v) for v in size.split("x"))
            return False, float(scale), w * h, size

        rows = []
        with self._lock:
            for name in models:
                for key in sorted((k for k in self._videos if k[0] == name), key=order):
                    stats = self._videos[key]
                    rows.append(
                        VideoReportRow(
                            *key,
                            stats.videos,
                            stats.frames,
                            *_summary(stats.forward),
                            *_summary(stats.per_frame),
                            stats.peak_memory_bytes / MIB,
                        )
                    )
        return rows

    def rows(self, models: Iterable[ModelDescriptor]) -> list[ReportRow]:
        """Rows for `models`, in that order, one per scale served (one empty row, at the
        scale the model serves, for a model that served nothing yet)."""
        rows = []
        with self._lock:
            for d in models:
                served = sorted(
                    (key[1] for key in self._stats if key[0] == d.name),
                    key=lambda s: (s == "other", float(s) if s != "other" else 0.0),
                )
                for scale in served or [str(d.served_scale)]:
                    stats = self._stats.get((d.name, scale), _Stats())
                    forward, request = _summary(stats.forward), _summary(stats.seconds)
                    rows.append(
                        ReportRow(
                            d.name,
                            scale,
                            d.parameters,
                            d.depth,
                            stats.requests,
                            *forward,
                            *request,
                            stats.peak_memory_bytes / MIB if stats.requests else None,
                        )
                    )
        return rows


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub-flavoured Markdown table; floats with 4 significant decimals, None as '—'."""

    def cell(v: object) -> str:
        if v is None:
            return "—"
        if isinstance(v, float):
            return f"{v:.4f}" if abs(v) < 100 else f"{v:.1f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


REPORT_HEADER = (
    "model", "scale", "params", "depth", "requests",
    "forward p50 s", "forward p95 s", "request p50 s", "request p95 s", "peak MiB",
)  # fmt: skip
VIDEO_HEADER = (
    "model", "scale", "frame size", "videos", "frames",
    "forward p50 s/frame", "forward p95 s/frame", "request p50 s/frame",
    "request p95 s/frame", "peak MiB",
)  # fmt: skip
_TIMES = (
    "forward_p50_seconds", "forward_p95_seconds", "request_p50_seconds",
    "request_p95_seconds", "peak_memory_mib",
)  # fmt: skip


def _section(
    header: Sequence[str],
    rows: Iterable[object],
    fields: Sequence[str],
    notes: Iterable[tuple[str, str]],
) -> str:
    """A table of `rows`' `fields` under `header`, then each (column, MEASURES key) note."""
    table = markdown_table(header, ([getattr(r, f) for f in fields] for r in rows))
    said = "\n".join(f"- **{name}**: {MEASURES[key]}." for name, key in notes)
    return f"{table}\n{said}\n"


def video_markdown(rows: Sequence[VideoReportRow]) -> str:
    """The videos' table (a sentence while none was served) and what its columns measure."""
    if not rows:
        return "Videos: none streamed to their end yet.\n"
    section = _section(
        VIDEO_HEADER,
        rows,
        ("model", "scale", "frame_size", "videos", "frames", *_TIMES),
        (
            ("frame size", "video_frame_size"),
            ("videos", "video_videos"),
            ("frames", "video_frames"),
            ("forward", "video_forward_*_seconds"),
            ("request", "video_request_*_seconds"),
            ("peak MiB", "video_peak_memory_mib"),
        ),
    )
    return f"Videos, per frame:\n\n{section}"


def report_markdown(
    rows: Sequence[ReportRow],
    *,
    device: str,
    precision: str,
    videos: Sequence[VideoReportRow] = (),
) -> str:
    """The table, preceded by the device and precision and followed by what each
    column measures; then the videos' table."""
    section = _section(
        REPORT_HEADER,
        rows,
        ("model", "scale", "parameters", "depth", "requests", *_TIMES),
        (
            ("forward", "forward_*_seconds"),
            ("request", "request_*_seconds"),
            ("peak MiB", "peak_memory_mib"),
            ("requests", "requests"),
            ("depth", "depth"),
        ),
    )
    images = f"Device: {device}. Precision: {precision}.\n\n{section}"
    return f"{images}\n{video_markdown(videos)}"
