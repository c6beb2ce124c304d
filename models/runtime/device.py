"""Which torch device a setting names: 'auto' picks CUDA when there is one."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """'auto', 'cpu', 'cuda' or 'cuda:N'; asking for CUDA where there is none is an error,
    never a silent fall back to the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for, but CUDA is not available here")
    return device
