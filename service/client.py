"""`imdn upscale --url`: send files to a running server instead of loading the models here.

Each file is one `POST /v1/superres` (the raw bytes), `concurrency` of them in flight.
A 429 (queue full) or 503 (not ready, draining) is tried again after the server's
`Retry-After`, or an exponential back-off without one, at most `retries` times; any
other refusal of a file is the server's problem document, reported for that file while
the others go on. The output is written to its own `.part` file and renamed once
complete (`service/jobs.py`).

What concerns every file alike ends the run at once instead of failing file after file:
a scale whose model the server does not load (read from `/v1/models` before anything is
sent), a refusal of the request itself rather than of the image (401, 404, 405, 422: a
scale over the server's maximum, say), reported once; and a server that is gone: a
lost connection is tried again, but once `retries` + 1 attempts in a row, across the
files in flight, found no server, the files not yet sent are left unsent.
"""

from __future__ import annotations

import asyncio
import contextlib
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

from service.errors import ScaleNotServed
from service.jobs import Job, OutputFormat, PartFile
from service.planner import check_served

RETRY_STATUSES = frozenset({429, 503})
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 30.0
RETRY_AFTER_CAP_S = 600.0  # a longer Retry-After is waited for this long at most
# refusals of the request itself (key, path, method, query), not of one file's image
RUN_WIDE_STATUSES = frozenset({401, 403, 404, 405, 422})
# failures that say the server is not there (a slow answer is a ReadTimeout: not counted)
CONNECTION_LOST = (httpx.NetworkError, httpx.RemoteProtocolError, httpx.ConnectTimeout)


class ClientError(Exception):
    """The server cannot be used at all (unreachable, key refused): nothing was sent."""


@dataclass(frozen=True)
class Outcome:
    path: Path
    ok: bool
    message: str  # "-> target (WxH, model)" or the reason it failed
    retries: int
    sent: bool = True  # False: the run stopped before this file was sent


@dataclass
class RemoteRun:
    """What a run did, file by file, and why it stopped early if it did."""

    outcomes: list[Outcome]
    stopped: str | None = None  # the run-wide refusal, or the server gone
    server_gone: bool = False


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
    jobs: Sequence[Job],
    scale: float,
    fmt: OutputFormat,
    *,
    quality: int,
    api_key: str | None,
    concurrency: int,
    retries: int,
    timeout_s: float,
) -> RemoteRun:
    """Send each job's source to the server at `url` and write the answer to its target.

    Raises `ClientError` before sending anything if the server cannot be reached, refuses
    the key, or does not load the model the scale needs.
    """
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    timeout = httpx.Timeout(timeout_s, connect=10.0)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout) as http:
        await _check_server(http, url, scale)
        run = _Run(http, scale, fmt, quality, retries)
        slots = asyncio.Semaphore(concurrency)
        bar = tqdm(total=len(jobs), desc=f"x{scale:g}", unit="img", disable=len(jobs) < 2)

        async def one(job: Job) -> Outcome:
            async with slots:
                outcome = await run.send(job)
            bar.update()
            if outcome.ok:
                tqdm.write(f"{job.source} {outcome.message}")
            elif outcome.sent and outcome.message != run.stopped:  # a run-wide one: once
                tqdm.write(f"{job.source}: failed: {outcome.message}", file=sys.stderr)
            return outcome

        try:
            outcomes = list(await asyncio.gather(*map(one, jobs)))
        finally:
            bar.close()
        return RemoteRun(outcomes, run.stopped, run.server_gone)


async def _check_server(http: httpx.AsyncClient, url: str, scale: float) -> None:
    """Fail at once, not once per file, when the server is not there, refuses the key, or
    does not load the model that `scale` needs."""
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
    try:
        loaded = [m["name"] for m in r.json()["models"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise ClientError(f"{url}: GET /v1/models answered something else: {exc}") from exc
    try:
        check_served(scale, loaded)
    except ScaleNotServed as exc:
        raise ClientError(f"the server at {url} cannot do it: {exc}") from exc


class _Run:
    """The state the files of one run share: whether it stopped, and the connection
    failures in a row (any answer from the server resets them)."""

    def __init__(
        self, http: httpx.AsyncClient, scale: float, fmt: OutputFormat, quality: int, retries: int
    ) -> None:
        self.http, self.scale, self.fmt, self.quality = http, scale, fmt, quality
        self.retries = retries
        self.stopped: str | None = None
        self.server_gone = False
        self.lost_in_a_row = 0
        self._stop = asyncio.Event()

    def stop(self, why: str, *, server_gone: bool = False) -> None:
        if self.stopped is None:
            self.stopped, self.server_gone = why, server_gone
            self._stop.set()

    async def pause(self, seconds: float) -> None:
        """Sleep `seconds`, or less if the run stops meanwhile."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    async def send(self, job: Job) -> Outcome:
        path = job.source
        if self.stopped is not None:
            return Outcome(path, False, "not sent: the run stopped", 0, sent=False)
        try:
            data = await asyncio.to_thread(path.read_bytes)
        except OSError as exc:
            return Outcome(path, False, f"cannot read it: {exc}", 0)
        for attempt in range(self.retries + 1):
            if attempt and self.stopped is not None:
                return Outcome(path, False, f"not tried again: {self.stopped}", attempt)
            try:
                answer = await self._attempt(job, data, attempt)
            except CONNECTION_LOST as exc:
                self.lost_in_a_row += 1
                answer = (f"{type(exc).__name__}: {exc}", retry_delay({}, attempt))
                if self.lost_in_a_row > self.retries:
                    gone = f"the server is gone ({self.lost_in_a_row} connection failures in a row)"
                    self.stop(gone, server_gone=True)
                    return Outcome(path, False, answer[0], attempt)
            except httpx.TransportError as exc:  # timed out: try this file again
                answer = (f"{type(exc).__name__}: {exc}", retry_delay({}, attempt))
            except (httpx.HTTPError, OSError) as exc:  # a broken answer, or the disk: no retry
                return Outcome(path, False, f"{type(exc).__name__}: {exc}", attempt)
            if isinstance(answer, Outcome):
                return answer
            refusal, delay = answer
            if attempt == self.retries:
                return Outcome(path, False, refusal, attempt)
            tqdm.write(
                f"{path}: {refusal}; trying again in {delay:.1f} s "
                f"({attempt + 1} of {self.retries} retries)",
                file=sys.stderr,
            )
            await self.pause(delay)
        raise AssertionError("unreachable: the last attempt returns")

    async def _attempt(self, job: Job, data: bytes, attempt: int) -> Outcome | tuple[str, float]:
        """One POST: the file's outcome, or (why, seconds to wait) to try it again."""
        params = {"scale": repr(self.scale)}
        if self.fmt.pillow != "PNG":  # PNG has no quality
            params["quality"] = str(self.quality)
        async with self.http.stream(
            "POST",
            "/v1/superres",
            params=params,
            content=data,
            # the server reads the format from the bytes; a label from the file's
            # name (which differs between systems) could only refuse a good file
            headers={"Content-Type": "application/octet-stream", "Accept": self.fmt.media_type},
        ) as r:
            self.lost_in_a_row = 0  # the server answered
            if r.status_code == 200:
                size = await _save(r, job.target, self.fmt)
                model = r.headers.get("x-imdn-model", "?")
                message = f"-> {job.target} ({size[0]}x{size[1]}, {model})"
                return Outcome(job.source, True, message, attempt)
            body = await r.aread()
        refusal = describe_refusal(r.status_code, r.headers, body)
        if r.status_code in RUN_WIDE_STATUSES:
            self.stop(refusal)
        if r.status_code not in RETRY_STATUSES:
            return Outcome(job.source, False, refusal, attempt)
        return refusal, retry_delay(r.headers, attempt)


async def _save(response: httpx.Response, target: Path, fmt: OutputFormat) -> tuple[int, int]:
    """Stream the image into its own `.part` file, check it is what was asked for, and
    only then rename it to `target`."""
    with PartFile(target) as part:
        with part.path.open("wb") as f:
            async for chunk in response.aiter_bytes():
                f.write(chunk)
        with Image.open(part.path) as img:  # the header only: its format, and its size
            size: tuple[int, int] = img.size
            if img.format != fmt.pillow:
                raise OSError(f"the server answered {img.format}, not {fmt.pillow}")
        part.commit()
    return size
