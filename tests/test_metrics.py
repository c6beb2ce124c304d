"""The metrics exposition parses, and carries exactly what was observed."""

from __future__ import annotations

import itertools
import math
import mmap

import pytest
import torch
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from models.networks.checkpoints import REGISTRY
from service.metrics import (
    OUTCOMES,
    SECONDS_BUCKETS,
    Metrics,
    WindowedPeak,
    peak_memory_bytes,
    reset_peak_memory,
    resident_memory_bytes,
    seconds_buckets,
)

EXPECTED_TYPES = {
    "imdn_build_info": "gauge",
    "imdn_request_duration_seconds": "histogram",
    "imdn_time_to_first_byte_seconds": "histogram",
    "imdn_queue_wait_seconds": "histogram",
    "imdn_compute_seconds": "histogram",
    "imdn_decode_seconds": "histogram",
    "imdn_encode_seconds": "histogram",
    "imdn_transfer_seconds": "histogram",
    "imdn_image_forward_seconds": "histogram",
    "imdn_batch_size": "histogram",
    "imdn_queue_depth": "gauge",
    "imdn_queue_capacity": "gauge",
    "imdn_requests_in_flight": "gauge",
    "imdn_peak_memory_bytes": "gauge",
    "imdn_model_load_seconds": "gauge",
    "imdn_model_warmup_seconds": "gauge",
    "imdn_model_parameters": "gauge",
    "imdn_model_depth": "gauge",
    "imdn_ready": "gauge",
    "imdn_requests": "counter",
    "imdn_input_pixels": "counter",
    "imdn_output_pixels": "counter",
    "imdn_errors": "counter",
    "imdn_batches": "counter",
    "imdn_deadline_missed": "counter",
}


def samples(metrics: Metrics) -> list[Sample]:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain; version=0.0.4")
    return [s for f in text_string_to_metric_families(body.decode()) for s in f.samples]


def value(metrics: Metrics, name: str, **labels: str) -> float:
    """The one sample named `name` whose labels include `labels`."""
    found = [
        s.value
        for s in samples(metrics)
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(found) == 1, f"{name}{labels}: {len(found)} samples"
    return found[0]


def test_every_metric_family_is_exposed_with_its_type() -> None:
    body, _ = Metrics().render()
    families = {f.name: f.type for f in text_string_to_metric_families(body.decode())}
    assert {n: t for n, t in families.items() if n.startswith("imdn_")} == EXPECTED_TYPES
    # the process's own figures and the versions, in the service's registry
    for name, kind in (
        ("process_cpu_seconds", "counter"),
        ("process_resident_memory_bytes", "gauge"),
        ("process_open_fds", "gauge"),
        ("python_info", "gauge"),
        ("python_gc_collections", "counter"),
    ):
        assert families.get(name) == kind, name
    (build,) = [s for s in samples(Metrics()) if s.name == "imdn_build_info"]
    assert build.value == 1 and build.labels["torch"] == torch.__version__
    assert build.labels["version"] and build.labels["python"].count(".") == 2


def test_request_is_timed_by_status_and_counted_by_outcome() -> None:
    m = Metrics()
    m.observe_request("x4", 200, "ok", 0.3)
    m.observe_request("x4", 200, "ok", 1.7)
    m.observe_request("x4", 429, "rejected", 0.002)
    base = "imdn_request_duration_seconds"
    assert value(m, f"{base}_count", model="x4", status="200") == 2
    assert value(m, f"{base}_sum", model="x4", status="200") == pytest.approx(2.0)
    assert value(m, f"{base}_bucket", model="x4", status="200", le="0.25") == 0
    assert value(m, f"{base}_bucket", model="x4", status="200", le="0.5") == 1
    assert value(m, f"{base}_bucket", model="x4", status="200", le="1.0") == 1
    assert value(m, f"{base}_bucket", model="x4", status="200", le="2.5") == 2
    assert value(m, f"{base}_bucket", model="x4", status="429", le="0.005") == 1
    assert value(m, "imdn_requests_total", model="x4", outcome="ok") == 2
    assert value(m, "imdn_requests_total", model="x4", outcome="rejected") == 1


def test_unknown_outcome_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown outcome 'oops'"):
        Metrics().observe_request("x2", 500, "oops", 0.1)


def test_batch_records_size_compute_peak_memory_and_count() -> None:
    m = Metrics()
    m.observe_batch("AS", size=4, seconds=0.02, peak_bytes=123_456_789, device="cuda:0")
    m.observe_batch("AS", size=8, seconds=0.03, peak_bytes=98_765_432, device="cuda:0")
    assert value(m, "imdn_batch_size_bucket", model="AS", le="3.0") == 0
    assert value(m, "imdn_batch_size_bucket", model="AS", le="4.0") == 1
    assert value(m, "imdn_batch_size_bucket", model="AS", le="7.0") == 1
    assert value(m, "imdn_batch_size_bucket", model="AS", le="8.0") == 2
    assert value(m, "imdn_batch_size_sum", model="AS") == 12
    assert value(m, "imdn_compute_seconds_sum", model="AS") == pytest.approx(0.05)
    # the highest peak of the window, not the last batch's
    peak = value(m, "imdn_peak_memory_bytes", model="AS", scale="any", device="cuda:0")
    assert peak == 123_456_789
    assert value(m, "imdn_batches_total", model="AS") == 2


def test_stage_timings_pixels_errors_and_gauges() -> None:
    m = Metrics()
    m.observe_queue_wait("x2", 0.004)
    m.observe_time_to_first_byte("x2", 0.08)
    m.observe_decode(0.003)
    m.observe_encode(0.04)
    m.observe_pixels("x2", input_pixels=256 * 256, output_pixels=512 * 512)
    m.count_error("queue_full")
    m.count_error("queue_full")
    m.set_queue_depth(17)
    m.request_started()
    m.request_started()
    m.request_finished()
    m.set_ready(True)
    assert value(m, "imdn_queue_wait_seconds_bucket", model="x2", le="0.0025") == 0
    assert value(m, "imdn_queue_wait_seconds_bucket", model="x2", le="0.005") == 1
    assert value(m, "imdn_time_to_first_byte_seconds_sum", model="x2") == pytest.approx(0.08)
    assert value(m, "imdn_decode_seconds_count") == 1
    m.observe_transfer("to_host", 0.002)
    assert value(m, "imdn_transfer_seconds_count", direction="to_host") == 1
    assert value(m, "imdn_transfer_seconds_count", direction="to_device") == 0
    with pytest.raises(ValueError, match="unknown direction"):
        m.observe_transfer("sideways", 0.1)
    assert value(m, "imdn_encode_seconds_sum", format="png") == pytest.approx(0.04)
    assert value(m, "imdn_input_pixels_total", model="x2") == 65_536
    assert value(m, "imdn_output_pixels_total", model="x2") == 262_144
    assert value(m, "imdn_errors_total", reason="queue_full") == 2
    assert value(m, "imdn_queue_depth") == 17
    assert value(m, "imdn_requests_in_flight") == 1
    assert value(m, "imdn_ready") == 1
    m.set_ready(False)
    assert value(m, "imdn_ready") == 0


def test_model_loaded_sets_timings_and_starts_its_counters_at_zero() -> None:
    m = Metrics()
    assert not [
        s for s in samples(m) if s.name == "imdn_requests_total" and s.labels["model"] == "x3"
    ]
    m.model_loaded("x3", load_seconds=0.42, warmup_seconds=1.5)
    assert value(m, "imdn_model_load_seconds", model="x3") == pytest.approx(0.42)
    assert value(m, "imdn_model_warmup_seconds", model="x3") == pytest.approx(1.5)
    for outcome in OUTCOMES:
        assert value(m, "imdn_requests_total", model="x3", outcome=outcome) == 0
    for name in ("imdn_input_pixels_total", "imdn_output_pixels_total", "imdn_batches_total"):
        assert value(m, name, model="x3") == 0


def test_seconds_buckets_run_from_half_a_millisecond_to_past_the_deadline() -> None:
    m = Metrics(request_timeout_s=30)
    m.compute.labels(model="x4").observe(45.0)
    les = sorted(
        float(s.labels["le"])
        for s in samples(m)
        if s.name == "imdn_compute_seconds_bucket" and s.labels["model"] == "x4"
    )
    assert les[0] == 0.0005 and les[-2] == 50.0 and math.isinf(les[-1])
    assert les[:-1] == list(seconds_buckets(30))
    # a 45 s batch (past the 30 s deadline) is in a finite bucket
    assert value(m, "imdn_compute_seconds_bucket", model="x4", le="50.0") == 1
    assert value(m, "imdn_compute_seconds_bucket", model="x4", le="25.0") == 0
    # the default deadline, 120 s: the top finite bucket is above it
    assert SECONDS_BUCKETS[0] == 0.0005 and SECONDS_BUCKETS[-2] <= 120 < SECONDS_BUCKETS[-1]
    # neighbours at most ×2.5 apart (a quantile reads within that of the truth), at most
    # 18 bounds to 120 s (the ×1.5 steps gave 37: one series each per label set), and
    # the latency objective (5 s) on a bound
    assert all(b / a <= 2.5 + 1e-9 for a, b in itertools.pairwise(SECONDS_BUCKETS))
    assert len(SECONDS_BUCKETS) <= 18 and 5.0 in SECONDS_BUCKETS
    for name in ("queue_wait", "compute", "decode", "encode", "image_forward", "transfer"):
        assert getattr(m, name)._upper_bounds[:-1] == list(seconds_buckets(30)), name
    # whole requests take longer than a millisecond: their histograms (which carry the
    # status label) start at 5 ms
    for name in ("request_duration", "time_to_first_byte"):
        bounds = getattr(m, name)._upper_bounds[:-1]
        assert bounds == list(seconds_buckets(30, lowest=0.005)), name
        assert len(seconds_buckets(120, lowest=0.005)) <= 15


def test_a_queue_wait_is_resolved_to_milliseconds() -> None:
    """A 5.5 ms wait lies in the (5, 10] ms bucket: read within ×2 of the truth (the
    price of 18 bounds instead of 37, whose (5, 7] bucket read it within ×1.4)."""
    m = Metrics()
    for _ in range(100):
        m.observe_queue_wait("x2", 0.0055)
    text = m.render()[0].decode()
    buckets = [
        (float(s.labels["le"]), s.value)
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "imdn_queue_wait_seconds_bucket"
    ]
    # the quantile Prometheus computes: linear inside the bucket that holds the 95th
    upper = next(le for le, count in buckets if count >= 95)
    lower = max(le for le, count in buckets if le < upper)
    assert (lower, upper) == (0.005, 0.01)


def test_batch_size_has_one_bucket_per_size_up_to_the_maximum() -> None:
    m = Metrics(max_batch_size=6)
    assert [s for s in samples(m) if s.name == "imdn_batch_size_bucket"] == []  # no batch yet
    for _ in range(20):
        m.observe_batch("x4", 1, 0.1, 1, "cpu")
    sizes = [float(s.labels["le"]) for s in samples(m) if s.name == "imdn_batch_size_bucket"]
    assert sizes[:-1] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0] and math.isinf(sizes[-1])
    # every batch of size 1: the p95 bucket is le=1 (with 1, 2, 4... buckets p95 read 0.95)
    assert value(m, "imdn_batch_size_bucket", model="x4", le="1.0") == 20


def test_peak_memory_keeps_the_highest_batch_of_its_window() -> None:
    now = [1000.0]
    peak = WindowedPeak(
        "peak_test", "test", ("model",), window_s=60, registry=CollectorRegistry(),
        clock=lambda: now[0],
    )  # fmt: skip
    assert peak.value(("x4",)) is None
    peak.observe(("x4",), 500)
    now[0] += 10
    peak.observe(("x4",), 900)  # the peak between two scrapes
    now[0] += 10
    peak.observe(("x4",), 300)
    assert peak.value(("x4",)) == 900
    now[0] += 55  # 900 is 65 s old: out of the window; 300 is 55 s old
    assert peak.value(("x4",)) == 300
    now[0] += 100  # nothing in the window: the last batch's peak, not 0
    assert peak.value(("x4",)) == 300
    peak.observe(("x4",), 200)
    assert peak.value(("x4",)) == 200
    peak.observe(("x2",), 7)
    assert peak.value(("x2",)) == 7 and peak.value(("x4",)) == 200


def test_model_facts_and_image_forward_are_labelled_with_the_scale() -> None:
    m = Metrics()
    m.model_facts(REGISTRY["x3"].model)
    m.model_facts(REGISTRY["AS"].model)
    m.observe_image_forward("x3", 0.012)
    assert value(m, "imdn_model_parameters", model="x3", scale="3") == 703_059
    assert value(m, "imdn_model_depth", model="AS", scale="any") == 35
    assert value(m, "imdn_image_forward_seconds_count", model="x3", scale="3") == 1
    assert value(m, "imdn_image_forward_seconds_bucket", model="x3", scale="3", le="0.025") == 1
    assert value(m, "imdn_image_forward_seconds_bucket", model="x3", scale="3", le="0.01") == 0
    assert value(m, "imdn_queue_capacity") == 256
    assert value(Metrics(max_queue_crops=17), "imdn_queue_capacity") == 17


def test_the_cpu_exports_no_device_figures() -> None:
    m = Metrics()
    m.watch_device("cpu")
    assert not [s for s in samples(m) if s.name.startswith("imdn_device_")]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_device_figures_follow_the_allocator() -> None:
    m = Metrics()
    m.watch_device("cuda")
    block = torch.empty(64 * 1024 * 1024, dtype=torch.uint8, device="cuda")
    allocated = value(m, "imdn_device_memory_allocated_bytes", device="cuda:0")
    assert allocated >= 64 * 1024 * 1024
    assert value(m, "imdn_device_memory_reserved_bytes", device="cuda:0") >= allocated
    total = value(m, "imdn_device_memory_total_bytes", device="cuda:0")
    assert total == torch.cuda.get_device_properties(0).total_memory
    del block


def test_two_instances_in_one_process_are_independent() -> None:
    a, b = Metrics(), Metrics()
    a.observe_request("x2", 200, "ok", 0.1)
    assert value(a, "imdn_requests_total", model="x2", outcome="ok") == 1
    assert not [s for s in samples(b) if s.name == "imdn_requests_total" and s.value]


def test_openmetrics_is_served_when_asked_for() -> None:
    m = Metrics()
    m.observe_request("x4", 200, "ok", 0.3)
    body, content_type = m.render("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    families = {f.name: f for f in openmetrics_families(body.decode())}  # type: ignore[no-untyped-call]
    assert families["imdn_requests"].type == "counter"
    assert families["imdn_request_duration_seconds"].type == "histogram"
    plain, plain_type = m.render("text/plain")
    assert plain_type.startswith("text/plain") and b"# EOF" not in plain

    def own(text: bytes) -> list[bytes]:  # the process_* series move between two renders
        return [line for line in text.splitlines() if b"imdn_" in line]

    assert own(plain) == own(m.render()[0])


def test_cpu_peak_is_a_window_reset_per_batch() -> None:
    reset_peak_memory("cpu")
    before = resident_memory_bytes()
    # fresh pages from the kernel (an anonymous mapping), not heap memory the allocator
    # kept resident from earlier tests, so resident memory really grows by 64 MiB
    size = 64 * 1024 * 1024
    with mmap.mmap(-1, size) as block:
        for offset in range(0, size, mmap.PAGESIZE):
            block[offset] = 1
        assert block[size - mmap.PAGESIZE] == 1
    peak = peak_memory_bytes("cpu")
    assert before > 10 * 1024 * 1024  # a Python process with torch loaded
    assert peak - before >= 48 * 1024 * 1024, "the peak saw the freed 64 MiB block"
    reset_peak_memory("cpu")
    assert peak_memory_bytes("cpu") < peak - 32 * 1024 * 1024, "the reset started a new window"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_peak_is_reset_per_batch() -> None:
    device = torch.device("cuda")
    reset_peak_memory(device)
    big = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device=device)
    del big
    assert peak_memory_bytes(device) >= 256 * 1024 * 1024
    reset_peak_memory(device)
    small = torch.empty(1024 * 1024, dtype=torch.uint8, device=device)
    assert peak_memory_bytes(device) < 256 * 1024 * 1024
    del small
