"""How long the device thread's small torch calls wait for the GIL while other threads
run Python, at Python's switch interval and at a shorter one.

    python -m bench.gil_convoy [--ops 20] [--busy 0 1 3] [--intervals 5 0.5]

Every torch call releases the GIL and takes it back. A thread that wants it back while
another runs Python waits until that thread is made to let go: the switch interval, 5 ms
by default. On a GPU host the device thread makes ~17 small calls a batch (the crops'
concatenation, the graph's input copies and replay, the clamp, the quantisation;
`bench.device_thread` counts them in the runner itself), each cheap on its own, so every
wait is added to the batch. This times
`--ops` small tensor additions (the device thread's calls) while `--busy` threads run
pure Python (the event loop and request threads at their busiest), for each interval.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from collections.abc import Callable

import torch

from bench.common import machine


def small_calls(x: torch.Tensor, ops: int) -> torch.Tensor:
    for _ in range(ops):
        x = x.add(1)
    return x


def python_work(stop: threading.Event) -> None:
    total = 0
    while not stop.is_set():
        for i in range(1000):
            total += i


def time_calls(ops: int, busy: int, rounds: int = 30) -> list[float]:
    """Seconds for `ops` small torch calls, `rounds` times, beside `busy` Python threads."""
    x = torch.rand(8, 3, 64, 64)
    return beside_busy_threads(lambda: small_calls(x, ops), busy, rounds)


def beside_busy_threads(fn: Callable[[], object], busy: int, rounds: int) -> list[float]:
    """Seconds of each of `rounds` calls of `fn` while `busy` threads run pure Python."""
    stop = threading.Event()
    threads = [threading.Thread(target=python_work, args=(stop,)) for _ in range(busy)]
    for thread in threads:
        thread.start()
    time.sleep(0.05)
    times = []
    try:
        for _ in range(rounds):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=20)
    parser.add_argument("--busy", type=int, nargs="+", default=[0, 1, 3])
    parser.add_argument("--intervals", type=float, nargs="+", default=[5.0, 0.5], metavar="MS")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(machine(torch.device("cpu")))
    print(f"{args.ops} small torch calls; median and p90 of 30 rounds, ms")
    default = sys.getswitchinterval()
    try:
        for interval in args.intervals:
            sys.setswitchinterval(interval / 1000)
            for busy in args.busy:
                times = sorted(time_calls(args.ops, busy))
                median, p90 = statistics.median(times), times[len(times) * 9 // 10]
                print(
                    f"switch interval {interval:>4} ms, {busy} busy Python threads: "
                    f"{1000 * median:8.2f} {1000 * p90:8.2f}"
                )
    finally:
        sys.setswitchinterval(default)


if __name__ == "__main__":
    main()
