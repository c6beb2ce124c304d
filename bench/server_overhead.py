"""The server's own cost per request, with the network replaced by nearest-neighbour upsampling.

    python -m bench.server_overhead [--clients 8] [--rounds 20] [--gil] [--frame]

On a GPU host the engine serves Set14 x3 at ~280 images/s in process, and HTTP must
reach 0.6 of that at 32 clients (issue 12; docs/benchmarks.md, section 8). What HTTP
adds is the server's own work per request: the HTTP parsing, decode, queueing, compose
and the PNG encode, with Python's parts under one GIL. This measures that work on any
machine: the server runs in this process (uvicorn on a loopback port, the CPU, the
service's defaults) with x3's network replaced by nearest-neighbour upsampling, so
inference is nearly free; the load comes from other processes. `--frame` sends the 4K
target's request instead: a 1920x1080 JPEG at x2, in a 1080x1920 frame bucket (one crop,
as a GPU host would be set up for it), x2's network replaced the same way.
It prints requests/s,
this process's CPU time per request, and with --gil the time per request some thread
held the GIL (py-spy samples), which bounds requests/s at 1 / that time whatever the
cores.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from bench import gpu_targets
from bench.common import HttpLoad, http_load_spread, machine, percentile
from bench.gpu_targets import FULL, encoded
from service.settings import Settings
from service.shared import WEIGHTS
from tests.live import live_server

GIL_SECONDS, GIL_RATE = 5, 200  # py-spy's sampling window and rate


def nearest(scale: int) -> Callable[..., torch.Tensor]:
    """What stands in for IMDN at `scale`, plain or masked: the output size, at almost no
    cost."""

    def forward(x: torch.Tensor, *valid: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=scale, mode="nearest")

    return forward


def gil_seconds(pid: int) -> float | None:
    """Seconds within GIL_SECONDS in which some thread of `pid` held the GIL (py-spy
    --gil samples), or None where py-spy is missing or may not attach."""
    spy = shutil.which("py-spy")
    if spy is None:
        return None
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "gil.txt"
        done = subprocess.run(
            [
                spy,
                "record",
                "--pid",
                str(pid),
                "--duration",
                str(GIL_SECONDS),
                "--rate",
                str(GIL_RATE),
                "--format",
                "raw",
                "--nonblocking",
                "--gil",
                "-o",
                str(out),
            ],
            capture_output=True,
            check=False,
        )
        if done.returncode != 0 or not out.is_file():
            return None
        samples = sum(int(line.rsplit(" ", 1)[1]) for line in out.read_text().splitlines() if line)
    return samples / GIL_RATE


def measure(
    clients: int, rounds: int, gil: bool, *, frame: bool = False
) -> tuple[HttpLoad, float, float | None]:
    """(the load, CPU seconds of this process per request, GIL seconds per request: from
    a second load long enough to cover py-spy's window, sampled from its second second)."""
    scale = 2 if frame else 3
    settings = Settings(
        device="cpu",
        weights_dir=os.environ.get("IMDN_WEIGHTS_DIR", str(WEIGHTS)),
        models=[f"x{scale}"],
        # the frame whole, as a GPU host serves it (no warm-up: it would run the network)
        **(
            {"shape_buckets": "on", "frame_buckets": ["1080x1920"], "warmup": False}
            if frame
            else {}
        ),
    )
    if frame:
        bodies = [encoded(gpu_targets.frame(FULL), "JPEG")]
    else:
        bodies = [encoded(lr, "PNG") for lr in gpu_targets.photos(FULL, 3)]
    processes = max(1, clients // 4)
    with live_server(settings) as srv:
        model = srv.app.state.engine.runner.models[f"x{scale}"]
        model.forward = model.masked = model.masked_eager = nearest(scale)

        def run(total: int) -> HttpLoad:
            return http_load_spread(
                srv.url,
                bodies,
                scale=scale,
                clients=clients,
                total=total,
                processes=processes,
                separate=True,
            )

        run(len(bodies))  # warm the whole path
        before = os.times()
        load = run(rounds * len(bodies))
        after = os.times()
        per_gil = None
        if gil:
            total = int(load.images_per_second * (GIL_SECONDS + 3)) + clients
            second: list[HttpLoad] = []
            loader = threading.Thread(target=lambda: second.append(run(total)))
            loader.start()
            time.sleep(1)
            held = gil_seconds(os.getpid())
            loader.join()
            if held is not None:
                per_gil = held / (GIL_SECONDS * second[0].images_per_second)
    cpu = (after.user - before.user) + (after.system - before.system)
    return load, cpu / len(load.latencies), per_gil


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=20, help="times each image is sent")
    parser.add_argument("--frame", action="store_true", help="a 1080p JPEG at x2 (4K out)")
    parser.add_argument("--gil", action="store_true", help="sample the GIL with py-spy")
    args = parser.parse_args(argv)
    print(machine(torch.device("cpu")))
    load, cpu, gil = measure(args.clients, args.rounds, args.gil, frame=args.frame)
    what = "1920x1080 JPEG x2" if args.frame else "Set14 x3"
    phases = ", ".join(f"{k} {v:.1f}" for k, v in load.median_phases().items())
    print(
        f"{what} (nearest-neighbour network), {args.clients} clients: "
        f"{load.images_per_second:.1f} requests/s, median latency "
        f"{1000 * percentile(load.latencies, 50):.1f} ms (Server-Timing ms: {phases})"
    )
    print(f"server CPU time per request: {1000 * cpu:.1f} ms")
    if args.gil:
        if gil is None:
            print("GIL: py-spy is missing or may not attach to this process")
        else:
            print(
                f"GIL held per request: {1000 * gil:.2f} ms, "
                f"so at most {1 / gil:.0f} requests/s from one process"
            )


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"({time.perf_counter() - started:.0f} s)")
