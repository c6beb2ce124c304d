"""Benchmark 9: what a backend costs at start: seconds until `/readyz`, and the server's
memory then (resident, and its peak so far), with the four models and default settings.

    python -m bench.startup [--backends eager auto] [--models x2 x3 x4 AS]

Each start is a fresh `imdn serve` child. `auto` (the default: openvino on the CPU where
installed) starts twice on one new, empty `IMDN_BACKEND_CACHE_DIR`: first converting
every network ("cold"), then reading back what the first start kept ("cached"), as a
restart does. The warm-up (first calls, and the batch sizes it measures) is part of
the time, as it is part of every start.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench.common import machine
from service.child import imdn_serve
from service.shared import WEIGHTS


def peak_rss_bytes(pid: int) -> int:
    """VmHWM of a process: its resident memory's high-water mark."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


def start(backend: str, models: list[str], cache: Path) -> dict[str, float]:
    settings = {
        "IMDN_MODELS": json.dumps(models),
        "IMDN_WEIGHTS_DIR": str(WEIGHTS),
        "IMDN_BACKEND": backend,
        "IMDN_BACKEND_CACHE_DIR": str(cache),
        "IMDN_LOG_LEVEL": "warning",
    }
    started = time.perf_counter()
    with imdn_serve(settings, start_timeout=900) as served:
        ready = time.perf_counter() - started
        rss, peak = served.rss_bytes(), peak_rss_bytes(served.process.pid)
    return {"ready_s": ready, "rss_mib": rss / 2**20, "peak_mib": peak / 2**20}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=["eager", "auto"])
    parser.add_argument("--models", nargs="+", default=["x2", "x3", "x4", "AS"])
    args = parser.parse_args(argv)
    print(machine())
    print(f"{'backend':16s} {'ready s':>8s} {'RSS MiB':>8s} {'peak MiB':>9s}")
    with tempfile.TemporaryDirectory() as folder:
        for backend in args.backends:
            cache = Path(folder) / backend
            runs = ["cold", "cached"] if backend in ("auto", "openvino") else [""]
            for run in runs:
                row = start(backend, args.models, cache)
                label = f"{backend} {run}".strip()
                print(
                    f"{label:16s} {row['ready_s']:8.1f} {row['rss_mib']:8.0f} "
                    f"{row['peak_mib']:9.0f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
