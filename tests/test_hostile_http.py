"""Issue 14's hostile client, over real HTTP on loopback: each hole it found is a case here,
its malicious input built in the test (a lying JPEG, a scan cut short with its end marker
put back, a PNG failing its CRC, a stalled upload and an HTTP/1.0 request on raw sockets, a
trailing-slash POST with a foreign Host header, ambiguous requests, a client that leaves
while its crops are in the engine), and the OpenAPI document with keys on."""

from __future__ import annotations

import gc
import io
import json
import logging
import socket
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from models.quality.evaluate import read_rgb
from service.settings import Settings
from tests.live import LiveServer, live_server, wait_until
from tests.load import png_bytes, png_size
from tests.test_reliability import gauge, metric_values

BODY_READ_TIMEOUT_S = 2.0
KEY = "key-14"


@pytest.fixture(scope="module")
def lr(datasets_dir: Path) -> np.ndarray:
    """A real 48×48 LR patch (Set5 baby)."""
    return read_rgb(datasets_dir / "Set5" / "LR_bicubic" / "x4" / "babyx4.bmp")[:48, :48]


@pytest.fixture(scope="module")
def server(weights_dir: Path) -> Iterator[LiveServer]:
    settings = Settings(
        weights_dir=weights_dir, models=["x2"], body_read_timeout_s=BODY_READ_TIMEOUT_S
    )
    with live_server(settings) as srv:
        yield srv


def _port(srv: LiveServer) -> int:
    return int(srv.url.rsplit(":", 1)[1])


def _crops_computed(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(metric_values(text, "imdn_batch_size_sum").values())


def _assert_problem(r: httpx.Response, status: int, reason: str) -> dict[str, object]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body: dict[str, object] = r.json()
    assert (body["status"], body["reason"]) == (status, reason), body
    return body


# --------------------------------------------------------------------------- decoding


def _jpeg(pixels: np.ndarray, **save: object) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", **save)
    return out.getvalue()


def lying_jpeg(pixels: np.ndarray) -> bytes:
    """A small JPEG whose frame header says 4000×4000: Pillow decodes it, grey below."""
    data = bytearray(_jpeg(pixels, quality=75))
    struct.pack_into(">HH", data, data.index(b"\xff\xc0") + 5, 4000, 4000)
    return bytes(data)


def truncated_jpeg(pixels: np.ndarray) -> bytes:
    """Half of the scan data cut out and the end marker (EOI) put back."""
    data = _jpeg(pixels, quality=90)
    sos = data.index(b"\xff\xda")
    start = sos + 2 + struct.unpack_from(">H", data, sos + 2)[0]
    end = data.rindex(b"\xff\xd9")
    return data[: start + (end - start) // 2] + b"\xff\xd9"


def bad_crc_png(pixels: np.ndarray) -> bytes:
    """A PNG one of whose IDAT bytes is flipped (its CRC left as it was)."""
    data = bytearray(png_bytes(pixels))
    data[data.index(b"IDAT") + 20] ^= 0x10
    return bytes(data)


def short_png(pixels: np.ndarray) -> bytes:
    """A PNG header declaring twice the rows its (complete) zlib stream holds."""
    height, width = pixels.shape[:2]

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + payload))
        return struct.pack(">I", len(payload)) + kind + payload + crc

    rows = b"".join(b"\0" + row.tobytes() for row in pixels)
    ihdr = struct.pack(">IIBBBBB", width, 2 * height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def test_dishonest_images_are_400_before_any_engine_work(
    server: LiveServer, lr: np.ndarray
) -> None:
    """Each of these was served 200 (grey or black rows) or queued 424 crops before."""
    lying = lying_jpeg(lr)
    assert len(lying) < 1500  # the was 996 bytes
    cases = [
        ("JPEG declaring 4000x4000 over 48x48", lying, "too short for the 4000x4000"),
        ("JPEG scan cut in half, EOI put back", truncated_jpeg(lr), "premature end of data"),
        ("PNG with a flipped IDAT byte", bad_crc_png(lr), "fails its CRC"),
        ("PNG declaring twice its rows", short_png(lr), "ends early"),
    ]
    with httpx.Client(base_url=server.url, timeout=60) as c:
        computed = _crops_computed(server.url)
        for what, body, says in cases:
            r = c.post("/v1/superres?scale=2", content=body)
            problem = _assert_problem(r, 400, "undecodable")
            assert says in str(problem["detail"]), f"{what}: {problem}"
        assert _crops_computed(server.url) == computed  # nothing reached the engine
        ok = c.post("/v1/superres?scale=2", content=_jpeg(lr, quality=90))
        assert ok.status_code == 200 and png_size(ok.content) == (96, 96)


# --------------------------------------------------------------------------- slow clients


def _read_response(sock: socket.socket) -> tuple[str, dict[str, str], bytes]:
    """(status line, headers, body) of a response read until the server closes."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines)}
    return status, headers, body


def test_stalled_upload_gets_408_while_others_are_served(
    server: LiveServer, lr: np.ndarray
) -> None:
    """10 bytes of a declared 1000, then silence: 408 once the body read timeout passes,
    and the connection closed; other clients are served meanwhile."""
    head = (
        b"POST /v1/superres?scale=2 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: image/png\r\nContent-Length: 1000\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", _port(server)), timeout=30) as stalled:
        stalled.sendall(head + png_bytes(lr)[:10])
        with httpx.Client(base_url=server.url, timeout=60) as c:
            assert c.get("/healthz").status_code == 200
            ok = c.post("/v1/superres?scale=2", content=png_bytes(lr))
            assert ok.status_code == 200 and png_size(ok.content) == (96, 96)
        status, headers, body = _read_response(stalled)  # the server closes it
    assert status.split()[1] == "408", status
    assert headers["content-type"] == "application/problem+json"
    assert headers["connection"] == "close"
    assert json.loads(body)["reason"] == "body_timeout"


def test_http10_client_gets_a_png_with_content_length(server: LiveServer, lr: np.ndarray) -> None:
    """HTTP/1.0 has no chunked encoding: the PNG comes whole, with its length, and the
    server closes the connection after it."""
    image = png_bytes(lr)
    request = (
        "POST /v1/superres?scale=2 HTTP/1.0\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: image/png\r\nContent-Length: {len(image)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", _port(server)), timeout=60) as sock:
        sock.sendall(request + image)
        status, headers, body = _read_response(sock)
    assert status.split()[1] == "200", status
    assert "transfer-encoding" not in headers
    assert headers["content-type"] == "image/png"
    assert int(headers["content-length"]) == len(body)
    out = Image.open(io.BytesIO(body))
    out.load()  # the whole PNG, no chunk sizes inside it
    assert out.size == (96, 96)


# --------------------------------------------------------------------------- paths


def test_no_redirects_unknown_paths_are_404_problems(server: LiveServer, lr: np.ndarray) -> None:
    """`POST /v1/superres/` was a 307 to a Location built from the Host header."""
    foreign = {"Host": "evil.example", "Content-Type": "image/png"}
    with httpx.Client(base_url=server.url, timeout=60, follow_redirects=False) as c:
        for method, path in [
            ("POST", "/v1/superres/?scale=2"),
            ("GET", "/healthz/"),
            ("GET", "/v1/models/"),
            ("GET", "/nowhere"),
        ]:
            r = c.request(method, path, content=png_bytes(lr), headers=foreign)
            _assert_problem(r, 404, "not_found")
            assert "location" not in r.headers
            assert "evil.example" not in r.text
        _assert_problem(c.get("/v1/superres?scale=2"), 405, "method_not_allowed")


# --------------------------------------------------------------------------- ambiguity


def test_repeated_scale_and_two_image_parts_are_422(server: LiveServer, lr: np.ndarray) -> None:
    """Both were served before, the last value winning."""
    image = png_bytes(lr)
    other = png_bytes(lr[:24, :24])
    with httpx.Client(base_url=server.url, timeout=60) as c:
        for query in ("scale=2&scale=3", "scale=2&scale=2", "scale=2&scale=x"):
            r = c.post(f"/v1/superres?{query}", content=image)
            problem = _assert_problem(r, 422, "repeated_scale")
            assert "give it once" in str(problem["detail"])
        two = [("image", ("a.png", image, "image/png")), ("image", ("b.png", other, "image/png"))]
        r = c.post("/v1/superres?scale=2", files=two)
        problem = _assert_problem(r, 422, "multiple_images")
        assert "2 'image' parts" in str(problem["detail"])
        one = c.post("/v1/superres?scale=2", files=two[:1])
        assert one.status_code == 200 and png_size(one.content) == (96, 96)


# --------------------------------------------------------------------------- disconnects


def test_client_gone_while_its_crops_are_in_the_engine_is_logged_at_info(
    weights_dir: Path, datasets_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Was `ERROR asyncio: _GatheringFuture exception was never retrieved`."""
    settings = Settings(
        weights_dir=weights_dir, models=["x4"], tile_max_pixels=80 * 80, max_batch_size=4
    )
    big = read_rgb(datasets_dir / "Set14" / "HR" / "baboon.png")[:192, :192]
    image = png_bytes(big)
    head = (
        "POST /v1/superres?scale=4 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: image/png\r\nContent-Length: {len(image)}\r\n\r\n"
    ).encode()
    caplog.set_level(logging.DEBUG)
    with live_server(settings) as srv:

        def queue_depth() -> float:
            return gauge(httpx.get(f"{srv.url}/metrics", timeout=10).text, "imdn_queue_depth")

        def idle() -> bool:
            text = httpx.get(f"{srv.url}/metrics", timeout=10).text
            return gauge(text, "imdn_requests_in_flight") == 0 == gauge(text, "imdn_queue_depth")

        for _ in range(2):
            with socket.create_connection(("127.0.0.1", _port(srv)), timeout=10) as sock:
                sock.sendall(head + image)
                wait_until(lambda: queue_depth() > 0, 30, "crops queued")
            wait_until(idle, 30, "the request dropped")
        gc.collect()  # the futures of the cancelled batches are gone now, logged or not
        r = httpx.get(f"{srv.url}/healthz", timeout=10)
        assert r.status_code == 200
    errors = [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
    assert errors == [], [f"{rec.name}: {rec.getMessage()}" for rec in errors]
    left = [
        rec
        for rec in caplog.records
        if rec.name == "service.api" and rec.levelno == logging.INFO and "left" in rec.message
    ]
    assert len(left) == 2


# --------------------------------------------------------------------------- OpenAPI


@pytest.fixture(scope="module")
def keyed_server(weights_dir: Path) -> Iterator[LiveServer]:
    settings = Settings(weights_dir=weights_dir, models=["x2"], api_keys=[KEY])
    with live_server(settings) as srv:
        yield srv


def test_openapi_declares_bearer_auth_only_with_keys(
    server: LiveServer, keyed_server: LiveServer
) -> None:
    """With keys, an HTTP bearer scheme on the key-protected routes (so /docs has its
    Authorize button and sends the key); without keys, none; nothing else differs."""
    open_doc = httpx.get(f"{server.url}/openapi.json", timeout=10).json()
    keyed_doc = httpx.get(f"{keyed_server.url}/openapi.json", timeout=10).json()
    assert "securitySchemes" not in open_doc.get("components", {})
    assert not any("security" in op for ops in open_doc["paths"].values() for op in ops.values())

    schemes = keyed_doc["components"].pop("securitySchemes")
    if not keyed_doc["components"]:  # the open document has no components at all
        del keyed_doc["components"]
    assert list(schemes.values()) == [schemes["bearerAuth"]]
    assert (schemes["bearerAuth"]["type"], schemes["bearerAuth"]["scheme"]) == ("http", "bearer")
    secured = {
        (path, method)
        for path, ops in keyed_doc["paths"].items()
        for method, op in ops.items()
        if op.pop("security", None) == [{"bearerAuth": []}]
    }
    assert secured == {
        ("/v1/superres", "post"),
        ("/v1/superres/video", "post"),
        ("/v1/models", "get"),
        ("/v1/report", "get"),
    }  # ops routes stay open unless IMDN_PROTECT_OPS_ROUTES
    assert keyed_doc == open_doc

    docs = httpx.get(f"{keyed_server.url}/docs", timeout=10)
    assert docs.status_code == 200 and "/openapi.json" in docs.text
    # what the Authorize button sends
    models = f"{keyed_server.url}/v1/models"
    assert httpx.get(models, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert httpx.get(models).status_code == 401
