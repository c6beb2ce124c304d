"""A bounded asyncio load client for `POST /v1/superres`: a fixed number of requests, a fixed
concurrency, a timeout on every request, and a tally of what came back.

Used by tests/test_reliability.py, and runnable against any server:

    .venv/bin/python -m tests.load --url http://127.0.0.1:8000 --requests 2000 \\
        --concurrency 16 --image some.png

Every request is a crop of the source image, its sides drawn in [min_side, max_side], at a
scale drawn from `scales` (2, 3 and 4 go to the paper's networks, the others to IMDN_AS).
A request counts as correct when it is a 200 whose PNG has exactly the size the service
promises (`service.imaging.output_size`); 429 and 503 are refusals by design; anything
else, a transport error or a timeout is a failure.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import random
import struct
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from service.imaging import output_size

DEFAULT_SCALES: tuple[float, ...] = (2, 3, 4, 1.5, 2.5, 3.3)
REFUSED_BY_DESIGN = frozenset({429, 503})


def png_bytes(image: np.ndarray | Image.Image, **save: object) -> bytes:
    """An image (uint8 array or Pillow image) as PNG bytes."""
    im = image if isinstance(image, Image.Image) else Image.fromarray(image)
    buf = io.BytesIO()
    im.save(buf, format="PNG", **save)
    return buf.getvalue()


def png_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR without decoding it; None if it is no PNG."""
    if len(data) < 24 or not data.startswith(b"\x89PNG\r\n\x1a\n") or data[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@dataclass(frozen=True, eq=False)
class Job:
    """One request to send: an uint8 H×W×3 crop and its scale."""

    index: int
    image: np.ndarray
    scale: float
    body: bytes

    @property
    def expected_size(self) -> tuple[int, int]:
        """(width, height) of the answer."""
        h, w = output_size(self.image.shape[0], self.image.shape[1], self.scale)
        return w, h


def make_jobs(
    source: np.ndarray,
    count: int,
    *,
    min_side: int = 16,
    max_side: int = 96,
    scales: Sequence[float] = DEFAULT_SCALES,
    seed: int = 0,
) -> list[Job]:
    """`count` random crops of `source` (uint8 H×W×3), each at a random scale."""
    rng = random.Random(seed)
    height, width = source.shape[:2]
    if min(height, width) < max_side:
        raise ValueError(f"the source ({width}x{height}) is smaller than max_side={max_side}")
    jobs = []
    for index in range(count):
        h, w = rng.randint(min_side, max_side), rng.randint(min_side, max_side)
        top, left = rng.randrange(height - h + 1), rng.randrange(width - w + 1)
        crop = np.ascontiguousarray(source[top : top + h, left : left + w])
        jobs.append(Job(index, crop, rng.choice(list(scales)), png_bytes(crop)))
    return jobs


@dataclass(eq=False)
class Outcome:
    job: Job
    status: int | None
    """HTTP status, or None when no response came (transport error, timeout)."""
    seconds: float
    error: str = ""
    body: bytes = b""


@dataclass
class LoadReport:
    outcomes: list[Outcome]
    seconds: float
    concurrency: int
    statuses: Counter[int | None] = field(init=False)

    def __post_init__(self) -> None:
        self.statuses = Counter(o.status for o in self.outcomes)

    @property
    def ok(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == 200 and not o.error]

    @property
    def refused(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status in REFUSED_BY_DESIGN]

    @property
    def failures(self) -> list[Outcome]:
        """Everything that is neither a correct image nor a refusal by design."""
        return [
            o
            for o in self.outcomes
            if (o.status == 200 and o.error) or o.status not in REFUSED_BY_DESIGN | {200}
        ]

    def latency_quantiles(self) -> dict[str, float]:
        times = sorted(o.seconds for o in self.ok)
        if not times:
            return {}
        return {
            f"p{q}": times[min(len(times) - 1, int(len(times) * q / 100))] for q in (50, 95, 99)
        } | {"max": times[-1]}

    def summary(self) -> dict[str, object]:
        return {
            "requests": len(self.outcomes),
            "concurrency": self.concurrency,
            "seconds": round(self.seconds, 1),
            "requests_per_second": round(len(self.outcomes) / self.seconds, 1),
            "statuses": {str(k): v for k, v in sorted(self.statuses.items(), key=str)},
            "ok": len(self.ok),
            "refused_by_design": len(self.refused),
            "failures": len(self.failures),
            "latency_s": {k: round(v, 3) for k, v in self.latency_quantiles().items()},
            "scales": dict(Counter(str(o.job.scale) for o in self.outcomes)),
        }


async def _send(
    client: httpx.AsyncClient, job: Job, keep_body: bool, headers: dict[str, str]
) -> Outcome:
    started = time.perf_counter()
    try:
        r = await client.post(
            "/v1/superres",
            params={"scale": job.scale},
            content=job.body,
            headers={"Content-Type": "image/png", **headers},
        )
    except httpx.HTTPError as exc:  # timeouts included: a hung connection is a failure
        return Outcome(job, None, time.perf_counter() - started, f"{type(exc).__name__}: {exc}")
    seconds = time.perf_counter() - started
    error = ""
    if r.status_code == 200:
        size = png_size(r.content)
        if size != job.expected_size:
            error = f"PNG of size {size}, expected {job.expected_size}"
    return Outcome(job, r.status_code, seconds, error, r.content if keep_body else b"")


async def run_load(
    url: str,
    jobs: Sequence[Job],
    *,
    concurrency: int = 16,
    timeout_s: float = 60.0,
    keep_bodies: frozenset[int] = frozenset(),
    headers: dict[str, str] | None = None,
) -> LoadReport:
    """Send every job with at most `concurrency` in flight; each has `timeout_s` (connect,
    read, write and pool alike). Bodies of the jobs whose index is in `keep_bodies` are
    kept for pixel checks; the others are checked for size and dropped."""
    pending: asyncio.Queue[Job] = asyncio.Queue()
    for job in jobs:
        pending.put_nowait(job)
    outcomes: list[Outcome] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def worker(client: httpx.AsyncClient) -> None:
        while True:
            try:
                job = pending.get_nowait()
            except asyncio.QueueEmpty:
                return
            outcomes.append(await _send(client, job, job.index in keep_bodies, headers or {}))

    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    outcomes.sort(key=lambda o: o.job.index)
    return LoadReport(outcomes, time.perf_counter() - started, concurrency)


def synthetic_source(side: int = 256, seed: int = 0) -> np.ndarray:
    """A smooth colour image with some texture, for runs without an image file."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side] / side
    planes = [np.sin(6 * x + 2 * c) * np.cos(5 * y - c) for c in range(3)]
    image = (np.stack(planes, axis=-1) + 1) * 110 + rng.normal(0, 12, (side, side, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.load", description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    parser.add_argument("--image", type=Path, help="source image; default: synthetic")
    parser.add_argument("--min-side", type=int, default=16)
    parser.add_argument("--max-side", type=int, default=96)
    parser.add_argument("--scales", type=float, nargs="+", default=list(DEFAULT_SCALES))
    parser.add_argument("--api-key", help="sent as Authorization: Bearer")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-dir", type=Path, help="write some answers here, as INDEX.png")
    parser.add_argument("--save-every", type=int, default=100, help="with --save-dir")
    args = parser.parse_args(argv)
    source = np.asarray(Image.open(args.image).convert("RGB")) if args.image else synthetic_source()
    jobs = make_jobs(
        source,
        args.requests,
        min_side=args.min_side,
        max_side=args.max_side,
        scales=args.scales,
        seed=args.seed,
    )
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    keep = frozenset(range(0, len(jobs), args.save_every)) if args.save_dir else frozenset()
    report = asyncio.run(
        run_load(
            args.url,
            jobs,
            concurrency=args.concurrency,
            timeout_s=args.timeout,
            keep_bodies=keep,
            headers=headers,
        )
    )
    if args.save_dir:
        args.save_dir.mkdir(parents=True, exist_ok=True)
        for outcome in report.ok:
            if outcome.body:
                (args.save_dir / f"{outcome.job.index}.png").write_bytes(outcome.body)
    print(json.dumps(report.summary(), indent=2))
    for failure in report.failures[:10]:
        print(
            f"failure: job {failure.job.index}: {failure.status} {failure.error}", file=sys.stderr
        )
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
