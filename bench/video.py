"""Benchmark: a video's frames per second through the whole pipeline (decode, engine,
encode, mux: `service/video/pipeline.py`, in process, no HTTP) against the model alone
on the same decoded frames, and where the pipeline's time goes.

    python -m bench.video [--size 240x320] [--frames 8] [--scale 2] [--rounds 2]

The clip is made here: a window sliding over a Set14 photograph (H.264, crf 18, no
audio). The model alone is the engine's backend forward of each frame, batch 1, one
after the other (what an ideal pipeline would hide everything behind). The two are
timed in alternation, `--rounds` times each; the figure kept is each one's best round.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

from bench.common import hr_images, machine, synchronizer, to_tensor
from models.networks.checkpoints import load_official
from models.runtime.backend import prepare, resolve_backend
from service.engine import Engine, model_for_scale
from service.settings import Settings
from service.shared import WEIGHTS
from service.video.encode import CODECS, choose_encoder
from service.video.pipeline import VideoJob, VideoStats, upscale_video
from service.video.probe import VideoLimits, probe


def make_clip(path: Path, height: int, width: int, frames: int) -> list[np.ndarray]:
    """Write the clip; the frames as the decoder will give them back."""
    photo = max((img for _, img in hr_images("Set14")), key=lambda a: a.shape[0] * a.shape[1])
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=25, options={"crf": "18"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            y, x = (i * 2) % (photo.shape[0] - height), (i * 3) % (photo.shape[1] - width)
            crop = np.ascontiguousarray(photo[y : y + height, x : x + width])
            frame = av.VideoFrame.from_ndarray(crop, format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, 25)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def model_only(engine: Engine, name: str, frames: list[np.ndarray]) -> float:
    """Seconds for the backend forward of every frame, batch 1, one after the other, on
    the engine's device, in its precision and by its backend (the frames already there)."""
    device, dtype, s = engine.device, engine.dtype, engine.settings
    backend = resolve_backend(s.backend, device, padded=engine.planner.buckets)
    forward = prepare(
        load_official(name, WEIGHTS),
        backend,
        device,
        dtype,
        cache_dir=s.backend_cache_dir,
        mixed=engine.runner.mixed,
    )
    inputs = [to_tensor(f).to(device, dtype) for f in frames]
    sync = synchronizer(device)
    with torch.inference_mode():
        forward(inputs[0])  # first-call costs out of the timing
        sync()
        t0 = time.perf_counter()
        for x in inputs:
            forward(x)
        sync()
        return time.perf_counter() - t0


async def pipeline(engine: Engine, path: Path, scale: float) -> tuple[float, VideoStats]:
    s = engine.settings
    limits = VideoLimits(
        s.video_max_input_pixels, s.video_max_output_pixels, s.video_max_frames, 1e9
    )
    info = probe(path, limits, scale)
    job = VideoJob(
        path=path,
        info=info,
        scale=scale,
        codec=CODECS["h264"],
        encoder=choose_encoder(CODECS["h264"], s.video_encoder, engine.device.type == "cuda"),
        crf=18,
        frames_in_flight=s.video_frames_in_flight,
        threads=s.video_codec_threads,
        deadline=time.perf_counter() + 3600,
    )
    stats = VideoStats()
    t0 = time.perf_counter()
    size = 0
    async for chunk in upscale_video(engine, job, stats):
        size += len(chunk)
    return time.perf_counter() - t0, stats


async def run(args: argparse.Namespace) -> dict[str, object]:
    height, width = (int(v) for v in args.size.lower().split("x"))
    name = model_for_scale(args.scale)
    tiles = {"tile_max_pixels": args.tile_max_pixels} if args.tile_max_pixels else {}
    settings = Settings(weights_dir=WEIGHTS, models=[name], device=args.device, **tiles)
    engine = Engine(settings)
    await engine.start()
    results: dict[str, object] = {
        "machine": machine(engine.device),
        "model": name,
        "size": args.size,
        "tile_max_pixels": settings.frame_tile_pixels,  # a frame's budget (service.settings)
    }
    try:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "clip.mp4"
            frames = make_clip(path, height, width, args.frames)
            model_s, pipe_s, best = [], [], None
            for _ in range(args.rounds):
                model_s.append(await asyncio.to_thread(model_only, engine, name, frames))
                seconds, stats = await pipeline(engine, path, args.scale)
                pipe_s.append(seconds)
                if best is None or seconds <= min(pipe_s):
                    best = stats
            assert best is not None
            n = len(frames)
            results.update(
                frames=n,
                scale=args.scale,
                model_fps=n / min(model_s),
                pipeline_fps=n / min(pipe_s),
                ratio=min(model_s) / min(pipe_s),
                stages_s={
                    "decode": best.decode_s,
                    "queue": best.queue_s,
                    "compute": best.compute_s,
                    "encode": best.encode_s,
                },
            )
    finally:
        await engine.stop()
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="240x320", help="HEIGHTxWIDTH of the input frames")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--scale", type=float, default=2.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument(
        "--tile-max-pixels",
        type=int,
        help="the engine's IMDN_TILE_MAX_PIXELS (default 65536: a frame above it is tiled)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (IMDN_VIDEO_ENCODER applies)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    r = asyncio.run(run(args))
    if args.json:
        print(json.dumps(r, indent=1))
        return
    print(r["machine"])
    print(
        f"{r['size']} x{r['scale']:g} ({r['model']}, tiles up to {r['tile_max_pixels']} px), "
        f"{r['frames']} frames: model alone "
        f"{r['model_fps']:.2f} frames/s, whole pipeline {r['pipeline_fps']:.2f} frames/s "
        f"= {r['ratio']:.2f} of the model"
    )
    stages = r["stages_s"]
    assert isinstance(stages, dict)
    print(
        "pipeline stages (s, summed over frames): "
        + ", ".join(f"{k} {v:.2f}" for k, v in stages.items())
    )


if __name__ == "__main__":
    main()
