"""Video super-resolution: probe, decode, upscale frame by frame through the engine's
batcher, encode, stream a fragmented MP4 (docs/video.md).

PyAV (`pip install 'imdn-serve[video]'`) is optional: `available()` says whether it is
installed, and nothing here imports it until a video is actually handled.
"""

from __future__ import annotations

import importlib.util

INSTALL_HINT = (
    "video needs PyAV (FFmpeg's libraries), which is not installed here: install the "
    "'video' extra (pip install 'imdn-serve[video]', or pip install av)"
)

ENCODERS = ("libx264", "libx265", "libsvtav1", "libvpx-vp9", "h264_nvenc", "hevc_nvenc")
"""The encoders `IMDN_VIDEO_ENCODER` may name (service/video/encode.py's codecs use them)."""

VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".mov", ".webm", ".mkv"})
"""File name endings `imdn upscale` treats as videos."""


def available() -> bool:
    """Whether PyAV can be imported (checked each call: tests patch it)."""
    return importlib.util.find_spec("av") is not None
