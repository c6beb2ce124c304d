"""What can go wrong with a request inside the engine: each error says what happened.

How an error reaches a client (HTTP status, Retry-After) is the HTTP layer's choice:
`service/api.py` maps these classes in one table. `reason` is the machine-readable word
that goes into the problem document and the error metric.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base of the errors a request can get from the engine."""

    reason = "engine_error"


class ScaleNotServed(EngineError):
    """The scale needs a model this server does not load."""

    reason = "model_not_loaded"


class QueueFull(EngineError):
    """The queue cannot take the request now; `retry_after_s` estimates when it could,
    from the work queued ahead and the measured throughput."""

    reason = "queue_full"

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class TooCostly(EngineError):
    """The request can never be served in time: its own crops alone exceed the deadline
    at the measured throughput, or exceed the whole queue. Retrying does not help."""

    reason = "too_costly"


class DeadlineExceeded(EngineError):
    reason = "deadline_exceeded"


class DeviceOutOfMemory(EngineError):
    """The device, or the configured memory budget, cannot hold a batch: retried smaller
    inside the runner, and the request's error only when even the smallest tile does
    not fit."""

    reason = "device_out_of_memory"


class NotReady(EngineError):
    """The models are not loaded yet, or the server is stopping."""

    reason = "not_ready"
