"""Pixels on the device: upload integers, normalise there, quantise there, copy back integers.

The host only sees the decoded uint8/uint16 input and the quantised output: 1 byte a
pixel channel each way for 8-bit images instead of float32's 4, and no full-size float
canvas on the host. Every step is elementwise in float32 in the same order as the
evaluation (`x / 255`; `round(y * 255)` half to even, then clipped), so on the CPU
the result is bit for bit what `service.imaging` computed from float arrays before.
"""

from __future__ import annotations

import numpy as np
import torch

from models.runtime.device import side_stream

# BT.601 luma, as `service.imaging.compose` weighs the planes (float32 constants)
_LUMA = (0.299, 0.587, 0.114)


def bits_of(image: np.ndarray) -> int:
    """The output depth for an input array: 16 for uint16, else 8 (uint8 or float)."""
    return 16 if image.dtype == np.uint16 else 8


def to_unit(image: np.ndarray, device: torch.device) -> torch.Tensor:
    """An HxWx3 uint8/uint16 (or float in [0, 1]) array as a (1, 3, H, W) float32 tensor
    in [0, 1] on `device`, converted there. Pinned staging on CUDA for an async copy."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 image, got shape {image.shape}")
    array = np.ascontiguousarray(image)
    if not array.flags.writeable:  # torch wants a writable buffer (it never writes here)
        array = array.copy()
    if array.dtype == np.uint16:  # torch's uint16 has few kernels: widen on the host
        array = array.astype(np.int32)
    elif array.dtype not in (np.uint8, np.float32):
        raise ValueError(f"expected uint8, uint16 or float32 pixels, got {image.dtype}")
    host = torch.from_numpy(array)
    if device.type == "cuda":
        host = host.pin_memory()
    # planes made contiguous before the conversion: a byte transpose, not a float one
    # (a 1080p frame on the CPU: 1.7 ms against 7.3)
    x = host.to(device, non_blocking=True).permute(2, 0, 1).unsqueeze(0).contiguous()
    if image.dtype == np.float32:
        return x
    top = 65535.0 if image.dtype == np.uint16 else 255.0
    return x.to(torch.float32).div_(top)


def quantise(y: torch.Tensor, *, grey: bool, bits: int, overwrite: bool = False) -> torch.Tensor:
    """(N, 3, H, W) outputs in [0, 1] to integers: (N, C, H, W), C = 1 for grey (the
    luma of the three planes) else 3; uint8 for 8 bits, int32 holding 16-bit values.
    With `overwrite` the caller needs `y` no more: float32 outputs are quantised in
    place, without a float copy of the batch (on the CPU a copy of a large batch costs
    more than the arithmetic)."""
    top = 65535.0 if bits == 16 else 255.0
    if grey:
        y = y.to(torch.float32)
        weights = [torch.tensor(w, dtype=torch.float32, device=y.device) for w in _LUMA]
        luma = y[:, 0:1] * weights[0]
        luma = luma + y[:, 1:2] * weights[1]
        y = (luma + y[:, 2:3] * weights[2]).mul_(top)
    elif y.dtype == torch.float32:
        y = y.mul_(top) if overwrite else y.mul(top)
    else:
        y = y.to(torch.float32).mul_(top)
    y = y.round_().clamp_(0.0, top)
    return y.to(torch.uint8 if bits == 8 else torch.int32)


def to_host(canvas: torch.Tensor, bits: int) -> np.ndarray:
    """A (C, H, W) integer tensor as an HxWxC uint8/uint16 array on the host (through
    pinned memory on CUDA, on a side stream: the canvas is complete, and the copy need
    not wait for the forward the device thread runs meanwhile)."""
    hwc = canvas.permute(1, 2, 0)
    if canvas.device.type == "cuda":
        host = torch.empty(hwc.shape, dtype=hwc.dtype, pin_memory=True)
        with side_stream(canvas.device):
            host.copy_(hwc)
        array = host.numpy()
    else:
        array = hwc.contiguous().numpy()
    return array.astype(np.uint16) if bits == 16 else array
