"""Benchmark 5: PNG encoding against inference for the same request, by compression level,
and the time to the first byte when the encoder's chunks are streamed as they come; then
the output formats: PNG in one stream or in parallel bands, WebP and JPEG.

    python -m bench.encode [--images 4] [--levels 0 1 2 3 6 9] [--rounds 3]
    python -m bench.encode --images 0 --rounds 3       # the formats table alone

Inputs are 256×256 crops of Set14/Set5 at ×4 (1024×1024 outputs, the service's own
pixels: the backend's forward, clamped, rounded). For each level: the time to encode
the whole PNG with `imaging.encode_png` (the service streams it as it comes), the time
until its first IDAT chunk is out, and the size; beside it Pillow's PNG encoder at the
same level (adaptive filters, not streamable), all interleaved with the inference.

The formats table (printed first) times, on a 3840×2160 RGB output and a 1024×1024 one,
everything interleaved: PNG at level 1 as one zlib stream (the one-thread encoder), in
parallel bands with 1, 2 and all CPU threads (`encode_png(threads=N)`; one thread runs
the band encoder through a pool of one, to show what the bands cost), WebP and JPEG at
the service's default quality. The 1024² image is the network's ×4 output of a 256²
crop; the 4K one a RealSR camera photo (2001×1200) resized bicubic to 3840×2160, as the
×2 network on a 1080p frame takes tens of seconds on a CPU.
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

from bench.common import interleaved, machine, to_tensor
from bench.service_vs_model import crops
from models.networks.checkpoints import load_official
from models.quality.evaluate import read_rgb
from models.runtime.backend import prepare, resolve_backend
from service import imaging
from service.api import DEFAULT_QUALITY, STREAM_CHUNK
from service.settings import usable_cpus
from service.shared import DATASETS, WEIGHTS


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


def png_bands(pixels: np.ndarray, threads: int, deflate: imaging.Deflate) -> int:
    """The parallel band encoder through a pool of `threads`, even for one, in bands of
    `PNG_BAND_BYTES` (the least band the service's encoder uses)."""
    stream = imaging.png._png_stream_banded(
        pixels, None, 1, STREAM_CHUNK, threads, imaging.PNG_BAND_BYTES, deflate
    )
    return sum(len(c) for c in stream)


def png(pixels: np.ndarray, threads: int, deflate: imaging.Deflate) -> int:
    return sum(len(c) for c in imaging.encode_png(pixels, threads=threads, deflate=deflate))


def first_idat(pixels: np.ndarray, threads: int, deflate: imaging.Deflate) -> int:
    chunks = imaging.encode_png(pixels, threads=threads, deflate=deflate)
    return len(next(chunks)) + len(next(chunks))


def lossy(pixels: np.ndarray, fmt: str) -> int:
    return len(imaging.encode_lossy(pixels, fmt, quality=DEFAULT_QUALITY))


def four_k() -> np.ndarray:
    photo = Image.fromarray(read_rgb(DATASETS / "RealSR" / "HR" / "cam1_07.png"))
    return np.asarray(photo.resize((3840, 2160), Image.Resampling.BICUBIC))


def formats_table(one_k: np.ndarray, rounds: int) -> None:
    """Time (fastest of `rounds`, interleaved) and size of each output format."""
    cpus = usable_cpus()
    threads = sorted({2, cpus})
    for label, pixels in (("3840x2160", four_k()), ("1024x1024", one_k)):
        # name -> (the whole encode, the encode up to the first IDAT chunk or None)
        cases: dict[str, tuple[Callable[[], int], Callable[[], int] | None]] = {}
        for deflate, library in (("zlib", "zlib"), ("isal", "ISA-L")):
            cases[f"PNG {library}, one stream"] = (
                functools.partial(png, pixels, 1, deflate),
                functools.partial(first_idat, pixels, 1, deflate),
            )
            cases[f"PNG {library}, bands, 1 thread"] = (
                functools.partial(png_bands, pixels, 1, deflate),
                None,
            )
            for n in threads:
                cases[f"PNG {library}, bands, {n} thr" + (" (all)" if n == cpus else "")] = (
                    functools.partial(png, pixels, n, deflate),
                    functools.partial(first_idat, pixels, n, deflate),
                )
        for fmt, name in (("WEBP", "WebP"), ("JPEG", "JPEG")):
            cases[f"{name} q{DEFAULT_QUALITY}"] = (functools.partial(lossy, pixels, fmt), None)
        sizes = {name: whole() for name, (whole, _) in cases.items()}
        calls = {name: whole for name, (whole, _) in cases.items()}
        calls |= {f"first {name}": first for name, (_, first) in cases.items() if first}
        timed = interleaved(calls, rounds=rounds, warmup=1)
        base = timed["PNG zlib, one stream"].best
        print(f"\n{label} RGB ({pixels.nbytes / 1e6:.1f} MB raw), {cpus} CPUs usable, level 1")
        print(f"{'encoder':<32s} {'ms':>7s} {'speed-up':>8s} {'first IDAT ms':>13s} {'MB':>6s}")
        for name in cases:
            ms = timed[name].best * 1000
            first = timed.get(f"first {name}")
            first_ms = " " * 13 if first is None else f"{first.best * 1000:13.1f}"
            print(
                f"{name:<32s} {ms:7.1f} {base / timed[name].best:7.2f}x {first_ms} "
                f"{sizes[name] / 1e6:6.2f}"
            )
    print("speed-up: against zlib in one stream, the encoder before ISA-L and bands")


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
    (crop,) = crops(1, 256)
    one_k = np.ascontiguousarray(
        np.rint(forward(to_tensor(crop)).clamp(0, 1)[0].permute(1, 2, 0).numpy() * 255)
    ).astype(np.uint8)
    formats_table(one_k, args.rounds)
    if args.images < 1:
        return
    print(f"\nbackend {backend}; {args.images} crops 256x256 -> 1024x1024")
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
