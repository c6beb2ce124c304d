"""Image quality the way the paper measures it: MATLAB bicubic, BT.601 Y, PSNR, SSIM.

`imresize` follows MATLAB's `imresize(..., 'bicubic')` (cubic kernel a = -0.5,
its contribution/index rule with symmetric edges, the kernel widened by 1/scale
when shrinking), so LR inputs made here match the authors' files. The weights
and indices are computed once per axis by `resize_taps` and applied by gathering
a few taps per output pixel, shared by the numpy and the torch (any device) path.
"""

from __future__ import annotations

import math
import warnings
from typing import TypeVar

import numpy as np
import numpy.typing as npt
import torch

KERNEL_WIDTH = 4.0  # support of the bicubic kernel, in input pixels
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03

Array = npt.NDArray[np.generic]
ScalarT = TypeVar("ScalarT", bound=np.generic)
FloatArray = npt.NDArray[np.float64]


def cubic(x: torch.Tensor) -> torch.Tensor:
    """Keys' cubic convolution kernel with a = -0.5, as MATLAB's `cubic`."""
    ax = x.abs()
    ax2 = ax * ax
    ax3 = ax2 * ax
    near = (1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1)
    far = (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) * ((ax > 1) & (ax <= 2))
    return near + far


def resize_taps(
    in_len: int, out_len: int, scale: float, *, antialias: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """MATLAB's `contributions`: (indices, weights), each (out_len, taps), float64 weights.

    Output pixel i (1-based) sits at u = i/scale + (1 - 1/scale)/2 in input
    coordinates; indices past an edge are mirrored (symmetric padding), and taps
    whose weight is zero for every output pixel are dropped.
    """
    if in_len < 1 or out_len < 1 or scale <= 0:
        raise ValueError(f"cannot resize {in_len} -> {out_len} pixels at scale {scale}")
    width = KERNEL_WIDTH
    shrink = antialias and scale < 1
    if shrink:
        width /= scale
    x = torch.arange(1, out_len + 1, dtype=torch.float64)
    u = x / scale + 0.5 * (1.0 - 1.0 / scale)
    left = torch.floor(u - width / 2.0)
    taps = math.ceil(width) + 2
    ind = left[:, None] + torch.arange(taps, dtype=torch.float64)[None, :]
    dist = u[:, None] - ind
    weights = scale * cubic(scale * dist) if shrink else cubic(dist)
    weights = weights / weights.sum(dim=1, keepdim=True)
    # Mirror out-of-range indices: MATLAB's aux = [1:n, n:-1:1], indexed modulo 2n.
    mirror = torch.cat([torch.arange(in_len), torch.arange(in_len - 1, -1, -1)])
    indices = mirror[(ind.long() - 1) % (2 * in_len)]
    keep = (weights != 0).any(dim=0)
    return indices[:, keep].contiguous(), weights[:, keep].contiguous()


def _axis_matrix(
    in_len: int,
    indices: torch.Tensor,
    weights: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The taps as a sparse (out_len x in_len) CSR matrix: a few non-zeros per row.

    Mirrored edge taps can hit one input pixel twice; coalescing sums them.
    """
    out_len, taps = indices.shape
    rows = torch.arange(out_len).repeat_interleave(taps)
    coo = torch.sparse_coo_tensor(
        torch.stack([rows, indices.reshape(-1)]),
        weights.reshape(-1),
        (out_len, in_len),
        check_invariants=True,
    ).coalesce()
    with warnings.catch_warnings():  # "sparse CSR support is in beta": we rely only on mm
        warnings.simplefilter("ignore", UserWarning)
        return coo.to(device=device, dtype=dtype).to_sparse_csr()


def _apply_taps(
    x: torch.Tensor, dim: int, indices: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """out[i] = sum_t weights[i, t] * x[indices[i, t]] along `dim`: resizing or filtering.

    One sparse matmul with the axis moved to the front: a single pass over
    memory, unlike a gather-and-add per tap, and no dense out x in matrix.
    """
    matrix = _axis_matrix(x.shape[dim], indices, weights, x.device, x.dtype)
    moved = x.movedim(dim, 0)
    flat = moved.reshape(moved.shape[0], -1)
    out: torch.Tensor = torch.sparse.mm(matrix, flat)
    return out.reshape(out.shape[0], *moved.shape[1:]).movedim(0, dim)


def _round_uint8(x: torch.Tensor) -> torch.Tensor:
    """MATLAB's conversion to uint8: round half away from zero, then saturate."""
    return torch.floor(x + 0.5).clamp_(0, 255)


def _resize_hw(
    x: torch.Tensor,
    dims: tuple[int, int],
    out_size: tuple[int, int],
    scales: tuple[float, float],
    *,
    antialias: bool,
    quantize: bool,
) -> torch.Tensor:
    """Resize the two spatial axes, the one with the smaller scale first (as MATLAB).

    With `quantize` each pass ends in uint8 rounding, as MATLAB keeps a uint8
    image in uint8 between the two passes.
    """
    order = sorted(range(2), key=lambda i: scales[i])  # stable: height first on a tie
    for i in order:
        in_len = x.shape[dims[i]]
        if in_len == out_size[i] and scales[i] == 1:
            continue
        indices, weights = resize_taps(in_len, out_size[i], scales[i], antialias=antialias)
        x = _apply_taps(x, dims[i], indices, weights)
        if quantize:
            x = _round_uint8(x)
    return x.contiguous()


def _plan(
    in_size: tuple[int, int], scale: float | None, size: tuple[int, int] | None
) -> tuple[tuple[int, int], tuple[float, float]]:
    """Output size and per-axis scale from exactly one of `scale` and `size`."""
    if (scale is None) == (size is None):
        raise ValueError("give exactly one of scale= and size=")
    if scale is not None:
        if scale <= 0:
            raise ValueError(f"scale must be positive, got {scale}")
        out = (math.ceil(scale * in_size[0]), math.ceil(scale * in_size[1]))
        return out, (scale, scale)
    assert size is not None
    out = (int(size[0]), int(size[1]))
    if min(out) < 1:
        raise ValueError(f"output size must be positive, got {size}")
    return out, (out[0] / in_size[0], out[1] / in_size[1])


def imresize(
    img: npt.NDArray[ScalarT],
    *,
    scale: float | None = None,
    size: tuple[int, int] | None = None,
    antialias: bool = True,
    round_each_pass: bool = True,
) -> npt.NDArray[ScalarT]:
    """MATLAB `imresize(img, scale | [h w], 'bicubic')` for an HxW or HxWxC array.

    uint8 in: computed in float64, rounded (half away from zero) and saturated
    to uint8 out. MATLAB keeps a uint8 image in uint8 between its two 1-D
    passes, so by default each pass is rounded: this reproduces the authors'
    Set5 LR files bit for bit. `round_each_pass=False` rounds once at the end,
    as common Python ports do (10-15 % of pixels one level off; the README's
    Set14 reference figures were measured that way). Float in: float out of
    the same dtype, never rounded.
    """
    if img.ndim not in (2, 3):
        raise ValueError(f"expected an HxW or HxWxC image, got shape {img.shape}")
    out_size, scales = _plan((img.shape[0], img.shape[1]), scale, size)
    is_uint8 = img.dtype == np.uint8
    if not is_uint8 and not np.issubdtype(img.dtype, np.floating):
        raise TypeError(f"expected uint8 or float pixels, got {img.dtype}")
    x = torch.from_numpy(img.astype(np.float64))  # a writable float64 copy
    each = is_uint8 and round_each_pass
    y = _resize_hw(x, (0, 1), out_size, scales, antialias=antialias, quantize=each)
    if is_uint8:
        return _round_uint8(y).to(torch.uint8).numpy()
    return y.numpy().astype(img.dtype, copy=False)


def imresize_tensor(
    x: torch.Tensor, size: tuple[int, int], *, antialias: bool = True
) -> torch.Tensor:
    """Bicubic resize of a float tensor (..., H, W) to `size`, on x's device and dtype.

    Same weights as `imresize` (scale = out/in per axis); no rounding. Half
    precision inputs are resized in float32 (sparse matmul wants it) and cast back.
    """
    if x.ndim < 2 or not x.is_floating_point():
        raise ValueError(f"expected a float tensor (..., H, W), got {x.dtype} {tuple(x.shape)}")
    out_size, scales = _plan((x.shape[-2], x.shape[-1]), None, size)
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    out = _resize_hw(
        work, (x.ndim - 2, x.ndim - 1), out_size, scales, antialias=antialias, quantize=False
    )
    return out.to(x.dtype)


def rgb_to_y(img: Array) -> FloatArray:
    """BT.601 luma of an HxWx3 RGB image in 0..255, as float (never rounded)."""
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 RGB image, got shape {img.shape}")
    rgb = img.astype(np.float64)
    y = 65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2]
    return np.asarray(16.0 + y / 255.0, dtype=np.float64)


def modcrop(img: npt.NDArray[ScalarT], s: int) -> npt.NDArray[ScalarT]:
    """Crop bottom/right so both sides are multiples of `s` (the HR side of a pair)."""
    if s < 1:
        raise ValueError(f"modcrop factor must be >= 1, got {s}")
    h, w = img.shape[0], img.shape[1]
    return img[: h - h % s, : w - w % s]


def shave(img: npt.NDArray[ScalarT], border: int) -> npt.NDArray[ScalarT]:
    """Drop `border` pixels on every side."""
    if border < 0:
        raise ValueError(f"border must be >= 0, got {border}")
    if border == 0:
        return img
    if min(img.shape[0], img.shape[1]) <= 2 * border:
        raise ValueError(f"image {img.shape[:2]} too small to shave {border} pixels")
    return img[border:-border, border:-border]


def _pair(a: Array, b: Array, border: int) -> tuple[FloatArray, FloatArray]:
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    return shave(a, border).astype(np.float64), shave(b, border).astype(np.float64)


def psnr(a: Array, b: Array, *, border: int = 0, peak: float = 255.0) -> float:
    """PSNR in dB over all pixels (and channels) after shaving; inf when identical."""
    x, y = _pair(a, b, border)
    mse = float(np.mean((x - y) ** 2))
    if mse == 0:
        return math.inf
    return 10.0 * math.log10(peak * peak / mse)


def _gaussian_1d(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """One factor of MATLAB's fspecial('gaussian', size, sigma), which is separable."""
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(r * r) / (2 * sigma * sigma))
    return g / g.sum()


def _ssim_plane(x: torch.Tensor, y: torch.Tensor, peak: float) -> float:
    """Wang et al.'s SSIM of two float64 planes: mean of the 'valid'-filtered map."""
    c1 = (SSIM_K1 * peak) ** 2
    c2 = (SSIM_K2 * peak) ** 2
    g = _gaussian_1d()
    stack = torch.stack([x, y, x * x, y * y, x * y])
    # 'valid' 2-D Gaussian filtering as two 1-D passes, each a banded sparse matmul.
    for dim in (1, 2):
        out_len = stack.shape[dim] - g.numel() + 1
        indices = torch.arange(out_len)[:, None] + torch.arange(g.numel())[None, :]
        stack = _apply_taps(stack, dim, indices, g.expand(out_len, -1))
    mu_x, mu_y, xx, yy, xy = stack
    var_x = xx - mu_x * mu_x
    var_y = yy - mu_y * mu_y
    cov = xy - mu_x * mu_y
    num = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    den = (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
    return float((num / den).mean())


def ssim(a: Array, b: Array, *, border: int = 0, peak: float = 255.0) -> float:
    """SSIM (11x11 Gaussian, sigma 1.5, K1 0.01, K2 0.03) on the shaved plane.

    HxW: one plane. HxWxC: per channel, averaged.
    """
    x, y = _pair(a, b, border)
    if min(x.shape[0], x.shape[1]) < SSIM_WINDOW:
        raise ValueError(f"image {x.shape[:2]} smaller than the {SSIM_WINDOW}x{SSIM_WINDOW} window")
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    if tx.ndim == 2:
        return _ssim_plane(tx, ty, peak)
    if tx.ndim != 3:
        raise ValueError(f"expected an HxW or HxWxC image, got shape {a.shape}")
    return float(np.mean([_ssim_plane(tx[..., c], ty[..., c], peak) for c in range(tx.shape[2])]))
