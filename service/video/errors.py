"""What a video can be refused for, with the HTTP status and the problem's `reason`."""

from __future__ import annotations


class VideoError(Exception):
    """A client's video we will not (or can no longer) process."""

    def __init__(self, status: int, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.reason, self.detail = status, reason, detail


def undecodable(detail: str) -> VideoError:
    return VideoError(400, "undecodable_video", detail)


def unsupported(detail: str, reason: str = "unsupported_video") -> VideoError:
    return VideoError(415, reason, detail)


def too_large(detail: str, reason: str) -> VideoError:
    return VideoError(413, reason, detail)


def unprocessable(detail: str, reason: str) -> VideoError:
    return VideoError(422, reason, detail)
