"""The batcher alone, with a fake runner and a fake clock: no weights, no device.

Fairness, admission by cost and Retry-After are judged by what the batcher does
(order of completion, the batches it formed, the errors it raised), never by timing.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable

import pytest

from service.batcher import Batcher, BatchOutcome, Key, Slice, Throughput, Ticket
from service.errors import DeadlineExceeded, NotReady, QueueFull, TooCostly


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeRunner:
    """Records every batch; each batch 'takes' `seconds` of the fake clock (`per_crop`:
    that many for each crop)."""

    def __init__(self, clock: FakeClock, seconds: float = 1.0, *, per_crop: bool = False) -> None:
        self.clock = clock
        self.seconds = seconds
        self.per_crop = per_crop
        self.batches: list[list[tuple[str, int, int]]] = []  # (ticket name, start, stop)
        self.gate: asyncio.Event | None = None

    async def __call__(self, key: Key, slices: list[Slice]) -> BatchOutcome:
        if self.gate is not None:
            await self.gate.wait()
        self.batches.append([(str(s.ticket.payload), s.start, s.stop) for s in slices])
        seconds = self.seconds * (sum(s.stop - s.start for s in slices) if self.per_crop else 1)
        self.clock.now += seconds
        await asyncio.sleep(0)
        return BatchOutcome(seconds, 0)


def make(
    clock: FakeClock, runner: Callable[[Key, list[Slice]], Awaitable[BatchOutcome]], **kw: object
) -> Batcher:
    options: dict[str, object] = {"max_batch": 8, "max_wait_s": 0.0, "max_queue_crops": 256}
    options.update(kw)
    return Batcher(runner, clock=clock, **options)  # type: ignore[arg-type]


KEY: Key = ("x4", 64, 64)


def measured(batcher: Batcher, seconds_per_crop: float, key: Key = KEY) -> None:
    """Give `batcher` a measured rate: `seconds_per_crop` for a crop of `key`."""
    batcher.throughput.observe(key[0], 4 * key[1] * key[2], 4 * seconds_per_crop, warm_up=True)


def test_small_requests_overtake_a_huge_one_and_wait_at_most_one_batch() -> None:
    """A 40-crop request queued first, then three 4-crop ones: earliest virtual deadline
    first runs the small ones before the huge one's crops (order of completion), and
    every batch holds at most `max_batch_s` of estimated work (here 2 crops of 1 s)."""

    async def scenario() -> tuple[list[str], list[list[tuple[str, int, int]]]]:
        clock = FakeClock()
        runner = FakeRunner(clock, per_crop=True)
        runner.gate = asyncio.Event()  # hold the first batch until everything is queued
        batcher = make(clock, runner, max_batch_s=2.5)
        measured(batcher, 1.0)
        batcher.start()
        finished: list[str] = []
        tickets = [batcher.submit(KEY, 40, "huge", clock.now + 100)]
        tickets += [batcher.submit(KEY, 4, f"small{i}", clock.now + 100) for i in range(3)]
        for t in tickets:
            t.future.add_done_callback(lambda _f, name=str(t.payload): finished.append(name))
        runner.gate.set()
        await asyncio.gather(*(t.future for t in tickets))
        await batcher.stop()
        return finished, runner.batches

    finished, batches = asyncio.run(scenario())
    assert finished == ["small0", "small1", "small2", "huge"], finished
    # every crop ran exactly once
    ran = sorted((name, i) for b in batches for name, a, z in b for i in range(a, z))
    assert ran == sorted(
        [("huge", i) for i in range(40)] + [(f"small{k}", i) for k in range(3) for i in range(4)]
    )
    assert all(sum(z - a for _, a, z in b) <= 2 for b in batches)
    # the small ones ran in the first six batches: none waited for the huge one's crops
    assert {name for b in batches[:6] for name, _, _ in b} == {"small0", "small1", "small2"}


def test_a_small_request_of_another_key_overtakes_a_large_one() -> None:
    """A large request of one shape, then a small one of another: the small one runs in
    the next batch, not after the large one's (time-bounded) batches."""

    async def scenario() -> list[list[tuple[str, int, int]]]:
        clock = FakeClock()
        runner = FakeRunner(clock, per_crop=True)
        runner.gate = asyncio.Event()
        batcher = make(clock, runner, max_batch_s=1.0)
        large_key, small_key = ("x2", 64, 64), ("x2", 16, 16)
        batcher.throughput.observe("x2", 64 * 64, 1.0, warm_up=True)
        batcher.start()
        a = batcher.submit(large_key, 12, "large", clock.now + 100)
        await asyncio.sleep(0)  # its first batch is taken
        b = batcher.submit(small_key, 2, "small", clock.now + 100)
        runner.gate.set()
        await asyncio.gather(a.future, b.future)
        await batcher.stop()
        return runner.batches

    batches = asyncio.run(scenario())
    names = [b[0][0] for b in batches]
    assert names[:3] == ["large", "small", "large"], names


def test_admission_keeps_every_promise_and_retry_after_is_when_it_fits() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        runner = FakeRunner(clock, per_crop=True)
        runner.gate = asyncio.Event()
        batcher = make(clock, runner, max_queue_crops=64)
        measured(batcher, 1.0)  # 1 s per 64x64 crop
        # can never fit: 30 crops = 30 s of work, 45 s with the headroom, against 30 s
        with pytest.raises(TooCostly):
            batcher.submit(KEY, 30, "never", clock.now + 30)
        # more crops than the queue can ever hold
        with pytest.raises(TooCostly):
            batcher.submit(KEY, 65, "too many", clock.now + 1000)
        batcher.start()
        first = batcher.submit(KEY, 15, "first", clock.now + 30)
        assert batcher.queued_seconds() == pytest.approx(15.0)
        # a small one still fits ahead of `first` (4 + 15 <= 20), and is put there
        small = batcher.submit(KEY, 4, "small", clock.now + 30)
        assert small.order < first.order
        # another small one would fit its own deadline but push `first` past its own: it
        # is not put ahead, and behind `first` it misses: 429, nothing admitted is late
        with pytest.raises(QueueFull) as caught:
            batcher.submit(KEY, 2, "late", clock.now + 30)
        assert caught.value.retry_after_s == 1  # 19 + 2 - 20
        # fits alone (10 s < 20 s) but not behind 19 s of queued work and the 2 s promised
        # to the retry of `late`: 429, told what must drain first: 19 + 2 + 10 - 20 = 11 s
        with pytest.raises(QueueFull) as caught:
            batcher.submit(KEY, 10, "second", clock.now + 30)
        assert caught.value.retry_after_s == 11
        runner.gate.set()
        await asyncio.gather(first.future, small.future)
        assert clock.now <= first.deadline
        await batcher.stop()

    asyncio.run(scenario())


def test_a_refused_request_s_retry_finds_its_place_kept() -> None:
    """Refused with Retry-After R, the same request (key and crops) sent again after R is
    admitted even though others came in between: they were refused for its sake."""

    async def scenario() -> None:
        clock = FakeClock()
        runner = FakeRunner(clock, per_crop=True)
        runner.gate = asyncio.Event()
        batcher = make(clock, runner, max_batch=4, max_queue_crops=64)
        measured(batcher, 1.0)
        batcher.start()
        batcher.submit(KEY, 16, "first", clock.now + 30)
        with pytest.raises(QueueFull) as caught:
            batcher.submit(KEY, 8, "refused", clock.now + 30)
        wait = caught.value.retry_after_s
        assert wait == 4  # 16 + 8 - 20
        # another shape arriving meanwhile would fit in what drains by then: refused
        with pytest.raises(QueueFull):
            batcher.submit(("x4", 32, 32), 8, "cutting in", clock.now + 30)
        runner.gate.set()
        while clock.now < 1000 + wait:  # the first batch (4 s) runs
            await asyncio.sleep(0)
        retry = batcher.submit(KEY, 8, "retry", clock.now + 30)
        await retry.future
        await batcher.stop()

    asyncio.run(scenario())


def test_a_retry_in_its_kept_place_is_not_starved_by_small_ones() -> None:
    """A large request refused 429 comes back and claims its kept place: far down the
    queue (its first attempt's deadline), behind the small requests that keep arriving
    with earlier virtual deadlines. The device's speed wobbles from batch to batch, and
    the estimates with it: once a wobble has put the retry's estimated finish past its
    margin, small ones may no longer overtake it (they queue behind it, or are refused),
    so it still runs in time; before, they did until none of its crops had run by its
    deadline. Every admitted request finishes in time."""
    deadline_s = 15.0
    small, large = ("x2", 64, 64), ("x2", 256, 256)  # 0.1 s and 1.6 s a crop, nominally
    speed = [1.3, 0.8]  # the device's seconds over the nominal, batch after batch

    async def scenario() -> tuple[list[Ticket], Counter[str]]:
        clock = FakeClock()
        arrivals = [(1000.0, large, f"large{i}") for i in range(7)]
        arrivals += [(1000.1 + 0.1 * i, small, f"small{i}") for i in range(150)]
        tickets: list[Ticket] = []
        told: Counter[str] = Counter()

        def arrive() -> None:
            """As api and engine do: hold a place, then submit into it. A 429 comes
            back once, after its Retry-After, as the same request (`who`)."""
            while arrivals and arrivals[0][0] <= clock.now:
                _, key, name = arrivals.pop(0)
                who = name.removesuffix(" again")
                deadline = clock.now + deadline_s
                try:
                    held = batcher.hold(key, 1, deadline, who=who)
                except QueueFull as refused:
                    told[f"429 {key[1]}"] += 1
                    if name == who:
                        arrivals.append((clock.now + refused.retry_after_s, key, f"{who} again"))
                        arrivals.sort()
                    continue
                tickets.append(batcher.submit(key, 1, name, deadline, hold=held, who=who))

        async def runner(key: Key, slices: list[Slice]) -> BatchOutcome:
            crops = sum(s.stop - s.start for s in slices)
            seconds = 0.1 * key[1] * key[2] / (64 * 64) * crops * speed[len(ran) % len(speed)]
            ran.append(crops)
            end = clock.now + seconds
            while arrivals and arrivals[0][0] <= end:  # requests arrive while it runs
                clock.now = max(clock.now, arrivals[0][0])
                arrive()
            clock.now = end
            await asyncio.sleep(0)
            return BatchOutcome(seconds, 0)

        ran: list[int] = []
        batcher = make(clock, runner, batch_limit=lambda key: 2, max_batch_s=4.0)
        measured(batcher, 0.1, small)
        arrive()
        batcher.start()
        while arrivals or any(not t.future.done() for t in tickets):
            await asyncio.sleep(0)
            if not any(not t.future.done() for t in tickets) and arrivals:
                clock.now = max(clock.now, arrivals[0][0])
                arrive()
        await batcher.stop()
        return tickets, told

    tickets, told = asyncio.run(scenario())
    assert told["429 256"] == 1, told  # the seventh large one, its place kept for its retry
    (retry,) = [t for t in tickets if t.payload == "large6 again"]
    assert retry.order == 1000.0 + deadline_s  # in its kept place: the first one's deadline
    late = [(t.payload, t.taken) for t in tickets if t.future.exception() is not None]
    assert late == [], late
    assert len([t for t in tickets if t.key == small]) > 50  # the small ones got in too


@pytest.mark.parametrize(("elapsed", "admitted"), [(2.0, True), (12.0, False)])
def test_a_batch_running_past_its_estimate_makes_admission_wary(
    elapsed: float, admitted: bool
) -> None:
    """A 4 s batch on the device: 2 s into it, an 8 s request fits its 30 s deadline (with
    the 1.5x headroom: 15 s); 12 s into it (3x its estimate, which the rate learns only
    when it ends), the same request is planned at 3x too (36 s) and refused."""

    async def scenario() -> bool:
        clock = FakeClock()
        runner = FakeRunner(clock, per_crop=True)
        runner.gate = asyncio.Event()
        batcher = make(clock, runner, max_batch=4)
        measured(batcher, 1.0)
        batcher.start()
        batcher.submit(KEY, 4, "running", clock.now + 100)
        await asyncio.sleep(0)  # its batch is on the device (held at the gate)
        clock.now += elapsed
        try:
            batcher.submit(KEY, 8, "next", clock.now + 30)
        except QueueFull:
            return False
        finally:
            await batcher.stop()
        return True

    assert asyncio.run(scenario()) is admitted


def test_the_estimate_follows_a_slowdown_and_thumbnails_do_not_price_large_images_out() -> None:
    throughput = Throughput()
    throughput.observe("x2", 4 * 64 * 64, 0.4, warm_up=True)  # 0.1 s a 64x64 crop
    crop = 64 * 64
    assert throughput.estimate("x2", crop) == pytest.approx(0.1)
    for _ in range(3):  # the host gets busy: crops cost 0.3 s
        throughput.observe("x2", 4 * crop, 1.2)
    assert throughput.estimate("x2", crop) == pytest.approx(0.275)  # within 10% in 3 batches
    for _ in range(100):  # thumbnails: 8x8 crops at 20 ms a batch, mostly a call's cost
        throughput.observe("x2", 8 * 8, 0.02)
    # the per-pixel rate is the large batches'; the thumbnails' cost is a per-batch overhead
    assert throughput.rate("x2") == pytest.approx(0.275 / crop)
    assert throughput.estimate("x2", 30 * crop, batches=4) == pytest.approx(
        30 * 0.275 + 4 * (0.02 - 64 * 0.275 / crop), rel=1e-3
    )
    for _ in range(3):  # quiet again
        throughput.observe("x2", 4 * crop, 0.4)
    assert throughput.estimate("x2", crop, batches=0) < 0.13
    # a warm-up in a slow moment (0.5 s a crop), then only one-crop batches at 0.1 s: the
    # small batches' rate is an upper bound of the true one, and brings the estimate down
    slow = Throughput()
    slow.observe("x2", 4 * crop, 2.0, warm_up=True)
    for _ in range(5):
        slow.observe("x2", crop, 0.1)
    assert slow.estimate("x2", crop, batches=0) < 0.125


def test_overload_admitted_requests_all_finish_in_time() -> None:
    """Four times what the device can do, small and large mixed, arriving over 60 s of a
    simulated clock: every request admitted finishes before its deadline, the refused
    ones are refused at once, and the device is kept busy."""
    deadline_s, per_crop = 10.0, 0.25  # a large request: 16 crops, 4 s; a small one: 1
    arrivals = []
    t = 1000.0
    for i in range(240):  # capacity: 60 s / ((16 + 1) / 2 * 0.25 s) ~ 28 requests
        t += 0.25
        arrivals.append((t, 16 if i % 2 else 1, f"r{i}"))

    promised: set[str] = set()  # the retries told a wait within a deadline

    async def scenario() -> tuple[list[Ticket], Counter[str], float]:
        clock = FakeClock()
        tickets: list[Ticket] = []
        told: Counter[str] = Counter()
        busy = 0.0

        def arrive() -> None:
            """Submit what has arrived by now; a refused request comes back once, when
            its Retry-After says."""
            while arrivals and arrivals[0][0] <= clock.now:
                _, crops, name = arrivals.pop(0)
                who = name.removesuffix(" again")  # the same request, sent again
                try:
                    tickets.append(
                        batcher.submit(KEY, crops, name, clock.now + deadline_s, who=who)
                    )
                except QueueFull as refused:
                    if name.endswith("again"):
                        told["promised, refused again" if name in promised else "retry"] += 1
                        continue
                    told["429"] += 1
                    wait = refused.retry_after_s
                    if wait <= deadline_s:  # a place is kept for its retry
                        promised.add(name + " again")
                    arrivals.append((clock.now + wait, crops, name + " again"))
                    arrivals.sort()
                except TooCostly:
                    told["413"] += 1

        async def runner(key: Key, slices: list[Slice]) -> BatchOutcome:
            nonlocal busy
            seconds = per_crop * sum(s.stop - s.start for s in slices)
            clock.now += seconds
            busy += seconds
            arrive()
            await asyncio.sleep(0)
            return BatchOutcome(seconds, 0)

        batcher = make(clock, runner, max_batch=8, max_batch_s=1.0)
        measured(batcher, per_crop)
        batcher.start()
        while arrivals or any(not t.future.done() for t in tickets):
            await asyncio.sleep(0)
            if not any(not t.future.done() for t in tickets) and arrivals:
                clock.now = max(clock.now, arrivals[0][0])  # idle until the next arrival
                arrive()
        await batcher.stop()
        return tickets, told, busy

    tickets, told, busy = asyncio.run(scenario())
    late = [t.payload for t in tickets if t.future.exception() is not None]
    assert late == [], late
    assert told["413"] == 0 and told["429"] > 120
    # a retry at its Retry-After finds the place it was promised (a refusal whose wait is
    # longer than a deadline promises none)
    assert told["promised, refused again"] == 0, told
    assert len([t for t in tickets if str(t.payload).endswith("again")]) > 20
    assert busy >= 55.0  # the device worked nearly all of the minute
    assert len([t for t in tickets if t.count == 1]) > 10  # small ones get in too


def test_crop_limit_retry_after_from_throughput() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        batcher = make(clock, FakeRunner(clock), max_queue_crops=10)
        batcher.throughput.observe("x4", 64 * 64, 0.5)
        batcher.submit(KEY, 8, "a", clock.now + 100)
        with pytest.raises(QueueFull) as caught:
            batcher.submit(KEY, 6, "b", clock.now + 100)
        # 4 crops too many; 0.5 s a crop: 2 s
        assert caught.value.retry_after_s == 2
        await batcher.stop()

    asyncio.run(scenario())


def test_unmeasured_throughput_admits_by_crops_only() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        batcher = make(clock, FakeRunner(clock), max_queue_crops=10)
        batcher.submit(KEY, 10, "a", clock.now + 0.001)  # no rate yet: no cost refusal
        with pytest.raises(QueueFull) as caught:
            batcher.submit(KEY, 1, "b", clock.now + 100)
        assert caught.value.retry_after_s == 1
        await batcher.stop()

    asyncio.run(scenario())


def test_expired_tickets_fail_and_dropped_ones_free_the_queue() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        runner = FakeRunner(clock, seconds=5.0)
        runner.gate = asyncio.Event()
        batcher = make(clock, runner, max_batch=4)
        batcher.start()
        first = batcher.submit(KEY, 4, "first", clock.now + 100)
        await asyncio.sleep(0)  # its batch is taken, and waits at the gate
        late = batcher.submit(KEY, 4, "late", clock.now + 2)  # expires while `first` runs
        gone = batcher.submit(KEY, 4, "gone", clock.now + 100)
        assert batcher.queued_crops == 8
        batcher.drop(gone)
        assert batcher.queued_crops == 4 and gone.future.cancelled()
        runner.gate.set()
        await first.future
        with pytest.raises(DeadlineExceeded):
            await late.future
        assert batcher.queued_crops == 0
        assert [b[0][0] for b in runner.batches] == ["first"]
        await batcher.stop()

    asyncio.run(scenario())


def test_a_failed_batch_fails_its_requests_and_the_batcher_goes_on() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        calls: list[int] = []

        async def flaky(key: Key, slices: list[Slice]) -> BatchOutcome:
            calls.append(len(slices))
            if len(calls) == 1:
                raise RuntimeError("device fell over")
            return BatchOutcome(0.1, 0)

        batcher = make(clock, flaky, max_batch=4)
        batcher.start()
        bad = batcher.submit(KEY, 4, "bad", clock.now + 100)
        with pytest.raises(RuntimeError, match="fell over"):
            await bad.future
        good = batcher.submit(KEY, 2, "good", clock.now + 100)
        assert (await good.future).compute_seconds == pytest.approx(0.1)
        await batcher.stop()

    asyncio.run(scenario())


def test_stop_fails_what_is_queued() -> None:
    async def scenario() -> Ticket:
        clock = FakeClock()
        batcher = make(clock, FakeRunner(clock), max_wait_s=1e9, max_batch=8)
        batcher.start()
        t = batcher.submit(KEY, 1, "waiting", clock.now + 100)
        await asyncio.sleep(0)
        await batcher.stop()
        return t

    t = asyncio.run(scenario())
    assert isinstance(t.future.exception(), NotReady)


def test_a_lone_request_fills_whole_batches() -> None:
    async def scenario() -> list[list[tuple[str, int, int]]]:
        clock = FakeClock()
        runner = FakeRunner(clock)
        batcher = make(clock, runner)
        batcher.start()
        t = batcher.submit(KEY, 20, "alone", clock.now + 100)
        await t.future
        await batcher.stop()
        return runner.batches

    batches = asyncio.run(scenario())
    assert [sum(z - a for _, a, z in b) for b in batches] == [8, 8, 4]


def test_a_key_with_a_batch_limit_of_one_runs_each_crop_alone_and_at_once() -> None:
    """Frames run one to a batch: three frames queued together run as three batches, the
    first request done after the first, and none waits out the batching window (an hour
    here) for more crops; other keys still fill batches of 8."""
    frame: Key = ("x2", 1080, 1920)

    async def scenario() -> tuple[list[list[tuple[str, int, int]]], list[float]]:
        clock = FakeClock()
        runner = FakeRunner(clock)
        batcher = make(
            clock,
            runner,
            max_wait_s=3600.0,
            batch_limit=lambda key: 1 if key == frame else 8,
        )
        batcher.start()
        tickets = [batcher.submit(frame, 1, name, clock.now + 100) for name in "abc"]
        tiles = batcher.submit(KEY, 8, "tiles", clock.now + 100)
        done = []
        for t in [*tickets, tiles]:
            served = await asyncio.wait_for(t.future, timeout=5)
            done.append(served.compute_seconds)
        await batcher.stop()
        return runner.batches, done

    batches, charged = asyncio.run(scenario())
    frames = [b for b in batches if b[0][0] != "tiles"]
    assert frames == [[("a", 0, 1)], [("b", 0, 1)], [("c", 0, 1)]]
    assert [("tiles", 0, 8)] in batches and len(batches) == 4
    assert charged == [1.0, 1.0, 1.0, 1.0]


def test_a_request_is_charged_each_of_its_batches_once() -> None:
    """A request's compute time (Server-Timing's "inference") counts each of its batches
    once: 20 crops in batches of 8, 8 and 4 took three batches of 1 s."""

    async def scenario() -> float:
        clock = FakeClock()
        runner = FakeRunner(clock)
        batcher = make(clock, runner)
        batcher.start()
        t = batcher.submit(KEY, 20, "alone", clock.now + 100)
        served = await t.future
        await batcher.stop()
        return served.compute_seconds

    assert asyncio.run(scenario()) == 3.0
