"""The HTTP server under the app: uvicorn, with a bounded request head and protocol
errors answered as problem documents.

uvicorn's httptools protocol buffers a request line and headers of any size (a 16 MB
header was served; four unfinished 64 MB header lines grew the process by 200 MB) and
answers what its parser refuses (a bad or doubled Content-Length, an unknown method) in
text/plain, before the app ever sees the request. `GuardedHttpToolsProtocol` counts the
bytes of each request head as they arrive and refuses one over the limit (414 when the
URL is most of it, 431 otherwise), and writes every refusal of its own as
application/problem+json, counted in the app's metrics as the app counts the requests
it refuses before a model is chosen (`model="unrouted"`). (uvicorn's h11 protocol, were
it chosen, reads the same limit from the same option, but answers text/plain.)
"""

from __future__ import annotations

import json
import logging
import time
from http import HTTPStatus
from typing import Any

import httptools  # uvicorn[standard] brings it
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger(__name__)

PROBLEM = "application/problem+json"


def problem_bytes(status: int, reason: str, detail: str) -> bytes:
    """A whole HTTP/1.1 response carrying an RFC 9457 problem document; the connection
    closes after it (what follows a refused head cannot be trusted to be a request)."""
    body = json.dumps(
        {
            "type": "about:blank",
            "title": HTTPStatus(status).phrase,
            "status": status,
            "reason": reason,
            "detail": detail,
        }
    ).encode()
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
        f"content-type: {PROBLEM}\r\n"
        f"content-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


def parser_refusal(exc: Exception) -> tuple[int, str, str]:
    """(status, reason, detail) for what httptools' parser refused."""
    detail = str(exc) or "the request is not valid HTTP/1.1"
    if isinstance(exc, httptools.HttpParserInvalidMethodError):
        return 501, "method_not_implemented", f"{detail}: this server knows GET, HEAD, POST"
    if isinstance(exc, httptools.HttpParserInvalidURLError):
        return 400, "bad_request_target", detail
    return 400, "bad_request", detail


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a limit on each request head (request line
    and headers, `config.h11_max_incomplete_event_size` bytes) and problem+json
    refusals.

    The head's bytes are counted per piece received while its headers are not yet
    complete; a piece that completes them (or ends the previous message) resets the
    count, so a body is never counted and the memory a head can take stays within
    the limit plus one piece read from the socket.
    """

    def __init__(self, config: uvicorn.Config, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        self.max_head_bytes = config.h11_max_incomplete_event_size or 64 * 1024
        self.head_bytes = self.url_bytes = 0
        self.in_body = self.message_ended = False
        self.head_started = time.perf_counter()  # the first byte of the head being read

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.url_bytes = 0

    def on_url(self, url: bytes) -> None:
        self.url_bytes += len(url)
        super().on_url(url)

    def on_headers_complete(self) -> None:
        self.in_body = True
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self.in_body, self.message_ended = False, True
        super().on_message_complete()

    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        self.message_ended = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:  # as uvicorn does (no WebSocket route here)
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError as exc:
            self.refuse(*parser_refusal(exc))
            return
        if self.in_body or self.message_ended:
            self.head_bytes = 0
            return
        if self.head_bytes == 0:
            self.head_started = time.perf_counter()
        self.head_bytes += len(data)
        if self.head_bytes > self.max_head_bytes:
            limit = self.max_head_bytes
            if 2 * self.url_bytes > self.head_bytes:
                self.refuse(414, "uri_too_long", f"the URL exceeds the {limit}-byte limit")
            else:
                self.refuse(
                    431,
                    "headers_too_large",
                    f"the request line and headers exceed the {limit}-byte limit",
                )

    def refuse(self, status: int, reason: str, detail: str) -> None:
        """Answer `status` and close, unless a response is already on the wire (a
        pipelined request refused mid-response): then only close."""
        if self.transport.is_closing():
            return
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
        log.warning("refused a request from %s: %d %s (%s)", client, status, reason, detail)
        metrics: Metrics | None = getattr(getattr(self.config.app, "state", None), "metrics", None)
        if metrics is not None:
            metrics.observe_unrouted_refusal(
                status, reason, time.perf_counter() - self.head_started
            )
        if self.cycle is None or self.cycle.response_complete:
            self.transport.write(problem_bytes(status, reason, detail))
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        self.refuse(400, "bad_request", msg)


def server_config(app: Any, settings: Settings, **options: Any) -> uvicorn.Config:
    """The uvicorn configuration of `app`: the guarded protocol and the head limit of
    `settings`, plus `options` (host, port, logging)."""
    return uvicorn.Config(
        app,
        http=GuardedHttpToolsProtocol,
        h11_max_incomplete_event_size=settings.max_header_bytes,
        **options,
    )
