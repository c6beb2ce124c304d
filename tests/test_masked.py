"""The masked forward: padded crops give the unpadded network's output, whatever the padding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.networks.imdn import IMDN, IMDN_AS
from models.networks.masked import _cca, masked_forward, valid_mask


@pytest.mark.parametrize("network", [IMDN(scale=3), IMDN_AS()], ids=["IMDN x3", "IMDN_AS"])
def test_padded_batch_equals_each_crop_alone(network: IMDN) -> None:
    torch.manual_seed(0)
    network.eval()
    m, s = network.size_multiple, network.scale
    sizes = [(20, 28), (32, 32), (12, 8)] if m == 4 else [(19, 27), (32, 32), (5, 9)]
    crops = [torch.rand(1, 3, h, w) for h, w in sizes]
    batch = torch.cat(
        [F.pad(c, (0, 32 - c.shape[-1], 0, 32 - c.shape[-2]), value=0.7) for c in crops]
    )
    valid = torch.tensor(sizes)
    with torch.inference_mode():
        out = masked_forward(network, batch, valid)
        for i, (crop, (h, w)) in enumerate(zip(crops, sizes, strict=True)):
            alone = network(crop)
            torch.testing.assert_close(
                out[i : i + 1, :, : h * s, : w * s], alone, atol=2e-5, rtol=0
            )


def test_unpadded_input_is_the_plain_forward() -> None:
    torch.manual_seed(1)
    network = IMDN(scale=2).eval()
    x = torch.rand(2, 3, 24, 16)
    with torch.inference_mode():
        torch.testing.assert_close(
            masked_forward(network, x, torch.tensor([[24, 16]] * 2)), network(x), atol=2e-5, rtol=0
        )


def test_channel_attention_holds_in_half_precision() -> None:
    """CCA's statistics over a valid region of more than 65504 pixels in fp16 (the CUDA
    default): the pixel count and the sums pass fp16's largest value, the gate must not."""
    torch.manual_seed(2)
    cca = IMDN(scale=2).blocks[0].cca.eval()
    x = torch.rand(2, 64, 264, 264) * 4
    mask = valid_mask(torch.tensor([[260, 258], [264, 264]]), 264, 264, 1, torch.float32)
    with torch.inference_mode():
        full = _cca(cca, x, mask)
        half = _cca(cca.half(), x.half(), mask.half())
    assert torch.isfinite(half).all()
    torch.testing.assert_close(half.float(), full, atol=2e-2, rtol=1e-2)
