"""Video metrics, registered in the app's registry beside the image ones
(`imdn_video_*`): frames, video seconds in and out, frames per second of each video,
time per stage, and how videos ended (an aborted stream is counted by its cause)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from service.metrics import seconds_buckets

STAGES = ("decode", "queue", "compute", "encode")
ABORT_REASONS = ("deadline_exceeded", "undecodable_video", "internal_error")
"""The usual causes of a cut stream, whose series exist from the start (others appear)."""
VIDEO_OUTCOMES = ("ok", "refused", "aborted", "cancelled")


class VideoMetrics:
    def __init__(self, registry: CollectorRegistry, timeout_s: float = 3600.0) -> None:
        r = registry
        self.videos = Counter(
            "imdn_video_requests",
            "Video requests by how they ended: ok, refused (a problem answer before the "
            "body), aborted (the stream cut: deadline, decode error), cancelled (client left).",
            ["outcome"],
            registry=r,
        )
        self.aborted = Counter(
            "imdn_video_aborted",
            "Video streams cut after their first bytes, by reason.",
            ["reason"],
            registry=r,
        )
        self.frames = Counter(
            "imdn_video_frames", "Video frames upscaled and encoded.", ["model"], registry=r
        )
        self.seconds_in = Counter(
            "imdn_video_seconds_in", "Seconds of video received (probed duration).", registry=r
        )
        self.seconds_out = Counter(
            "imdn_video_seconds_out", "Seconds of video encoded and sent.", registry=r
        )
        self.stage_seconds = Counter(
            "imdn_video_stage_seconds",
            "Time per stage summed over frames: decode, queue (batch queue wait), compute "
            "(the frame's batches on the device), encode.",
            ["stage"],
            registry=r,
        )
        self.fps = Histogram(
            "imdn_video_frames_per_second",
            "Frames per second of each finished video, end to end.",
            buckets=(0.1, 0.3, 1, 2, 3, 5, 10, 15, 24, 30, 48, 60, 90, 120, 240, 480),
            registry=r,
        )
        self.duration = Histogram(
            "imdn_video_request_duration_seconds",
            "Whole video request, arrival to last byte.",
            buckets=seconds_buckets(timeout_s, lowest=0.01),
            registry=r,
        )
        for outcome in VIDEO_OUTCOMES:
            self.videos.labels(outcome=outcome)
        for stage in STAGES:
            self.stage_seconds.labels(stage=stage)
        for reason in ABORT_REASONS:
            self.aborted.labels(reason=reason)
