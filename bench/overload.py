"""Overload: what a server does when offered more than it can serve in a deadline.

    python -m bench.overload [--seconds 20] [--timeout 15] [--processes 2]

Starts `imdn serve` (x2 on the CPU, or what IMDN_* in the environment say with
`--inherit`), measures its capacity on a mix of small (64x64) and large (256x256: 16x
the pixels) images at x2 with two closed-loop clients, then offers 0.5x, 1x, 2x and 4x
that capacity as open-loop Poisson arrivals from client processes of their
own, each request a distinct image (a few pixels changed), for `--seconds` each. A
request refused with 429 is sent again once, after its Retry-After.

Per level it prints goodput (answers within the deadline per second), the share of
200 / 429 / 413 / 504 among first attempts, p50/p99 latency of the admitted (200 and
504), and the retries: how long Retry-After made them wait and how many were then
served. Then a small request's p99 alone, and beside a stream of large ones at the
measured capacity (the target: at most twice alone plus one batch, IMDN_MAX_BATCH_SECONDS).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import multiprocessing
import random
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import httpx
import numpy as np
from PIL import Image

from bench.common import machine, percentile
from service.child import imdn_serve
from service.shared import WEIGHTS
from tests.load import synthetic_source

SMALL, LARGE = 64, 256  # sides of the two kinds of request: one crop each, 16x apart
LEVELS = (0.5, 1.0, 2.0, 4.0)


@dataclass
class Result:
    """One request: its kind, first status, latency, and its retry if it had one."""

    kind: str
    sent: float  # seconds after the level's start
    status: int | None
    seconds: float
    retry_after: float | None = None
    retry_status: int | None = None
    retry_seconds: float | None = None


def bodies(kind: str, count: int, seed: int) -> list[bytes]:
    """`count` distinct PNGs of one kind: the same picture, a few pixels changed in each
    (the server keeps a refused request's place by its bytes)."""
    side = SMALL if kind == "small" else LARGE
    source = synthetic_source(LARGE, seed=1)[:side, :side].copy()
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        image = source.copy()
        image[rng.integers(0, side, 4), rng.integers(0, side, 4)] = rng.integers(0, 256, 3)
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "PNG", compress_level=1)
        out.append(buffer.getvalue())
    return out


async def _send(client: httpx.AsyncClient, body: bytes) -> tuple[int | None, float, float | None]:
    started = time.perf_counter()
    try:
        r = await client.post(
            "/v1/superres?scale=2", content=body, headers={"Content-Type": "image/png"}
        )
        await r.aread()
    except httpx.HTTPError:
        return None, time.perf_counter() - started, None
    retry = r.headers.get("retry-after")
    return r.status_code, time.perf_counter() - started, float(retry) if retry else None


async def _request(client: httpx.AsyncClient, kind: str, body: bytes, sent: float) -> Result:
    status, seconds, retry_after = await _send(client, body)
    result = Result(kind, sent, status, seconds, retry_after)
    if status == 429 and retry_after is not None:
        await asyncio.sleep(retry_after)
        result.retry_status, result.retry_seconds, _ = await _send(client, body)
    return result


def offer(
    url: str, start_at: float, seconds: float, rates: dict[str, float], seed: int
) -> list[Result]:
    """Open-loop Poisson arrivals of each kind at its rate (requests/s) for `seconds`,
    from `start_at` (time.time()); every request on its own, whatever the answers."""
    rng = random.Random(seed)
    plan = []
    for kind, rate in rates.items():
        t = rng.expovariate(rate) if rate > 0 else seconds
        while t < seconds:
            plan.append((t, kind))
            t += rng.expovariate(rate)
    plan.sort()
    made = {k: iter(bodies(k, sum(1 for _, x in plan if x == k), seed)) for k in rates}

    async def run() -> list[Result]:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
            await asyncio.sleep(max(0.0, start_at - time.time()))
            zero = time.perf_counter()
            tasks = []
            for t, kind in plan:
                await asyncio.sleep(max(0.0, t - (time.perf_counter() - zero)))
                tasks.append(asyncio.create_task(_request(client, kind, next(made[kind]), t)))
            return list(await asyncio.gather(*tasks))

    return asyncio.run(run())


def spread(url: str, seconds: float, rates: dict[str, float], processes: int) -> list[Result]:
    """`offer` split over `processes` client processes, which start together."""
    context = multiprocessing.get_context("spawn")
    start_at = time.time() + 3.0  # the processes start and make their bodies first
    shares = {k: r / processes for k, r in rates.items()}
    with ProcessPoolExecutor(processes, mp_context=context) as pool:
        futures = [
            pool.submit(offer, url, start_at, seconds, shares, 100 * i + int(seconds))
            for i in range(processes)
        ]
        return [r for f in futures for r in f.result()]


def capacity(url: str, seconds: float, small_share: float) -> float:
    """Requests per second the server completes of the mix, two closed-loop clients."""
    small, large = bodies("small", 4, 7), bodies("large", 4, 8)
    done = 0
    rng = random.Random(3)

    async def client_loop(client: httpx.AsyncClient, until: float) -> None:
        nonlocal done
        while time.perf_counter() < until:
            body = rng.choice(small if rng.random() < small_share else large)
            status, _, _ = await _send(client, body)
            if status == 200:
                done += 1

    async def run() -> float:
        async with httpx.AsyncClient(base_url=url, timeout=300) as client:
            await _send(client, large[0])  # first-call costs
            started = time.perf_counter()
            until = started + seconds
            await asyncio.gather(client_loop(client, until), client_loop(client, until))
            return done / (time.perf_counter() - started)

    return asyncio.run(run())


@dataclass
class Level:
    factor: float
    offered: float
    results: list[Result] = field(default_factory=list)

    def goodput(self, seconds: float, timeout: float) -> float:
        """Answers (first or retried) within the deadline, per second of arrivals."""
        good = sum(1 for r in self.results if r.status == 200 and r.seconds <= timeout)
        good += sum(
            1 for r in self.results if r.retry_status == 200 and (r.retry_seconds or 0) <= timeout
        )
        return good / seconds

    def report(self, seconds: float, timeout: float) -> str:
        first = Counter(r.status for r in self.results)
        n = len(self.results) or 1
        admitted = [r.seconds for r in self.results if r.status in (200, 504)]
        retried = [r for r in self.results if r.retry_after is not None and r.status == 429]
        retry_ok = sum(1 for r in retried if r.retry_status == 200)
        waits = [r.retry_after or 0.0 for r in retried]
        shares = "  ".join(
            f"{code}: {100 * first.get(code, 0) / n:4.1f}%" for code in (200, 429, 413, 504)
        )
        other = n - sum(first.get(code, 0) for code in (200, 429, 413, 504))
        return (
            f"{self.factor:3g}x  offered {self.offered:5.2f}/s  sent {len(self.results):4d}  "
            f"goodput {self.goodput(seconds, timeout):5.2f}/s  {shares}  other: {other}  "
            f"admitted p50 {percentile(admitted, 50):5.2f} s p99 {percentile(admitted, 99):5.2f} s"
            if admitted
            else f"{self.factor:3g}x  offered {self.offered:5.2f}/s  nothing admitted"
        ) + (
            f"\n      retries after Retry-After: {len(retried)}, waited median "
            f"{statistics.median(waits):.0f} s (max {max(waits):.0f} s), then 200: {retry_ok} "
            f"({100 * retry_ok / len(retried):.0f}%), "
            f"429 again: {sum(1 for r in retried if r.retry_status == 429)}"
            if retried
            else "\n      no 429, no retries"
        )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.overload", description=__doc__)
    parser.add_argument("--seconds", type=float, default=20.0, help="of arrivals per level")
    parser.add_argument("--timeout", type=float, default=15.0, help="IMDN_REQUEST_TIMEOUT_S")
    parser.add_argument("--processes", type=int, default=2, help="client processes")
    parser.add_argument("--small-share", type=float, default=0.75)
    parser.add_argument("--levels", type=float, nargs="+", default=list(LEVELS))
    parser.add_argument("--inherit", action="store_true", help="keep IMDN_* from the shell")
    args = parser.parse_args(argv)
    settings = {
        "IMDN_WEIGHTS_DIR": str(WEIGHTS),
        "IMDN_MODELS": '["x2"]',
        "IMDN_DEVICE": "cpu",
        "IMDN_REQUEST_TIMEOUT_S": str(args.timeout),
        "IMDN_LOG_LEVEL": "warning",
        "IMDN_ACCESS_LOG": "false",
    }
    print(machine())
    print(
        f"x2, deadline {args.timeout:g} s, {args.seconds:g} s of arrivals a level, "
        f"{args.processes} client processes, {100 * args.small_share:.0f}% {SMALL}x{SMALL} "
        f"and the rest {LARGE}x{LARGE}"
    )
    with imdn_serve(settings, inherit=args.inherit, start_timeout=300) as served:
        url = served.url
        rate = capacity(url, max(2.0, args.seconds / 2), args.small_share)
        print(f"measured capacity: {rate:.2f} requests/s of the mix (closed loop, 2 clients)")
        goodput: dict[float, float] = {}
        for factor in args.levels:
            offered = factor * rate
            level = Level(factor, offered)
            rates = {"small": offered * args.small_share, "large": offered * (1 - args.small_share)}
            level.results = spread(url, args.seconds, rates, args.processes)
            print(level.report(args.seconds, args.timeout), flush=True)
            goodput[factor] = level.goodput(args.seconds, args.timeout)
            time.sleep(2.0)
        if goodput.get(1.0):
            print(
                "goodput / goodput at 1x: "
                + ", ".join(f"{f:g}x {g / goodput[1.0]:.2f}" for f, g in goodput.items())
            )
        # a small request alone, then beside a stream of large ones at capacity
        large_rate = rate * (1 - args.small_share)  # the large requests of the 1x level
        alone = spread(url, args.seconds, {"small": 0.5}, 1)
        beside = spread(url, args.seconds, {"small": 0.5, "large": large_rate}, args.processes)
        p_alone = percentile([r.seconds for r in alone if r.status == 200], 99)
        small_beside = [r.seconds for r in beside if r.kind == "small" and r.status == 200]
        p_beside = percentile(small_beside, 99) if small_beside else float("nan")
        statuses = Counter(r.status for r in beside if r.kind == "small")
        print(
            f"small request p99: alone {p_alone:.2f} s, beside large ones at "
            f"{large_rate:.2f}/s {p_beside:.2f} s (its statuses {dict(statuses)}); "
            f"target <= 2 x alone + one batch"
        )


if __name__ == "__main__":
    main()
