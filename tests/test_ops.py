"""Operating the service: request IDs in and out, JSON log lines, and a liveness probe
that fails when the device worker is wedged (and only then). Real servers on loopback."""

from __future__ import annotations

import io
import itertools
import json
import logging
import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from service.child import imdn_serve
from service.engine import Engine
from service.logs import RequestIdFilter
from service.settings import Settings
from tests.live import LiveServer, live_server, wait_until

GENERATED = re.compile(r"[0-9a-f]{32}")


def png_of(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def small_png(side: int = 24, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    return png_of(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def server(weights_dir: Path) -> Iterator[LiveServer]:
    settings = Settings(weights_dir=weights_dir, models=["x2"], warmup=False)
    with live_server(settings) as srv:
        yield srv


@pytest.fixture
def client(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


# ------------------------------------------------------------------ request IDs


@pytest.mark.parametrize(
    "given", ["abc-123", "0f8c1d2e-7a3b-4c5d-9e6f-001122334455", "a" * 128, "x.y_z-1"]
)
def test_a_well_formed_request_id_is_echoed_on_every_kind_of_answer(
    client: httpx.Client, given: str
) -> None:
    headers = {"X-Request-ID": given}
    ok = client.post("/v1/superres?scale=2", content=small_png(), headers=headers)
    assert ok.status_code == 200 and ok.headers["content-type"] == "image/png"
    assert ok.headers["x-request-id"] == given  # a streamed body too
    for r in (
        client.get("/healthz", headers=headers),
        client.get("/metrics", headers=headers),
        client.get("/nowhere", headers=headers),
        client.post("/v1/superres?scale=9", content=small_png(), headers=headers),
        client.post("/v1/superres?scale=2", content=b"not an image", headers=headers),
    ):
        assert r.headers["x-request-id"] == given, (r.request.url, r.status_code)
        if r.status_code >= 400:
            assert r.headers["content-type"] == "application/problem+json"
            assert r.json()["request_id"] == given


@pytest.mark.parametrize(
    "given",
    ["", "a" * 129, "has space", 'quote"d', "semi;colon", "new\tline", "é".encode().decode()],
    ids=["empty", "129-chars", "space", "quote", "semicolon", "tab", "non-ascii"],
)
def test_a_malformed_request_id_is_replaced(client: httpx.Client, given: str) -> None:
    r = client.post(
        "/v1/superres?scale=9",
        content=small_png(),
        headers=[(b"X-Request-ID", given.encode("utf-8"))],
    )
    assert r.status_code == 422
    rid = r.headers["x-request-id"]
    assert GENERATED.fullmatch(rid) and rid != given
    assert r.json()["request_id"] == rid


def test_without_a_request_id_each_request_gets_its_own(client: httpx.Client) -> None:
    ids = {client.get("/nowhere").headers["x-request-id"] for _ in range(5)}
    assert len(ids) == 5 and all(GENERATED.fullmatch(i) for i in ids)
    body = client.get("/nowhere").json()
    assert GENERATED.fullmatch(body["request_id"])


def test_an_unexpected_error_carries_the_id_in_its_body_header_and_log_records(
    server: LiveServer, client: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    engine: Engine = server.app.state.engine
    model = engine.models["x2"]
    real = model.forward

    def broken(x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("injected fault")

    caplog.handler.addFilter(RequestIdFilter())  # what `imdn serve`'s handler has
    caplog.set_level(logging.INFO)
    model.forward = broken
    try:
        r = client.post(
            "/v1/superres?scale=2", content=small_png(), headers={"X-Request-ID": "req-500"}
        )
        # a new connection: uvicorn closes the one whose app raised
        with httpx.Client(base_url=server.url, timeout=60) as other:
            ok = other.post(
                "/v1/superres?scale=9", content=small_png(), headers={"X-Request-ID": "req-422"}
            )
    finally:
        model.forward = real
    assert r.status_code == 500 and r.headers["x-request-id"] == "req-500"
    assert r.json()["reason"] == "internal_error" and r.json()["request_id"] == "req-500"
    assert ok.status_code == 422

    def records(rid: str) -> list[logging.LogRecord]:
        return [rec for rec in caplog.records if getattr(rec, "request_id", None) == rid]

    failed = records("req-500")
    loggers = {rec.name for rec in failed}
    assert {"service.api", "imdn.access"} <= loggers, loggers
    [access] = [rec for rec in failed if rec.name == "imdn.access"]
    assert (access.method, access.path, access.status) == ("POST", "/v1/superres", 500)  # type: ignore[attr-defined]
    [unexpected] = [rec for rec in failed if rec.name == "service.api"]
    assert unexpected.exc_info and "injected fault" in str(unexpected.exc_info[1])
    # the other request's records carry its own ID, never the first one's
    assert [rec.status for rec in records("req-422") if rec.name == "imdn.access"] == [422]  # type: ignore[attr-defined]


# ------------------------------------------------------------------ JSON logs, from `imdn serve`


def test_imdn_serve_writes_json_lines_with_request_ids_and_no_probe_noise(
    weights_dir: Path, tmp_path: Path
) -> None:
    log_path = tmp_path / "serve.log"
    settings = {
        "IMDN_WEIGHTS_DIR": str(weights_dir),
        "IMDN_MODELS": '["x2"]',
        "IMDN_WARMUP": "false",
        "IMDN_LOG_FORMAT": "json",
    }
    with (
        imdn_serve(settings, log=log_path) as served,
        httpx.Client(base_url=served.url, timeout=60) as c,
    ):
        for _ in range(3):
            assert c.get("/metrics").status_code == 200
            assert c.get("/healthz").status_code == 200
        sent = {
            "ok-1": c.post(
                "/v1/superres?scale=2", content=small_png(), headers={"X-Request-ID": "ok-1"}
            ).status_code,
            "bad-scale": c.post(
                "/v1/superres?scale=0.5",
                content=small_png(),
                headers={"X-Request-ID": "bad-scale"},
            ).status_code,
            "missing": c.get("/nowhere", headers={"X-Request-ID": "missing"}).status_code,
        }
    assert served.process.returncode == 0
    assert sent == {"ok-1": 200, "bad-scale": 422, "missing": 404}

    lines = [ln for ln in log_path.read_text().splitlines() if ln.strip()]
    entries = [json.loads(ln) for ln in lines]  # every line is one JSON object
    for e in entries:
        assert {"time", "level", "logger", "message", "request_id"} <= set(e), e
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", e["time"])
    access = [e for e in entries if e["logger"] == "imdn.access"]
    assert {e["path"] for e in access} == {"/v1/superres", "/nowhere"}  # no probes, no scrapes
    by_id = {e["request_id"]: e for e in access}
    assert set(by_id) == set(sent)
    for rid, status in sent.items():
        e = by_id[rid]
        assert e["status"] == status and e["level"] == "INFO"
        assert e["method"] in ("GET", "POST") and e["duration_ms"] > 0
    assert by_id["bad-scale"]["query"] == "scale=0.5"
    # uvicorn's own lines go through the same handler, outside any request
    assert any(e["logger"].startswith("uvicorn") and e["request_id"] is None for e in entries)


# ------------------------------------------------------------------ liveness


def test_a_wedged_device_worker_fails_liveness_and_recovers(weights_dir: Path) -> None:
    """A forward that does not come back turns /healthz 503 once it has run past
    IMDN_LIVENESS_TIMEOUT_S; readiness is not what restarts a pod, liveness is. When the
    forward returns, /healthz is 200 again and the request still gets its image."""
    settings = Settings(
        weights_dir=weights_dir, models=["x2"], warmup=False, liveness_timeout_s=0.5
    )
    release = threading.Event()
    with (
        live_server(settings) as srv,
        httpx.Client(base_url=srv.url, timeout=60) as c,
        ThreadPoolExecutor(max_workers=1) as pool,
    ):
        engine: Engine = srv.app.state.engine
        model = engine.models["x2"]
        real = model.forward

        def wedged(x: torch.Tensor) -> torch.Tensor:
            release.wait(timeout=60)
            return real(x)

        assert c.get("/healthz").json() == {"status": "ok"}
        assert engine.device_busy_since() is None
        model.forward = wedged
        try:
            pending = pool.submit(c.post, "/v1/superres?scale=2", content=small_png())
            wait_until(lambda: engine.device_busy_since() is not None, 30, "forward started")
            wait_until(lambda: c.get("/healthz").status_code == 503, 30, "liveness failed")
            r = c.get("/healthz", headers={"X-Request-ID": "probe-1"})
            assert r.status_code == 503
            body = r.json()
            assert body["reason"] == "device_wedged" and body["request_id"] == "probe-1"
            assert "limit 0.5s" in body["detail"]
        finally:
            release.set()
            model.forward = real
        assert pending.result().status_code == 200
        assert engine.device_busy_since() is None
        assert c.get("/healthz").status_code == 200


def test_a_busy_worker_renews_its_clock_with_every_forward(weights_dir: Path) -> None:
    """Busy is not wedged: each device call starts its own clock, so back-to-back forwards
    never add up to one long call."""
    settings = Settings(weights_dir=weights_dir, models=["x2"], warmup=False)
    seen: list[tuple[float, float]] = []  # (busy since, when this forward ended)
    with live_server(settings) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        engine: Engine = srv.app.state.engine
        model = engine.models["x2"]
        real = model.forward

        def watched(x: torch.Tensor) -> torch.Tensor:
            since = engine.device_busy_since()
            assert since is not None
            y = real(x)
            seen.append((since, time.monotonic()))
            return y

        model.forward = watched
        try:
            for seed in range(4):
                r = c.post("/v1/superres?scale=2", content=small_png(seed=seed))
                assert r.status_code == 200
        finally:
            model.forward = real
    assert len(seen) == 4
    for (_, ended), (since, _) in itertools.pairwise(seen):
        assert since >= ended  # the clock restarted after the previous call returned
