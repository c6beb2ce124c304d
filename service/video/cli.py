"""`imdn upscale clip.mp4 -o out.mp4 --scale 2`: a video here (the same pipeline as the
server's) or on a server (`--url`), with a progress bar in frames (frames/s, time left).

Remotely the frame count comes from the answer's `X-IMDN-Frames` header and progress
from the fragments as they arrive (`FragmentCounter` reads their sample counts).
"""

from __future__ import annotations

import struct
import sys
import time
from pathlib import Path

import httpx
from tqdm import tqdm

from service import video
from service.jobs import PartFile

VIDEO_TRACK = 1  # the encoder adds the video stream first


def is_video(path: Path) -> bool:
    return path.suffix.lower() in video.VIDEO_SUFFIXES


def _bar(total: int, name: str) -> tqdm:
    return tqdm(total=total, desc=name, unit="frame", dynamic_ncols=True)


async def upscale_local(engine: object, path: Path, target: Path, scale: float) -> str | None:
    """Upscale one video file with `engine` into `target`; an error message, or None."""
    if not video.available():
        return video.INSTALL_HINT
    from service.engine import Engine, EngineError
    from service.video.encode import CODECS
    from service.video.errors import VideoError
    from service.video.pipeline import VideoJob, VideoStats, upscale_video
    from service.video.probe import VideoLimits, probe

    assert isinstance(engine, Engine)
    try:
        info = probe(path, VideoLimits.of(engine.settings), scale)
        codec = CODECS["vp9" if target.suffix.lower() == ".webm" else "h264"]
        job = VideoJob.for_engine(
            engine, path, info, scale, codec, None, arrived=time.perf_counter()
        )
        with (
            PartFile(target) as part,
            _bar(info.frames, path.name) as bar,
            part.path.open("wb") as out,
        ):
            stats = VideoStats()
            done = 0

            def progress(st: VideoStats) -> None:
                nonlocal done
                bar.update(st.frames - done)
                done = st.frames

            async for chunk in upscale_video(engine, job, stats, progress):
                out.write(chunk)
            out.close()
            part.commit()
    except (VideoError, EngineError) as exc:  # the part file is gone with its block
        return getattr(exc, "detail", None) or str(exc)
    return None


def upscale_remote(
    url: str,
    path: Path,
    target: Path,
    scale: float,
    *,
    api_key: str | None,
    timeout_s: float,
) -> str | None:
    """Send one video to the server at `url` and stream the answer into `target` (VP9 WebM
    when it ends in .webm, else H.264 MP4); an error message, or None. A stream cut
    short leaves no file."""
    headers = {"content-type": _content_type(path)}
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    params: dict[str, str | float] = {"scale": scale}
    if target.suffix.lower() == ".webm":
        params["codec"] = "vp9"
    try:
        with (
            PartFile(target) as part,
            path.open("rb") as body,
            httpx.stream(
                "POST",
                f"{url}/v1/superres/video",
                params=params,
                content=body,
                headers=headers,
                timeout=timeout_s,
            ) as r,
        ):
            if r.status_code != 200:
                r.read()
                return _problem(r)
            counter = FragmentCounter()
            total = int(r.headers.get("x-imdn-frames", 0))
            with _bar(total, path.name) as bar, part.path.open("wb") as out:
                for chunk in r.iter_raw():
                    out.write(chunk)
                    bar.update(counter.feed(chunk))
            part.commit()
    except httpx.HTTPError as exc:  # the part file is gone with its block
        return f"the transfer failed ({type(exc).__name__}: {exc}); no file was written"
    return None


def _content_type(path: Path) -> str:
    return {".webm": "video/webm", ".mkv": "video/x-matroska", ".mov": "video/quicktime"}.get(
        path.suffix.lower(), "video/mp4"
    )


def _problem(r: httpx.Response) -> str:
    try:
        body = r.json()
        return f"HTTP {r.status_code} {body.get('reason')}: {body.get('detail')}"
    except ValueError:
        return f"HTTP {r.status_code}"


class FragmentCounter:
    """Counts the video frames of a fragmented MP4 as its bytes arrive: the sample count
    of each `trun` in a `moof`'s `traf` of the video track. Other boxes are skipped
    without being kept; WebM is not parsed (it counts 0)."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._skip = 0
        self.frames = 0

    def feed(self, data: bytes) -> int:
        """Take the next bytes; the frames completed by them."""
        before = self.frames
        view = memoryview(data)
        if self._skip:
            n = min(self._skip, len(view))
            self._skip -= n
            view = view[n:]
        self._buffer += view
        while len(self._buffer) >= 8:
            size, kind = struct.unpack(">I4s", self._buffer[:8])
            if size < 8:  # not a box we can follow (size 0: to the end; 1: 64-bit)
                self._buffer.clear()
                break
            if kind != b"moof":
                n = min(size, len(self._buffer))
                del self._buffer[:n]
                self._skip = size - n
                if self._skip:
                    break
                continue
            if len(self._buffer) < size:
                break
            self.frames += _samples(bytes(self._buffer[8:size]))
            del self._buffer[:size]
        return self.frames - before


def _boxes(data: bytes) -> list[tuple[bytes, bytes]]:
    out, at = [], 0
    while at + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[at : at + 8])
        if size < 8:
            break
        out.append((kind, data[at + 8 : at + size]))
        at += size
    return out


def _samples(moof: bytes) -> int:
    count = 0
    for kind, traf in _boxes(moof):
        if kind != b"traf":
            continue
        children = _boxes(traf)
        track = next((struct.unpack(">I", b[4:8])[0] for k, b in children if k == b"tfhd"), 0)
        if track == VIDEO_TRACK:
            count += sum(struct.unpack(">I", b[4:8])[0] for k, b in children if k == b"trun")
    return count


def report(path: Path, error: str | None, target: Path) -> bool:
    """Print the outcome of one video; whether it succeeded."""
    if error is not None:
        tqdm.write(f"{path}: skipped: {error}", file=sys.stderr)
        return False
    tqdm.write(f"{path} -> {target}")
    return True
