"""Issue 26's hostile client, over real HTTP on loopback (the server `imdn serve` runs:
tests/live.py builds it with service/http_server.py): protocol errors answered as
problem documents, a bounded request head, transfer codings, ambiguous numbers, and
text logs that a request cannot forge."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.logs import RequestIdFilter, TextFormatter
from service.settings import Settings
from tests.live import LiveServer, live_server
from tests.test_reliability import metric_values

HEAD_LIMIT = 16 * 1024


@pytest.fixture(scope="module")
def server(weights_dir: Path) -> Iterator[LiveServer]:
    settings = Settings(
        weights_dir=weights_dir, models=["x2"], warmup=False, max_header_bytes=HEAD_LIMIT
    )
    with live_server(settings) as srv:
        yield srv


def _connect(srv: LiveServer) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", int(srv.url.rsplit(":", 1)[1])), timeout=10)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return data


def _exchange(srv: LiveServer, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes; (status, headers, body) of the answer, read to the close."""
    with _connect(srv) as sock:
        # refused before all of it was sent: the answer is already there
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(request)
        answer = _read_all(sock)
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


def _problem(answer: tuple[int, dict[str, str], bytes], status: int, reason: str) -> None:
    got, headers, body = answer
    assert got == status, body
    assert headers["content-type"] == "application/problem+json"
    document = json.loads(body)
    assert (document["status"], document["reason"]) == (status, reason), document


@pytest.mark.parametrize(
    ("request_bytes", "status", "reason"),
    [
        (b"FOO /healthz HTTP/1.1\r\nHost: x\r\n\r\n", 501, "method_not_implemented"),
        (
            b"POST /v1/superres?scale=2 HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
            400,
            "bad_request",
        ),
        (
            b"POST /v1/superres?scale=2 HTTP/1.1\r\nHost: x\r\nContent-Length: 5x\r\n\r\nhello",
            400,
            "bad_request",
        ),
        (b"GET /" + b"a" * 1_000_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "uri_too_long"),
        (
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n",
            431,
            "headers_too_large",
        ),
    ],
    ids=["unknown-method", "double-length", "bad-length", "1MB-url", "200kB-header"],
)
def test_protocol_errors_are_problem_documents(
    server: LiveServer, request_bytes: bytes, status: int, reason: str
) -> None:
    """Each is answered as a problem document, and counted in the metrics as the app
    counts its own refusals: the reason, and the status under model "unrouted"."""

    def counted() -> tuple[float, float, float]:
        text = httpx.get(f"{server.url}/metrics", timeout=10).text
        outcome = "client_error" if status < 500 else "error"
        return (
            metric_values(text, "imdn_errors_total").get((("reason", reason),), 0.0),
            metric_values(text, "imdn_request_duration_seconds_count").get(
                (("model", "unrouted"), ("status", str(status))), 0.0
            ),
            metric_values(text, "imdn_requests_total").get(
                (("model", "unrouted"), ("outcome", outcome)), 0.0
            ),
        )

    before = counted()
    _problem(_exchange(server, request_bytes), status, reason)
    after = counted()
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 1, 1]


def test_a_head_under_the_limit_is_served(server: LiveServer) -> None:
    big = b"a" * (HEAD_LIMIT - 1024)
    r = httpx.get(f"{server.url}/healthz", headers={"X-Big": big.decode()}, timeout=10)
    assert r.status_code == 200


def test_an_unfinished_head_is_cut_off_at_the_limit(server: LiveServer) -> None:
    """A header line that never ends is refused once it passes the limit: the server
    answers 431 and closes while the client is still sending (not after 8 MB)."""
    piece = b"a" * 4096
    sent = 0
    with _connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Endless: ")
        try:
            while sent < 8 * 1024 * 1024:
                sock.sendall(piece)
                sent += len(piece)
                time.sleep(0.0005)
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = _read_all(sock)
    assert sent < 2 * 1024 * 1024, f"{sent} bytes of one header line were taken"
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]


def test_a_transfer_coding_other_than_chunked_is_refused(server: LiveServer) -> None:
    answer = _exchange(
        server,
        b"POST /v1/superres?scale=2 HTTP/1.1\r\nHost: x\r\n"
        b"Transfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    _problem(answer, 400, "unsupported_transfer_coding")


@pytest.mark.parametrize(
    ("query", "reason", "where"),
    [
        ("scale=2&quality=50&quality=60", "repeated_quality", None),
        ("scale=0_2", "invalid_request", "scale"),
        ("scale=2&quality=5_0", "invalid_request", "quality"),
    ],
)
def test_ambiguous_numbers_are_422(
    server: LiveServer, query: str, reason: str, where: str | None
) -> None:
    r = httpx.post(f"{server.url}/v1/superres?{query}", content=b"\x89PNG", timeout=10)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["reason"] == reason
    if where is not None:
        assert body["detail"][0]["loc"] == ["query", where]


def test_text_logs_cannot_be_forged(server: LiveServer, caplog: pytest.LogCaptureFixture) -> None:
    """A path with an encoded line break and an ESC writes one line, escaped, under the
    text format `imdn serve` uses."""
    caplog.handler.addFilter(RequestIdFilter())
    caplog.set_level(logging.INFO)
    forged = "%0A2026-12-07%2000:00:00,000%20ERROR%20service.api%20[-]%20FORGED%1B[31m"
    r = httpx.post(f"{server.url}/v1/superres{forged}?scale=2", content=b"x", timeout=10)
    assert r.status_code == 404
    formatter = TextFormatter()
    lines = [formatter.format(rec) for rec in caplog.records if rec.name == "imdn.access"]
    assert lines, "the request was not logged"
    for line in lines:
        assert "\n" not in line and "\x1b" not in line, repr(line)
        assert "/v1/superres\\n2026-12-07" in line and "FORGED\\x1b[31m" in line
