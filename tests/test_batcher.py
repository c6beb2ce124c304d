"""The batcher alone, with a fake runner and a fake clock: no weights, no device.

Fairness, admission by cost and Retry-After are judged by what the batcher does
(order of completion, the batches it formed, the errors it raised), never by timing.
"""

from __future__ import annotations

import asyncio
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
    """Records every batch; each batch 'takes' `seconds` of the fake clock."""

    def __init__(self, clock: FakeClock, seconds: float = 1.0) -> None:
        self.clock = clock
        self.seconds = seconds
        self.batches: list[list[tuple[str, int, int]]] = []  # (ticket name, start, stop)
        self.gate: asyncio.Event | None = None

    async def __call__(self, key: Key, slices: list[Slice]) -> BatchOutcome:
        if self.gate is not None:
            await self.gate.wait()
        self.batches.append([(str(s.ticket.payload), s.start, s.stop) for s in slices])
        self.clock.now += self.seconds
        await asyncio.sleep(0)
        return BatchOutcome(self.seconds, 0)


def make(
    clock: FakeClock, runner: Callable[[Key, list[Slice]], Awaitable[BatchOutcome]], **kw: object
) -> Batcher:
    options: dict[str, object] = {"max_batch": 8, "max_wait_s": 0.0, "max_queue_crops": 256}
    options.update(kw)
    return Batcher(runner, clock=clock, **options)  # type: ignore[arg-type]


KEY: Key = ("x4", 64, 64)


def test_one_huge_request_does_not_starve_small_ones() -> None:
    """A 40-crop request queued first, then three 4-crop ones: the small ones finish
    first, each sharing a batch with a piece of the huge one (order of completion)."""

    async def scenario() -> tuple[list[str], list[list[tuple[str, int, int]]]]:
        clock = FakeClock()
        runner = FakeRunner(clock)
        runner.gate = asyncio.Event()  # hold the first batch until everything is queued
        batcher = make(clock, runner)
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
    # the four crops of a small request travel together (the paper's ACS batch of 4)
    for batch in batches:
        for name, a, z in batch:
            if name.startswith("small"):
                assert (a, z) == (0, 4)
    assert all(sum(z - a for _, a, z in b) <= 8 for b in batches)


def test_keys_take_turns() -> None:
    """Two shapes both ready: batches alternate between them, so a huge request of one
    shape does not hold the device against another shape."""

    async def scenario() -> list[list[tuple[str, int, int]]]:
        clock = FakeClock()
        runner = FakeRunner(clock)
        runner.gate = asyncio.Event()
        batcher = make(clock, runner)
        batcher.start()
        a = batcher.submit(("x2", 64, 64), 32, "a", clock.now + 100)
        b = batcher.submit(("x3", 32, 32), 16, "b", clock.now + 100)
        runner.gate.set()
        await asyncio.gather(a.future, b.future)
        await batcher.stop()
        return runner.batches

    batches = asyncio.run(scenario())
    names = [b[0][0] for b in batches]
    assert names[:4] == ["a", "b", "a", "b"], names


def test_admission_by_cost_and_an_honest_retry_after() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        runner = FakeRunner(clock)
        runner.gate = asyncio.Event()
        batcher = make(clock, runner, max_queue_crops=64)
        # measured: 1 s per 64x64 crop
        batcher.throughput.observe("x4", 64 * 64, 1.0)
        # can never fit: 30 crops = 30 s of work against a 20 s deadline
        with pytest.raises(TooCostly):
            batcher.submit(KEY, 30, "never", clock.now + 20)
        # more crops than the queue can ever hold
        with pytest.raises(TooCostly):
            batcher.submit(KEY, 65, "too many", clock.now + 1000)
        batcher.start()
        first = batcher.submit(KEY, 15, "first", clock.now + 20)
        assert batcher.queued_seconds() == pytest.approx(15.0)
        # fits alone (10 s < 20 s) but not behind 15 s of queued work: 429, and the wait
        # it is told is what must drain first: 15 + 10 - 20 = 5 s
        with pytest.raises(QueueFull) as caught:
            batcher.submit(KEY, 10, "second", clock.now + 20)
        assert caught.value.retry_after_s == 5
        # a small one still fits: 15 + 4 <= 20
        small = batcher.submit(KEY, 4, "small", clock.now + 20)
        runner.gate.set()
        await asyncio.gather(first.future, small.future)
        await batcher.stop()

    asyncio.run(scenario())


def test_small_batches_do_not_price_a_large_image_out() -> None:
    """A thumbnail's batch is mostly fixed per-call cost: its seconds per pixel, scaled up
    to a large image, would refuse that image as too costly. The rate admission uses is
    the lowest seen (the warm-up's, kept; or a recent large batch's)."""

    async def scenario() -> None:
        clock = FakeClock()
        batcher = make(clock, FakeRunner(clock), max_queue_crops=64)
        batcher.throughput.observe("x4", 4 * 64 * 64, 0.4, warm_up=True)  # 0.1 s a crop
        for _ in range(100):  # 8x8 crops at 20 ms each: 32x the warm-up's rate per pixel
            batcher.throughput.observe("x4", 8 * 8, 0.02)
        # 30 crops: 3 s at the warm-up's rate, ~96 s at the thumbnails'
        batcher.submit(KEY, 30, "large", clock.now + 20)
        assert batcher.queued_seconds() == pytest.approx(3.0)
        await batcher.stop()

    asyncio.run(scenario())
    throughput = Throughput(window=4)
    throughput.observe("x2", 100, 10.0)  # a slow moment (10 s a hundred pixels)...
    assert throughput.estimate("x2", 100) == pytest.approx(10.0)
    for _ in range(4):
        throughput.observe("x2", 100, 20.0)  # ...and then slower still, for a window
    assert throughput.estimate("x2", 100) == pytest.approx(20.0)  # the window moved on
    throughput.observe("x2", 1000, 1.0)  # a large batch: 1 ms a pixel
    assert throughput.estimate("x2", 100) == pytest.approx(0.1)


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
        late = batcher.submit(KEY, 4, "late", clock.now + 2)  # expires while `first` runs
        gone = batcher.submit(KEY, 4, "gone", clock.now + 100)
        assert batcher.queued_crops == 12
        batcher.drop(gone)
        assert batcher.queued_crops == 8 and gone.future.cancelled()
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
    assert [("tiles", 0, 4), ("tiles", 4, 8)] in batches and len(batches) == 4
    assert charged == [1.0, 1.0, 1.0, 1.0]


def test_a_request_is_charged_each_of_its_batches_once() -> None:
    """A request's crops may fill a batch as several slices (a few crops per turn); its
    compute time (Server-Timing's "inference") counts that batch once, not per slice:
    20 crops in batches of 8, 8 and 4 took three batches of 1 s."""

    async def scenario() -> float:
        clock = FakeClock()
        runner = FakeRunner(clock)
        batcher = make(clock, runner)
        batcher.start()
        t = batcher.submit(KEY, 20, "alone", clock.now + 100)
        served = await t.future
        await batcher.stop()
        assert max(len(b) for b in runner.batches) > 1, "several slices in one batch"
        return served.compute_seconds

    assert asyncio.run(scenario()) == 3.0
