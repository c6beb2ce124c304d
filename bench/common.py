"""What every benchmark shares: the machine it ran on, interleaved timing, real images.

Absolute times on a shared 2-core machine swing by 2-4× with whatever else runs, so every
figure we keep is a ratio of candidates measured side by side: round-robin in one process,
each candidate once per round (the order rotated each round), repeated, and summarised by
the minimum (the least-disturbed run) and the median.
"""

from __future__ import annotations

import multiprocessing
import statistics
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import torch

from models.quality.evaluate import list_images, read_rgb
from service.machine import describe
from service.shared import DATASETS


def machine(device: torch.device | None = None) -> str:
    """One line that says where and when the figures were taken (`service.machine`)."""
    facts = describe(device or torch.device("cpu"))
    if device is None:
        del facts["device"]
    return " | ".join(f"{name} {value}" for name, value in facts.items())


def synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


@dataclass(frozen=True)
class Timing:
    samples: tuple[float, ...]

    @property
    def best(self) -> float:
        return min(self.samples)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def __str__(self) -> str:
        return f"min {self.best * 1000:9.1f} ms  median {self.median * 1000:9.1f} ms"


SETTLE_S = 0.05  # seconds before each timed call: other runtimes' threads stop spinning


def interleaved(
    candidates: Mapping[str, Callable[[], object]],
    *,
    rounds: int,
    warmup: int = 1,
    sync: Callable[[], None] = lambda: None,
    settle_s: float = SETTLE_S,
) -> dict[str, Timing]:
    """Seconds per call of each candidate, measured round-robin in one process, each call
    after `settle_s` (see `bracketed`)."""
    names = list(candidates)
    for _ in range(warmup):
        for name in names:
            candidates[name]()
        sync()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            sync()
            time.sleep(settle_s)
            started = time.perf_counter()
            candidates[name]()
            sync()
            samples[name].append(time.perf_counter() - started)
    return {name: Timing(tuple(s)) for name, s in samples.items()}


@dataclass(frozen=True)
class Bracketed:
    seconds: tuple[float, ...]  # the candidate's own times
    ratios: tuple[float, ...]  # reference time (mean of the two around it) / candidate time


def bracketed(
    candidates: Mapping[str, Callable[[], object]],
    reference: Callable[[], object],
    *,
    rounds: int,
    warmup: int = 1,
    sync: Callable[[], None] = lambda: None,
    settle_s: float = SETTLE_S,
) -> tuple[dict[str, Bracketed], Timing]:
    """Each candidate call timed between two calls of `reference`: the ratio of the two is
    steady when the machine's load changes slowly, even when absolute times are not.
    Each call waits `settle_s` first: thread pools spin-wait after a call (ONNX Runtime's
    for several ms), and a spinning pool slows the next call of another runtime, which
    would flatter the candidate (measured: 0.95 against 0.87 of the limit for the same
    ONNX Runtime model with spinning on and off).
    Returns the candidates' figures and the reference's own timing."""

    def timed(fn: Callable[[], object]) -> float:
        sync()
        time.sleep(settle_s)
        started = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - started

    names = list(candidates)
    for _ in range(warmup):
        reference()
        for name in names:
            candidates[name]()
    seconds: dict[str, list[float]] = {name: [] for name in names}
    ratios: dict[str, list[float]] = {name: [] for name in names}
    references: list[float] = []
    for r in range(rounds):
        before = timed(reference)
        references.append(before)
        for name in names[r % len(names) :] + names[: r % len(names)]:
            own = timed(candidates[name])
            after = timed(reference)
            seconds[name].append(own)
            ratios[name].append((before + after) / 2 / own)
            references.append(after)
            before = after
    figures = {n: Bracketed(tuple(seconds[n]), tuple(ratios[n])) for n in names}
    return figures, Timing(tuple(references))


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear between the closest ranks."""
    return float(np.percentile(np.asarray(values), q))


def hr_images(dataset: str) -> list[tuple[str, np.ndarray]]:
    """(name, H×W×3 uint8) for every HR image of a benchmark set (grey ones as RGB)."""
    folder = DATASETS / dataset / "HR"
    if not folder.is_dir():
        raise SystemExit(f"{folder} is missing: set IMDN_SHARED_DIR to the shared data folder")
    return [(p.stem, read_rgb(p)) for p in list_images(folder)]


def to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """H×W×3 uint8 to a contiguous 1×3×H×W float32 tensor in [0, 1]."""
    return torch.from_numpy(rgb.astype(np.float32) / 255).permute(2, 0, 1)[None].contiguous()


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """1×3×H×W float in [0, 1] to H×W×3 uint8, rounded as the authors' script rounds."""
    out = x[0].clamp(0, 1).mul(255).round().byte().permute(1, 2, 0)
    return np.ascontiguousarray(out.cpu().numpy())


@dataclass
class HttpLoad:
    clients: int
    seconds: float
    latencies: list[float]
    first_bytes: list[float]  # time to the first byte of each answer
    server_timings: list[dict[str, float]]  # each answer's Server-Timing, in ms by phase

    def median_phases(self) -> dict[str, float]:
        """The median of each Server-Timing phase over the answers, in ms."""
        phases = {name for timing in self.server_timings for name in timing}
        return {
            name: statistics.median(t.get(name, 0.0) for t in self.server_timings)
            for name in sorted(phases)
        }

    @property
    def images_per_second(self) -> float:
        return len(self.latencies) / self.seconds


def http_load(
    url: str,
    bodies: Sequence[bytes],
    *,
    scale: float,
    clients: int,
    total: int,
    content_type: str | None = None,
    check: Callable[[bytes], bool] = lambda body: True,
) -> HttpLoad:
    """`total` requests to /v1/superres (cycling through `bodies`), `clients` at a time, each
    client sending its next request once the last one's answer is in. Exits if any answer
    is not a 200 or fails `check`."""
    todo = iter(range(total))
    lock = threading.Lock()
    latencies: list[float] = []
    first_bytes: list[float] = []
    server_timings: list[dict[str, float]] = []
    errors: list[str] = []
    headers = {"Content-Type": content_type} if content_type else {}

    def worker() -> None:
        with httpx.Client(base_url=url, timeout=600) as client:
            while True:
                with lock:
                    i = next(todo, None)
                if i is None:
                    return
                started = time.perf_counter()
                with client.stream(
                    "POST",
                    f"/v1/superres?scale={scale:g}",
                    content=bodies[i % len(bodies)],
                    headers=headers,
                ) as r:
                    chunks = r.iter_bytes()
                    first = next(chunks, b"")
                    ttfb = time.perf_counter() - started
                    data = first + b"".join(chunks)
                elapsed = time.perf_counter() - started
                with lock:
                    latencies.append(elapsed)
                    first_bytes.append(ttfb)
                    server_timings.append(server_timing(r.headers.get("server-timing", "")))
                    if r.status_code != 200 or not check(data):
                        errors.append(f"{r.status_code} {data[:200]!r}")

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - started
    if errors:
        raise SystemExit(f"{len(errors)} requests failed, e.g. {errors[0]}")
    return HttpLoad(clients, seconds, latencies, first_bytes, server_timings)


def server_timing(header: str) -> dict[str, float]:
    """`decode;dur=1.2, queue;dur=0.3` as {"decode": 1.2, "queue": 0.3}."""
    phases = {}
    for entry in header.split(","):
        name, _, params = entry.strip().partition(";")
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key == "dur" and name:
                phases[name] = float(value)
    return phases


def http_load_spread(
    url: str,
    bodies: Sequence[bytes],
    *,
    scale: float,
    clients: int,
    total: int,
    processes: int,
    separate: bool = False,
) -> HttpLoad:
    """`http_load` with its clients spread over `processes` processes, so that the load
    generator's own GIL (32 threads parsing large chunked bodies) does not become the
    limit it measures. The processes start together at a barrier; the time is the
    parent's, from the barrier until the last answer is in. One process is this one,
    unless `separate` (the server under test runs in this one)."""
    processes = max(1, min(processes, clients))
    if processes == 1 and not separate:
        return http_load(url, bodies, scale=scale, clients=clients, total=total)
    context = multiprocessing.get_context("spawn")  # the parent may hold CUDA and threads
    with context.Manager() as manager, ProcessPoolExecutor(processes, mp_context=context) as pool:
        barrier = manager.Barrier(processes + 1)
        shares = [
            (
                clients // processes + (i < clients % processes),
                total // processes + (i < total % processes),
            )
            for i in range(processes)
        ]
        futures = [
            pool.submit(_load_share, barrier, url, list(bodies), scale, c, t) for c, t in shares
        ]
        barrier.wait()
        started = time.perf_counter()
        loads = [f.result() for f in futures]
        seconds = time.perf_counter() - started
    return HttpLoad(
        clients,
        seconds,
        [x for load in loads for x in load.latencies],
        [x for load in loads for x in load.first_bytes],
        [x for load in loads for x in load.server_timings],
    )


def _load_share(
    barrier: Any, url: str, bodies: list[bytes], scale: float, clients: int, total: int
) -> HttpLoad:
    barrier.wait()
    return http_load(url, bodies, scale=scale, clients=clients, total=total)
