"""Benchmark 4: peak memory (RSS, CPU) of one request against its output size, with the
engine's tile budget (`tile_max_pixels`) and, for the sizes that allow it, without.

    python -m bench.memory [--sides 128 256 512 1024] [--no-budget-up-to 512]

Each size runs in a fresh child process (peak RSS never goes down in a process): the
engine loads x4, serves one small request to warm its allocators, the peak is reset
(`/proc/self/clear_refs`), then one request runs as the service runs it: decode a PNG,
`Engine.upscale`, `imaging.compose`, `imaging.encode_png`. Reported: the RSS before, the
peak during upscale and during the whole request, as MB and as MB per output megapixel.
The output itself must be held (float32 H×W×3 stitched, 12 bytes a pixel, and the uint8
RGB that `compose` fills from it, 3 bytes; the PNG is streamed in 64 KB pieces, as the
service sends it): that part grows with the image by design; what the tile budget bounds
is the network's working set on top of it.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import subprocess
import sys
from pathlib import Path

from bench.common import hr_images, machine
from service.shared import REPO, WEIGHTS

SCALE = 4


def _kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)


def child(side: int, budget: int, backend: str) -> dict[str, float]:
    import numpy as np
    from PIL import Image

    from service import imaging
    from service.engine import Engine
    from service.settings import Settings

    settings = Settings(
        weights_dir=WEIGHTS,
        models=["x4"],
        backend=backend,
        tile_max_pixels=budget,
        warmup=True,
        request_timeout_s=3600,
        max_input_pixels=side * side,
    )
    _, hr = max(hr_images("Set14"), key=lambda item: item[1].shape[0] * item[1].shape[1])
    body = io.BytesIO()
    Image.fromarray(hr).resize((side, side), Image.Resampling.BICUBIC).save(body, format="PNG")

    async def run() -> dict[str, float]:
        engine = Engine(settings)
        await engine.start()
        try:
            await engine.upscale(np.random.default_rng(0).random((64, 64, 3), np.float32), 4)
            _reset_peak()
            before = _kb("VmRSS")
            decoded = imaging.decode(body.getvalue(), "image/png", max_pixels=side * side)
            result = await engine.upscale(decoded.pixels, SCALE, grey=decoded.grey)
            upscale_peak = _kb("VmHWM")
            pixels = imaging.compose(decoded, result.image)
            del result
            size = sum(len(c) for c in imaging.encode_png(pixels, compress_level=1))
            return {
                "side": side,
                "output_mp": (side * SCALE) ** 2 / 1e6,
                "budget": budget,
                "rss_before_mb": before / 1024,
                "upscale_peak_mb": upscale_peak / 1024,
                "request_peak_mb": _kb("VmHWM") / 1024,
                "png_mb": size / 1e6,
            }
        finally:
            await engine.stop()

    return asyncio.run(run())


def measure(side: int, budget: int, backend: str) -> dict[str, float]:
    cmd = [sys.executable, "-m", "bench.memory", "--child", str(side), str(budget), backend]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"child for {side} failed:\n{done.stderr[-3000:]}")
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> None:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        side, budget, backend = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
        print(json.dumps(child(side, budget, backend)))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sides", nargs="+", type=int, default=[128, 256, 512, 1024])
    parser.add_argument("--budget", type=int, default=256 * 256, help="tile_max_pixels")
    parser.add_argument("--no-budget-up-to", type=int, default=512)
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args(argv)
    print(machine())
    print(
        f"{'input':>9s} {'output MP':>9s} {'budget':>12s} {'RSS before':>10s} "
        f"{'upscale peak':>12s} {'request peak':>12s} {'+MB':>7s} {'+MB/MP':>7s} "
        f"{'+MB beyond output':>17s}"
    )
    runs = [(s, args.budget) for s in args.sides]
    runs += [(s, max(s * s, 32 * 32 * 4)) for s in args.sides if s <= args.no_budget_up_to]
    for side, budget in runs:
        r = measure(side, budget, args.backend)
        grown = r["request_peak_mb"] - r["rss_before_mb"]
        output_mb = r["output_mp"] * 1e6 * (12 + 3) / 2**20
        label = "tiles" if budget < side * side else "whole"
        print(
            f"{side:4d}x{side:<4d} {r['output_mp']:9.2f} {label:>5s} {budget:6d} "
            f"{r['rss_before_mb']:10.0f} {r['upscale_peak_mb']:12.0f} "
            f"{r['request_peak_mb']:12.0f} {grown:7.0f} {grown / r['output_mp']:7.1f} "
            f"{grown - output_mb:17.0f}",
            flush=True,
        )
    print(
        "+MB: request peak - RSS before; beyond output: minus the output buffers (15 bytes a pixel)"
    )


if __name__ == "__main__":
    main()
