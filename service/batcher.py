"""The batch queue: admission by cost, deadlines kept, batches bounded in time.

Pure asyncio, no tensors and no device: a request is a `Ticket` of `count` crops under
one key (model, crop height, crop width), and the batcher hands the runner `Slice`s of
tickets whose crops share that key. What a slice holds is the runner's business
(`Ticket.payload`), which keeps this module testable with a fake runner.

**Estimate.** `Throughput` prices work at the device's *current* speed: seconds per crop
pixel per model, an exponentially weighted average (weight 1/2) of the recent large
batches, started from the warm-up's, plus a per-batch overhead learnt from the small
batches. A slowdown (a busy host) shows in the estimate within two or three batches; a
run of thumbnails, mostly fixed cost per call, does not price large images out.

**Scheduling: earliest virtual deadline first.** Each ticket gets, at admission, a
*virtual deadline*: its arrival plus `slack` times its own estimated cost, never later
than its real deadline. The batcher always serves the ticket of earliest virtual
deadline (ties: first come), filling its batch with that key's next tickets in the same
order. A small request therefore jumps ahead of a large one that arrived before it,
and large requests, whose virtual deadline is their real one, run first come first
served instead of all slowing together. A batch holds at most `batch_limit(key)` crops
and at most `max_batch_s` of estimated work (one crop at the least), so a request
never waits more than about one such batch for the device.

**Admission.** A request is admitted only if, in that order, it finishes before its
deadline *and* every ticket it would overtake still finishes before theirs, counting
the batch on the device and the work promised to retries (below). If it would fit
behind everything (virtual deadline = its deadline) it goes there instead. A request
whose own crops outlast its deadline on an idle device, or outnumber the whole queue
(`max_queue_crops`), can never be served: `TooCostly` (413). Otherwise `QueueFull`
(429) with `retry_after_s`: when enough of the work ahead will have run for it to fit.
That capacity is then reserved for the retry (the same request: key, crops and the
caller's `who`, which the API makes from the upload's digest) from that time until
`reservation_grace_s` after it, in the place the request asked for: requests that arrive
meanwhile count it as work ahead of them, so the retry is not refused again by the ones
that came between. A refusal that would have to wait longer than a deadline promises
nothing. Before anything was measured, only the crop limit applies.

An admitted request that still misses its deadline (the device slowed after it was
admitted) is a broken promise: the engine counts it (`imdn_deadline_missed_total`) and
logs its estimate beside what happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from service.errors import DeadlineExceeded, NotReady, QueueFull, TooCostly
from service.metrics import Metrics

log = logging.getLogger(__name__)

Key = tuple[str, int, int]  # model, crop height, crop width

SLACK = 4.0
"""A ticket's virtual deadline is its arrival plus this many times its own cost."""
HEADROOM = 1.5
"""Admission plans with this many times the estimated time to each finish: the estimate
lags a host whose load changes by the second, and requests that overtake an admitted one
may use its slack only down to this margin (without it, on the loaded 2-core CPU, 6-10 %
of the requests admitted at 2-4x the capacity missed their deadline). While the batch on
the device runs past its estimate, the margin grows by as much (`_overrun`)."""


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
    order: float = math.inf  # virtual deadline: the scheduling order
    promised: float | None = None  # estimated finish when admitted (None: unmeasured)
    seq: int = 0  # arrival order, for ties
    taken: int = 0  # crops handed to batches so far
    finished: int = 0  # crops whose batch has run
    queue_seconds: float = 0.0
    compute_seconds: float = 0.0
    peak_memory_bytes: int = 0

    @property
    def remaining(self) -> int:
        return self.count - self.taken

    @property
    def live(self) -> bool:
        return not self.future.done() and self.remaining > 0


@dataclass(frozen=True)
class Slice:
    """Crops [start, stop) of a ticket, one piece of a batch."""

    ticket: Ticket
    start: int
    stop: int


@dataclass(eq=False)
class Reservation:
    """Device time promised to a request not queued yet: the retry of a refused one (the
    same key, crops and `who`), or a `hold` on an admitted request whose image is still
    being decoded."""

    key: Key
    count: int
    at: float  # when the retry was told to come (a hold: when it was admitted)
    until: float  # unclaimed after this, it is forgotten
    seconds: float  # its estimated device time
    order: float  # where it stands among the tickets (their virtual deadlines)
    deadline: float
    seq: int  # ties in `order`: first come first served, tickets and reservations alike
    retry: bool = True
    who: object = None  # the refused request's identity, when its caller gave one


Runner = Callable[[Key, list[Slice]], Awaitable[BatchOutcome]]


@dataclass
class Throughput:
    """Device seconds per crop pixel, per model, at the device's current speed.

    A batch of at least `large_pixels` crop pixels updates the rate (an exponentially
    weighted average, weight `alpha`, of its seconds per pixel); a smaller batch, whose
    time is mostly the fixed cost of a call, updates instead the per-batch `overhead`
    (the same average of its seconds beyond what its pixels cost at that rate), or
    lowers the rate when it ran faster per pixel than that. The
    warm-up's lowest rate is where the average starts; `large_pixels` becomes half the
    warm-up's largest batch.
    """

    alpha: float = 0.5
    large_pixels: int = 2 * 64 * 64
    rates: dict[str, float] = field(default_factory=dict)
    overhead: dict[str, float] = field(default_factory=dict)

    def observe(self, model: str, pixels: int, seconds: float, *, warm_up: bool = False) -> None:
        if pixels <= 0 or seconds <= 0:
            return
        rate = seconds / pixels
        if warm_up:
            self.rates[model] = min(rate, self.rates.get(model, rate))
            self.large_pixels = max(self.large_pixels, pixels // 2)
            return
        if model not in self.rates:
            self.rates[model] = rate
        elif pixels >= self.large_pixels or rate < self.rates[model]:
            # a small batch's rate is an upper bound of the true one (its fixed cost is
            # in it): below the estimate, it lowers it (a slow warm-up is not kept)
            self.rates[model] += self.alpha * (rate - self.rates[model])
        else:
            excess = max(0.0, seconds - self.rates[model] * pixels)
            before = self.overhead.get(model, excess)
            self.overhead[model] = before + self.alpha * (excess - before)

    def rate(self, model: str) -> float | None:
        """Seconds per crop pixel of `model`; None before any measurement."""
        return self.rates.get(model)

    def estimate(self, model: str, pixels: int, batches: int = 1) -> float | None:
        """Seconds to run `pixels` crop pixels of `model` in `batches` batches; None
        before any measurement."""
        rate = self.rates.get(model)
        if rate is None:
            return None
        return rate * pixels + self.overhead.get(model, 0.0) * batches


class Batcher:
    """Admits tickets, orders them by virtual deadline, runs bounded batches through `run`."""

    def __init__(
        self,
        run: Runner,
        *,
        max_batch: int,
        max_wait_s: float,
        max_queue_crops: int,
        max_batch_s: float = math.inf,
        slack: float = SLACK,
        reservation_grace_s: float = 2.0,
        batch_limit: Callable[[Key], int] | None = None,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        """`batch_limit(key)`: the most crops a batch of `key` takes, when lower than
        `max_batch` (a frame bucket's: 1); a key at its limit runs without waiting.
        `max_batch_s`: the most estimated seconds of work in one batch (one crop at
        the least)."""
        if max_batch < 1 or max_queue_crops < 1:
            raise ValueError("max_batch and max_queue_crops must be >= 1")
        if max_batch_s <= 0 or slack <= 0:
            raise ValueError("max_batch_s and slack must be > 0")
        self._run = run
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue_crops = max_queue_crops
        self.max_batch_s = max_batch_s
        self.slack = slack
        self.reservation_grace_s = reservation_grace_s
        self._batch_limit = batch_limit
        self.metrics = metrics or Metrics()
        self.clock = clock
        self.throughput = Throughput()
        self._tickets: list[Ticket] = []
        self._reservations: list[Reservation] = []
        self._seq = itertools.count()
        self._queued = 0  # crops not yet handed to a batch
        self._running: tuple[float, float] | None = None  # (started, estimated seconds)
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
        for t in self._tickets:
            if not t.future.done():
                t.future.set_exception(NotReady("the service is shutting down"))
        self._tickets.clear()
        self._reservations.clear()
        self._queued = 0
        self.metrics.set_queue_depth(0)

    # Estimates

    @property
    def queued_crops(self) -> int:
        return self._queued

    def limit(self, key: Key) -> int:
        """The most crops a batch of `key` takes."""
        if self._batch_limit is None:
            return self.max_batch
        return max(1, min(self.max_batch, self._batch_limit(key)))

    def crops_per_batch(self, key: Key) -> int:
        """The crops of `key` one batch takes: its limit, and no more than fit in
        `max_batch_s` at the measured rate (one at the least)."""
        limit = self.limit(key)
        one = self.throughput.estimate(key[0], key[1] * key[2], batches=0)
        if one is None or one <= 0 or math.isinf(self.max_batch_s):
            return limit
        return max(1, min(limit, int(self.max_batch_s / one)))

    def cost(self, key: Key, crops: int) -> float | None:
        """Estimated device seconds of `crops` crops of `key`, in the batches they need."""
        if crops <= 0:
            return 0.0
        batches = math.ceil(crops / self.crops_per_batch(key))
        return self.throughput.estimate(key[0], key[1] * key[2] * crops, batches)

    def queued_seconds(self) -> float:
        """The estimated device time of the crops waiting now (unmeasured models count 0)."""
        return sum(self.cost(t.key, t.remaining) or 0.0 for t in self._tickets if t.live)

    def _in_flight_s(self, now: float) -> float:
        """What remains, by its estimate, of the batch on the device."""
        if self._running is None:
            return 0.0
        started, estimate = self._running
        return max(0.0, estimate - (now - started))

    def _overrun(self, now: float) -> float:
        """How many times its estimate the batch on the device has taken so far, when
        more than once: the device is that much slower now than the estimate knows (it
        learns only when the batch ends), and admission plans with it; else 1."""
        if self._running is None:
            return 1.0
        started, estimate = self._running
        return max(1.0, (now - started) / estimate) if estimate > 0 else 1.0

    def _claimable(self, now: float, key: Key, count: int, who: object) -> Reservation | None:
        """The retry reservation a request of `key` and `count` crops (and identity `who`)
        may claim now."""
        return next(
            (
                r
                for r in self._reservations
                if r.retry and (r.key, r.count, r.who) == (key, count, who) and r.at - 0.25 <= now
            ),
            None,
        )

    def hold(self, key: Key, count: int, deadline: float, *, who: object = None) -> Reservation:
        """Admit a request whose crops are not ready yet (its image is being decoded), and
        keep its place: it counts as queued work, in its order, until
        `submit(..., hold=)` queues it or `release` lets it go."""
        (order, tie), _ = self.admit(key, count, deadline, claim=True, who=who)
        now = self.clock()
        seconds = self.cost(key, count) or 0.0
        held = Reservation(
            key, count, now, deadline, seconds, order, deadline, self._tie(tie), retry=False
        )
        self._reservations.append(held)
        return held

    def _tie(self, tie: float) -> int:
        """A newcomer's place among equal orders: the one it was promised, else the last."""
        return next(self._seq) if math.isinf(tie) else int(tie)

    def release(self, held: Reservation) -> None:
        """Let a hold or a reservation go (its request was queued, refused or failed)."""
        if held in self._reservations:
            self._reservations.remove(held)

    # Admission

    def submit(
        self,
        key: Key,
        count: int,
        payload: object,
        deadline: float,
        *,
        hold: Reservation | None = None,
        who: object = None,
    ) -> Ticket:
        """Admit `count` crops of `key` (see `admit`) and queue them, in place of their
        `hold` if they had one."""
        try:
            (order, tie), promised = self.admit(
                key, count, deadline, claim=True, hold=hold, who=who
            )
        finally:
            if hold is not None:
                self.release(hold)
        ticket = Ticket(
            key,
            count,
            deadline,
            payload,
            asyncio.get_running_loop().create_future(),
            self.clock(),
            order=order,
            promised=promised,
            seq=self._tie(tie),
        )
        self._tickets.append(ticket)
        self._queued += count
        self.metrics.set_queue_depth(self._queued)
        self._arrived.set()
        return ticket

    def admit(
        self,
        key: Key,
        count: int,
        deadline: float,
        *,
        claim: bool = False,
        hold: Reservation | None = None,
        who: object = None,
    ) -> tuple[tuple[float, float], float | None]:
        """Raise `TooCostly` or `QueueFull` unless `count` crops of `key` fit now; else
        return its place (virtual deadline, tie) and estimated finish. The engine asks before the
        image is decoded (and `hold`s its place) and before its crops are prepared;
        `submit` asks again, and `claim`s the reservation a refusal made for its retry."""
        if count < 1:
            raise ValueError("a ticket needs at least one crop")
        now = self.clock()
        limit = self.max_queue_crops
        if count > limit:
            raise TooCostly(
                f"the image needs {count} crops; this server queues at most {limit}: "
                "send a smaller image"
            )
        own = self.cost(key, count)
        budget = deadline - now
        if own is not None and HEADROOM * own > budget:
            raise TooCostly(
                f"the image needs ~{own:.1f}s of device time at the measured throughput "
                f"(planned with {HEADROOM:g}x headroom); the deadline is {budget:.1f}s: "
                "send a smaller image"
            )
        self._reservations = [r for r in self._reservations if r.until > now]
        held = sum(r.count for r in self._reservations if not r.retry and r is not hold)
        if self._queued + held + count > limit:
            ahead = self.queued_seconds()
            excess = self._queued + held + count - limit
            per_crop = ahead / self._queued if ahead > 0 and self._queued else None
            wait = excess * per_crop if per_crop is not None else None
            raise QueueFull(
                f"the queue holds {self._queued + held} crops (limit {limit}); retry shortly",
                retry_after_s=_retry_after(wait),
            )
        if own is None:
            return (deadline, math.inf), None
        start = now + self._in_flight_s(now)
        margin = HEADROOM * self._overrun(now)
        # a request claims a retry's reservation only when it does not fit without one
        claimable = None if hold is not None else self._claimable(now, key, count, who)
        for mine in (hold, claimable) if claimable is not None else (hold,):
            fitted = self._place(start, now, own, deadline, mine, margin)
            if fitted is not None:
                if claim and mine is not None and mine.retry:
                    self.release(mine)
                return fitted
        # behind everything queued and promised: when enough of it has run, it fits
        behind = (
            start
            + self.queued_seconds()
            + sum(r.seconds for r in self._reservations if r is not hold)
        )
        behind += own
        # sent again after R, with the work ahead R seconds shorter and the deadline R later
        retry = _retry_after((now + margin * (behind - now) - deadline) / margin)
        if hold is None and retry <= budget:  # promise a place to its retry
            self._reservations.append(
                Reservation(
                    key,
                    count,
                    now + retry,
                    now + retry + self.reservation_grace_s,
                    own,
                    order=deadline,  # the place it asked for: before later arrivals
                    deadline=now + retry + budget,
                    seq=next(self._seq),
                    who=who,
                )
            )
        raise QueueFull(
            f"~{behind - now - own:.1f}s of work is queued or promised ahead; this request "
            f"would miss its {budget:.1f}s deadline",
            retry_after_s=retry,
        )

    def _place(
        self,
        start: float,
        now: float,
        own: float,
        deadline: float,
        mine: Reservation | None,
        margin: float,
    ) -> tuple[tuple[float, float], float] | None:
        """Where `own` seconds due at `deadline` fit among the queued and promised work
        (its own reservation `mine` aside, whose place it tries first) with `margin` on
        each estimated time to finish, and its estimated finish there; None where it fits
        nowhere."""
        work: list[tuple[float, float, float, float, float]] = [
            *(
                (t.order, t.seq, t.deadline, self.cost(t.key, t.remaining) or 0.0, t.enqueued)
                for t in self._tickets
                if t.live
            ),
            *(
                (r.order, r.seq, r.deadline, r.seconds, max(now, r.at) if r.retry else r.at)
                for r in self._reservations
                if r is not mine
            ),
        ]
        work.sort()
        places = [
            ((min(deadline, now + self.slack * own), math.inf), 0.0),
            ((deadline, math.inf), 0.0),
        ]
        if mine is not None:  # the place held or promised to it first: its time is counted
            places.insert(0, ((mine.order, mine.seq), mine.seconds))
        for place, counted in places:
            finish = _fits(work, now, start, place, deadline, own, counted, margin)
            if finish is not None:
                return place, finish
        return None

    def drop(self, ticket: Ticket) -> None:
        """Forget a ticket whose request ended (done, timed out or cancelled)."""
        if ticket in self._tickets:
            self._tickets.remove(ticket)
            self._queued -= ticket.remaining
        if not ticket.future.done():
            ticket.future.cancel()
        self.metrics.set_queue_depth(self._queued)

    # Scheduling

    def _expire(self, now: float) -> None:
        """Fail the tickets past their deadline, and forget the ended ones."""
        kept = []
        for t in self._tickets:
            if not t.future.done() and now > t.deadline:
                t.future.set_exception(DeadlineExceeded("the request expired in the queue"))
            if t.live:
                kept.append(t)
            else:
                self._queued -= t.remaining
        self._tickets = kept
        self.metrics.set_queue_depth(self._queued)

    def _ready_at(self, key: Key) -> float:
        """When `key` may run a batch: now if it holds a full batch or crops of a ticket
        already started, else when its oldest ticket has waited `max_wait_s`."""
        mine = [t for t in self._tickets if t.key == key]
        if sum(t.remaining for t in mine) >= self.crops_per_batch(key) or any(
            t.taken for t in mine
        ):
            return -math.inf
        return min(t.enqueued for t in mine) + self.max_wait_s

    async def _loop(self) -> None:
        while True:
            now = self.clock()
            self._expire(now)
            first = min(self._tickets, key=_order, default=None)
            ready_at = math.inf if first is None else self._ready_at(first.key)
            if first is None or ready_at > now:
                self._arrived.clear()
                timeout = None if math.isinf(ready_at) else max(0.0, ready_at - now)
                if first is not None:  # wake for its deadline too
                    timeout = min(timeout or math.inf, max(0.0, first.deadline - now) + 1e-3)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._arrived.wait(), timeout)
                continue
            batch = self._take(first.key, now)
            await self._run_batch(first.key, batch)

    def _take(self, key: Key, now: float) -> list[Slice]:
        """The next batch of `key`: its tickets' crops in virtual-deadline order, up to
        `crops_per_batch(key)`."""
        room = self.crops_per_batch(key)
        batch: list[Slice] = []
        for t in sorted((t for t in self._tickets if t.key == key), key=_order):
            if room == 0:
                break
            chunk = min(room, t.remaining)
            if t.taken == 0:
                t.queue_seconds = now - t.enqueued
                self.metrics.observe_queue_wait(key[0], t.queue_seconds)
            batch.append(Slice(t, t.taken, t.taken + chunk))
            t.taken += chunk
            room -= chunk
            self._queued -= chunk
        self._tickets = [t for t in self._tickets if t.remaining > 0]
        self.metrics.set_queue_depth(self._queued)
        return batch

    async def _run_batch(self, key: Key, batch: list[Slice]) -> None:
        crops = sum(s.stop - s.start for s in batch)
        estimate = self.cost(key, crops)
        self._running = (self.clock(), estimate or 0.0)
        try:
            outcome = await self._run(key, batch)
        except Exception as exc:  # a failed batch fails its requests, not the batcher
            log.exception("batch of %d crops for %s failed", crops, key[0])
            for s in batch:
                if not s.ticket.future.done():
                    s.ticket.future.set_exception(exc)
            return
        finally:
            self._running = None
        self.throughput.observe(key[0], key[1] * key[2] * crops, outcome.seconds)
        for t in {s.ticket: None for s in batch}:  # each ticket charged once per batch
            t.compute_seconds += outcome.seconds
            t.peak_memory_bytes = max(t.peak_memory_bytes, outcome.peak_memory_bytes)
        for s in batch:
            t = s.ticket
            t.finished += s.stop - s.start
            if t.finished == t.count and not t.future.done():
                t.future.set_result(Served(t.queue_seconds, t.compute_seconds, t.peak_memory_bytes))


def _fits(
    work: list[tuple[float, float, float, float, float]],
    now: float,
    start: float,
    place: tuple[float, float],
    deadline: float,
    own: float,
    counted: float = 0.0,
    margin: float = HEADROOM,
) -> float | None:
    """The estimated finish of `own` seconds placed at `place` (order, tie) among `work`
    (order, tie, deadline, seconds, since; sorted, run from `start`) if it meets
    `deadline` and every piece of work it overtakes still meets its own (with the
    `counted` seconds already promised to it there, only the work that met it before
    must: its kept place is already planned); else None. Meeting a deadline means with a
    `margin`: the time from `since` (the newcomer: now; the others: when they were
    admitted, a retry: when it comes) to the estimated finish, times `margin`, fits: an
    admitted request keeps the slack it was admitted with, however long it has waited,
    and a newcomer may not delay work whose estimate has grown past it."""

    def meets(t: float, due: float, since: float = now) -> bool:
        return since + margin * (t - since) <= due

    delay = max(0.0, own - counted)
    t, finish = start, None
    for w_order, w_tie, w_deadline, seconds, since in work:
        if finish is None and place < (w_order, w_tie):
            t += own
            finish = t
            if not meets(finish, deadline):
                return None
        t += seconds
        if finish is not None and (
            # planned from its admission, with the margin (not shrunk by the time passed
            # since), it no longer makes it: a newcomer may not delay it at all (work
            # whose estimate grew past its margin would otherwise be overtaken until it
            # starves), a request in the place kept for it only when that pushes it past
            (
                not meets(t, w_deadline, since)
                and (not counted or meets(t - delay, w_deadline, since))
            )
            # or plainly, at the estimate: it would have made it, and no longer does
            or t - delay <= w_deadline < t
        ):
            return None
    if finish is None:
        finish = t + own
    return finish if meets(finish, deadline) else None


def _order(t: Ticket) -> tuple[float, int]:
    return t.order, t.seq


def _retry_after(wait_s: float | None) -> float:
    """Whole seconds for Retry-After: the estimate rounded up, at least 1."""
    return 1.0 if wait_s is None else float(max(1, math.ceil(wait_s)))
