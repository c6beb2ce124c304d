"""The reference an engine's or a server's output is held to: the network on the whole
image in one forward, in fp32 on the CPU, rounded as the paper's evaluation rounds."""

from __future__ import annotations

import numpy as np
import torch


def whole_forward(model: torch.nn.Module, lr: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 in, the model's H'xW'x3 uint8 out (clamp to [0, 1], x255, round)."""
    x = torch.from_numpy(lr.copy()).permute(2, 0, 1).unsqueeze(0).float() / 255
    with torch.inference_mode():
        y = model(x).clamp(0, 1)[0].permute(1, 2, 0).numpy()
    return np.round(y * 255).astype(np.uint8)
