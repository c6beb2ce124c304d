"""IMDN on padded crops as if they were not padded: the forward with a valid region.

Fixed batch shapes mean padding an image into a bigger crop. Padding is not free with
IMDN: its channel attention (CCA) pools mean and standard deviation over the whole
feature map, so padded pixels, whatever their values, move every output pixel (on Set5
x4, replicate padding from 72 to 96 px costs 42 dB against the unpadded image). This
forward takes each crop's valid height and width and (1) zeroes every feature map
outside the valid region before each 3x3 convolution, which is what the convolution's
own zero padding does at the real border, and (2) computes CCA's statistics over the
valid region only. Inside the valid region the result is the unpadded network's up to
float rounding (summation order), for any padding.

Same weights, same modules: `masked_forward(model, x, valid)` reads `model`'s layers.
IMDN_AS's valid sides must be multiples of 4 (its features live at a quarter of each
side). Pure tensor code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.networks.imdn import (
    IMDN,
    LEAKY_SLOPE,
    ContrastChannelAttention,
    InformationMultiDistillationBlock,
)


def valid_mask(
    valid: torch.Tensor, height: int, width: int, factor: int, dtype: torch.dtype
) -> torch.Tensor:
    """(N, 1, height, width) mask of the first valid // factor rows and columns of each
    crop; `valid` is (N, 2) integer (valid_h, valid_w) at the input's resolution."""
    rows = torch.arange(height, device=valid.device) < (valid[:, 0:1] // factor)
    cols = torch.arange(width, device=valid.device) < (valid[:, 1:2] // factor)
    return (rows[:, None, :, None] & cols[:, None, None, :]).to(dtype)


def _cca(cca: ContrastChannelAttention, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """CCA with its mean and standard deviation over the valid region. The sums
    accumulate and stay in float32: in half precision a 256x256 crop's pixel count alone
    (65536) passes fp16's largest value (65504), and the gate turned to NaN."""
    dims = (2, 3)
    count = mask.sum(dim=dims, keepdim=True, dtype=torch.float32).clamp_(min=1)
    mean = (x * mask).sum(dim=dims, keepdim=True, dtype=torch.float32) / count
    centred = (x - mean.to(x.dtype)) * mask
    variance = centred.pow(2).sum(dim=dims, keepdim=True, dtype=torch.float32) / count
    stats = (variance.sqrt() + mean).to(x.dtype)
    gate = torch.sigmoid(cca.excite(F.relu(cca.squeeze(stats))))
    return x * gate


def _block(
    block: InformationMultiDistillationBlock, x: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    split = [block.distilled, block.remaining]
    kept1, rest = torch.split(F.leaky_relu(block.c1(x), LEAKY_SLOPE), split, dim=1)
    kept2, rest = torch.split(F.leaky_relu(block.c2(rest * mask), LEAKY_SLOPE), split, dim=1)
    kept3, rest = torch.split(F.leaky_relu(block.c3(rest * mask), LEAKY_SLOPE), split, dim=1)
    kept4 = block.c4(rest * mask)
    distilled = torch.cat([kept1, kept2, kept3, kept4], dim=1)
    out: torch.Tensor = (block.c5(_cca(block.cca, distilled, mask)) + x) * mask
    return out


def masked_forward(model: IMDN, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """`model(x[i, :, :h_i, :w_i])` for every crop i at once, padded back to x's shape
    times the scale (values outside each crop's valid output region are unspecified)."""
    _, _, height, width = x.shape
    m = model.size_multiple
    x = x * valid_mask(valid, height, width, 1, x.dtype)
    head = model.head
    if isinstance(head, nn.Sequential):  # IMDN_AS: two stride-2 convs
        first, act, second = head
        half = act(first(x)) * valid_mask(valid, height // 2, width // 2, 2, x.dtype)
        features = second(half)
    else:
        features = head(x)
    mask = valid_mask(valid, height // m, width // m, m, x.dtype)
    features = features * mask
    outputs = []
    out = features
    for block in model.blocks:
        out = _block(block, out, mask)  # type: ignore[arg-type]
        outputs.append(out)
    fused = F.leaky_relu(model.fuse(torch.cat(outputs, dim=1)), LEAKY_SLOPE) * mask
    body = (model.body_conv(fused) + features) * mask
    return model.upsample(body)
