"""Which torch device a setting names ('auto' picks CUDA when there is one), its dtype,
and the side streams request threads use on it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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


PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def precision_dtype(precision: str, device: torch.device, *, prefer_bf16: bool) -> torch.dtype:
    """The dtype a precision setting ('auto', 'fp32', 'fp16', 'bf16') names on `device`.

    'auto' is float32 off CUDA; on CUDA a half type: bfloat16 where the GPU has it when
    `prefer_bf16` (training: its range needs no loss scaling), else float16 (serving: the
    precision tests/test_gpu.py holds to its tolerances). fp16 off CUDA is an error,
    never a silent change.
    """
    if precision == "auto":
        if device.type != "cuda":
            return torch.float32
        bf16 = prefer_bf16 and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float16
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be auto or one of {', '.join(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    if dtype == torch.float16 and device.type != "cuda":
        raise ValueError(f"fp16 needs CUDA, not {device.type}; use fp32 or bf16")
    return dtype


@contextlib.contextmanager
def side_stream(device: torch.device) -> Iterator[None]:
    """Run the block's device work on a CUDA stream from PyTorch's pool, and wait for it
    on leaving. A request thread's copies and small kernels (upload, resize, crop;
    download) on the default stream would queue behind the forward in flight, tens of
    milliseconds for a 1080p frame; on their own stream the copy engines overlap it.
    Whatever the block leaves on the device is complete when it returns, so the device
    thread may use it on the default stream. Off CUDA, nothing changes."""
    if device.type != "cuda":
        yield
        return
    stream = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
    with torch.cuda.stream(stream):
        yield
    stream.synchronize()
