"""Batches split by the warm-up's timings against batches padded to a warmed size.

    python -m bench.batch_split [--clients 8] [--rounds 3] [--scale 3] [--quick]

With shape buckets every batch runs at a warmed batch size. Padding 5 crops to 8 computes
3 crops for nothing; splitting them 4 + 1 costs a second launch. The runner picks, per
shape, whichever its warm-up timings say is cheaper (`service.planner.batch_split`).
This serves Set14 at one scale through the in-process engine (the service's settings
for this device, buckets on), `clients` requests at a time, and alternates rounds with
the split on and off (off: the runner has no timings and pads, as before the split),
in one process, so the two are measured side by side. It prints images/s and the
crops the device computed per image crop asked for (padding included). `--quick`:
cropped images and small buckets, a smoke run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from typing import Any

import numpy as np
import torch

from bench.common import machine
from bench.gpu_targets import FULL, QUICK, photos
from models.runtime.device import resolve_device
from service.engine import Engine
from service.settings import Settings
from service.shared import WEIGHTS


class CropCounter:
    """Counts the crops each forward of a model computes (padding included)."""

    def __init__(self, model: Any) -> None:
        self.crops = 0
        for name in ("forward", "masked", "masked_eager"):
            fn = getattr(model, name)
            if fn is not None:
                setattr(model, name, self._counted(fn))

    def _counted(self, fn: Any) -> Any:
        def counted(x: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
            self.crops += x.shape[0]
            return fn(x, *rest)  # type: ignore[no-any-return]

        return counted


async def serve_round(
    engine: Engine, images: list[np.ndarray], scale: int, clients: int
) -> tuple[float, int]:
    """(seconds to serve every image once, `clients` at a time; the crops they asked)."""
    gate = asyncio.Semaphore(clients)

    async def one(lr: np.ndarray) -> int:
        async with gate:
            return (await engine.upscale(lr, scale)).crops

    started = time.perf_counter()
    crops = await asyncio.gather(*(one(lr) for lr in images))
    return time.perf_counter() - started, sum(crops)


async def measure(
    settings: Settings, images: list[np.ndarray], scale: int, clients: int, rounds: int
) -> dict[str, tuple[list[float], float]]:
    """{"split" | "padded": (images/s of each round, device crops per crop asked)}."""
    engine = Engine(settings)
    await engine.start()
    try:
        timings = dict(engine.runner.batch_seconds)
        counter = CropCounter(engine.runner.models[next(iter(engine.models))])
        await serve_round(engine, images, scale, clients)  # warm the whole path
        results: dict[str, tuple[list[float], int, int]] = {
            "split": ([], 0, 0),
            "padded": ([], 0, 0),
        }
        for r in range(rounds):
            for mode in ("split", "padded") if r % 2 == 0 else ("padded", "split"):
                engine.runner.batch_seconds = timings if mode == "split" else {}
                counter.crops = 0
                seconds, asked = await serve_round(engine, images, scale, clients)
                rates, computed, total = results[mode]
                results[mode] = (
                    [*rates, len(images) / seconds],
                    computed + counter.crops,
                    total + asked,
                )
        return {mode: (rates, c / a) for mode, (rates, c, a) in results.items()}
    finally:
        await engine.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each mode")
    parser.add_argument("--scale", type=int, default=3, choices=(2, 3, 4))
    parser.add_argument("--quick", action="store_true", help="cropped images: a smoke run")
    args = parser.parse_args(argv)
    settings = Settings(
        weights_dir=os.environ.get("IMDN_WEIGHTS_DIR", str(WEIGHTS)),
        models=[f"x{args.scale}"],
        shape_buckets="on",
        # quick: small buckets, so that warming them takes seconds on a CPU too
        **({"tile_max_pixels": 64 * 64, "tile_padding": 16} if args.quick else {}),
    )
    images = photos(QUICK if args.quick else FULL, args.scale)
    print(machine(resolve_device(settings.device)))
    print(
        f"Set14 x{args.scale}, {len(images)} images, {args.clients} at a time, "
        f"{args.rounds} rounds of each mode, alternating"
        + (" (quick: cropped images, not a measurement)" if args.quick else "")
    )
    figures = asyncio.run(measure(settings, images, args.scale, args.clients, args.rounds))
    for mode, (rates, crops) in figures.items():
        print(
            f"{mode:>7}: {statistics.median(rates):7.2f} images/s median "
            f"({', '.join(f'{r:.2f}' for r in rates)}); device crops per crop asked {crops:.2f}"
        )
    split, padded = (statistics.median(figures[m][0]) for m in ("split", "padded"))
    print(f"split / padded: {split / padded:.2f}x")


if __name__ == "__main__":
    main()
