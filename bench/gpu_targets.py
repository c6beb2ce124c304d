"""The GPU targets of issue 12, measured side by side in one run.

    python -m bench.gpu_targets              # on a CUDA host: the issue's sizes
    python -m bench.gpu_targets --quick      # anywhere: small inputs, a smoke run
    python -m bench.gpu_targets --frames-only  # (4) alone, from a server of x2 only

Prints, against each target: (1) the x2 forward of a 1920x1080 frame on the device,
eager and (with --compile MODE...) compiled; (2) `Engine.upscale` on Set14 at x4 the first time
each size is seen and again; (3) HTTP throughput on Set14 photos at x3 with 8 and 32
clients, against the in-process engine on the same images (compose and PNG encoding
included on both sides); (4) a 1920x1080 JPEG at x2 to a 4K PNG over HTTP, one at a time
and with 16 clients. The engine runs with the service's settings from the environment
(IMDN_*; on CUDA that means fp16 and shape buckets). `--quick` shrinks every input and
client count so the whole run takes seconds on a CPU: its figures say the harness works,
not how fast anything is.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import numpy as np
import torch
from PIL import Image

from bench.common import HttpLoad, hr_images, http_load_spread, machine, percentile, synchronizer
from models.networks.checkpoints import load_official
from models.runtime.backend import CompileMode, prepare, split_free
from models.runtime.device import precision_dtype, resolve_device
from service import imaging
from service.child import Served, imdn_serve
from service.engine import Engine
from service.settings import Settings
from service.shared import DATASETS, WEIGHTS
from service.table6 import lr_from_hr


@dataclass(frozen=True)
class Sizes:
    frame: tuple[int, int]  # (height, width) of the x2 frame
    dataset: str
    images: int
    clients: tuple[int, int]  # the low and high HTTP concurrency
    big_clients: int
    repeats: int
    crop: int | None  # crop every dataset image to this side (quick runs)


FULL = Sizes((1080, 1920), "Set14", 14, (8, 32), 16, 10, None)
QUICK = Sizes((68, 120), "Set5", 3, (2, 4), 2, 2, 48)


WHAT_WIDTH = 78  # the first column of the printed table


@dataclass
class Row:
    what: str
    figure: float
    unit: str
    target: str
    met: bool | None

    def line(self) -> str:
        verdict = {True: "met", False: "NOT met", None: ""}[self.met]
        figure = f"{self.figure:>10.2f} {self.unit:<10} {self.target:<22}"
        return f"{self.what:<{WHAT_WIDTH}} {figure} {verdict}"


def photos(sizes: Sizes, scale: int) -> list[np.ndarray]:
    """LR inputs from the data set's HR images (MATLAB bicubic), cropped in quick runs."""
    out = []
    for _, hr in hr_images(sizes.dataset)[: sizes.images]:
        lr = lr_from_hr(hr, scale)
        out.append(lr if sizes.crop is None else lr[: sizes.crop, : sizes.crop].copy())
    return out


def frame(sizes: Sizes) -> np.ndarray:
    """A photo-like frame of the target size: a Set14 image tiled and cropped."""
    _, hr = hr_images("Set14")[0]
    h, w = sizes.frame
    reps = (-(-h // hr.shape[0]), -(-w // hr.shape[1]), 1)
    return np.ascontiguousarray(np.tile(hr, reps)[:h, :w])


def encoded(rgb: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


# (1) the forward


def forward_rows(
    sizes: Sizes,
    settings: Settings,
    compile_modes: list[CompileMode],
    kernels: int = 0,
    split_free_too: bool = False,
) -> list[Row]:
    """The x2 frame's forward, eager (NCHW and channels-last), then compiled in each of
    `compile_modes`; cuDNN's autotuning on where the engine turns it on (with buckets):
    a frame of its bucket's size runs this very forward in the service. With `kernels`,
    each variant's most expensive kernels (torch.profiler, over three forwards) are
    printed under its name as it is measured: where the frame's time goes.
    `split_free_too` adds the channels-last and compiled rows again with every channel
    split made two convolutions (`split_free`, the same function): channels-last, the
    kept and refined channels of a split are strided views that the next convolution
    may copy or read slowly."""
    device = resolve_device(settings.device)
    dtype = precision_dtype(settings.precision, device, prefer_bf16=False)
    sync = synchronizer(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = settings.buckets_on(device)
        print(f"cudnn.benchmark {torch.backends.cudnn.benchmark}")
    x = torch.from_numpy(frame(sizes)).permute(2, 0, 1).unsqueeze(0).to(device, dtype) / 255
    rows = []
    variants: list[tuple[str, CompileMode, bool]] = [
        ("eager", "default", False),
        ("channels_last", "default", False),
    ]
    variants += [("compile", mode, False) for mode in compile_modes]
    if split_free_too:
        variants += [(backend, mode, True) for backend, mode, _ in variants[1:]]
    for backend, mode, free in variants:
        network = load_official("x2", WEIGHTS)
        if free:
            network = split_free(network)
        forward = prepare(network, backend, device, dtype, in_place=True, compile_mode=mode)
        started = time.perf_counter()
        forward(x)
        sync()
        prepared = time.perf_counter() - started
        times = []
        for _ in range(sizes.repeats):
            started = time.perf_counter()
            forward(x)
            sync()
            times.append(time.perf_counter() - started)
        ms = 1000 * min(times)
        name = (mode if backend == "compile" else backend) + (" split-free" if free else "")
        if kernels:
            print(f"  kernels of the {name} forward:")
            kernel_table(forward, x, device, kernels)
        rows.append(
            Row(
                f"x2 {sizes.frame[1]}x{sizes.frame[0]} forward, {name} "
                f"(first call {prepared:.1f}s)",
                1000 / ms,
                "frames/s",
                ">= 60 frames/s",
                1000 / ms >= 60,
            )
        )
    return rows


def kernel_table(
    forward: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    device: torch.device,
    rows: int,
) -> None:
    """The `rows` kernels (or CPU ops, off CUDA) that took the most time in three forwards."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        for _ in range(3):
            forward(x)
        synchronizer(device)()
    key = "cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60))


# (2) and the in-process side of (3): the engine


async def engine_rows(sizes: Sizes, settings: Settings) -> tuple[list[Row], float]:
    engine = Engine(settings.model_copy(update={"models": ["x3", "x4"]}))
    await engine.start()
    try:
        x4 = photos(sizes, 4)
        first, again = [], []
        for lr in x4:
            started = time.perf_counter()
            await engine.upscale(lr, 4)
            first.append(time.perf_counter() - started)
        for lr in x4:
            started = time.perf_counter()
            await engine.upscale(lr, 4)
            again.append(time.perf_counter() - started)
        x3 = photos(sizes, 3)

        jobs = [x3[i % len(x3)] for i in range(max(len(x3), sizes.clients[1]) * 2)]
        semaphore = asyncio.Semaphore(sizes.clients[1])

        def png_bytes(lr: np.ndarray, pixels: np.ndarray) -> int:
            composed = imaging.compose(_decoded(lr), pixels)
            return len(b"".join(imaging.encode_png(composed, compress_level=1)))

        async def full(lr: np.ndarray) -> int:  # what the HTTP path does, in process
            async with semaphore:
                result = await engine.upscale(lr, 3)
                return await asyncio.to_thread(png_bytes, lr, result.image)

        started = time.perf_counter()
        await asyncio.gather(*(full(lr) for lr in jobs))
        in_process = len(jobs) / (time.perf_counter() - started)
    finally:
        await engine.stop()
    mean_first, mean_again = statistics.mean(first), statistics.mean(again)
    rows = [
        Row(
            f"{sizes.dataset} x4 Engine.upscale, sizes never seen",
            1000 * mean_first,
            "ms/image",
            "",
            None,
        ),
        Row(
            f"{sizes.dataset} x4 Engine.upscale, sizes seen before",
            1000 * mean_again,
            "ms/image",
            "<= 10 ms/image",
            1000 * mean_again <= 10,
        ),
        Row(
            "never seen / seen",
            mean_first / mean_again,
            "x",
            "<= 1.5",
            mean_first / mean_again <= 1.5,
        ),
    ]
    return rows, in_process


def _decoded(lr: np.ndarray) -> imaging.DecodedImage:
    return imaging.DecodedImage(
        pixels=lr, alpha=None, grey=False, bits=8, icc_profile=None, format="PNG"
    )


# (3) and (4): HTTP


@contextmanager
def server(models: list[str]) -> Iterator[Served]:
    """`imdn serve` on a free loopback port with the environment's settings."""
    settings = {
        "IMDN_MODELS": json.dumps(models),
        "IMDN_WEIGHTS_DIR": os.environ.get("IMDN_WEIGHTS_DIR", str(WEIGHTS)),
        "IMDN_LOG_LEVEL": "warning",
        "IMDN_REQUEST_TIMEOUT_S": "600",
        "IMDN_MAX_QUEUE_CROPS": "4096",
    }
    with imdn_serve(settings, start_timeout=1800, inherit=True) as served:
        yield served


def load(url: str, bodies: list[bytes], scale: int, clients: int, total: int) -> HttpLoad:
    """`total` requests, `clients` at a time, from one process per 8 clients (one Python
    process parsing 32 clients' PNGs was the limit on an H200 host: docs/benchmarks.md)."""
    return http_load_spread(
        url, bodies, scale=scale, clients=clients, total=total, processes=-(-clients // 8)
    )


def phase_line(run: HttpLoad) -> str:
    phases = ", ".join(f"{k} {v:.1f}" for k, v in run.median_phases().items())
    return (
        f"median latency {1000 * percentile(run.latencies, 50):.1f} ms; Server-Timing ms: {phases}"
    )


def profiled(served: Served, folder: Path, work: Callable[[], object]) -> None:
    """py-spy samples of the server while `work` loads it: every busy thread, then only
    the thread holding the GIL (raw collapsed stacks; flamegraph.pl or speedscope read them)."""
    folder.mkdir(parents=True, exist_ok=True)
    loader = threading.Thread(target=work)
    loader.start()
    time.sleep(1)
    for name, extra in (("threads", ["--threads"]), ("gil", ["--gil"])):
        subprocess.run(
            [
                "py-spy",
                "record",
                "--pid",
                str(served.process.pid),
                "--duration",
                "5",
                "--rate",
                "250",
                "--format",
                "raw",
                "--nonblocking",
                "-o",
                str(folder / f"pyspy_{name}.txt"),
                *extra,
            ],
            check=False,
            capture_output=True,
        )
    loader.join()


def http_rows(sizes: Sizes, in_process: float | None, profile: Path | None) -> list[Row]:
    """(3) against `in_process`, then (4); (4) alone, from a server of x2 only, when
    `in_process` is None (--frames-only: a compiled backend then compiles one model)."""
    with server(["x2"] if in_process is None else ["x2", "x3"]) as served:
        rows = [] if in_process is None else set14_rows(served, sizes, in_process, profile)
        return rows + frame_rows(served.url, sizes)


def set14_rows(served: Served, sizes: Sizes, in_process: float, profile: Path | None) -> list[Row]:
    bodies = [encoded(lr, "PNG") for lr in photos(sizes, 3)]
    low, high = sizes.clients
    url = served.url
    load(url, bodies, 3, 1, len(bodies))  # warm the whole path
    small = {n: load(url, bodies, 3, n, 2 * max(len(bodies), n)) for n in (low, high)}
    rps_low, rps_high = (small[n].images_per_second for n in (low, high))
    if profile is not None:
        profiled(served, profile, lambda: load(url, bodies, 3, high, 20 * high))
    for n, run in small.items():
        print(f"  {sizes.dataset} x3, {n} clients: {phase_line(run)}")
    return [
        Row(f"HTTP {sizes.dataset} x3, {low} clients", rps_low, "requests/s", "", None),
        Row(
            f"HTTP {sizes.dataset} x3, {high} clients",
            rps_high,
            "requests/s",
            f">= {low}-client figure",
            rps_high >= rps_low,
        ),
        Row(f"in-process engine + PNG, {high} at a time", in_process, "images/s", "", None),
        Row(
            f"HTTP / in-process at {high} clients",
            rps_high / in_process,
            "x",
            ">= 0.6",
            rps_high / in_process >= 0.6,
        ),
    ]


def frame_rows(url: str, sizes: Sizes) -> list[Row]:
    big = encoded(frame(sizes), "JPEG")
    load(url, [big], 2, 1, 1)
    one_at_a_time = load(url, [big], 2, 1, sizes.repeats)
    many = load(url, [big], 2, sizes.big_clients, 2 * sizes.big_clients)
    h, w = sizes.frame
    median_ms = 1000 * percentile(one_at_a_time.latencies, 50)
    for name, run in (("one at a time", one_at_a_time), (f"{sizes.big_clients} clients", many)):
        print(f"  {w}x{h} x2, {name}: {phase_line(run)}")
    return [
        Row(
            f"HTTP {w}x{h} JPEG x2 -> PNG, one at a time (median)",
            median_ms,
            "ms",
            "<= 150 ms",
            median_ms <= 150,
        ),
        Row(
            f"HTTP {w}x{h} JPEG x2 -> PNG, {sizes.big_clients} clients",
            many.images_per_second,
            "requests/s",
            ">= 20/s",
            many.images_per_second >= 20,
        ),
    ]


def inductor_setting(item: str) -> tuple[str, object]:
    """ "key=value" as an inductor setting: true/false as booleans, digits as integers."""
    import torch._inductor.config as inductor

    key, sep, text = item.partition("=")
    if not sep or not hasattr(inductor, key):
        raise SystemExit(f"--inductor {item!r}: expected KEY=VALUE with an inductor setting")
    value: object = {"true": True, "false": False}.get(text.lower(), text)
    return key, int(text) if text.isdigit() else value


def shown(rows: list[Row]) -> list[Row]:
    """Print each row as its part ends, so a run cut short keeps what it measured."""
    for row in rows:
        print(row.line())
    return rows


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small inputs: a smoke run anywhere")
    parser.add_argument(
        "--compile",
        nargs="+",
        default=[],
        choices=get_args(CompileMode),
        metavar="MODE",
        help="also time the frame's forward compiled in these torch.compile modes",
    )
    parser.add_argument(
        "--inductor",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="inductor settings for the compiled rows, e.g. freezing=true (weights as "
        "constants), coordinate_descent_tuning=true, max_autotune_conv_backends=ATEN,TRITON",
    )
    parser.add_argument("--forward-only", action="store_true", help="the frame's forward alone")
    parser.add_argument(
        "--split-free",
        action="store_true",
        help="also time the channels-last and compiled forwards without channel splits",
    )
    parser.add_argument(
        "--kernels",
        type=int,
        default=0,
        metavar="N",
        help="after each forward row, its N most expensive kernels (torch.profiler)",
    )
    parser.add_argument("--skip-http", action="store_true", help="in-process figures only")
    parser.add_argument(
        "--frames-only", action="store_true", help="the 1080p JPEG -> 4K PNG over HTTP alone"
    )
    parser.add_argument(
        "--profile", type=Path, metavar="DIR", help="py-spy samples of the server under load"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if not (DATASETS / sizes.dataset / "HR").is_dir():
        raise SystemExit(f"{DATASETS / sizes.dataset / 'HR'} not found (set IMDN_SHARED_DIR)")
    settings = Settings(weights_dir=os.environ.get("IMDN_WEIGHTS_DIR", str(WEIGHTS)))
    device = resolve_device(settings.device)
    print(machine(device))
    print(
        f"device {device}, precision {settings.precision}, backend {settings.backend}, "
        f"shape buckets {'on' if settings.buckets_on(device) else 'off'}, "
        f"CUDA graphs {'on' if settings.graphs_on(device) else 'off'}, GIL switch interval "
        f"{1000 * (settings.switch_interval_s(device) or sys.getswitchinterval()):g} ms"
        + (" (quick: small inputs, not a measurement)" if args.quick else "")
    )
    for key, value in (inductor_setting(item) for item in args.inductor):
        import torch._inductor.config as inductor

        setattr(inductor, key, value)
        print(f"inductor {key} = {value!r}")
    print(f"{'what':<{WHAT_WIDTH}} {'figure':>10} {'unit':<10} {'target':<22}")
    if args.frames_only:
        rows = shown(http_rows(sizes, None, None))
    else:
        rows = shown(forward_rows(sizes, settings, args.compile, args.kernels, args.split_free))
    if not (args.forward_only or args.frames_only):
        engine, in_process = asyncio.run(engine_rows(sizes, settings))
        rows += shown(engine)
        if not args.skip_http:
            rows += shown(http_rows(sizes, in_process, args.profile))
    if args.json:
        print(json.dumps([row.__dict__ for row in rows], indent=2))
    return rows


if __name__ == "__main__":
    main()
