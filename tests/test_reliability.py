"""Reliability over real HTTP: access control, load, and faults (device OOM, clients that
leave, deadlines, SIGTERM). Every server here is on loopback; every wait is bounded."""

from __future__ import annotations

import asyncio
import ctypes
import gc
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager as ContextManager
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from models.networks.imdn import IMDN
from models.quality.evaluate import read_rgb
from models.quality.matlab import imresize_tensor, psnr
from models.runtime.acs import authors_forward
from service import child
from service.child import Served
from service.engine import model_for_scale
from service.imaging import output_size
from service.settings import Settings
from tests.live import LiveServer, live_server, wait_until
from tests.load import make_jobs, png_bytes

OPS_ROUTES = ("/healthz", "/readyz", "/metrics")
KEYED_ROUTES = ("/v1/models", "/v1/report")
APP_ORIGIN = "https://app.example"


def read_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


png_of = png_bytes


def reference(model: IMDN, image: np.ndarray, scale: float) -> np.ndarray:
    """The network's answer computed here, without the service: the whole image for the
    paper's fixed scales; bicubic to the output size then the authors' ACS for IMDN_AS."""
    x = torch.from_numpy(image.copy()).permute(2, 0, 1).unsqueeze(0).float() / 255
    with torch.inference_mode():
        if model.scale == 1:
            size = output_size(image.shape[0], image.shape[1], scale)
            y = authors_forward(model, imresize_tensor(x, size=size).clamp(0, 1))
        else:
            y = model(x)
    return np.round(y.clamp(0, 1)[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)


def metric_values(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Samples of one metric from a Prometheus exposition, keyed by sorted labels."""
    return {
        tuple(sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    }


def gauge(text: str, name: str) -> float:
    (value,) = metric_values(text, name).values()
    return value


@pytest.fixture(scope="module")
def small_lr(datasets_dir: Path) -> np.ndarray:
    """A real 32×32 LR patch (Set5 bird)."""
    return read_rgb(datasets_dir / "Set5" / "LR_bicubic" / "x4" / "birdx4.bmp")[:32, :32]


# --------------------------------------------------------------------------- access


@pytest.fixture(scope="module")
def keyed_cors_server(weights_dir: Path) -> Iterator[LiveServer]:
    """Keys on the inference routes, ops routes open (the default), CORS for one origin:
    configured through the environment, as a deployment does."""
    env = {
        "IMDN_WEIGHTS_DIR": str(weights_dir),
        "IMDN_MODELS": '["x2"]',
        "IMDN_API_KEYS": '["key-one", "key-two"]',
        "IMDN_CORS_ORIGINS": f'["{APP_ORIGIN}"]',
    }
    with pytest.MonkeyPatch.context() as mp:
        for name, value in env.items():
            mp.setenv(name, value)
        settings = Settings()
    assert not settings.protect_ops_routes
    with live_server(settings) as srv:
        yield srv


def test_inference_routes_need_a_key(keyed_cors_server: LiveServer, small_lr: np.ndarray) -> None:
    body = png_of(small_lr)
    with httpx.Client(base_url=keyed_cors_server.url, timeout=60) as c:
        for route in KEYED_ROUTES:
            for headers in (
                {},
                {"X-API-Key": "wrong"},
                {"Authorization": "Bearer wrong"},
                {"Authorization": "Basic a2V5LW9uZTo="},  # not a bearer token
                {"X-API-Key": "key-one-and-more"},
                {"X-API-Key": ""},
            ):
                r = c.get(route, headers=headers)
                assert r.status_code == 401, (route, headers, r.text)
                assert r.headers["content-type"] == "application/problem+json"
                assert r.headers["www-authenticate"] == "Bearer"
                assert r.json()["reason"] == "unauthorized"
            assert c.get(route, headers={"X-API-Key": "key-one"}).status_code == 200
            assert c.get(route, headers={"Authorization": "Bearer key-two"}).status_code == 200
        refused = c.post("/v1/superres?scale=2", content=body)
        assert refused.status_code == 401
        ok = c.post("/v1/superres?scale=2", content=body, headers={"X-API-Key": "key-two"})
        assert ok.status_code == 200, ok.text
        assert read_png(ok.content).shape == (64, 64, 3)


def test_ops_routes_are_open_by_default(keyed_cors_server: LiveServer) -> None:
    with httpx.Client(base_url=keyed_cors_server.url, timeout=60) as c:
        for route in OPS_ROUTES:
            assert c.get(route).status_code == 200, route
        assert "imdn_requests_in_flight" in c.get("/metrics").text


def test_cors_preflight_and_exposed_headers_for_the_configured_origin(
    keyed_cors_server: LiveServer, small_lr: np.ndarray
) -> None:
    with httpx.Client(base_url=keyed_cors_server.url, timeout=60) as c:
        preflight = c.options(
            "/v1/superres",
            headers={
                "Origin": APP_ORIGIN,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
        assert preflight.status_code == 200, preflight.text  # no key needed for a preflight
        assert preflight.headers["access-control-allow-origin"] == APP_ORIGIN
        assert "POST" in preflight.headers["access-control-allow-methods"]
        allowed_headers = preflight.headers["access-control-allow-headers"].lower()
        assert "authorization" in allowed_headers
        r = c.post(
            "/v1/superres?scale=2",
            content=png_of(small_lr),
            headers={"Origin": APP_ORIGIN, "Authorization": "Bearer key-one"},
        )
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == APP_ORIGIN
        exposed = r.headers["access-control-expose-headers"].lower()
        assert "server-timing" in exposed and "x-imdn-model" in exposed
        assert "access-control-allow-credentials" not in r.headers

        other = "https://evil.example"
        refused = c.options(
            "/v1/superres",
            headers={"Origin": other, "Access-Control-Request-Method": "POST"},
        )
        assert refused.status_code == 400
        assert "access-control-allow-origin" not in refused.headers
        simple = c.get("/healthz", headers={"Origin": other})
        assert simple.status_code == 200
        assert "access-control-allow-origin" not in simple.headers


def test_protected_ops_routes_and_no_cors_unless_configured(
    weights_dir: Path, small_lr: np.ndarray
) -> None:
    settings = Settings(
        weights_dir=weights_dir, models=["x2"], api_keys=["ops-key"], protect_ops_routes=True
    )
    assert not settings.cors_origins
    with live_server(settings) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        for route in (*OPS_ROUTES, *KEYED_ROUTES):
            r = c.get(route, headers={"Origin": APP_ORIGIN})
            assert r.status_code == 401, route
            assert r.headers["content-type"] == "application/problem+json"
            assert "access-control-allow-origin" not in r.headers
            authed = c.get(route, headers={"Authorization": "Bearer ops-key", "Origin": APP_ORIGIN})
            assert authed.status_code == 200, route
            assert "access-control-allow-origin" not in authed.headers
        preflight = c.options(
            "/v1/superres",
            headers={"Origin": APP_ORIGIN, "Access-Control-Request-Method": "POST"},
        )
        assert preflight.status_code == 405  # no CORS middleware: a plain OPTIONS, not allowed
        assert not any(h.startswith("access-control-") for h in preflight.headers)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"protect_ops_routes": True}, "api_keys is empty"),
        ({"cors_origins": ["https://app.example/"]}, "trailing slash"),
        ({"cors_origins": ["app.example"]}, "scheme://host"),
    ],
)
def test_access_misconfiguration_fails_at_start(
    weights_dir: Path, overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(weights_dir=weights_dir, **overrides)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- `imdn serve`


def imdn_serve(weights_dir: Path, log_dir: Path, env: dict[str, str]) -> ContextManager[Served]:
    """`imdn serve` with the official weights, logging to a file in `log_dir`."""
    settings = {"IMDN_WEIGHTS_DIR": str(weights_dir), "IMDN_LOG_LEVEL": "warning", **env}
    return child.imdn_serve(settings, log=log_dir / "imdn-serve.log")


# --------------------------------------------------------------------------- load

LOAD_REQUESTS = int(os.environ.get("IMDN_LOAD_REQUESTS", "600"))
"""Requests in the measured run (the priming run adds LOAD_PRIMING)."""
LOAD_PRIMING = 150
LOAD_CONCURRENCY = 16
LOAD_SEED = 2
SPOT_CHECKS = 24
LEAK_TOLERANCE = 0.05


def live_rss_bytes() -> tuple[int, int]:
    """(resident bytes as they are, resident bytes once glibc returned its free pages).

    glibc keeps freed large buffers in its heaps (its mmap threshold rises with use), so
    the plain resident size of a process that runs tensors of many shapes creeps up for
    thousands of requests after any warm-up, leak or not. `malloc_trim(0)` hands those free
    pages back, so the second figure counts live memory (and some fragmentation): what a
    leak would grow.
    """

    def statm() -> int:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")

    before = statm()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return before, statm()


M_MMAP_THRESHOLD = -3  # glibc mallopt parameters
M_ARENA_MAX = -8


@contextmanager
def pinned_malloc() -> Iterator[None]:
    """glibc's mmap threshold pinned at 64 KiB, so tensors' buffers are mapped and unmapped
    whole instead of fragmenting the heaps; the resident size then tracks live memory.
    Afterwards the threshold goes back to glibc's initial 128 KiB (no longer adaptive)."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(M_ARENA_MAX, 2)
    libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024)
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)


def run_load_client(url: str, source: Path, requests: int, seed: int, save_dir: Path) -> dict:  # type: ignore[type-arg]
    """tests/load.py as a script, in a process of its own: the client's memory and CPU
    are not the server's, and the script is what an operator runs."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.load",
            f"--url={url}",
            f"--requests={requests}",
            f"--concurrency={LOAD_CONCURRENCY}",
            f"--seed={seed}",
            f"--image={source}",
            f"--save-dir={save_dir}",
            f"--save-every={max(1, requests // SPOT_CHECKS)}",
            "--timeout=60",
        ],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summary: dict = json.loads(done.stdout)  # type: ignore[type-arg]
    return summary


@pytest.mark.slow
def test_load_mixed_sizes_and_scales_no_errors_no_leak(
    weights_dir: Path,
    datasets_dir: Path,
    official_model: Callable[[str], IMDN],
    tmp_path: Path,
) -> None:
    """Thousands of requests, 16–96 px sides, scales 2, 3, 4 and 1.5, 2.5, 3.3 (IMDN_AS),
    16 at a time: each a correct image (its size checked by the client, some pixels here)
    or a 429/503, none hung; the server's live memory after the run within a few percent
    of what it was after a priming run."""
    source_path = datasets_dir / "Set14" / "HR" / "baboon.png"
    with pinned_malloc(), live_server(Settings(weights_dir=weights_dir)) as srv:
        primed = run_load_client(srv.url, source_path, LOAD_PRIMING, 1, tmp_path / "primed")
        assert primed["failures"] == 0, primed
        rss_primed, live_primed = live_rss_bytes()
        report = run_load_client(srv.url, source_path, LOAD_REQUESTS, LOAD_SEED, tmp_path / "run")
        rss_after, live_after = live_rss_bytes()
        metrics = httpx.get(f"{srv.url}/metrics", timeout=10).text
    mib = 2**20
    print(
        f"\nload: {report}\nresident: primed {rss_primed / mib:.1f} MiB, after "
        f"{rss_after / mib:.1f} MiB; live (trimmed): primed {live_primed / mib:.1f} MiB, "
        f"after {live_after / mib:.1f} MiB ({(live_after / live_primed - 1) * 100:+.2f}%)"
    )
    assert report["requests"] == LOAD_REQUESTS
    assert report["failures"] == 0, report  # every answer a 200 of the right size, 429 or 503
    assert report["ok"] >= LOAD_REQUESTS * 0.9, report
    assert set(report["statuses"]) <= {"200", "429", "503"}, report
    assert gauge(metrics, "imdn_requests_in_flight") == 0
    assert gauge(metrics, "imdn_queue_depth") == 0
    jobs = make_jobs(read_rgb(source_path), LOAD_REQUESTS, seed=LOAD_SEED)
    saved = sorted((tmp_path / "run").glob("*.png"))
    assert len(saved) >= SPOT_CHECKS // 2
    for path in saved:
        job = jobs[int(path.stem)]
        served = read_png(path.read_bytes())
        expected = reference(official_model(model_for_scale(job.scale)), job.image, job.scale)
        assert served.shape == expected.shape
        quality = psnr(served, expected)
        assert quality >= 45, (job.scale, job.image.shape, quality)
    assert live_after <= live_primed * (1 + LEAK_TOLERANCE), (live_primed, live_after)


# --------------------------------------------------------------------------- faults


@contextmanager
def _raw_post(port: int, body: bytes, *, send: int | None = None) -> Iterator[socket.socket]:
    """A POST to /v1/superres?scale=4 on a raw socket that sends `send` bytes of the body
    (all by default); the socket closes when the block ends, the response never read."""
    head = (
        "POST /v1/superres?scale=4 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: image/png\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head + body[: len(body) if send is None else send])
        yield sock


def _post_raw(port: int, body: bytes, *, send: int | None = None) -> None:
    with _raw_post(port, body, send=send):
        pass


def _metrics(url: str) -> str:
    return httpx.get(f"{url}/metrics", timeout=10).text


def _error_count(text: str, reason: str) -> float:
    return metric_values(text, "imdn_errors_total").get((("reason", reason),), 0.0)


def test_device_oom_is_retried_smaller_and_the_client_gets_its_image(
    weights_dir: Path, datasets_dir: Path, official_model: Callable[[str], IMDN]
) -> None:
    """A 26 MB activation budget (x4 needs ~2.9 KB per input pixel): three 56×56 crops in one
    batch do not fit and are halved; a 128×128 image does not fit alone and is tiled."""
    settings = Settings(
        weights_dir=weights_dir,
        models=["x4"],
        device_memory_budget_bytes=26_000_000,
        max_batch_wait_ms=200,
        batch_limit="max",  # the three crops in one batch, whatever warm-up timed here
    )
    lr = read_rgb(datasets_dir / "Set14" / "HR" / "baboon.png")
    images = [lr[:56, :56], lr[56:112, :56], lr[:56, 56:112], lr[200:328, 200:328]]
    with live_server(settings) as srv:
        before = _error_count(_metrics(srv.url), "device_oom_retry")

        async def post_all() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=srv.url, timeout=120) as c:
                answers: list[httpx.Response] = await asyncio.gather(
                    *(c.post("/v1/superres?scale=4", content=png_of(im)) for im in images)
                )
                return answers

        responses = asyncio.run(post_all())
        after = _error_count(_metrics(srv.url), "device_oom_retry")
    assert after >= before + 2, (before, after)  # the batch of three, and the 128×128 image
    for image, r in zip(images, responses, strict=True):
        assert r.status_code == 200, r.text
        served = read_png(r.content)
        expected = reference(official_model("x4"), image, 4)
        assert served.shape == expected.shape
        assert psnr(served, expected) >= 45


def _batches_taking(seconds: float, scale: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """A stand-in network whose every batch takes `seconds` on any machine (a fast host
    runs the real one's small batches in milliseconds): nearest-neighbour upsampling."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        time.sleep(seconds)
        return torch.nn.functional.interpolate(x, scale_factor=scale, mode="nearest")

    return forward


@pytest.fixture(scope="module")
def slow_server(weights_dir: Path) -> Iterator[LiveServer]:
    """Small tiles and batches, so a 192×192 image at ×4 is ~150 crops, and batches that
    take 0.05 s each: seconds of work on any machine."""
    settings = Settings(
        weights_dir=weights_dir,
        models=["x4"],
        tile_max_pixels=80 * 80,
        max_batch_size=4,
        batch_limit="max",  # batches of 4, whatever warm-up timed on this CPU
    )
    with live_server(settings) as srv:
        srv.app.state.engine.runner.models["x4"].forward = _batches_taking(0.05, 4)
        yield srv


def _idle(url: str) -> bool:
    text = _metrics(url)
    return gauge(text, "imdn_requests_in_flight") == 0 and gauge(text, "imdn_queue_depth") == 0


def test_client_gone_mid_upload_frees_its_request(
    slow_server: LiveServer, small_lr: np.ndarray
) -> None:
    url, port = slow_server.url, int(slow_server.url.rsplit(":", 1)[1])
    body = png_of(small_lr)
    before = _metrics(url)
    for _ in range(3):
        _post_raw(port, body + b"\0" * 100_000, send=len(body) // 2)
    wait_until(lambda: _idle(url), 10, "in-flight gauge back to 0")
    after = _metrics(url)
    disconnects = _error_count(after, "client_disconnected") - _error_count(
        before, "client_disconnected"
    )
    assert disconnects == 3
    assert _error_count(after, "internal_error") == 0
    r = httpx.post(f"{url}/v1/superres?scale=4", content=body, timeout=60)
    assert r.status_code == 200 and read_png(r.content).shape == (128, 128, 3)


def test_client_gone_before_the_answer_drops_its_queued_crops(
    slow_server: LiveServer, datasets_dir: Path, small_lr: np.ndarray
) -> None:
    url, port = slow_server.url, int(slow_server.url.rsplit(":", 1)[1])
    big = read_rgb(datasets_dir / "Set14" / "HR" / "baboon.png")[:192, :192]
    before = _metrics(url)
    crops_before = sum(metric_values(before, "imdn_batch_size_sum").values())
    with _raw_post(port, png_of(big)):  # closed once its crops are queued, answer unread
        wait_until(lambda: gauge(_metrics(url), "imdn_queue_depth") > 0, 10, "crops queued")
        queued = gauge(_metrics(url), "imdn_queue_depth")
    wait_until(lambda: _idle(url), 10, "queue and in-flight gauges back to 0")
    after = _metrics(url)
    computed = sum(metric_values(after, "imdn_batch_size_sum").values()) - crops_before
    assert queued > 50
    assert computed < queued / 2, f"{computed} crops computed of {queued} queued"
    assert (
        _error_count(after, "client_disconnected") - _error_count(before, "client_disconnected")
        == 1
    )
    r = httpx.post(f"{url}/v1/superres?scale=4", content=png_of(small_lr), timeout=60)
    assert r.status_code == 200 and read_png(r.content).shape == (128, 128, 3)


def test_past_its_deadline_a_request_is_504_and_its_work_dropped(
    weights_dir: Path, datasets_dir: Path
) -> None:
    """~150 crops in batches of 4 that take 0.1 s each: seconds of work, whatever the
    machine, against a deadline of half a second."""
    settings = Settings(
        weights_dir=weights_dir,
        models=["x4"],
        device="cpu",
        request_timeout_s=0.5,
        tile_max_pixels=80 * 80,
        max_batch_size=4,
        # no warm-up, so no measured throughput: admission by cost cannot refuse the big
        # request up front (tests/test_engine.py covers that), and its deadline passes
        warmup=False,
    )
    big = read_rgb(datasets_dir / "Set14" / "HR" / "baboon.png")[:192, :192]
    small = read_rgb(datasets_dir / "Set5" / "LR_bicubic" / "x4" / "birdx4.bmp")[:16, :16]
    with live_server(settings) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        srv.app.state.engine.runner.models["x4"].forward = _batches_taking(0.1, 4)
        started = time.monotonic()
        r = c.post("/v1/superres?scale=4", content=png_of(big))
        elapsed = time.monotonic() - started
        assert r.status_code == 504, r.text
        assert r.headers["content-type"] == "application/problem+json"
        problem = r.json()
        assert problem["status"] == 504 and problem["reason"] == "deadline_exceeded"
        assert elapsed < 5
        wait_until(lambda: _idle(srv.url), 5, "queue and in-flight gauges back to 0")
        # a batch already on the device when the deadline passed still runs to its end (a
        # forward cannot be interrupted), so the next request may expire behind it: retry
        give_up = time.monotonic() + 30
        while True:
            ok = c.post("/v1/superres?scale=4", content=png_of(small))
            assert ok.status_code in (200, 504), ok.text
            if ok.status_code == 200 or time.monotonic() > give_up:
                break
            time.sleep(0.5)
        assert ok.status_code == 200 and read_png(ok.content).shape == (64, 64, 3)


def test_sigterm_drains_in_flight_requests_and_exits_cleanly(
    weights_dir: Path, datasets_dir: Path, tmp_path: Path
) -> None:
    """`imdn serve` in a process of its own: SIGTERM while three slow requests run. Readiness
    turns 503 (while a connection can still be made), the three finish with 200, new
    connections are refused, and the process exits 0 within the grace period."""
    grace_s = 60
    env = {
        "IMDN_MODELS": '["x4"]',
        "IMDN_TILE_MAX_PIXELS": str(80 * 80),
        "IMDN_MAX_BATCH_SIZE": "4",
        "IMDN_REQUEST_TIMEOUT_S": str(grace_s),
        # no measured throughput before the three arrive: on a loaded machine, admission
        # by cost could answer the third 429 and it would never be in flight
        "IMDN_WARMUP": "false",
    }
    big = read_rgb(datasets_dir / "Set14" / "HR" / "baboon.png")[:128, :128]
    with imdn_serve(weights_dir, tmp_path, env) as srv:

        async def slow_requests() -> list[httpx.Response | BaseException]:
            async with httpx.AsyncClient(base_url=srv.url, timeout=grace_s) as c:
                posts = [
                    asyncio.ensure_future(c.post("/v1/superres?scale=4", content=png_of(big)))
                    for _ in range(3)
                ]
                give_up = time.monotonic() + 30
                while gauge(_metrics(srv.url), "imdn_requests_in_flight") < 3:
                    if time.monotonic() > give_up or any(p.done() for p in posts):
                        pytest.fail("the three requests were never in flight together")
                    await asyncio.sleep(0.05)
                srv.process.send_signal(signal.SIGTERM)
                sent = time.monotonic()
                try:
                    ready = await c.get("/readyz", timeout=2)
                    assert ready.status_code == 503, ready.text
                except httpx.TransportError:
                    pass  # the listener is already closed: as good
                await asyncio.sleep(0.5)
                with pytest.raises(httpx.ConnectError):
                    async with httpx.AsyncClient(timeout=2) as fresh:
                        await fresh.get(f"{srv.url}/healthz")
                results: list[httpx.Response | BaseException] = await asyncio.gather(
                    *posts, return_exceptions=True
                )
                assert time.monotonic() - sent < grace_s
                return results

        results = asyncio.run(slow_requests())
        code = srv.process.wait(timeout=grace_s)
    for r in results:
        assert isinstance(r, httpx.Response), r
        assert r.status_code == 200, r.text
        assert read_png(r.content).shape == (512, 512, 3)
    log = srv.log.read_text()
    assert code == 0, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
