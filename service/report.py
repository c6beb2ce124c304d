"""Table 6 of the paper, live: per model, parameters, depth, time per image and peak memory.

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

WINDOW = 10_000  # images kept per model for the mean and p95


@dataclass
class _ModelStats:
    requests: int = 0
    seconds: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    peak_memory_bytes: int = 0


@dataclass(frozen=True)
class ReportRow:
    model: str
    parameters: int
    depth: int
    requests: int
    mean_seconds: float | None
    p95_seconds: float | None
    peak_memory_mb: float | None

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


class Report:
    """Per-model running statistics of served images (thread-safe)."""

    def __init__(self) -> None:
        self._stats: dict[str, _ModelStats] = {}
        self._lock = threading.Lock()

    def record(self, model: str, seconds: float, peak_memory_bytes: int) -> None:
        with self._lock:
            stats = self._stats.setdefault(model, _ModelStats())
            stats.requests += 1
            stats.seconds.append(seconds)
            stats.peak_memory_bytes = max(stats.peak_memory_bytes, peak_memory_bytes)

    def rows(self, models: Iterable[tuple[str, int, int]]) -> list[ReportRow]:
        """One row per (name, parameters, depth), in the order given."""
        rows = []
        with self._lock:
            for name, parameters, depth in models:
                stats = self._stats.get(name, _ModelStats())
                times = np.asarray(stats.seconds, dtype=np.float64)
                rows.append(
                    ReportRow(
                        model=name,
                        parameters=parameters,
                        depth=depth,
                        requests=stats.requests,
                        mean_seconds=float(times.mean()) if times.size else None,
                        p95_seconds=float(np.percentile(times, 95)) if times.size else None,
                        peak_memory_mb=stats.peak_memory_bytes / 2**20 if stats.requests else None,
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


def report_markdown(rows: Sequence[ReportRow]) -> str:
    header = ["model", "params", "depth", "requests", "mean s/image", "p95 s/image", "peak MB"]
    return markdown_table(
        header,
        (
            (
                r.model,
                r.parameters,
                r.depth,
                r.requests,
                r.mean_seconds,
                r.p95_seconds,
                r.peak_memory_mb,
            )
            for r in rows
        ),
    )
