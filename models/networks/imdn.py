"""IMDN and IMDN_AS, as described in the paper (Hui et al., ACM MM 2019).

Module names are our own; `models.networks.checkpoints` maps the official state-dict
keys onto them. Inputs and outputs are RGB float tensors in [0, 1], NCHW.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LEAKY_SLOPE = 0.05


def _conv(in_ch: int, out_ch: int, kernel: int, stride: int = 1) -> nn.Conv2d:
    """A 'same'-padded convolution with bias, as every conv in IMDN is."""
    return nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=True)


class ContrastChannelAttention(nn.Module):
    """CCA: gate channels by (standard deviation + mean) over the whole map (Eq. 5)."""

    def __init__(self, *, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.squeeze = _conv(channels, channels // reduction, 1)
        self.excite = _conv(channels // reduction, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=(2, 3), keepdim=True)
        # Population variance, as in the paper and the authors' code.
        std = (x - mean).pow(2).mean(dim=(2, 3), keepdim=True).sqrt()
        gate = torch.sigmoid(self.excite(F.relu(self.squeeze(std + mean))))
        return x * gate


class InformationMultiDistillationBlock(nn.Module):
    """IMDB: progressive refinement keeping a quarter of the channels at each step."""

    def __init__(self, *, channels: int = 64, distilled: int = 16) -> None:
        super().__init__()
        remaining = channels - distilled
        self.distilled = distilled
        self.remaining = remaining
        self.c1 = _conv(channels, channels, 3)
        self.c2 = _conv(remaining, channels, 3)
        self.c3 = _conv(remaining, channels, 3)
        self.c4 = _conv(remaining, distilled, 3)
        self.cca = ContrastChannelAttention(channels=distilled * 4)
        self.c5 = _conv(distilled * 4, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        split = [self.distilled, self.remaining]
        kept1, rest = torch.split(F.leaky_relu(self.c1(x), LEAKY_SLOPE), split, dim=1)
        kept2, rest = torch.split(F.leaky_relu(self.c2(rest), LEAKY_SLOPE), split, dim=1)
        kept3, rest = torch.split(F.leaky_relu(self.c3(rest), LEAKY_SLOPE), split, dim=1)
        kept4 = self.c4(rest)
        distilled = torch.cat([kept1, kept2, kept3, kept4], dim=1)
        out: torch.Tensor = self.c5(self.cca(distilled)) + x
        return out


class IMDN(nn.Module):
    """The fixed-scale network: output is `scale` times the input on each side."""

    architecture = "IMDN"
    size_multiple = 1  # input sides must be multiples of this

    def __init__(self, *, scale: int, channels: int = 64, blocks: int = 6) -> None:
        super().__init__()
        self.scale = scale
        self.head: nn.Module = _conv(3, channels, 3)
        self.blocks = nn.ModuleList(
            InformationMultiDistillationBlock(channels=channels) for _ in range(blocks)
        )
        self.fuse = _conv(channels * blocks, channels, 1)
        self.body_conv = _conv(channels, channels, 3)
        self.upsample_conv = _conv(channels, 3 * self.upsample_factor**2, 3)

    @property
    def upsample_factor(self) -> int:
        return self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.upsample(self.trunk(self.head(x)))

    # The forward's three stages: `head` (a module), `trunk`, `upsample`. A backend may
    # run them apart: OpenVINO's mixed precision keeps the first and last in float32.

    def trunk(self, features: torch.Tensor) -> torch.Tensor:
        """The blocks, their fusion and the long skip: head features to body features."""
        outputs = []
        out = features
        for block in self.blocks:
            out = block(out)
            outputs.append(out)
        fused = F.leaky_relu(self.fuse(torch.cat(outputs, dim=1)), LEAKY_SLOPE)
        body: torch.Tensor = self.body_conv(fused) + features
        return body

    def upsample(self, body: torch.Tensor) -> torch.Tensor:
        """The last convolution and the pixel shuffle to the output size."""
        return F.pixel_shuffle(self.upsample_conv(body), self.upsample_factor)


class IMDN_AS(IMDN):
    """The any-scale network: same-size restoration of a bicubic-upscaled image.

    The head downsamples by 4 (two stride-2 convs) and the tail upsamples by 4,
    so both sides of the input must be multiples of 4.
    """

    architecture = "IMDN_AS"
    size_multiple = 4

    def __init__(self, *, channels: int = 64, blocks: int = 6) -> None:
        super().__init__(scale=1, channels=channels, blocks=blocks)
        self.head = nn.Sequential(
            _conv(3, channels, 3, stride=2),
            nn.LeakyReLU(LEAKY_SLOPE),
            _conv(channels, channels, 3, stride=2),
        )

    @property
    def upsample_factor(self) -> int:
        return 4


def architecture_for(scale: int) -> type[IMDN]:
    """The network of a network scale: 1 is IMDN_AS (it restores a bicubic upscale of any
    factor at the same size), 2 and above the fixed-scale IMDN."""
    return IMDN_AS if scale == 1 else IMDN


def describe_network(arch: str, scale: int) -> str:
    """How messages name a network: "IMDN ×3", or "IMDN_AS (any scale)"."""
    return (
        f"{IMDN_AS.architecture} (any scale)"
        if arch == IMDN_AS.architecture
        else f"{arch} ×{scale}"
    )


def build_model(arch: str, scale: int) -> IMDN:
    """Build an untrained network: `arch` is "IMDN" (scale 2, 3, 4, ...) or "IMDN_AS"."""
    if arch == IMDN.architecture:
        if scale < 2:
            raise ValueError(f"IMDN needs an integer scale >= 2, got {scale}")
        return IMDN(scale=scale)
    if arch == IMDN_AS.architecture:
        return IMDN_AS()
    raise ValueError(f"unknown architecture {arch!r}; expected 'IMDN' or 'IMDN_AS'")


def count_parameters(model: nn.Module) -> int:
    """Learnable parameters (Table 6's column): the one count the registry, the runner and
    the profile share."""
    return sum(p.numel() for p in model.parameters())
