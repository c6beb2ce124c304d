"""The output's size from the scale, and the output pixels in the input's kind and depth
(grey back to grey, alpha resized on its own and re-attached): docs/images.md."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

import numpy as np
from PIL import Image

from service.imaging.decoding import DecodedImage
from service.imaging.errors import ImageTooLarge

# --------------------------------------------------------------------------- sizes


def output_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """(round(s·H), round(s·W)) with halves rounded up, the scale read as the decimal the
    client wrote: 2.3 x 25 = 57.5 → 58 (float arithmetic would give 57.49999… → 57)."""
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    s = Decimal(repr(float(scale)))
    if not s.is_finite() or s <= 0:
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    out_h, out_w = (int((s * n).to_integral_value(rounding=ROUND_HALF_UP)) for n in (height, width))
    if out_h < 1 or out_w < 1:
        raise ValueError(f"scale {scale} makes {height}x{width} empty")
    return out_h, out_w


def check_output_pixels(height: int, width: int, max_output_pixels: int) -> None:
    """Refuse (413 ``output_too_large``) an output over the pixel budget, before any work."""
    if height * width > max_output_pixels:
        raise ImageTooLarge(
            f"the output would be {width}x{height} = {height * width} pixels; "
            f"the limit is {max_output_pixels}",
            reason="output_too_large",
        )


# --------------------------------------------------------------------------- compose


def _quantise(unit: np.ndarray, bits: int) -> np.ndarray:
    """[0, 1] floats to uint8/uint16: rounded as the evaluation rounds (`np.round` of
    x * 255; adding 0.5 in float32 would carry x.4999… up), then clipped."""
    top = 65535.0 if bits == 16 else 255.0
    scaled = unit * np.float32(top)
    np.rint(scaled, out=scaled)
    np.clip(scaled, 0.0, top, out=scaled)
    return scaled.astype(np.uint16 if bits == 16 else np.uint8)


def _resize_alpha(alpha: np.ndarray, height: int, width: int) -> np.ndarray:
    if alpha.shape == (height, width):
        return alpha
    plane = Image.fromarray(np.ascontiguousarray(alpha, dtype=np.float32))
    resized = np.asarray(plane.resize((width, height), Image.Resampling.BICUBIC), np.float32)
    clipped: np.ndarray = np.clip(resized, 0.0, 1.0)
    return clipped


# pixels quantised at a time: compose's float temporaries stay ~3 MB, not 12 B a pixel
COMPOSE_BAND_PIXELS = 1 << 18


def compose(decoded: DecodedImage, rgb_out: np.ndarray) -> np.ndarray:
    """The output pixels at `rgb_out`'s size, in the input's kind and depth.

    `rgb_out` is either what the engine returns, already quantised on the device
    (uint8/uint16 as `decoded.bits`, H'xW'x1 for a grey input, else H'xW'x3), or the
    network's H'xW'x3 float output in [0, 1], quantised here as the engine does it
    (`np.rint` of x * 255, then clipped). Returns uint8 or uint16 (`decoded.bits`),
    H'xW'xC with C = 1 grey, 2 grey + alpha, 3 RGB, 4 RGBA: grey inputs come back grey
    (BT.601 luma of the three planes), alpha is resized on its own (bicubic, clipped)
    and re-attached. Float input is quantised a band of rows at a time, straight into
    the result, so a large output costs its integer pixels and little more.
    """
    if rgb_out.dtype.kind in "ui":
        return _attach_alpha(decoded, rgb_out)
    if rgb_out.ndim != 3 or rgb_out.shape[2] != 3 or rgb_out.dtype.kind != "f":
        raise ValueError(f"rgb_out must be float HxWx3, got {rgb_out.dtype} {rgb_out.shape}")
    if not np.isfinite(np.sum(rgb_out, dtype=np.float64)):
        raise ValueError("rgb_out holds NaN or infinite values")
    height, width = int(rgb_out.shape[0]), int(rgb_out.shape[1])
    alpha = None if decoded.alpha is None else _resize_alpha(decoded.alpha, height, width)
    channels = (1 if decoded.grey else 3) + (alpha is not None)
    out = np.empty((height, width, channels), np.uint16 if decoded.bits == 16 else np.uint8)
    rows = max(1, COMPOSE_BAND_PIXELS // width)
    for top in range(0, height, rows):
        band = slice(top, top + rows)
        rgb = rgb_out[band].astype(np.float32, copy=False)
        if decoded.grey:
            luma = rgb[..., 0] * np.float32(0.299)
            luma += rgb[..., 1] * np.float32(0.587)
            luma += rgb[..., 2] * np.float32(0.114)
            out[band, :, 0] = _quantise(luma, decoded.bits)
        else:
            out[band, :, :3] = _quantise(rgb, decoded.bits)
        if alpha is not None:
            out[band, :, -1] = _quantise(alpha[band], decoded.bits)
    return out


def _attach_alpha(decoded: DecodedImage, quantised: np.ndarray) -> np.ndarray:
    """The engine's quantised output with the input's alpha (resized) re-attached."""
    dtype = np.uint16 if decoded.bits == 16 else np.uint8
    planes = 1 if decoded.grey else 3
    if quantised.ndim != 3 or quantised.shape[2] != planes or quantised.dtype != dtype:
        raise ValueError(
            f"quantised output must be {np.dtype(dtype).name} HxWx{planes} for this input, "
            f"got {quantised.dtype} {quantised.shape}"
        )
    if decoded.alpha is None:
        return quantised
    height, width = int(quantised.shape[0]), int(quantised.shape[1])
    alpha = _resize_alpha(decoded.alpha, height, width)
    out = np.empty((height, width, planes + 1), dtype)
    out[..., :planes] = quantised
    rows = max(1, COMPOSE_BAND_PIXELS // width)
    for top in range(0, height, rows):
        out[top : top + rows, :, -1] = _quantise(alpha[top : top + rows], decoded.bits)
    return out
