"""Encode upscaled frames into a streamed container: a fragmented MP4 (H.264, HEVC, AV1)
or a WebM (VP9), written piece by piece into memory for the HTTP body.

What the upload carries is kept: every frame's timestamp (the encoder gets the input's
time base and each frame's pts; the `moov` waits for the first fragment (`delay_moov`),
so that its edit list can say where the first frame starts, e.g. 0.233 s: with an empty
`moov` written up front, a fragmented file starts at 0; B-frames are off and x264/x265
run without lookahead, so that a frame's packet leaves as it is encoded), the rotation
(display matrix), the sample aspect ratio, and the colour primaries, transfer, matrix
and range (tags and conversion alike); 10-bit where the codec has it. Audio and subtitle
streams are copied packet for packet where the output container holds their codec,
audio is re-encoded (AAC in MP4, Opus in WebM) where it does not, and what cannot go
(subtitles of another format, data streams, extra video streams) is named in `dropped`.

Odd output sides: 4:2:0 needs even sides, and cropping one pixel is not something
H.264's or HEVC's headers can say in 4:2:0 (their crop unit is two pixels). A frame of
round(s·H) × round(s·W) with an odd side is therefore encoded 4:4:4 (which has no such
rule) rather than padded, cropped or resized; AV1 (SVT-AV1 is 4:2:0 only) refuses it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import av
import numpy as np

from service.video.errors import unprocessable
from service.video.probe import VideoInfo

MP4_FLAGS = "frag_keyframe+delay_moov+default_base_moof+negative_cts_offsets"
FRAGMENT_US = 500_000  # a fragment leaves at least every half second of video


@dataclass(frozen=True)
class Codec:
    name: str
    container: str  # FFmpeg muxer
    media_type: str
    cpu_encoder: str
    gpu_encoder: str | None
    default_crf: int
    max_crf: int
    ten_bit: bool  # a 10-bit 4:2:0 format in this encoder
    any_sides: bool  # 4:4:4 available for odd sides


CODECS = {
    "h264": Codec("h264", "mp4", "video/mp4", "libx264", "h264_nvenc", 18, 51, True, True),
    "hevc": Codec("hevc", "mp4", "video/mp4", "libx265", "hevc_nvenc", 20, 51, True, True),
    "av1": Codec("av1", "mp4", "video/mp4", "libsvtav1", None, 30, 63, True, False),
    "vp9": Codec("vp9", "webm", "video/webm", "libvpx-vp9", None, 31, 63, False, True),
}
# what each output container takes as it is; audio of other codecs is re-encoded to the first
HOLDS = {
    "mp4": {
        "audio": ("aac", "mp3", "opus", "flac", "alac", "ac3", "eac3"),
        "subtitle": ("mov_text",),
    },
    "webm": {"audio": ("opus", "vorbis"), "subtitle": ("webvtt",)},
}
AUDIO_ENCODER = {"mp4": "aac", "webm": "libopus"}


def choose_encoder(codec: Codec, setting: str, cuda: bool) -> str:
    """The encoder for `codec`: 'cpu' the CPU one; 'auto' NVENC on a CUDA host where
    PyAV has it; a named encoder where it encodes this codec, else the CPU one."""
    if setting == "auto" and cuda and codec.gpu_encoder in av.codecs_available:
        return codec.gpu_encoder or codec.cpu_encoder
    if setting not in ("auto", "cpu") and setting in (codec.cpu_encoder, codec.gpu_encoder):
        return setting
    return codec.cpu_encoder


@dataclass(frozen=True)
class StreamPlan:
    copy: frozenset[int]
    reencode: frozenset[int]
    dropped: tuple[str, ...]


def plan_streams(info: VideoInfo, codec: Codec) -> StreamPlan:
    """Which of the upload's other streams are copied, re-encoded or dropped."""
    holds = HOLDS[codec.container]
    copy, reencode, dropped = set(), set(), []
    for index, kind in info.other_streams.items():
        media, _, name = kind.partition(":")
        if name in holds.get(media, ()):
            copy.add(index)
        elif media == "audio":
            reencode.add(index)
        else:
            dropped.append(f"{index}:{kind}")
    return StreamPlan(frozenset(copy), frozenset(reencode), tuple(dropped))


def pixel_format(codec: Codec, encoder: str, bits: int, height: int, width: int) -> str:
    deep = bits > 8 and codec.ten_bit
    if height % 2 == 0 and width % 2 == 0:
        if deep:
            return "p010le" if encoder.endswith("_nvenc") else "yuv420p10le"
        return "yuv420p"
    if not codec.any_sides:
        raise unprocessable(
            f"the output frames would be {width}x{height}: {codec.name} here is 4:2:0 only, "
            "which needs even sides; choose a scale that gives even sides, or codec h264, "
            "hevc or vp9 (they encode odd sizes 4:4:4)",
            "odd_output_size",
        )
    if deep:
        return "yuv444p16le" if encoder.endswith("_nvenc") else "yuv444p10le"
    return "yuv444p"


def _options(encoder: str, crf: int) -> dict[str, str]:
    if encoder == "libx264":
        return {"crf": str(crf), "preset": "veryfast", "tune": "zerolatency"}
    if encoder == "libx265":
        return {
            "crf": str(crf),
            "preset": "fast",
            "tune": "zerolatency",
            "x265-params": "bframes=0:log-level=error",
        }
    if encoder == "libsvtav1":
        return {"crf": str(crf), "preset": "10"}
    if encoder == "libvpx-vp9":
        return {"crf": str(crf), "b": "0", "deadline": "realtime", "cpu-used": "8", "row-mt": "1"}
    return {"cq": str(crf), "preset": "p4", "rc": "vbr"}  # NVENC


class ChunkSink:
    """The file object the muxer writes to: bytes kept until the HTTP body takes them."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []

    def write(self, data: bytes) -> int:
        self._chunks.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        data = b"".join(self._chunks)
        self._chunks.clear()
        return data


class Encoder:
    """The output container on a `ChunkSink`; used from one thread."""

    def __init__(
        self,
        source: av.container.InputContainer,
        info: VideoInfo,
        plan: StreamPlan,
        *,
        codec: Codec,
        encoder: str,
        crf: int,
        size: tuple[int, int],
        threads: int,
    ) -> None:
        self.sink = ChunkSink()
        self.info = info
        options = (
            {"movflags": MP4_FLAGS, "frag_duration": str(FRAGMENT_US)}
            if codec.container == "mp4"
            else {}
        )
        self.out = av.open(self.sink, "w", format=codec.container, options=options)
        height, width = size
        self.pix_fmt = pixel_format(codec, encoder, info.bits, height, width)
        stream = self.out.add_stream(encoder, rate=info.rate or 25, options=_options(encoder, crf))
        assert isinstance(stream, av.VideoStream)
        stream.width, stream.height, stream.pix_fmt = width, height, self.pix_fmt
        stream.time_base = info.time_base
        ctx = stream.codec_context
        ctx.time_base = info.time_base
        ctx.thread_count = threads
        ctx.max_b_frames = 0
        if info.sample_aspect_ratio:
            ctx.sample_aspect_ratio = info.sample_aspect_ratio
        for name in ("color_primaries", "color_trc", "colorspace"):
            if getattr(info, name) != 2:  # 2: unspecified
                setattr(ctx, name, getattr(info, name))
        if info.color_range:
            ctx.color_range = info.color_range
        if codec.name == "hevc" and codec.container == "mp4":
            ctx.codec_tag = "hvc1"  # what Apple's players look for
        if info.rotation:
            stream.set_display_rotation(info.rotation)
        self.video = stream
        self.copied: dict[int, av.stream.Stream] = {}
        self.reencoded: dict[int, av.AudioStream] = {}
        for index in sorted(plan.copy | plan.reencode):
            template = source.streams[index]
            if index in plan.copy:
                self.copied[index] = self.out.add_stream_from_template(template)
            else:
                assert isinstance(template, av.AudioStream)
                audio = self.out.add_stream(
                    AUDIO_ENCODER[codec.container],
                    rate=48000 if codec.container == "webm" else template.rate,
                )
                assert isinstance(audio, av.AudioStream)
                audio.layout = template.layout
                self.reencoded[index] = audio
        self._rgb = "rgb48le" if info.bits > 8 else "rgb24"
        self._reformat: dict[str, object] = {"format": self.pix_fmt}
        if info.colorspace in (1, 4, 5, 6, 7, 9, 10):
            self._reformat["dst_colorspace"] = {6: 5, 10: 9}.get(info.colorspace, info.colorspace)
        if info.color_range:
            self._reformat["dst_color_range"] = info.color_range

    def frame(self, pixels: np.ndarray, pts: int) -> bytes:
        """Encode one upscaled HxWx3 frame; the bytes of any fragment it completed."""
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format=self._rgb)
        frame = frame.reformat(**self._reformat)  # type: ignore[arg-type]
        frame.pts, frame.time_base = pts, Fraction(self.info.time_base)
        for packet in self.video.encode(frame):
            self.out.mux(packet)
        return self.sink.take()

    def packet(self, packet: av.Packet[Any]) -> bytes:
        packet.stream = self.copied[packet.stream.index]
        self.out.mux(packet)
        return self.sink.take()

    def audio(self, index: int, frame: av.AudioFrame) -> bytes:
        frame.pts = None  # the encoder counts samples itself
        for packet in self.reencoded[index].encode(frame):
            self.out.mux(packet)
        return self.sink.take()

    def finish(self) -> bytes:
        """Flush the encoders and close the container: the last fragment's bytes."""
        for packet in self.video.encode():
            self.out.mux(packet)
        for audio in self.reencoded.values():
            for packet in audio.encode():
                self.out.mux(packet)
        self.out.close()
        return self.sink.take()

    def close(self) -> None:
        """Give up: release the encoder without writing what is left."""
        with contextlib.suppress(Exception):  # an aborted stream's output: nothing to keep
            self.out.close()
