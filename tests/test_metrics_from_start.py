"""Metrics a real server exposes from its start (issue 26): the error series at 0 before
the first error, so that a real Prometheus sees the first errors as a rise; requests
refused before the handler counted; dashboard ratios 0, not NaN, when idle."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from service.settings import Settings
from tests.live import LiveServer, live_server
from tests.prometheus import running_prometheus, series_value
from tests.test_observability import dashboard_queries

KEY = "key-26"


def _png(side: int) -> bytes:
    out = io.BytesIO()
    pixels = np.random.default_rng(side).integers(0, 256, (side, side, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def _value(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and labels.items() <= s.labels.items():
                return float(s.value)
    return None


@pytest.fixture(scope="module")
def server(weights_dir: Path) -> Iterator[LiveServer]:
    settings = Settings(weights_dir=weights_dir, models=["x2"], warmup=False, api_keys=[KEY])
    with live_server(settings) as srv:
        yield srv


def test_error_series_exist_at_zero_from_the_start(server: LiveServer) -> None:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    count = "imdn_request_duration_seconds_count"
    for status in ("200", "429", "500", "503", "504"):
        assert _value(text, count, model="x2", status=status) == 0, status
    for status in ("401", "404", "405", "422"):
        assert _value(text, count, model="unrouted", status=status) == 0, status
    for reason in ("deadline_exceeded", "queue_full", "unauthorized", "not_found"):
        assert _value(text, "imdn_errors_total", reason=reason) == 0, reason
    # the versions, and the process's own figures, in the service's registry
    assert _value(text, "imdn_build_info", torch=torch.__version__) == 1
    resident = _value(text, "process_resident_memory_bytes")
    assert resident is not None and resident > 0
    # fewer buckets: 15 bounds (and +Inf) for a whole request, 18 for a batch's compute
    buckets = [
        s
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == f"{count[:-6]}_bucket" and s.labels["status"] == "200"
    ]
    assert len(buckets) == 16


def test_requests_refused_before_the_handler_are_counted(server: LiveServer) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    refused = [
        (401, "unauthorized", httpx.post(f"{server.url}/v1/superres?scale=2", content=b"x")),
        (401, "unauthorized", httpx.get(f"{server.url}/v1/models")),
        (404, "not_found", httpx.get(f"{server.url}/nowhere", headers=auth)),
        (405, "method_not_allowed", httpx.delete(f"{server.url}/v1/superres", headers=auth)),
        (422, "invalid_request", httpx.post(f"{server.url}/v1/superres", headers=auth)),
        (
            422,
            "invalid_request",
            httpx.post(f"{server.url}/v1/superres?scale=2&quality=0", headers=auth),
        ),
        (
            422,
            "repeated_scale",
            httpx.post(f"{server.url}/v1/superres?scale=2&scale=3", headers=auth),
        ),
    ]
    for status, reason, r in refused:
        assert (r.status_code, r.json()["reason"]) == (status, reason)
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    count = "imdn_request_duration_seconds_count"
    for status, n in ((401, 2), (404, 1), (405, 1), (422, 3)):
        assert _value(text, count, model="unrouted", status=str(status)) == n, status
    for reason, n in (("unauthorized", 2), ("invalid_request", 2), ("repeated_scale", 1)):
        assert _value(text, "imdn_errors_total", reason=reason) == n, reason
    total = _value(text, "imdn_requests_total", model="unrouted", outcome="client_error")
    assert total == len(refused)
    # a request the handler refuses itself is counted once, under its model
    r = httpx.post(f"{server.url}/v1/superres?scale=2", headers=auth, content=b"not an image")
    assert r.status_code == 400
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert _value(text, count, model="x2", status="400") == 1
    assert _value(text, "imdn_requests_total", model="unrouted", outcome="client_error") == total


def test_a_real_prometheus_sees_the_first_errors_rise_and_idle_ratios_are_zero(
    weights_dir: Path, tmp_path: Path
) -> None:
    settings = Settings(weights_dir=weights_dir, models=["x2"], warmup=False)
    ratios = [q for q in dashboard_queries() if "error ratio" in q.panel]
    assert len(ratios) == 2
    with (
        live_server(settings) as server,
        running_prometheus([server.url.removeprefix("http://")], tmp_path) as prom,
    ):
        instance = server.url.removeprefix("http://")
        prom.targets_up()
        # scraped at 0 before any request: the series a first error will raise
        prom.wait_for_value('imdn_request_duration_seconds_count{status="500"}', 0)
        prom.wait_for_value('imdn_errors_total{reason="internal_error"}', 0)
        # idle, no request yet: every ratio is 0 (each series is there, at 0), not 0/0
        for q in ratios:
            result = prom.wait_for(
                q.promql(instance, ["x2"]),
                lambda r: bool(r) and all(series_value(s) == 0 for s in r),
                timeout=30,
            )
            assert {s["metric"]["model"] for s in result} <= {"x2", "unrouted"}, result

        model = server.app.state.engine.models["x2"]

        def failing(x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("injected device fault")

        model.forward = failing
        for _ in range(3):  # between two scrapes (1 s apart), as the 8 timeouts
            r = httpx.post(f"{server.url}/v1/superres?scale=2", content=_png(16), timeout=60)
            assert r.status_code == 500, r.text
        rise = 'increase(imdn_request_duration_seconds_count{model="x2", status="500"}[1m])'
        prom.wait_for(rise, lambda r: bool(r) and series_value(r[0]) >= 2, timeout=30)
        prom.wait_for(
            'increase(imdn_errors_total{reason="internal_error"}[1m])',
            lambda r: bool(r) and series_value(r[0]) >= 2,
            timeout=30,
        )
