"""Logging: a request ID on every record of a request, text or JSON lines, and the
access log.

A pure ASGI middleware (it sees streamed bodies through to their last byte, which
`BaseHTTPMiddleware` would not) takes the client's `X-Request-ID` when it is
well-formed, makes one otherwise, puts it in a context variable, echoes it on the
response and writes one access line per request. A filter on the one log handler
copies the context variable into every record, so any logger (ours, uvicorn's,
a library's) that logs while a request is handled carries its ID. Code run through
`asyncio.to_thread` inherits the ID; the engine's scheduler and device thread serve
batches of several requests, and their records carry none.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from contextvars import ContextVar
from datetime import datetime, timezone
from typing import Any, Literal, TextIO

REQUEST_ID_HEADER = "X-Request-ID"
WELL_FORMED_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
"""A client's request ID is kept when it is 1-128 characters of letters, digits, '.',
'_' and '-' (UUIDs, ULIDs, W3C trace IDs and the like); anything else (empty, too long,
spaces, quotes, control or non-ASCII characters, which could forge log lines or
break parsers downstream) is replaced by a fresh one."""
OPS_PATHS = frozenset({"/metrics", "/healthz", "/readyz"})
"""Routes polled by probes and scrapers: no access line unless asked for."""
ACCESS_FIELDS = ("method", "path", "query", "status", "duration_ms", "client")
EXTRA_FIELDS = (*ACCESS_FIELDS, "problems")
"""Fields a JSON line carries when the record has them (`problems`: a start-up refusal)."""
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
"""What a text log line must not carry raw: a CR or LF from a client's path or header
would start a forged line of its own, an ESC would drive the reader's terminal."""

ARRIVED = "imdn.arrived"
"""The scope key holding the request's arrival (time.perf_counter())."""

request_id: ContextVar[str | None] = ContextVar("imdn_request_id", default=None)
access_log = logging.getLogger("imdn.access")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def accept_request_id(given: str | None) -> str:
    """The client's ID when well-formed, else a new random one (32 hex digits)."""
    if given is not None and WELL_FORMED_ID.fullmatch(given):
        return given
    return uuid.uuid4().hex


def current_request_id() -> str | None:
    """The ID of the request being handled in this context, if any."""
    return request_id.get()


class RequestIdFilter(logging.Filter):
    """Give every record the current request's ID (None outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (UTC, ISO 8601), level, logger, message, request_id,
    the access fields when present, and the traceback of an exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
        }
        for name in EXTRA_FIELDS:
            if hasattr(record, name):
                entry[name] = getattr(record, name)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """`time level logger [request_id] message`, with '-' outside a request."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(rid)s] %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        record.rid = getattr(record, "request_id", None) or "-"
        return super().format(record)

    def formatMessage(self, record: logging.LogRecord) -> str:
        """The line, with control characters escaped (`\\n`, `\\x1b`): whatever a client
        put in a path or a header stays on this one line. A traceback, appended after
        this, keeps its own lines."""
        return escape_controls(super().formatMessage(record))


def escape_controls(text: str) -> str:
    """`text` with each control character written as a Python escape (`\\r`, `\\x1b`)."""
    return CONTROL_CHARACTERS.sub(lambda m: repr(m.group())[1:-1], text)


def configure(
    level: str, fmt: Literal["text", "json"] = "text", stream: TextIO | None = None
) -> logging.Handler:
    """Route every logger (uvicorn's too: start it with `log_config=None`) through one
    handler on the root logger, in the chosen format, with request IDs."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers, logger.propagate = [], True
    return handler


class RequestContextMiddleware:
    """Request ID in, request ID out, and one access line per request.

    The context variable is set for the rest of the request's task and deliberately not
    reset: Starlette's outermost error middleware answers an unexpected exception after
    this middleware has returned, and its problem body and log lines must still carry
    the ID. uvicorn runs each request in a task of its own, so nothing leaks.
    """

    def __init__(self, app: ASGIApp, *, access: bool = True, ops_routes: bool = False) -> None:
        self.app, self.access, self.ops_routes = app, access, ops_routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next(
            (v.decode("latin-1") for k, v in scope["headers"] if k.lower() == b"x-request-id"),
            None,
        )
        rid = accept_request_id(given)
        request_id.set(rid)
        started = time.perf_counter()
        scope[ARRIVED] = started  # what the request metrics time a refusal from
        status = 500  # what the error middleware answers if nothing is sent

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                if not any(k.lower() == b"x-request-id" for k, _ in headers):
                    headers.append((b"x-request-id", rid.encode()))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if self.access and (self.ops_routes or scope["path"] not in OPS_PATHS):
                self._log(scope, status, time.perf_counter() - started)

    @staticmethod
    def _log(scope: Scope, status: int, seconds: float) -> None:
        query = scope.get("query_string", b"").decode("latin-1")
        client = scope.get("client")
        fields = {
            "method": scope["method"],
            "path": scope["path"],
            "query": query,
            "status": status,
            "duration_ms": round(seconds * 1000, 3),
            "client": f"{client[0]}:{client[1]}" if client else None,
        }
        target = scope["path"] + (f"?{query}" if query else "")
        access_log.info(
            "%s %s %d %.1fms", scope["method"], target, status, seconds * 1000, extra=fields
        )
