"""The device thread's own cost per batch: its torch calls, and how long they take while
other threads run Python.

    python -m bench.device_thread [--jobs 32] [--busy 0 1 3] [--rounds 30]

On a GPU host a batch of small photos costs the network a few milliseconds; the rest of
the device thread's time is Python making torch calls (concatenating crops, the graph's
input copies and replay, quantising and pasting each request's outputs), and every call
releases the GIL and waits to take it back while request threads and the event loop run
Python (`bench.gil_convoy`). At 32 clients a batch's "inference" grew from 8.4 ms at 8
clients to 21.5 ms (docs/benchmarks.md, section 8). This runs `DeviceRunner.run_batch`
itself on the CPU, with shape buckets (as on CUDA), `--jobs` requests of one small crop
each (Set14 photos cut to 40-64 px, padded into a 64 px bucket) in one batch, and x3's
network replaced by nearest-neighbour upsampling so that the calls, not the arithmetic,
are what is timed. It prints the torch calls the batch makes from Python (each a GIL
release), and the batch's median time alone and beside `--busy` pure-Python threads, at
the GIL switch interval the runner sets with CUDA (0.5 ms). On a GPU host, `--device
cuda` runs the batch there, and `--network imdn` with x3's real network, warmed and
graphed as the service runs it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
from collections.abc import Callable
from types import FrameType

import numpy as np
import torch

from bench.common import hr_images, machine
from bench.gil_convoy import beside_busy_threads
from bench.server_overhead import nearest
from service.batcher import Slice, Ticket
from service.engine import Engine
from service.settings import Settings
from service.shared import WEIGHTS
from service.table6 import lr_from_hr

BUCKET = 64  # the long bucket side at tile_max_pixels = 64 * 64 (x3: a multiple of 1)


def photo_crops(count: int) -> list[np.ndarray]:
    """`count` LR photos of Set14 at x3, cut to sides of 40-64 px (the same every run)."""
    rng = np.random.default_rng(0)
    photos = [lr_from_hr(hr, 3) for _, hr in hr_images("Set14")]
    out = []
    for i in range(count):
        lr = photos[i % len(photos)]
        h, w = (int(v) for v in rng.integers(40, BUCKET + 1, size=2))
        out.append(np.ascontiguousarray(lr[:h, :w]))
    return out


def torch_calls(fn: Callable[[], object]) -> int:
    """How many torch functions and tensor methods implemented in C `fn` calls from Python
    on this thread: each releases the GIL and takes it back."""
    count = 0

    def profile(frame: FrameType, event: str, arg: object) -> None:
        nonlocal count
        if event != "c_call":
            return
        owner = getattr(arg, "__self__", None)
        module = getattr(arg, "__module__", None) or ""
        if isinstance(owner, torch.Tensor) or module.startswith("torch"):
            count += 1

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return count


async def batch_of(engine: Engine, jobs: int, *, stand_in: bool = True) -> Callable[[], object]:
    """A call of the runner's `run_batch` on one batch of `jobs` one-crop requests, x3's
    network replaced by nearest-neighbour upsampling unless not `stand_in`."""
    model = engine.models["x3"]
    if stand_in:
        model.forward = model.masked = model.masked_eager = nearest(3)
    loop = asyncio.get_running_loop()
    slices, key = [], None
    for lr in photo_crops(jobs):
        target = (lr.shape[0] * 3, lr.shape[1] * 3)
        plan = engine.plan(model, *lr.shape[:2])
        job, _, _ = engine._prepare(model, plan, lr, target, False, 8)
        key = ("x3", *plan.shape)
        ticket = Ticket(key, 1, float("inf"), job, loop.create_future(), 0.0)
        slices.append(Slice(ticket, 0, job.crops.shape[0]))
    assert key is not None and all(s.ticket.key == key for s in slices)
    return lambda: engine.runner.run_batch(key, slices)


async def measure(
    jobs: int,
    busy: list[int],
    rounds: int,
    interval_ms: float,
    *,
    device: str = "cpu",
    network: str = "nearest",
) -> int:
    """Print (and return) the batch's torch calls, then its time beside each of `busy`.
    With the real `network` ("imdn") the model is warmed as the service warms it (on
    CUDA: fp16, the bucket's CUDA graphs at every batch size)."""
    real = network == "imdn"
    settings = Settings(
        device=device,
        weights_dir=os.environ.get("IMDN_WEIGHTS_DIR", str(WEIGHTS)),
        models=["x3"],
        shape_buckets="on",
        tile_max_pixels=BUCKET * BUCKET,
        tile_padding=8,
        max_batch_size=max(jobs, 8),
        warmup=real,
    )
    engine = Engine(settings)
    await engine.start()
    print(f"device {engine.device}, {engine.dtype}, network {network}")
    try:
        run = await batch_of(engine, jobs, stand_in=not real)
        run()  # the first call's costs
        calls = torch_calls(run)
        print(f"a batch of {jobs} one-crop requests: {calls} torch calls from Python")
        default = sys.getswitchinterval()
        sys.setswitchinterval(interval_ms / 1000)
        try:
            for threads in busy:
                ms = 1000 * statistics.median(beside_busy_threads(run, threads, rounds))
                print(
                    f"switch interval {interval_ms:g} ms, {threads} busy Python threads: "
                    f"{ms:8.2f} ms per batch (median of {rounds})"
                )
        finally:
            sys.setswitchinterval(default)
    finally:
        await engine.stop()
    return calls


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=32, help="requests in the batch")
    parser.add_argument("--busy", type=int, nargs="+", default=[0, 1, 3])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--interval", type=float, default=0.5, metavar="MS")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda on a GPU host")
    parser.add_argument(
        "--network",
        choices=["nearest", "imdn"],
        default="nearest",
        help="the stand-in (the calls alone) or x3's real network, warmed",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(machine(torch.device(args.device)))
    asyncio.run(
        measure(
            args.jobs,
            args.busy,
            args.rounds,
            args.interval,
            device=args.device,
            network=args.network,
        )
    )


if __name__ == "__main__":
    main()
