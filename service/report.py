"""Table 6 of the paper, live: per model and scale, parameters, depth, time per image
and peak memory, each figure saying what it measures.

The HTTP layer records each served image here; `/v1/report` renders it as JSON
or Markdown. `imdn bench` renders its offline measurements with the same table.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from models.networks.descriptor import ModelDescriptor

WINDOW = 10_000  # images kept per (model, scale) for the mean and quantiles
MAX_SCALES = 64  # (model, scale) rows kept; IMDN_AS scales beyond are pooled as "other"
MIB = 2**20

MEASURES: dict[str, str] = {
    "parameters": "learnable parameters of the network",
    "depth": "conv layers on the network's longest path",
    "requests": "images served with 200 since the start",
    "forward_*_seconds": "per image: device compute (synchronised) of the batches that "
    "carried its crops, as the paper times a network; a batch shared with other images "
    f"counts whole for each. Mean, median and 95th percentile of the last {WINDOW:,} images",
    "request_*_seconds": "per image: from the request's arrival to its PNG encoded (body "
    "read, decode, queue wait, forward, stitching, encode), without the client's reading "
    "of the response. Same statistics",
    "peak_memory_mib": "largest per-batch peak among the images served, in MiB (2^20 "
    "bytes): on CUDA the allocator's peak of allocated device memory (weights, inputs, "
    "activations, outputs); on the CPU the process's resident high-water mark during "
    "the batch (the whole process, so an upper bound)",
}


def scale_key(model: ModelDescriptor, scale: float) -> str:
    """A row's scale: a fixed model's own, or IMDN_AS's requested scale to 2 decimals."""
    return f"{round(scale, 2):g}" if model.any_scale else str(model.scale)


@dataclass
class _Stats:
    requests: int = 0
    seconds: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    forward: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    peak_memory_bytes: int = 0


@dataclass(frozen=True)
class ReportRow:
    model: str
    scale: str
    parameters: int
    depth: int
    requests: int
    forward_mean_seconds: float | None
    forward_p50_seconds: float | None
    forward_p95_seconds: float | None
    request_mean_seconds: float | None
    request_p50_seconds: float | None
    request_p95_seconds: float | None
    peak_memory_mib: float | None

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def _summary(values: Iterable[float]) -> tuple[float | None, float | None, float | None]:
    a = np.asarray(list(values), dtype=np.float64)
    if not a.size:
        return None, None, None
    return float(a.mean()), float(np.percentile(a, 50)), float(np.percentile(a, 95))


class Report:
    """Per (model, scale) running statistics of served images (thread-safe)."""

    def __init__(self) -> None:
        self._stats: dict[tuple[str, str], _Stats] = {}
        self._lock = threading.Lock()

    def record(
        self,
        model: str,
        scale: str,
        seconds: float,
        forward_seconds: float,
        peak_memory_bytes: int,
    ) -> None:
        """One served image: `scale` from `scale_key`, its request and forward times."""
        with self._lock:
            key = (model, scale)
            if key not in self._stats and len(self._stats) >= MAX_SCALES:
                key = (model, "other")
            stats = self._stats.setdefault(key, _Stats())
            stats.requests += 1
            stats.seconds.append(seconds)
            stats.forward.append(forward_seconds)
            stats.peak_memory_bytes = max(stats.peak_memory_bytes, peak_memory_bytes)

    def rows(self, models: Iterable[ModelDescriptor]) -> list[ReportRow]:
        """Rows for `models`, in that order, one per scale served (one empty row, at the
        scale the model serves, for a model that served nothing yet)."""
        rows = []
        with self._lock:
            for d in models:
                served = sorted(
                    (key[1] for key in self._stats if key[0] == d.name),
                    key=lambda s: (s == "other", float(s) if s != "other" else 0.0),
                )
                for scale in served or [str(d.served_scale)]:
                    stats = self._stats.get((d.name, scale), _Stats())
                    forward, request = _summary(stats.forward), _summary(stats.seconds)
                    rows.append(
                        ReportRow(
                            d.name,
                            scale,
                            d.parameters,
                            d.depth,
                            stats.requests,
                            *forward,
                            *request,
                            stats.peak_memory_bytes / MIB if stats.requests else None,
                        )
                    )
        return rows


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub-flavoured Markdown table; floats with 4 significant decimals, None as '—'."""

    def cell(v: object) -> str:
        if v is None:
            return "—"
        if isinstance(v, float):
            return f"{v:.4f}" if abs(v) < 100 else f"{v:.1f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


REPORT_HEADER = (
    "model", "scale", "params", "depth", "requests",
    "forward p50 s", "forward p95 s", "request p50 s", "request p95 s", "peak MiB",
)  # fmt: skip


def report_markdown(rows: Sequence[ReportRow], *, device: str, precision: str) -> str:
    """The table, preceded by the device and precision and followed by what each
    column measures."""
    table = markdown_table(
        REPORT_HEADER,
        (
            (
                r.model,
                r.scale,
                r.parameters,
                r.depth,
                r.requests,
                r.forward_p50_seconds,
                r.forward_p95_seconds,
                r.request_p50_seconds,
                r.request_p95_seconds,
                r.peak_memory_mib,
            )
            for r in rows
        ),
    )
    notes = "\n".join(
        f"- **{name}**: {MEASURES[key]}."
        for name, key in (
            ("forward", "forward_*_seconds"),
            ("request", "request_*_seconds"),
            ("peak MiB", "peak_memory_mib"),
            ("requests", "requests"),
            ("depth", "depth"),
        )
    )
    return f"Device: {device}. Precision: {precision}.\n\n{table}\n{notes}\n"
