"""Demux and decode an upload in file order: video frames as RGB arrays (with their own
timestamps: a variable frame rate stays variable), the packets of the streams copied
as they are, and the decoded audio of the streams the output container cannot hold
as they are (to be re-encoded).

Frames become RGB with the matrix and range the file declares, so the network sees the
colours the viewer would; the encoder converts back with the same ones.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import av.error
import numpy as np

from service.video.errors import undecodable
from service.video.probe import VideoInfo

# AVColorSpace values swscale converts with; others (unspecified, ...) get its default
_MATRICES = {1: 1, 4: 4, 5: 5, 6: 5, 7: 7, 9: 9, 10: 9}


@dataclass
class Frame:
    index: int
    pixels: np.ndarray  # HxWx3, uint8 (8-bit video) or uint16 (deeper)
    pts: int
    time_base: Fraction
    decode_seconds: float


@dataclass
class Packet:
    """A packet of a stream copied to the output untouched."""

    packet: av.Packet[Any]


@dataclass
class AudioFrame:
    """Decoded audio of a stream that is re-encoded for the output container."""

    stream_index: int
    frame: av.AudioFrame


Item = Frame | Packet | AudioFrame


def rgb_args(info: VideoInfo) -> dict[str, object]:
    """`to_ndarray`/`reformat` arguments for RGB of the file's matrix and range."""
    args: dict[str, object] = {"format": "rgb48le" if info.bits > 8 else "rgb24"}
    if info.colorspace in _MATRICES:
        args["src_colorspace"] = _MATRICES[info.colorspace]
    if info.color_range:
        args["src_color_range"] = info.color_range
    return args


class Decoder:
    """One pass over the file; `items()` yields in demux order. Used from one thread."""

    def __init__(
        self, path: Path, info: VideoInfo, *, copy: set[int], reencode: set[int], threads: int
    ) -> None:
        self.info = info
        self.copy, self.reencode = copy, reencode
        self.container = av.open(str(path), metadata_errors="ignore")
        self.video = self.container.streams.video[0]  # the one probe() read
        self.video.thread_type = "AUTO"
        self.video.codec_context.thread_count = threads
        self._rgb = rgb_args(info)

    def items(self) -> Iterator[Item]:
        streams = [
            s
            for s in self.container.streams
            if s.index in {self.video.index, *self.copy, *self.reencode}
        ]
        index, last_pts = 0, -1
        step = _frame_step(self.info)
        t0 = time.perf_counter()
        try:
            for packet in self.container.demux(streams):
                i = packet.stream.index
                if i in self.copy:
                    if packet.dts is not None:  # not the demuxer's flush packet
                        yield Packet(packet)
                    continue
                if i in self.reencode:
                    for audio in packet.decode():
                        assert isinstance(audio, av.AudioFrame)
                        yield AudioFrame(i, audio)
                    continue
                for frame in packet.decode():
                    assert isinstance(frame, av.VideoFrame)
                    pts = frame.pts if frame.pts is not None else last_pts + step
                    last_pts = pts
                    pixels = frame.to_ndarray(**self._rgb)  # type: ignore[arg-type]
                    now = time.perf_counter()
                    yield Frame(index, pixels, pts, self.info.time_base, now - t0)
                    index += 1
                    t0 = time.perf_counter()
        except av.error.FFmpegError as exc:
            raise undecodable(f"the video stops decoding after {index} frames: {exc}") from None

    def close(self) -> None:
        self.container.close()


def _frame_step(info: VideoInfo) -> int:
    """A frame's length in the stream's time base, for frames the file gives no pts."""
    if info.rate:
        return max(1, round(1 / (info.rate * info.time_base)))
    return 1
