"""Decode, upscale and encode a video at once, as an async stream of container bytes.

Three stages overlap: a decode thread reads frames ahead, each frame goes to the engine
as its own request (so the batcher puts several small frames in one forward, and an
image request takes its turn between a long video's frames: its cost is counted per
frame), and an encode thread muxes the results in order. At most `frames_in_flight`
frames are between the decoder and the encoder, so memory does not grow with the
video's length. Stopping the stream (the client left, a deadline, an error) cancels
the frames in the engine at once (their queued crops are dropped) and closes the
decoder and encoder in their threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from service.engine import DeadlineExceeded, Engine, QueueFull, UpscaleResult
from service.imaging import output_size
from service.report import WINDOW
from service.video.decode import AudioFrame, Decoder, Frame, Item, Packet
from service.video.encode import Codec, Encoder, choose_encoder, plan_streams
from service.video.probe import VideoInfo

T = TypeVar("T")
RETRY_MIN_S, RETRY_MAX_S = 0.05, 1.0  # a frame's wait before it asks a full queue again


@dataclass(frozen=True)
class VideoJob:
    path: Path
    info: VideoInfo
    scale: float
    codec: Codec
    encoder: str
    crf: int
    frames_in_flight: int
    threads: int  # decoder and encoder threads each
    deadline: float  # time.perf_counter() by which the last frame must be out

    @classmethod
    def for_engine(
        cls,
        engine: Engine,
        path: Path,
        info: VideoInfo,
        scale: float,
        codec: Codec,
        crf: int | None,
        arrived: float,
    ) -> VideoJob:
        """A job under `engine`'s settings: its encoder for `codec` on this device, frames
        in flight, codec threads, and the video deadline from `arrived`; `crf` None: the
        codec's default."""
        s = engine.settings
        return cls(
            path=path,
            info=info,
            scale=scale,
            codec=codec,
            encoder=choose_encoder(codec, s.video_encoder, engine.device.type == "cuda"),
            crf=codec.default_crf if crf is None else crf,
            frames_in_flight=s.video_frames_in_flight,
            threads=s.video_codec_threads,
            deadline=arrived + s.video_timeout_s,
        )

    @property
    def output_size(self) -> tuple[int, int]:
        return output_size(self.info.height, self.info.width, self.scale)


@dataclass
class VideoStats:
    """What one video cost, stage by stage (seconds summed over frames)."""

    frames: int = 0
    decode_s: float = 0.0
    queue_s: float = 0.0
    compute_s: float = 0.0
    encode_s: float = 0.0
    seconds_out: float = 0.0  # video time of the frames encoded so far
    model: str = ""
    # each frame's forward time (the last ones: the report keeps no more) and the largest
    # batch peak among the frames, for the Table 6 report's video rows
    forward_s: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    peak_memory_bytes: int = 0
    started: float = field(default_factory=time.perf_counter)
    dropped_streams: tuple[str, ...] = ()
    stop: Callable[[], None] = lambda: None
    """Stop the work now (idempotent, no await): the stream's owner calls it when it
    stops reading, since a generator left at a `yield` runs its `finally` only later."""

    def frames_per_second(self) -> float:
        elapsed = time.perf_counter() - self.started
        return self.frames / elapsed if elapsed > 0 else 0.0


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


_END = object()


async def upscale_video(
    engine: Engine,
    job: VideoJob,
    stats: VideoStats,
    on_frame: Callable[[VideoStats], None] | None = None,
) -> AsyncGenerator[bytes, None]:
    """The output container's bytes as fragments complete; raises `VideoError` (decode),
    `EngineError` (a frame refused, or the deadline) where it stops."""
    loop = asyncio.get_running_loop()
    decode_pool = ThreadPoolExecutor(1, thread_name_prefix="imdn-video-decode")
    encode_pool = ThreadPoolExecutor(1, thread_name_prefix="imdn-video-encode")

    async def on(pool: ThreadPoolExecutor, fn: Callable[..., T], *args: Any) -> T:
        return await loop.run_in_executor(pool, fn, *args)

    plan = plan_streams(job.info, job.codec)
    stats.dropped_streams = plan.dropped
    decoder: Decoder | None = None
    encoder: Encoder | None = None
    producer: asyncio.Task[None] | None = None
    queue: asyncio.Queue[object] = asyncio.Queue(maxsize=4 * job.frames_in_flight + 64)
    slots = asyncio.Semaphore(job.frames_in_flight)
    in_flight: set[asyncio.Future[UpscaleResult]] = set()
    items = None
    stopped = False

    def stop() -> None:
        nonlocal stopped
        if stopped:
            return
        stopped = True
        if producer is not None:
            producer.cancel()
        for work in list(in_flight):
            work.cancel()  # its crops leave the batch queue
        _close_in(decode_pool, items, decoder)
        _close_in(encode_pool, None, encoder)

    stats.stop = stop
    try:
        decoder = await on(
            decode_pool,
            lambda: Decoder(
                job.path,
                job.info,
                copy=set(plan.copy),
                reencode=set(plan.reencode),
                threads=job.threads,
            ),
        )
        source = decoder.container
        encoder = await on(
            encode_pool,
            lambda: Encoder(
                source,
                job.info,
                plan,
                codec=job.codec,
                encoder=job.encoder,
                crf=job.crf,
                size=job.output_size,
                threads=job.threads,
            ),
        )
        items = decoder.items()

        async def produce() -> None:
            try:
                while True:
                    await slots.acquire()  # a frame's slot, taken before reading on
                    item: Item | None = await on(decode_pool, next, items, None)
                    if not isinstance(item, Frame):
                        slots.release()
                    if item is None:
                        break
                    if isinstance(item, Frame):
                        work = asyncio.ensure_future(_upscale_frame(engine, job, item))
                        in_flight.add(work)
                        work.add_done_callback(in_flight.discard)
                        await queue.put((item, work))
                    else:
                        await queue.put(item)
                await queue.put(_END)
            except Exception as exc:  # handed to the consumer, which raises it
                await queue.put(_Failed(exc))

        producer = asyncio.ensure_future(produce())
        tb = float(job.info.time_base)
        first_pts: int | None = None
        pending = b""
        while True:
            entry = await queue.get()
            if entry is _END:
                break
            if isinstance(entry, _Failed):
                raise entry.exc
            if isinstance(entry, tuple):
                frame, work = entry
                try:
                    result: UpscaleResult = await work
                finally:
                    slots.release()
                if time.perf_counter() > job.deadline:
                    raise DeadlineExceeded("the video did not finish within its deadline")
                t0 = time.perf_counter()
                data = await on(encode_pool, encoder.frame, result.image, frame.pts)
                stats.encode_s += time.perf_counter() - t0
                stats.frames += 1
                stats.decode_s += frame.decode_seconds
                stats.queue_s += result.queue_seconds
                stats.compute_s += result.compute_seconds
                stats.forward_s.append(result.compute_seconds)
                stats.peak_memory_bytes = max(stats.peak_memory_bytes, result.peak_memory_bytes)
                stats.model = result.model
                first_pts = frame.pts if first_pts is None else first_pts
                stats.seconds_out = (frame.pts - first_pts) * tb
                if on_frame is not None:
                    on_frame(stats)
            elif isinstance(entry, Packet):
                data = await on(encode_pool, encoder.packet, entry.packet)
            else:
                assert isinstance(entry, AudioFrame)
                data = await on(encode_pool, encoder.audio, entry.stream_index, entry.frame)
            pending += data
            if pending and stats.frames:  # nothing leaves before the first frame is encoded
                yield pending
                pending = b""
        t0 = time.perf_counter()
        data = await on(encode_pool, encoder.finish)
        stats.encode_s += time.perf_counter() - t0
        stats.seconds_out = max(stats.seconds_out, job.info.duration_s)
        encoder = None  # finished: nothing to release
        if pending + data:
            yield pending + data
    finally:
        stop()  # no await here: a cancelled scope (the client left) would cancel it again


async def _upscale_frame(engine: Engine, job: VideoJob, frame: Frame) -> UpscaleResult:
    """One frame through the engine. A full queue makes a frame wait and try again (a
    video yields to images rather than fail halfway); the video's deadline holds."""
    while True:
        left = job.deadline - time.perf_counter()
        if left <= 0:
            raise DeadlineExceeded("the video did not finish within its deadline")
        try:
            return await engine.upscale(
                frame.pixels,
                job.scale,
                deadline=job.deadline,
                tile_max_pixels=engine.settings.frame_tile_pixels,
            )
        except QueueFull as exc:
            await asyncio.sleep(min(max(exc.retry_after_s, RETRY_MIN_S), RETRY_MAX_S, left))


def _close_in(pool: ThreadPoolExecutor, items: Any, closable: Decoder | Encoder | None) -> None:
    """Close a stage in its own thread, after the call it may be in, and let the thread go."""

    def close() -> None:
        if items is not None:
            with contextlib.suppress(Exception):
                items.close()
        if closable is not None:
            with contextlib.suppress(Exception):
                closable.close()

    pool.submit(close)
    pool.shutdown(wait=False)
