"""What an image can be refused for: each `ImageError` carries the HTTP status and
the `reason` that the problem document and the error metric use (docs/images.md)."""

from __future__ import annotations

from typing import ClassVar

REASONS = (
    "empty",
    "undecodable",
    "unsupported_type",
    "animated",
    "unsupported_mode",
    "too_many_pixels",
    "decompression_bomb",
    "too_many_scans",
    "too_many_chunks",
    "output_too_large",
)
"""Every `ImageError.reason`, for metrics that pre-register their labels."""


class ImageError(Exception):
    """A client's image we will not process; `status` is the HTTP status to answer with."""

    status: ClassVar[int] = 400
    default_reason: ClassVar[str] = "undecodable"

    def __init__(self, detail: str, *, reason: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.reason = reason or self.default_reason
        if self.reason not in REASONS:
            raise ValueError(f"unknown reason {self.reason!r}; add it to REASONS")


class UndecodableImage(ImageError):
    """400: empty, truncated, corrupt, or not an image at all."""

    status = 400
    default_reason = "undecodable"


class UnsupportedImageType(ImageError):
    """415: a content type, format, animation or pixel mode we do not accept."""

    status = 415
    default_reason = "unsupported_type"


class ImageTooLarge(ImageError):
    """413: too many pixels in the input (from its header) or in the requested output."""

    status = 413
    default_reason = "too_many_pixels"
