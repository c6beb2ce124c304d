"""Benchmark 3: images per second through HTTP against the in-process model on the same
inputs, in one run, with latency percentiles at each concurrency.

    python -m bench.service_vs_model [--images 8] [--levels 1 4 16] [--backend auto]

A real server (`python -m service.cli serve`, uvicorn, x4 only) runs in a subprocess;
N client threads POST PNGs (256×256 crops of Set14/Set5, so 1024×1024 PNGs come back)
until each image has been sent once (at least `concurrency` requests per level). The
model's own throughput is the prepared backend's forward, batch 1, one image after the
other, in this process while the server idles: measured before the first level and
after each one, and every level is compared with the mean of the passes around it.
Percentiles come from the requests of one level: with 8-16 of them p95 and p99 are
close to the maximum.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image

from bench.common import HttpLoad, hr_images, http_load, machine, percentile, to_tensor
from models.networks.checkpoints import load_official
from models.runtime.backend import MIXED, Forward, mixed_precision, prepare, resolve_backend
from service.child import imdn_serve
from service.shared import WEIGHTS


def crops(count: int, side: int) -> list[np.ndarray]:
    """`count` different side×side crops of real photographs (Set14, then Set5)."""
    out: list[np.ndarray] = []
    images = [im for _, im in hr_images("Set14") + hr_images("Set5") if min(im.shape[:2]) >= side]
    corner = 0
    while len(out) < count:
        for im in images:
            h, w = im.shape[:2]
            y, x = [(0, 0), (h - side, w - side), (0, w - side), (h - side, 0)][corner % 4]
            out.append(np.ascontiguousarray(im[y : y + side, x : x + side]))
            if len(out) == count:
                break
        corner += 1
    return out


def png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def png_size(data: bytes) -> tuple[int, int]:
    width, height = struct.unpack(">II", data[16:24])
    return height, width


@contextmanager
def server(backend: str, threads: int) -> Iterator[str]:
    """`imdn serve` on a free loopback port, x4 only, until the block ends."""
    settings = {
        "IMDN_MODELS": '["x4"]',
        "IMDN_WEIGHTS_DIR": str(WEIGHTS),
        "IMDN_BACKEND": backend,
        "IMDN_DEVICE": "cpu",
        "IMDN_LOG_LEVEL": "warning",
        "IMDN_TORCH_THREADS": str(threads),
        "IMDN_REQUEST_TIMEOUT_S": "600",
    }
    with imdn_serve(settings, start_timeout=300, inherit=True) as served:
        yield served.url


def http_level(url: str, bodies: list[bytes], concurrency: int, side: int, scale: int) -> HttpLoad:
    """Send every body once (cycling to at least `concurrency`), `concurrency` at a time;
    each answer must be a PNG of the scaled size."""
    return http_load(
        url,
        bodies,
        scale=scale,
        clients=concurrency,
        total=max(len(bodies), concurrency),
        content_type="image/png",
        check=lambda data: png_size(data) == (side * scale, side * scale),
    )


def model_pass(forward: Forward, inputs: list[torch.Tensor]) -> float:
    """Images per second of the prepared forward, one image at a time."""
    started = time.perf_counter()
    for x in inputs:
        forward(x).clamp(0, 1)
    return len(inputs) / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--levels", nargs="+", type=int, default=[1, 4, 16])
    parser.add_argument("--side", type=int, default=256)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    scale = 4
    cpu = torch.device("cpu")
    backend = resolve_backend(args.backend, cpu)
    mixed = mixed_precision("auto", backend)  # the server's default precision
    print(machine())
    precision = MIXED if mixed else "float32"
    print(f"backend {backend} ({precision}); {args.images} images {args.side}x{args.side}", end="")
    print(f" -> x{scale}")
    images = crops(args.images, args.side)
    bodies = [png(im) for im in images]
    inputs = [to_tensor(im) for im in images]
    forward = prepare(load_official("x4", WEIGHTS), backend, cpu, torch.float32, mixed=mixed)
    forward(inputs[0])  # warm
    rows = []
    with server(backend, torch.get_num_threads()) as url:
        http_level(url, bodies[:1], 1, args.side, scale)  # warm the server's path too
        before = model_pass(forward, inputs)
        print(f"model in process: {before:.3f} images/s")
        for c in args.levels:
            level = http_level(url, bodies, c, args.side, scale)
            after = model_pass(forward, inputs)
            model = (before + after) / 2
            print(f"model in process: {after:.3f} images/s")
            row = {
                "concurrency": c,
                "requests": len(level.latencies),
                "http_images_per_s": level.images_per_second,
                "model_images_per_s": model,
                "ratio": level.images_per_second / model,
                **{f"p{q}_s": percentile(level.latencies, q) for q in (50, 95, 99)},
                "ttfb_p50_s": percentile(level.first_bytes, 50),
                "latency_mean_s": statistics.mean(level.latencies),
            }
            rows.append(row)
            print(
                f"concurrency {c:2d}: {row['http_images_per_s']:.3f} images/s over HTTP, "
                f"{row['ratio']:.2f} of the model; latency p50 {row['p50_s']:.2f}s "
                f"p95 {row['p95_s']:.2f}s p99 {row['p99_s']:.2f}s; "
                f"first byte p50 {row['ttfb_p50_s']:.2f}s",
                flush=True,
            )
            before = after
    if args.json:
        print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
