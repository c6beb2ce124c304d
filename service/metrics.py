"""Prometheus metrics of the service, each app owning its own registry.

Every stage of a request is timed separately (queue wait apart from compute, time to
first byte apart from the whole request), so a latency rise can be traced to its
stage. prometheus-client does the work; this module only names the metrics, picks
buckets that resolve what they measure (half a millisecond for a GPU batch, past the
request deadline for a large image on the CPU, one bucket per batch size) and gives
the engine and the API small methods to call.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import logging
import math
import os
import resource
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from prometheus_client import (
    GC_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from models.networks.checkpoints import REGISTRY
from models.networks.descriptor import ModelDescriptor
from service.errors import EngineError
from service.imaging.errors import REASONS as IMAGE_REASONS

if TYPE_CHECKING:
    from service.settings import Settings

log = logging.getLogger(__name__)

# Bounds per decade at 1, 2.5 and 5 (×2-2.5 apart): Prometheus interpolates linearly
# inside a bucket, so a quantile is read within that ratio of the truth, and an objective
# at 5 s (the latency alert's) falls on a bound. 18 bounds from 0.5 ms past a 120 s
# deadline (15 from 5 ms for the whole-request histograms, which carry a status label);
# every bound costs one series per label set, which ×1.5 steps (37 bounds) made 1,446
# series on one instance.
_PER_DECADE = (1.0, 2.5, 5.0)
SHORTEST_S = 0.0005
"""The lowest bucket bound of the device-side timing histograms: half a millisecond."""
REQUEST_SHORTEST_S = 0.005
"""The lowest bound of the whole-request histograms: no request is answered faster."""


def seconds_buckets(past: float, lowest: float = SHORTEST_S) -> tuple[float, ...]:
    """Bucket bounds from `lowest` up to the first one above `past` (the request deadline:
    a request that ran into it still lands in a finite bucket)."""
    bounds: list[float] = []
    exponent = math.floor(math.log10(lowest))
    while not bounds or bounds[-1] <= past:
        for step in _PER_DECADE:
            bound = float(f"{step:g}e{exponent}")
            if bound >= lowest and (not bounds or bounds[-1] <= past):
                bounds.append(bound)
        exponent += 1
    return tuple(bounds)


def batch_size_buckets(max_batch_size: int) -> tuple[float, ...]:
    """One bucket per batch size, 1..max: a quantile of sizes is then exact."""
    return tuple(float(n) for n in range(1, max_batch_size + 1))


SECONDS_BUCKETS = seconds_buckets(120.0)
"""The buckets for the default 120 s request deadline."""

OUTCOMES: tuple[str, ...] = ("ok", "client_error", "rejected", "timeout", "cancelled", "error")
"""Values of `imdn_requests_total{outcome}`: how a request ended."""
ENCODE_FORMATS: tuple[str, ...] = ("png", "webp", "jpeg")
TRANSFER_DIRECTIONS: tuple[str, ...] = ("to_device", "to_host")
"""Values of `imdn_encode_seconds{format}`."""

UNROUTED = "unrouted"
"""The `model` label of a request refused before a model was chosen (a scale out of
range, or one whose model this server does not load): the request still counts in
every total, but no series appears under the name of a model that is not loaded."""

STATUSES_AT_START: tuple[str, ...] = ("200", "429", "500", "503", "504")
"""The `status` series of `imdn_request_duration_seconds` each loaded model has from the
start, at 0: those the alert rules select. A series born at its first error is never
seen to rise (Prometheus's first sample of it is already the count), so `increase()`
and the alerts would miss the first errors."""
REFUSALS_AT_START: tuple[str, ...] = ("401", "404", "405", "422")
"""The same for requests refused before a model was chosen (`model="unrouted"`)."""
ERROR_REASONS: tuple[str, ...] = (
    *IMAGE_REASONS,
    EngineError.reason,
    *(cls.reason for cls in EngineError.__subclasses__()),  # service/errors.py
    "unauthorized",
    "not_found",
    "method_not_allowed",
    "http_error",
    "invalid_request",
    "repeated_scale",
    "repeated_quality",
    "scale_out_of_range",
    "not_acceptable",
    "unsupported_transfer_coding",
    # refused by the HTTP parser, before the app (service/http_server.py)
    "bad_request",
    "bad_request_target",
    "method_not_implemented",
    "uri_too_long",
    "headers_too_large",
    "body_too_large",
    "body_timeout",
    "bad_multipart",
    "multiple_images",
    "missing_image_field",
    "client_disconnected",
    "internal_error",
    "device_oom_retry",
)
"""Every `reason` of `imdn_errors_total`, each a series at 0 from the start (see
STATUSES_AT_START); tests/test_metrics.py checks that the code gives no other."""

PEAK_WINDOW_S = 60.0
"""`imdn_peak_memory_bytes` is the highest batch peak over this window: longer than any
scrape interval, so a scrape never misses a peak."""


def build_labels() -> dict[str, str]:
    """`imdn_build_info`'s labels: this package's version, Python's and PyTorch's."""
    try:
        version = importlib.metadata.version("imdn-serve")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    python = ".".join(str(n) for n in sys.version_info[:3])
    return {"version": version, "python": python, "torch": torch.__version__}


def scale_label(model: str) -> str:
    """The `scale` label of a model's series: its fixed factor, or "any" for IMDN_AS."""
    spec = REGISTRY.get(model)
    return "" if spec is None else str(spec.model.served_scale)


class Metrics:
    """All metrics of one app, in a registry of their own.

    Several apps (or tests) in one process each create a `Metrics` and never collide.
    """

    def __init__(
        self,
        *,
        request_timeout_s: float = 120.0,
        max_batch_size: int = 8,
        max_queue_crops: int = 256,
        peak_window_s: float = PEAK_WINDOW_S,
    ) -> None:
        # `*_created` gauges would double the series in the classic text format for a
        # timestamp that Prometheus never uses; prometheus-client only offers a
        # process-wide switch, and the service wants it off everywhere.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        seconds = seconds_buckets(request_timeout_s)
        whole_request = seconds_buckets(request_timeout_s, lowest=REQUEST_SHORTEST_S)
        # the process's CPU, memory, file descriptors and start time, Python's version and
        # garbage collector, in this registry (the default one is not served)
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        r.register(GC_COLLECTOR)
        self.build_info = Gauge(
            "imdn_build_info",
            "1, labelled with the versions of the service, Python and PyTorch.",
            ["version", "python", "torch"],
            registry=r,
        )
        self.build_info.labels(**build_labels()).set(1)

        # Histograms
        self.request_duration = Histogram(
            "imdn_request_duration_seconds",
            "Whole request, from the body read to the last byte sent, by HTTP status "
            '(refused before a model was chosen: model="unrouted").',
            ["model", "status"],
            buckets=whole_request,
            registry=r,
        )
        self.time_to_first_byte = Histogram(
            "imdn_time_to_first_byte_seconds",
            "From the request's arrival to the first byte of the response body.",
            ["model"],
            buckets=whole_request,
            registry=r,
        )
        self.queue_wait = Histogram(
            "imdn_queue_wait_seconds",
            "Time a crop waited in the batch queue before its batch started.",
            ["model"],
            buckets=seconds,
            registry=r,
        )
        self.compute = Histogram(
            "imdn_compute_seconds",
            "Device compute of one batch (synchronised), per model.",
            ["model"],
            buckets=seconds,
            registry=r,
        )
        self.image_forward = Histogram(
            "imdn_image_forward_seconds",
            "Forward (device compute) time of one served image: the batches that carried "
            "its crops (a batch shared with other images counts whole). Table 6's time "
            "per image.",
            ["model", "scale"],
            buckets=seconds,
            registry=r,
        )
        self.decode = Histogram(
            "imdn_decode_seconds",
            "Decoding one uploaded image.",
            buckets=seconds,
            registry=r,
        )
        self.transfer = Histogram(
            "imdn_transfer_seconds",
            "One request's pixels between host and device, with the wait for a worker "
            "thread: to_device (upload, normalise, cut into crops; Server-Timing prepare) "
            "and to_host (the output back; Server-Timing readback).",
            ["direction"],
            buckets=seconds,
            registry=r,
        )
        for direction in TRANSFER_DIRECTIONS:
            self.transfer.labels(direction=direction)
        self.encode = Histogram(
            "imdn_encode_seconds",
            "Encoding one output image, by format (png, webp, jpeg).",
            ["format"],
            buckets=seconds,
            registry=r,
        )
        for fmt in ENCODE_FORMATS:  # every format's series from the start
            self.encode.labels(format=fmt)
        self.batch_size = Histogram(
            "imdn_batch_size",
            "Crops per batch sent to the device.",
            ["model"],
            buckets=batch_size_buckets(max_batch_size),
            registry=r,
        )

        # Gauges
        self.queue_depth = Gauge(
            "imdn_queue_depth", "Crops waiting in the batch queue.", registry=r
        )
        self.queue_capacity = Gauge(
            "imdn_queue_capacity",
            "Crops the batch queue holds before it answers 429 (IMDN_MAX_QUEUE_CROPS).",
            registry=r,
        )
        self.queue_capacity.set(max_queue_crops)
        self.requests_in_flight = Gauge(
            "imdn_requests_in_flight", "Super-resolution requests being served now.", registry=r
        )
        self.peak_memory = WindowedPeak(
            "imdn_peak_memory_bytes",
            f"Highest per-batch peak memory over the last {peak_window_s:g} s (the last "
            "batch's when none ran in that window): on CUDA the allocator's peak, reset per "
            "batch; on the CPU the process's resident high-water mark during the batch.",
            ("model", "scale", "device"),
            window_s=peak_window_s,
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
        self.model_parameters = Gauge(
            "imdn_model_parameters",
            "Parameters of a loaded model (Table 6).",
            ["model", "scale"],
            registry=r,
        )
        self.model_depth = Gauge(
            "imdn_model_depth",
            "Conv layers on the model's longest path (Table 6's depth).",
            ["model", "scale"],
            registry=r,
        )
        self.ready = Gauge("imdn_ready", "1 once every model is loaded and warm.", registry=r)

        # Counters (prometheus-client appends `_total`)
        self.requests = Counter(
            "imdn_requests",
            "Super-resolution requests by how they ended (refused before a model was "
            'chosen, any route: model="unrouted").',
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
        self.deadline_missed = Counter(
            "imdn_deadline_missed",
            "Admitted requests that then missed their deadline (504): a promise the "
            "admission estimate broke; the log says by how much.",
            ["model"],
            registry=r,
        )
        for reason in ERROR_REASONS:
            self.errors.labels(reason=reason)
        for status in REFUSALS_AT_START:
            self.request_duration.labels(model=UNROUTED, status=status)
        self.requests.labels(model=UNROUTED, outcome="client_error")

    @classmethod
    def from_settings(cls, settings: Settings) -> Metrics:
        """Buckets up to the settings' deadline and batch size, and the queue's capacity."""
        return cls(
            request_timeout_s=settings.request_timeout_s,
            max_batch_size=settings.max_batch_size,
            max_queue_crops=settings.max_queue_crops,
        )

    def watch_device(self, device: str | torch.device) -> None:
        """Export the device's own memory figures (and utilisation, through NVML when
        `pynvml` is installed) at each scrape; nothing on the CPU."""
        dev = torch.device(device)
        if dev.type == "cuda":
            self.registry.register(CudaCollector(dev))

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
        for status in STATUSES_AT_START:
            self.request_duration.labels(model=model, status=status)
        self.input_pixels.labels(model=model)
        self.output_pixels.labels(model=model)
        self.batches.labels(model=model)
        self.deadline_missed.labels(model=model)

    def model_facts(self, model: ModelDescriptor) -> None:
        """A loaded model's parameters and depth, the fixed columns of Table 6."""
        labels = {"model": model.name, "scale": str(model.served_scale)}
        self.model_parameters.labels(**labels).set(model.parameters)
        self.model_depth.labels(**labels).set(model.depth)

    def set_ready(self, ready: bool) -> None:
        self.ready.set(1 if ready else 0)

    # Requests

    def observe_request(self, model: str, status: int, outcome: str, seconds: float) -> None:
        """A finished request: its duration by HTTP status, and its outcome counted."""
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}; expected one of {OUTCOMES}")
        self.request_duration.labels(model=model, status=str(status)).observe(seconds)
        self.requests.labels(model=model, outcome=outcome).inc()

    def observe_unrouted_refusal(self, status: int, reason: str, seconds: float) -> None:
        """A request refused before a model was chosen (by the app or the HTTP parser):
        its reason, and its duration and outcome under model "unrouted"."""
        self.count_error(reason)
        outcome = "client_error" if status < 500 else "error"
        self.observe_request(UNROUTED, status, outcome, seconds)

    def observe_time_to_first_byte(self, model: str, seconds: float) -> None:
        self.time_to_first_byte.labels(model=model).observe(seconds)

    def observe_image_forward(self, model: str, seconds: float) -> None:
        """The device time of one served image (Table 6's time per image)."""
        self.image_forward.labels(model=model, scale=scale_label(model)).observe(seconds)

    def observe_pixels(self, model: str, input_pixels: int, output_pixels: int) -> None:
        self.input_pixels.labels(model=model).inc(input_pixels)
        self.output_pixels.labels(model=model).inc(output_pixels)

    def observe_decode(self, seconds: float) -> None:
        self.decode.observe(seconds)

    def observe_transfer(self, direction: str, seconds: float) -> None:
        if direction not in TRANSFER_DIRECTIONS:
            raise ValueError(f"unknown direction {direction!r}; expected {TRANSFER_DIRECTIONS}")
        self.transfer.labels(direction=direction).observe(seconds)

    def observe_encode(self, seconds: float, *, format: str = "png") -> None:
        if format not in ENCODE_FORMATS:
            raise ValueError(f"unknown format {format!r}; expected one of {ENCODE_FORMATS}")
        self.encode.labels(format=format).observe(seconds)

    def count_error(self, reason: str) -> None:
        self.errors.labels(reason=reason).inc()

    def count_deadline_missed(self, model: str) -> None:
        self.deadline_missed.labels(model=model).inc()

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
        self.peak_memory.observe((model, scale_label(model), device), peak_bytes)
        self.batches.labels(model=model).inc()

    # Exposition

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition and its content type, negotiated from an HTTP `Accept` header:
        the classic text format (0.0.4, which every Prometheus reads) unless OpenMetrics
        is asked for."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


class WindowedPeak:
    """A gauge per label set holding the highest value observed over the last `window_s`
    seconds, or the last value when nothing was observed in the window.

    A plain gauge set per batch shows only the batch before the scrape; this one shows
    every peak to at least one scrape. A monotonic deque keeps it O(1) per observation.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        *,
        window_s: float,
        registry: CollectorRegistry,
        clock: Any = time.monotonic,
    ) -> None:
        self.name, self.documentation = name, documentation
        self.labelnames = tuple(labelnames)
        self.window_s, self._clock = window_s, clock
        self._peaks: dict[tuple[str, ...], deque[tuple[float, float]]] = {}
        self._last: dict[tuple[str, ...], float] = {}
        self._lock = threading.Lock()
        registry.register(self)

    def observe(self, labels: Sequence[str], value: float) -> None:
        key, now = tuple(labels), self._clock()
        with self._lock:
            peaks = self._peaks.setdefault(key, deque())
            while peaks and peaks[-1][1] <= value:  # a smaller, older value never wins
                peaks.pop()
            peaks.append((now, value))
            self._last[key] = value

    def value(self, labels: Sequence[str]) -> float | None:
        key = tuple(labels)
        with self._lock:
            peaks = self._peaks.get(key)
            if peaks is None:
                return None
            while peaks and peaks[0][0] < self._clock() - self.window_s:
                peaks.popleft()
            return peaks[0][1] if peaks else self._last[key]

    def describe(self) -> Iterable[Metric]:
        return [GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)]

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)
        with self._lock:
            keys = list(self._peaks)
        for key in keys:
            value = self.value(key)
            if value is not None:
                family.add_metric(list(key), value)
        return [family]


class CudaCollector:
    """The CUDA device's own figures at each scrape: memory allocated and reserved by
    PyTorch's allocator and the device's total, and (when `pynvml` is installed) the
    utilisation NVML reports. Nothing before CUDA is initialised."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.label = str(device if device.index is not None else torch.device("cuda", 0))
        self._nvml: Any = None
        self._nvml_handle: Any = None
        if importlib.util.find_spec("pynvml") is not None:
            self._nvml = importlib.import_module("pynvml")

    def describe(self) -> Iterable[Metric]:
        return list(self._families())

    def _families(self) -> Iterator[GaugeMetricFamily]:
        for name, doc in (
            ("imdn_device_memory_allocated_bytes", "Device memory held by live tensors."),
            (
                "imdn_device_memory_reserved_bytes",
                "Device memory PyTorch's caching allocator reserved (allocated + cached).",
            ),
            ("imdn_device_memory_total_bytes", "The device's total memory."),
            (
                "imdn_device_utilization_ratio",
                "Fraction of the last sample period in which a kernel ran (NVML; only "
                "with pynvml installed).",
            ),
        ):
            yield GaugeMetricFamily(name, doc, labels=["device"])

    def collect(self) -> Iterable[Metric]:
        if not torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
            return []
        allocated, reserved, total, utilisation = self._families()
        allocated.add_metric([self.label], torch.cuda.memory_allocated(self.device))
        reserved.add_metric([self.label], torch.cuda.memory_reserved(self.device))
        total.add_metric([self.label], torch.cuda.get_device_properties(self.device).total_memory)
        families = [allocated, reserved, total]
        ratio = self._utilisation()
        if ratio is not None:
            utilisation.add_metric([self.label], ratio)
            families.append(utilisation)
        return families

    def _utilisation(self) -> float | None:
        if self._nvml is None:
            return None
        try:
            if self._nvml_handle is None:
                self._nvml.nvmlInit()
                uuid = torch.cuda.get_device_properties(self.device).uuid
                self._nvml_handle = self._nvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
            return float(self._nvml.nvmlDeviceGetUtilizationRates(self._nvml_handle).gpu) / 100
        except Exception as exc:  # NVML missing from the driver, or a device it hides
            log.warning("NVML utilisation unavailable, no longer asked: %s", exc)
            self._nvml = None
            return None


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
