"""Benchmark 5: PNG encoding against inference for the same request, by compression level,
and the time to the first byte when the encoder's chunks are streamed as they come.

    python -m bench.encode [--images 4] [--levels 0 1 2 3 6 9] [--rounds 3]

Inputs are 256×256 crops of Set14/Set5 at ×4 (1024×1024 outputs, the service's own
pixels: the backend's forward, clamped, rounded). For each level: the time to encode
the whole PNG with `imaging.encode_png` (the service streams it as it comes), the time
until its first IDAT chunk is out, and the size; beside it Pillow's PNG encoder at the
same level (adaptive filters, not streamable), all interleaved with the inference.
"""

from __future__ import annotations

import argparse
import functools
import io
import statistics
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from bench.common import WEIGHTS, interleaved, machine, to_tensor
from bench.service_vs_model import crops
from models.backend import prepare, resolve_backend
from models.checkpoints import load_official
from service import imaging


def encode_all(pixels: np.ndarray, level: int) -> int:
    return sum(len(c) for c in imaging.encode_png(pixels, compress_level=level))


def pillow_all(pixels: np.ndarray, level: int) -> int:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG", compress_level=level)
    return out.tell()


def first_chunk(pixels: np.ndarray, level: int) -> int:
    """Bytes up to and including the first IDAT chunk (the header alone is not an image)."""
    chunks = imaging.encode_png(pixels, compress_level=level)
    return len(next(chunks)) + len(next(chunks))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--levels", nargs="+", type=int, default=[0, 1, 2, 3, 6, 9])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args(argv)
    cpu = torch.device("cpu")
    backend = resolve_backend(args.backend, cpu)
    print(machine())
    forward = prepare(load_official("x4", WEIGHTS), backend, cpu, torch.float32)
    print(f"backend {backend}; {args.images} crops 256x256 -> 1024x1024")
    infer_ms: list[float] = []
    encode_ms: dict[int, list[float]] = {level: [] for level in args.levels}
    first_ms: dict[int, list[float]] = {level: [] for level in args.levels}
    sizes: dict[int, list[int]] = {level: [] for level in args.levels}
    pillow_ms: dict[int, list[float]] = {level: [] for level in args.levels}
    pillow_sizes: dict[int, list[int]] = {level: [] for level in args.levels}
    for rgb in crops(args.images, 256):
        x = to_tensor(rgb)
        out = forward(x).clamp(0, 1)[0].permute(1, 2, 0).numpy()
        pixels = np.ascontiguousarray(np.rint(out * 255)).astype(np.uint8)
        candidates: dict[str, Callable[[], object]] = {"infer": functools.partial(forward, x)}
        for level in args.levels:
            sizes[level].append(encode_all(pixels, level))
            candidates[f"all{level}"] = functools.partial(encode_all, pixels, level)
            candidates[f"first{level}"] = functools.partial(first_chunk, pixels, level)
            pillow_sizes[level].append(pillow_all(pixels, level))
            candidates[f"pillow{level}"] = functools.partial(pillow_all, pixels, level)
        t = interleaved(candidates, rounds=args.rounds, warmup=0)
        infer_ms.append(t["infer"].best * 1000)
        for level in args.levels:
            encode_ms[level].append(t[f"all{level}"].best * 1000)
            first_ms[level].append(t[f"first{level}"].best * 1000)
            pillow_ms[level].append(t[f"pillow{level}"].best * 1000)
    infer = statistics.mean(infer_ms)
    print(f"inference: {infer:.0f} ms per image (mean of each image's fastest)")
    print(
        f"{'level':>5s} {'encode ms':>9s} {'of inference':>12s} {'first chunk ms':>14s} "
        f"{'size MB':>8s} {'bytes/px':>8s} {'Pillow ms':>9s} {'Pillow MB':>9s}"
    )
    for level in args.levels:
        enc = statistics.mean(encode_ms[level])
        size = statistics.mean(sizes[level])
        pillow_mb = statistics.mean(pillow_sizes[level]) / 1e6
        print(
            f"{level:5d} {enc:9.1f} {enc / infer:12.3f} {statistics.mean(first_ms[level]):14.1f} "
            f"{size / 1e6:8.2f} {size / 1024**2:8.2f} "
            f"{statistics.mean(pillow_ms[level]):9.1f} {pillow_mb:9.2f}"
        )


if __name__ == "__main__":
    main()
