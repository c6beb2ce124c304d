"""Prometheus metrics of the service, each app owning its own registry.

Every stage of a request is timed separately (queue wait apart from compute, time to
first byte apart from the whole request), so a latency rise can be traced to its
stage. prometheus-client does the work; this module only names the metrics, picks
buckets that suit super-resolution (milliseconds for a small crop, up to a minute for
a large image on the CPU) and gives the engine and the API small methods to call.
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.exposition import choose_encoder

# Seconds: from a few milliseconds (one small crop on a GPU) to a minute (a large image
# on the CPU); the request timeout defaults to 120 s, which lands in +Inf.
SECONDS_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0,
)  # fmt: skip
# Decoding and encoding are cheaper than inference: finer at the low end.
CODEC_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_SIZE_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64)

OUTCOMES: tuple[str, ...] = ("ok", "client_error", "rejected", "timeout", "cancelled", "error")
"""Values of `imdn_requests_total{outcome}`: how a request ended."""
ENCODE_FORMATS: tuple[str, ...] = ("png", "webp", "jpeg")
"""Values of `imdn_encode_seconds{format}`."""


class Metrics:
    """All metrics of one app, in a registry of their own.

    Several apps (or tests) in one process each create a `Metrics` and never collide.
    """

    def __init__(self) -> None:
        # `*_created` gauges would double the series in the classic text format for a
        # timestamp that Prometheus never uses; prometheus-client only offers a
        # process-wide switch, and the service wants it off everywhere.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry

        # Histograms
        self.request_duration = Histogram(
            "imdn_request_duration_seconds",
            "Whole request, from the body read to the last byte sent, by HTTP status.",
            ["model", "status"],
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.time_to_first_byte = Histogram(
            "imdn_time_to_first_byte_seconds",
            "From the request's arrival to the first byte of the response body.",
            ["model"],
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "imdn_queue_wait_seconds",
            "Time a crop waited in the batch queue before its batch started.",
            ["model"],
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.compute = Histogram(
            "imdn_compute_seconds",
            "Device compute of one batch (synchronised), per model.",
            ["model"],
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.decode = Histogram(
            "imdn_decode_seconds",
            "Decoding one uploaded image.",
            buckets=CODEC_BUCKETS,
            registry=r,
        )
        self.encode = Histogram(
            "imdn_encode_seconds",
            "Encoding one output image, by format (png, webp, jpeg).",
            ["format"],
            buckets=CODEC_BUCKETS,
            registry=r,
        )
        for fmt in ENCODE_FORMATS:  # every format's series from the start
            self.encode.labels(format=fmt)
        self.batch_size = Histogram(
            "imdn_batch_size",
            "Crops per batch sent to the device.",
            ["model"],
            buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )

        # Gauges
        self.queue_depth = Gauge(
            "imdn_queue_depth", "Crops waiting in the batch queue.", registry=r
        )
        self.requests_in_flight = Gauge(
            "imdn_requests_in_flight", "Super-resolution requests being served now.", registry=r
        )
        self.peak_memory = Gauge(
            "imdn_peak_memory_bytes",
            "Peak device memory of the last batch (CUDA allocator peak, reset per batch; "
            "on the CPU the process's resident memory).",
            ["model", "device"],
            registry=r,
        )
        self.model_load = Gauge(
            "imdn_model_load_seconds",
            "Time to load and verify the checkpoint.",
            ["model"],
            registry=r,
        )
        self.model_warmup = Gauge(
            "imdn_model_warmup_seconds",
            "Time of the warm-up passes.",
            ["model"],
            registry=r,
        )
        self.ready = Gauge("imdn_ready", "1 once every model is loaded and warm.", registry=r)

        # Counters (prometheus-client appends `_total`)
        self.requests = Counter(
            "imdn_requests",
            "Super-resolution requests by how they ended.",
            ["model", "outcome"],
            registry=r,
        )
        self.input_pixels = Counter(
            "imdn_input_pixels", "Pixels of decoded input images.", ["model"], registry=r
        )
        self.output_pixels = Counter(
            "imdn_output_pixels", "Pixels of output images.", ["model"], registry=r
        )
        self.errors = Counter("imdn_errors", "Errors by reason.", ["reason"], registry=r)
        self.batches = Counter("imdn_batches", "Batches run on the device.", ["model"], registry=r)

    # Model life cycle

    def model_loaded(self, model: str, load_seconds: float, warmup_seconds: float) -> None:
        """Record a model's load and warm-up, and start its counters at zero.

        Series that exist from the start let `rate()` and ratios return 0 instead of
        nothing before the first request of a kind.
        """
        self.model_load.labels(model=model).set(load_seconds)
        self.model_warmup.labels(model=model).set(warmup_seconds)
        for outcome in OUTCOMES:
            self.requests.labels(model=model, outcome=outcome)
        self.input_pixels.labels(model=model)
        self.output_pixels.labels(model=model)
        self.batches.labels(model=model)

    def set_ready(self, ready: bool) -> None:
        self.ready.set(1 if ready else 0)

    # Requests

    def observe_request(self, model: str, status: int, outcome: str, seconds: float) -> None:
        """A finished request: its duration by HTTP status, and its outcome counted."""
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}; expected one of {OUTCOMES}")
        self.request_duration.labels(model=model, status=str(status)).observe(seconds)
        self.requests.labels(model=model, outcome=outcome).inc()

    def observe_time_to_first_byte(self, model: str, seconds: float) -> None:
        self.time_to_first_byte.labels(model=model).observe(seconds)

    def observe_pixels(self, model: str, input_pixels: int, output_pixels: int) -> None:
        self.input_pixels.labels(model=model).inc(input_pixels)
        self.output_pixels.labels(model=model).inc(output_pixels)

    def observe_decode(self, seconds: float) -> None:
        self.decode.observe(seconds)

    def observe_encode(self, seconds: float, *, format: str = "png") -> None:
        if format not in ENCODE_FORMATS:
            raise ValueError(f"unknown format {format!r}; expected one of {ENCODE_FORMATS}")
        self.encode.labels(format=format).observe(seconds)

    def count_error(self, reason: str) -> None:
        self.errors.labels(reason=reason).inc()

    def request_started(self) -> None:
        self.requests_in_flight.inc()

    def request_finished(self) -> None:
        self.requests_in_flight.dec()

    # Batch queue and device

    def set_queue_depth(self, crops: int) -> None:
        self.queue_depth.set(crops)

    def observe_queue_wait(self, model: str, seconds: float) -> None:
        self.queue_wait.labels(model=model).observe(seconds)

    def observe_batch(
        self, model: str, size: int, seconds: float, peak_bytes: int, device: str
    ) -> None:
        """One batch on the device: its size, compute time and peak memory."""
        self.batch_size.labels(model=model).observe(size)
        self.compute.labels(model=model).observe(seconds)
        self.peak_memory.labels(model=model, device=device).set(peak_bytes)
        self.batches.labels(model=model).inc()

    # Exposition

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition and its content type, negotiated from an HTTP `Accept` header:
        the classic text format (0.0.4, which every Prometheus reads) unless OpenMetrics
        is asked for."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


def resident_memory_bytes() -> int:
    """The process's resident memory now (Linux), or its lifetime peak elsewhere."""
    statm = Path("/proc/self/statm")
    if statm.is_file():
        fields: Sequence[str] = statm.read_text().split()
        return int(fields[1]) * os.sysconf("SC_PAGE_SIZE")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # kilobytes on Linux/BSD


def _peak_resident_bytes() -> int | None:
    """VmHWM, the resident high-water mark since the last reset (Linux only)."""
    status = Path("/proc/self/status")
    if not status.is_file():
        return None
    for line in status.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return None


def peak_memory_bytes(device: str | torch.device) -> int:
    """Peak memory since the last `reset_peak_memory`: the CUDA allocator's peak on a
    CUDA device; on the CPU the process's resident high-water mark (Linux), else its
    resident memory now."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return int(torch.cuda.max_memory_allocated(dev))
    return _peak_resident_bytes() or resident_memory_bytes()


def reset_peak_memory(device: str | torch.device) -> None:
    """Start a new peak window (per batch): the CUDA allocator's peak, or on Linux the
    process's resident high-water mark (writing 5 to /proc/self/clear_refs)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        return
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
