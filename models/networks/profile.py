"""Model facts for the paper's Tables 6 and 7, computed from the modules themselves.

Depth is the number of convolutions on the longest path through the traced
graph; the attention branch (CCA) only gates its input and is left out of the
path, which is how the paper counts 34 layers for IMDN. Multiply-adds are
counted by hooks on every convolution during a real forward pass.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
from torch import nn

from models.networks.imdn import IMDN, ContrastChannelAttention


class _GateAsLeaf(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, ContrastChannelAttention) or super().is_leaf_module(
            m, module_qualified_name
        )


def conv_depth(model: nn.Module) -> int:
    """Convolutions on the longest input-to-output path (attention gates excluded)."""
    graph = _GateAsLeaf().trace(model)
    modules = dict(model.named_modules())
    depth: dict[torch.fx.Node, int] = {}
    for node in graph.nodes:  # topological order
        here = (
            1
            if node.op == "call_module" and isinstance(modules[str(node.target)], nn.Conv2d)
            else 0
        )
        depth[node] = here + max((depth[n] for n in node.all_input_nodes), default=0)
    return max(depth.values())


def mult_adds(model: nn.Module, height: int, width: int) -> int:
    """Multiply-adds of one forward pass on a 1×3×height×width input."""
    total = 0

    def count(module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        nonlocal total
        assert isinstance(module, nn.Conv2d)
        kh, kw = module.kernel_size
        per_output = (module.in_channels // module.groups) * kh * kw
        total += output.numel() * per_output

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.inference_mode():
            model(torch.zeros(1, 3, height, width))
    finally:
        for h in hooks:
            h.remove()
    return total


def mult_adds_per_output_pixel(model: IMDN, *, input_size: int = 64) -> float:
    """Multiply-adds per output pixel (Eq. 10 of the paper; Table 7's column), measured on
    an `input_size` square cut to the network's size rule."""
    side = input_size - input_size % model.size_multiple
    return mult_adds(model, side, side) / (side * model.scale) ** 2
