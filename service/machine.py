"""The machine a figure was measured on, described once for `imdn bench` (Table 6), the
benchmark scripts (bench/) and the HTTP report: CPU, cores, PyTorch and its threads, the
device with its GPU's name, the date and the load."""

from __future__ import annotations

import datetime as dt
import os
import platform
from pathlib import Path

import torch


def cpu_model() -> str:
    """The CPU's marketing name (Linux's /proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """The device in words: the GPU's name on CUDA, else the torch device."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def describe(device: torch.device, precision: str | None = None) -> dict[str, str]:
    """Where and when the figures were taken, as named facts (with the `precision`)."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    facts = {
        "cpu": cpu_model(),
        "cores": str(os.cpu_count()),
        "torch": f"{torch.__version__} ({torch.get_num_threads()} threads)",
        "device": device_name(device),
    }
    if precision is not None:
        facts["precision"] = precision
    facts["date"] = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    facts["load average at start"] = "n/a" if load is None else " ".join(f"{x:.2f}" for x in load)
    return facts
