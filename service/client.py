"""`imdn upscale --url`: send files to a running server instead of loading the models here.

Each file is one `POST /v1/superres` (the raw bytes), `concurrency` of them in flight.
A 429 (queue full) or 503 (not ready, draining) is tried again after the server's
`Retry-After`, or an exponential back-off without one, at most `retries` times; any
other refusal is the server's problem document, reported for that file while the
others go on. The output is written to a `.part` file and renamed once complete.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from pathlib import Path

import httpx
from PIL import Image
from tqdm import tqdm

RETRY_STATUSES = frozenset({429, 503})
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 30.0
RETRY_AFTER_CAP_S = 600.0  # a longer Retry-After is waited for this long at most


class ClientError(Exception):
    """The server cannot be used at all (unreachable, key refused): nothing was sent."""


@dataclass(frozen=True)
class Outcome:
    path: Path
    ok: bool
    message: str  # "-> target (WxH, model)" or the reason it failed
    retries: int


def retry_delay(
    headers: Mapping[str, str],
    attempt: int,
    *,
    now: datetime | None = None,
    jitter: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait before trying again after failed attempt number `attempt` (0-based).

    The server's `Retry-After` (seconds, or an HTTP date) when it gives one, else
    `BACKOFF_BASE_S`·2^attempt up to `BACKOFF_CAP_S`; plus up to 20 % of jitter so that
    clients refused together do not all come back at the same instant.
    """
    spread = 1.0 + 0.2 * jitter()
    value = headers.get("retry-after", "").strip()
    if value:
        seconds: float | None
        try:
            seconds = float(value)
        except ValueError:
            try:
                when = parsedate_to_datetime(value)
            except (TypeError, ValueError):
                seconds = None
            else:
                moment = now or datetime.now(timezone.utc)
                seconds = (when - moment).total_seconds()
        if seconds is not None and math.isfinite(seconds):
            return min(max(seconds, 0.0), RETRY_AFTER_CAP_S) * spread
    return min(BACKOFF_BASE_S * 2.0**attempt, BACKOFF_CAP_S) * spread


def describe_refusal(status: int, headers: Mapping[str, str], body: bytes) -> str:
    """One line from the server's problem document: status, title, detail, reason."""
    if "json" in headers.get("content-type", ""):
        try:
            problem = json.loads(body)
        except ValueError:
            problem = None
        if isinstance(problem, dict):
            detail = problem.get("detail", "")
            if isinstance(detail, list):  # validation errors: [{"loc", "msg", ...}]
                detail = "; ".join(
                    f"{'.'.join(str(p) for p in e.get('loc', []))}: {e.get('msg', '')}"
                    if isinstance(e, dict)
                    else str(e)
                    for e in detail
                )
            title = problem.get("title", "")
            reason = f" [{problem['reason']}]" if problem.get("reason") else ""
            return f"{status} {title}: {detail}{reason}"
    text = body.decode("utf-8", "replace").strip()[:200]
    return f"{status}: {text}" if text else f"{status}"


async def upscale_remote(
    url: str,
    files: Sequence[Path],
    targets: Sequence[Path],
    scale: float,
    *,
    api_key: str | None,
    concurrency: int,
    retries: int,
    timeout_s: float,
) -> list[Outcome]:
    """Send `files[i]` to the server at `url` and write the answer to `targets[i]`.

    Raises `ClientError` before sending anything if the server cannot be reached or
    refuses the key.
    """
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    timeout = httpx.Timeout(timeout_s, connect=10.0)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout) as http:
        await _check_server(http, url)
        slots = asyncio.Semaphore(concurrency)
        bar = tqdm(total=len(files), desc=f"x{scale:g}", unit="img", disable=len(files) < 2)

        async def one(path: Path, target: Path) -> Outcome:
            async with slots:
                outcome = await _send(http, path, target, scale, retries)
            bar.update()
            if outcome.ok:
                tqdm.write(f"{path} {outcome.message}")
            else:
                tqdm.write(f"{path}: failed: {outcome.message}", file=sys.stderr)
            return outcome

        try:
            return list(await asyncio.gather(*map(one, files, targets)))
        finally:
            bar.close()


async def _check_server(http: httpx.AsyncClient, url: str) -> None:
    """Fail at once, not once per file, when the server is not there or refuses the key."""
    try:
        r = await http.get("/v1/models")
    except httpx.TransportError as exc:
        raise ClientError(f"cannot reach the server at {url}: {exc}") from exc
    if r.status_code == 401:
        given = "the API key was refused" if "authorization" in http.headers else "no API key"
        raise ClientError(
            f"{given} ({describe_refusal(r.status_code, r.headers, r.content)}); "
            "set IMDN_API_KEY or pass --api-key"
        )
    if r.status_code != 200:
        raise ClientError(
            f"{url} does not look like an IMDN server: GET /v1/models answered "
            f"{describe_refusal(r.status_code, r.headers, r.content)}"
        )


async def _send(
    http: httpx.AsyncClient, path: Path, target: Path, scale: float, retries: int
) -> Outcome:
    try:
        data = await asyncio.to_thread(path.read_bytes)
    except OSError as exc:
        return Outcome(path, False, f"cannot read it: {exc}", 0)
    part = target.with_name(target.name + ".part")
    for attempt in range(retries + 1):
        last = attempt == retries
        try:
            async with http.stream(
                "POST",
                "/v1/superres",
                params={"scale": repr(scale)},
                content=data,
                # the server reads the format from the bytes; a label from the file's
                # name (which differs between systems) could only refuse a good file
                headers={"Content-Type": "application/octet-stream", "Accept": "image/png"},
            ) as r:
                if r.status_code == 200:
                    size = await _save(r, part, target)
                    model = r.headers.get("x-imdn-model", "?")
                    message = f"-> {target} ({size[0]}x{size[1]}, {model})"
                    return Outcome(path, True, message, attempt)
                body = await r.aread()
            refusal = describe_refusal(r.status_code, r.headers, body)
            if r.status_code not in RETRY_STATUSES or last:
                return Outcome(path, False, refusal, attempt)
            delay = retry_delay(r.headers, attempt)
        except httpx.TransportError as exc:  # connection lost or timed out: try again
            part.unlink(missing_ok=True)
            refusal = f"{type(exc).__name__}: {exc}"
            if last:
                return Outcome(path, False, refusal, attempt)
            delay = retry_delay({}, attempt)
        except (httpx.HTTPError, OSError) as exc:  # a broken answer, or the disk: no retry
            part.unlink(missing_ok=True)
            return Outcome(path, False, f"{type(exc).__name__}: {exc}", attempt)
        tqdm.write(
            f"{path}: {refusal}; trying again in {delay:.1f} s "
            f"({attempt + 1} of {retries} retries)",
            file=sys.stderr,
        )
        await asyncio.sleep(delay)
    raise AssertionError("unreachable: the last attempt returns")


async def _save(response: httpx.Response, part: Path, target: Path) -> tuple[int, int]:
    """Stream the PNG into `part`, check it is one, and only then rename it to `target`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with part.open("wb") as f:
        async for chunk in response.aiter_bytes():
            f.write(chunk)
    with Image.open(part) as img:  # the header only: it is a PNG, and its size
        size: tuple[int, int] = img.size
        if img.format != "PNG":
            raise OSError(f"the server answered {img.format}, not a PNG")
    part.replace(target)
    return size
