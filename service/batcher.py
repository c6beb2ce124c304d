"""The batch queue: admission by cost, deadlines, fair batches across requests.

Pure asyncio, no tensors and no device: a request is a `Ticket` of `count` crops under
one key (model, crop height, crop width), and the batcher hands the runner `Slice`s of
tickets whose crops share that key. What a slice holds is the runner's business
(`Ticket.payload`), which keeps this module testable with a fake runner.

**Admission.** The batcher measures its throughput (device seconds per crop pixel, per
model: the lowest rate of the warm-up and the recent batches, see `Throughput`). A request whose own
crops would take longer than its deadline at that rate, or that has more crops than
the whole queue may hold, can never be served: `TooCostly` at once. One that would
fit on an idle device but not behind the work queued now gets `QueueFull`, whose
`retry_after_s` is the measured time until the queue has drained enough for it. Before
anything was measured, only the crop limit applies.

**Fairness.** Keys take turns (round-robin over the keys that have a batch ready), and
within a key requests take turns too: each turn a request gives at most `unit` crops
(4: the paper's four ACS crops stay in one batch), then goes to the back of the line.
A small request that arrives behind a huge one is in the next batch, beside the huge
one's next crops, instead of waiting for all of them (deficit round-robin with a
quantum of `unit` crops). A request alone fills whole batches by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from service.errors import DeadlineExceeded, NotReady, QueueFull, TooCostly
from service.metrics import Metrics

log = logging.getLogger(__name__)

Key = tuple[str, int, int]  # model, crop height, crop width


class Served(NamedTuple):
    """What a ticket's future resolves to once all its crops ran."""

    queue_seconds: float  # from submission to its first crop's batch
    compute_seconds: float  # device time of the batches that carried its crops
    peak_memory_bytes: int


class BatchOutcome(NamedTuple):
    seconds: float
    peak_memory_bytes: int


@dataclass(eq=False)
class Ticket:
    """One request's crops of one key, and how far they have got."""

    key: Key
    count: int
    deadline: float
    payload: object
    future: asyncio.Future[Served]
    enqueued: float
    taken: int = 0  # crops handed to batches so far
    finished: int = 0  # crops whose batch has run
    queue_seconds: float = 0.0
    compute_seconds: float = 0.0
    peak_memory_bytes: int = 0

    @property
    def remaining(self) -> int:
        return self.count - self.taken


@dataclass(frozen=True)
class Slice:
    """Crops [start, stop) of a ticket, one piece of a batch."""

    ticket: Ticket
    start: int
    stop: int


Runner = Callable[[Key, list[Slice]], Awaitable[BatchOutcome]]


@dataclass
class Throughput:
    """Device seconds per crop pixel, per model: the lowest rate seen recently.

    A batch costs a fixed amount per call plus an amount per pixel, so a small batch's
    seconds per pixel is mostly the fixed part: an average over a run of thumbnails would
    price a large image many times over and refuse it as too costly. The lowest rate among
    the warm-up's (kept for good) and the last `window` batches' comes from the largest of
    them: a lower bound of what a request costs, so admission refuses only what cannot fit,
    and a slow moment (a busy host) does not stick.
    """

    window: int = 32
    warm: dict[str, float] = field(default_factory=dict)
    recent: dict[str, deque[float]] = field(default_factory=dict)

    def observe(self, model: str, pixels: int, seconds: float, *, warm_up: bool = False) -> None:
        if pixels <= 0 or seconds <= 0:
            return
        rate = seconds / pixels
        if warm_up:
            self.warm[model] = min(rate, self.warm.get(model, rate))
        else:
            self.recent.setdefault(model, deque(maxlen=self.window)).append(rate)

    def rate(self, model: str) -> float | None:
        """Seconds per crop pixel of `model`; None before any measurement."""
        rates = [*self.recent.get(model, ()), *([self.warm[model]] if model in self.warm else [])]
        return min(rates) if rates else None

    def estimate(self, model: str, pixels: int) -> float | None:
        """Seconds to run `pixels` crop pixels of `model`; None before any measurement."""
        rate = self.rate(model)
        return None if rate is None else rate * pixels


class Batcher:
    """Queues tickets, forms batches fairly, and runs them one at a time through `run`."""

    def __init__(
        self,
        run: Runner,
        *,
        max_batch: int,
        max_wait_s: float,
        max_queue_crops: int,
        unit: int = 4,
        batch_limit: Callable[[Key], int] | None = None,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        """`batch_limit(key)`: the most crops a batch of `key` takes, when lower than
        `max_batch` (a frame bucket's: 1); a key at its limit runs without waiting."""
        if max_batch < 1 or unit < 1 or max_queue_crops < 1:
            raise ValueError("max_batch, unit and max_queue_crops must be >= 1")
        self._run = run
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue_crops = max_queue_crops
        self.unit = min(unit, max_batch)
        self._batch_limit = batch_limit
        self.metrics = metrics or Metrics()
        self.clock = clock
        self.throughput = Throughput()
        self._queues: dict[Key, deque[Ticket]] = {}
        self._turn = 0  # index into the keys where the next round-robin search starts
        self._queued = 0  # crops not yet handed to a batch
        self._arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # Life cycle

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="imdn-batcher")

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def stop(self) -> None:
        """Stop forming batches and fail every queued ticket with `NotReady`."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for queue in self._queues.values():
            for t in queue:
                if not t.future.done():
                    t.future.set_exception(NotReady("the service is shutting down"))
        self._queues.clear()
        self._queued = 0
        self.metrics.set_queue_depth(0)

    # Admission

    @property
    def queued_crops(self) -> int:
        return self._queued

    def queued_seconds(self) -> float:
        """The measured device time of the crops waiting now (unmeasured models count 0)."""
        total = 0.0
        for (model, h, w), queue in self._queues.items():
            pixels = h * w * sum(t.remaining for t in queue if not t.future.done())
            total += self.throughput.estimate(model, pixels) or 0.0
        return total

    def submit(self, key: Key, count: int, payload: object, deadline: float) -> Ticket:
        """Admit `count` crops of `key` (see `admit`) and queue them."""
        self.admit(key, count, deadline)
        ticket = Ticket(
            key, count, deadline, payload, asyncio.get_running_loop().create_future(), self.clock()
        )
        self._queues.setdefault(key, deque()).append(ticket)
        self._queued += count
        self.metrics.set_queue_depth(self._queued)
        self._arrived.set()
        return ticket

    def admit(self, key: Key, count: int, deadline: float) -> None:
        """Raise `TooCostly` or `QueueFull` unless `count` crops of `key` fit now. The
        engine asks before it prepares a request's crops; `submit` asks again."""
        if count < 1:
            raise ValueError("a ticket needs at least one crop")
        now = self.clock()
        model, h, w = key
        limit = self.max_queue_crops
        if count > limit:
            raise TooCostly(
                f"the image needs {count} crops; this server queues at most {limit}: "
                "send a smaller image"
            )
        own = self.throughput.estimate(model, h * w * count)
        budget = deadline - now
        if own is not None and own > budget:
            raise TooCostly(
                f"the image needs ~{own:.1f}s of device time at the measured throughput; "
                f"the deadline is {budget:.1f}s: send a smaller image"
            )
        ahead = self.queued_seconds()
        if self._queued + count > limit:
            excess = self._queued + count - limit
            per_crop = ahead / self._queued if ahead > 0 else None
            wait = excess * per_crop if per_crop is not None else None
            raise QueueFull(
                f"the queue holds {self._queued} crops (limit {limit}); retry shortly",
                retry_after_s=_retry_after(wait),
            )
        if own is not None and ahead + own > budget:
            raise QueueFull(
                f"~{ahead:.1f}s of work is queued ahead; this request would miss its "
                f"{budget:.1f}s deadline",
                retry_after_s=_retry_after(ahead + own - budget),
            )

    def drop(self, ticket: Ticket) -> None:
        """Forget a ticket whose request ended (done, timed out or cancelled)."""
        queue = self._queues.get(ticket.key)
        if queue is not None and ticket in queue:
            queue.remove(ticket)
            self._queued -= ticket.remaining
        if not ticket.future.done():
            ticket.future.cancel()
        self.metrics.set_queue_depth(self._queued)

    # Scheduling

    def limit(self, key: Key) -> int:
        """The most crops a batch of `key` takes."""
        if self._batch_limit is None:
            return self.max_batch
        return max(1, min(self.max_batch, self._batch_limit(key)))

    def _ready_at(self, key: Key) -> float:
        """When a key's queue may run a batch: now if it holds a full batch or crops of a
        ticket already started, else when its oldest ticket has waited `max_wait_s`."""
        live = [t for t in self._queues[key] if not t.future.done()]
        if not live:
            return math.inf
        if sum(t.remaining for t in live) >= self.limit(key) or any(t.taken for t in live):
            return -math.inf
        return min(t.enqueued for t in live) + self.max_wait_s

    def _next_key(self, now: float) -> tuple[Key | None, float]:
        """The next ready key in round-robin order, or None and when one will be ready."""
        keys = list(self._queues)
        soonest = math.inf
        for i in range(len(keys)):
            index = (self._turn + i) % len(keys)
            ready_at = self._ready_at(keys[index])
            if ready_at <= now:
                self._turn = index + 1
                return keys[index], now
            soonest = min(soonest, ready_at)
        return None, soonest

    async def _loop(self) -> None:
        while True:
            key, ready_at = self._next_key(self.clock())
            if key is None:
                self._arrived.clear()
                timeout = None if math.isinf(ready_at) else max(0.0, ready_at - self.clock())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._arrived.wait(), timeout)
                continue
            batch = self._take(key)
            if batch:
                await self._run_batch(key, batch)
            else:
                await asyncio.sleep(0)  # every ticket of the key had ended: look again

    def _take(self, key: Key) -> list[Slice]:
        """Up to `limit(key)` crops of `key`: `unit` crops per ticket per turn,
        round-robin; tickets past their deadline fail here."""
        queue = self._queues[key]
        batch: list[Slice] = []
        size, skipped = 0, 0
        limit = self.limit(key)
        now = self.clock()
        while queue and size < limit and skipped < len(queue):
            t = queue[0]
            if t.future.done() or now > t.deadline:
                queue.popleft()
                self._queued -= t.remaining
                if not t.future.done():
                    t.future.set_exception(DeadlineExceeded("the request expired in the queue"))
                continue
            chunk = min(self.unit, t.remaining, limit)
            if size + chunk > limit:
                queue.rotate(-1)
                skipped += 1
                continue
            if t.taken == 0:
                t.queue_seconds = now - t.enqueued
                self.metrics.observe_queue_wait(key[0], t.queue_seconds)
            batch.append(Slice(t, t.taken, t.taken + chunk))
            t.taken += chunk
            size += chunk
            self._queued -= chunk
            skipped = 0
            if t.remaining == 0:
                queue.popleft()
            else:
                queue.rotate(-1)
        if not queue:
            del self._queues[key]
        self.metrics.set_queue_depth(self._queued)
        return batch

    async def _run_batch(self, key: Key, batch: list[Slice]) -> None:
        crops = sum(s.stop - s.start for s in batch)
        try:
            outcome = await self._run(key, batch)
        except Exception as exc:  # a failed batch fails its requests, not the batcher
            log.exception("batch of %d crops for %s failed", crops, key[0])
            for s in batch:
                if not s.ticket.future.done():
                    s.ticket.future.set_exception(exc)
            return
        self.throughput.observe(key[0], key[1] * key[2] * crops, outcome.seconds)
        for t in {s.ticket: None for s in batch}:  # a ticket may be several slices of it
            t.compute_seconds += outcome.seconds
            t.peak_memory_bytes = max(t.peak_memory_bytes, outcome.peak_memory_bytes)
        for s in batch:
            t = s.ticket
            t.finished += s.stop - s.start
            if t.finished == t.count and not t.future.done():
                t.future.set_result(Served(t.queue_seconds, t.compute_seconds, t.peak_memory_bytes))


def _retry_after(wait_s: float | None) -> float:
    """Whole seconds for Retry-After: the estimate rounded up, at least 1."""
    return 1.0 if wait_s is None else float(max(1, math.ceil(wait_s)))
