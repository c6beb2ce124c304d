"""Fuzzing the HTTP API against its own OpenAPI document with schemathesis (4.x).

A real uvicorn server on loopback (tests/live.py) with two models and small limits, so
fuzzed images stay cheap. Four angles:

* `schemathesis run` over every operation: its coverage phase (boundaries, wrong types,
  missing fields, unexpected methods and content types) and its fuzzing phase, with every
  check; the run's JSON report must show every operation tested and nothing failed.
* the same against a server that wants an API key, with none sent: every 401 is declared.
* POST /v1/superres with bodies schemathesis cannot make up (to it, `binary` is a few fixed
  file samples): images in the five formats and their modes, served whole at the right size
  and mode, or truncated, bit-flipped, spliced, or noise behind a real magic number, which
  must be refused with a declared 4xx, never a 5xx.
* answers a fuzzer does not reach: `/metrics` and `/v1/report` in the types their Accept
  header picks, and `/readyz` before the models are loaded.

schemathesis's pytest plugin (`from_fixture`) fails under pytest 9, so the CLI runs in a
subprocess and the Python API feeds hypothesis directly. `IMDN_FUZZ_SEED` replays a run.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import random
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("schemathesis", reason="schemathesis (dev dependency) is not installed")

import httpx
import numpy as np
import requests
import schemathesis
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from PIL import Image
from schemathesis import checks
from schemathesis.core.result import Err

from service.app import create_app
from service.imaging import output_size
from service.settings import Settings
from tests.live import LiveServer, live_server

Operation = schemathesis.APIOperation[Any, Any, Any, Any]
MAX_SIDE = 40  # inputs up to 40x40, under the 64x64 pixel limit below
RESPONSE_CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
    checks.response_headers_conformance,
]
# A schema-valid upload can still be refused for its bytes: `format: binary` cannot say "a
# decodable PNG of at most max_input_pixels", so 400 (undecodable), 413 (too large) and 415
# (a GIF or PDF sample) are fair answers to valid data. 422 stays out: it would mean the
# schema allows a scale or a form the server refuses.
CONFIG = """
[[operations]]
include-path = "/v1/superres"
checks.positive_data_acceptance.expected-statuses = [
    "2xx", "3xx", "400", "401", "403", "404", "409", "413", "415", "429", "5xx",
]

# A video may also be 422 for valid data: a file with no video stream, no frames or alpha,
# and a crf past the chosen codec's own range (h264/hevc 0..51; the schema's 0..63 is AV1's
# and VP9's, and one parameter's schema cannot depend on another's value).
[[operations]]
include-path = "/v1/superres/video"
checks.positive_data_acceptance.expected-statuses = [
    "2xx", "3xx", "400", "401", "403", "404", "409", "413", "415", "422", "429", "5xx",
]
"""


def fuzz_settings(weights_dir: Path, **overrides: Any) -> Settings:
    return Settings(
        weights_dir=weights_dir,
        models=["x2", "AS"],
        max_input_pixels=64 * 64,
        max_upload_bytes=200_000,
        request_timeout_s=30,
        **overrides,
    )


def seed() -> int:
    return int(os.environ.get("IMDN_FUZZ_SEED") or random.SystemRandom().randrange(2**32))


@pytest.fixture(scope="module")
def server(weights_dir: Path) -> Iterator[LiveServer]:
    with live_server(fuzz_settings(weights_dir)) as srv:
        yield srv


@pytest.fixture(scope="module")
def schema(server: LiveServer) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json")


def operations(schema: schemathesis.BaseSchema) -> dict[str, Operation]:
    """The schema's operations by label ("POST /v1/superres"); an unparsable one raises."""
    found = {}
    for result in schema.get_all_operations():
        if isinstance(result, Err):
            raise result.err()
        found[result.ok().label] = result.ok()
    return found


# ------------------------------------------------------------------ the CLI, whole schema


def schemathesis_run(url: str, work: Path, *, max_examples: int) -> dict[str, Any]:
    """`schemathesis run` with every check against `url`; its JSON report and output."""
    cli = Path(sys.executable).with_name("schemathesis")
    if not cli.is_file():
        found = shutil.which("schemathesis")
        if found is None:
            pytest.skip("the schemathesis command is not installed")
        cli = Path(found)
    (work / "schemathesis.toml").write_text(CONFIG)
    run_seed = seed()
    command = [
        str(cli),
        "--config-file",
        str(work / "schemathesis.toml"),
        "run",
        f"{url}/openapi.json",
        "--checks=all",
        "--phases=examples,coverage,fuzzing",  # stateful: no links between operations
        f"--max-examples={max_examples}",
        "--continue-on-failure",
        "--workers=1",
        f"--seed={run_seed}",
        "--generation-database=none",
        "--request-timeout=30",
        "--no-color",
        "--report=json",
        f"--report-dir={work}",
    ]
    # loopback only: no proxy from the environment, nothing written to the repository
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    done = subprocess.run(
        command, cwd=work, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    reports = sorted(work.glob("json-*.json"))
    assert reports, f"no report (exit {done.returncode}):\n{done.stdout[-4000:]}{done.stderr}"
    report: dict[str, Any] = json.loads(reports[-1].read_text())
    report["output"] = f"seed {run_seed}, exit {done.returncode}\n{done.stdout[-8000:]}"
    return report


def declared_operations(url: str) -> set[str]:
    paths = requests.get(f"{url}/openapi.json", timeout=10).json()["paths"]
    return {f"{method.upper()} {path}" for path, item in paths.items() for method in item}


def test_schemathesis_every_operation_conforms_and_no_5xx(
    server: LiveServer, tmp_path: Path
) -> None:
    report = schemathesis_run(server.url, tmp_path, max_examples=100)
    out = report["output"]
    assert report["stop_reason"] == "completed", out
    assert report["failures"] == [] and report["errors"] == [], out
    assert report["exit_code"] == 0, out
    ops = report["operations"]
    assert ops["tested"] == ops["total"] == len(declared_operations(server.url)) == 7, out
    assert ops["errored"] == 0 and ops["skipped"] == 0, out
    for phase in ("coverage", "fuzzing"):
        assert report["phases"][phase]["status"] == "success", out
    # every operation got valid requests through, not only refusals (but a video, which
    # schemathesis cannot make: tests/test_video.py sends real ones)
    for label, rates in report["valid_rates"].items():
        if label == "POST /v1/superres/video":
            continue
        assert sum(r["accepted"] for r in rates.values()) > 0, (label, rates)
    assert report["test_cases"]["generated"] >= 100, out


def test_schemathesis_with_api_keys_every_operation_declares_its_401(
    weights_dir: Path, tmp_path: Path
) -> None:
    settings = fuzz_settings(weights_dir, api_keys=["fuzz-key"], protect_ops_routes=True)
    with live_server(settings) as srv:
        report = schemathesis_run(srv.url, tmp_path, max_examples=10)
        declared = declared_operations(srv.url)
    out = report["output"]
    assert report["failures"] == [] and report["errors"] == [], out
    assert report["operations"]["tested"] == len(declared) == 7, out
    # schemathesis warns about operations that answered nothing but 401/403: all of them
    assert set(report["warnings"]["missing_auth"]) == declared, out


# ------------------------------------------------------------------ images schemathesis cannot make

# Pillow format -> (content type, modes written, encoder options to draw from)
FORMATS: dict[str, tuple[str, tuple[str, ...], tuple[dict[str, Any], ...]]] = {
    "PNG": ("image/png", ("1", "L", "LA", "P", "RGB", "RGBA", "I;16"), ({}, {"optimize": True})),
    "JPEG": (
        "image/jpeg",
        ("L", "RGB", "CMYK"),
        ({"quality": 5}, {"quality": 95, "progressive": True}),
    ),
    "WEBP": ("image/webp", ("L", "RGB", "RGBA"), ({"lossless": True}, {"quality": 10})),
    "BMP": ("image/bmp", ("1", "L", "P", "RGB"), ({},)),
    "TIFF": (
        "image/tiff",
        ("1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16"),
        ({}, {"compression": "tiff_lzw"}, {"compression": "tiff_adobe_deflate"}),
    ),
}
MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"RIFF\0\0\0\0WEBPVP8 ", b"BM", b"II*\0")
REFUSALS = {400, 413, 415}


def output_mode(fmt: str, mode: str) -> str:
    """What the service answers for an input mode: grey stays grey (16-bit stays 16-bit),
    alpha stays, palette and CMYK become RGB; WebP stores no grey, so its L is RGB."""
    if fmt == "WEBP" and mode == "L":
        return "RGB"
    return {"1": "L", "P": "RGB", "CMYK": "RGB"}.get(mode, mode)


def encode(
    arr: np.ndarray, alpha: np.ndarray, mode: str, fmt: str, options: dict[str, Any]
) -> bytes:
    image = Image.fromarray(arr)
    if mode == "I;16":
        image = image.convert("L").convert("I").point(lambda v: v * 257).convert("I;16")
    elif mode in ("LA", "RGBA"):
        image = image.convert(mode[:-1])
        image.putalpha(Image.fromarray(alpha))
    else:
        image = image.convert(mode)
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


@st.composite
def images(draw: st.DrawFn) -> tuple[bytes, str, str, str, tuple[int, int]]:
    """(bytes, content type, Pillow format, mode, (height, width)) of a real image."""
    fmt = draw(st.sampled_from(sorted(FORMATS)))
    content_type, modes, option_sets = FORMATS[fmt]
    mode = draw(st.sampled_from(modes))
    h, w = draw(st.integers(1, MAX_SIDE)), draw(st.integers(1, MAX_SIDE))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if draw(st.booleans()):  # noise, or one flat colour
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    else:
        arr = np.broadcast_to(rng.integers(0, 256, 3, dtype=np.uint8), (h, w, 3)).copy()
    alpha = rng.integers(0, 256, (h, w), dtype=np.uint8)
    data = encode(arr, alpha, mode, fmt, draw(st.sampled_from(option_sets)))
    return data, content_type, fmt, mode, (h, w)


@st.composite
def damaged(draw: st.DrawFn, data: bytes) -> tuple[str, bytes]:
    """`data` truncated, bit-flipped, spliced, or replaced by noise behind a magic number."""
    kind = draw(st.sampled_from(["truncate", "flip", "splice", "noise"]))
    if kind == "truncate":
        return kind, data[: draw(st.integers(0, len(data) - 1))]
    if kind == "flip":
        out = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            out[draw(st.integers(0, len(out) - 1))] ^= draw(st.integers(1, 255))
        return kind, bytes(out)
    if kind == "splice":
        a = draw(st.integers(0, len(data) - 1))
        b = draw(st.integers(a + 1, len(data)))
        doubled = draw(st.booleans())
        return kind, data[:b] + data[a:] if doubled else data[:a] + data[b:]
    return kind, draw(st.sampled_from(MAGIC)) + draw(st.binary(max_size=2048))


def test_superres_fuzzed_images_are_served_or_refused_never_a_5xx(
    server: LiveServer, schema: schemathesis.BaseSchema
) -> None:
    op = operations(schema)["POST /v1/superres"]
    other_types = [t for t, _, _ in FORMATS.values()] + ["application/octet-stream"]
    seen: Counter[tuple[str, int]] = Counter()
    session = requests.Session()

    @settings(
        max_examples=int(os.environ.get("IMDN_FUZZ_EXAMPLES", "150")),
        deadline=None,
        database=None,  # nothing written to the repository
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(
        generated=op.as_strategy(),  # the scale: what the schema allows, drawn by schemathesis
        image=images(),
        data=st.data(),
    )
    def check(
        generated: Any, image: tuple[bytes, str, str, str, tuple[int, int]], data: Any
    ) -> None:
        body, content_type, fmt, mode, (h, w) = image
        kind = "whole"
        if data.draw(st.integers(0, 2)) == 0:  # some uploads damaged (0 is drawn most)
            kind, body = data.draw(damaged(body))
        declared = data.draw(st.sampled_from([content_type, *other_types]))
        scale = generated.query["scale"]
        url, params = f"{server.url}/v1/superres", {"scale": scale}
        # sent by requests, not schemathesis: it has no serializer for every image type
        if data.draw(st.booleans()):
            how = "raw"
            response = session.post(
                url, params=params, data=body, headers={"Content-Type": declared}, timeout=60
            )
        else:
            how = "multipart"
            files = {"image": ("upload", body, declared)}
            response = session.post(url, params=params, files=files, timeout=60)
        note(f"{fmt} {mode} {h}x{w} {kind}, {how} as {declared}, x{scale}: {response.status_code}")
        op.Case(query=params).validate_response(response, checks=RESPONSE_CHECKS)
        seen[kind, response.status_code] += 1
        if kind == "whole":
            assert response.status_code == 200, response.text
            out = Image.open(io.BytesIO(response.content))
            assert out.format == "PNG"
            assert out.size[::-1] == output_size(h, w, scale)
            assert out.mode == output_mode(fmt, mode)
        else:
            assert response.status_code in {200} | REFUSALS, response.text
            if response.status_code == 200:
                assert Image.open(io.BytesIO(response.content)).format == "PNG"

    try:
        check()
    finally:
        session.close()
    # both paths were exercised: whole images served, damaged ones refused
    assert seen["whole", 200] > 0, seen
    assert sum(n for (kind, status), n in seen.items() if status in REFUSALS) > 0, seen


# ------------------------------------------------------------------ answers a fuzzer does not reach


@pytest.mark.parametrize(
    ("label", "accept", "media_type"),
    [
        (
            "GET /metrics",
            "application/openmetrics-text; version=1.0.0",
            "application/openmetrics-text",
        ),
        ("GET /metrics", "text/plain", "text/plain"),
        ("GET /v1/report", "text/markdown", "text/markdown"),
        ("GET /v1/report", "application/json", "application/json"),
    ],
)
def test_negotiated_content_types_are_declared(
    server: LiveServer, schema: schemathesis.BaseSchema, label: str, accept: str, media_type: str
) -> None:
    case = operations(schema)[label].Case(headers={"Accept": accept})
    response = case.call(base_url=server.url)
    assert response.status_code == 200
    assert response.headers["content-type"][0].startswith(media_type)
    case.validate_response(response, checks=RESPONSE_CHECKS)


def test_readyz_before_the_models_load_is_a_declared_503(
    server: LiveServer, schema: schemathesis.BaseSchema, weights_dir: Path
) -> None:
    async def readyz() -> httpx.Response:
        # httpx's ASGI transport runs no lifespan, so the models are never loaded
        transport = httpx.ASGITransport(app=create_app(fuzz_settings(weights_dir)))
        async with httpx.AsyncClient(transport=transport, base_url=server.url) as client:
            return await client.get("/readyz")

    response = asyncio.run(readyz())
    assert response.status_code == 503
    assert response.json()["reason"] == "not_ready"
    # a declared 503 is the point here, so every check but not_a_server_error
    declared_only = [c for c in RESPONSE_CHECKS if c is not checks.not_a_server_error]
    operations(schema)["GET /readyz"].Case().validate_response(response, checks=declared_only)
