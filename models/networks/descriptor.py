"""One descriptor per model: every fact the rest of the code states about a model.

The registry holds one per official model (the static facts); the service's runner
holds it again with the dtype and device it loaded the model on. `/v1/models`, the
Table 6 report, the metrics' model series and the `imdn` command read it from there, so
a model's scale, size rule, parameters and depth are written once (as spandrel's
`ImageModelDescriptor` holds a model's scale and size rule beside the module).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from models.networks.imdn import IMDN, count_parameters
from models.networks.profile import conv_depth


@dataclass(frozen=True)
class ModelDescriptor:
    name: str  # "x2", "x3", "x4", "AS"
    architecture: str  # "IMDN" or "IMDN_AS"
    scale: int  # the network's own factor: 2, 3, 4; 1 for IMDN_AS, which serves any scale
    size_multiple: int  # input sides must be multiples of this (4 for IMDN_AS)
    parameters: int  # learnable parameters (Table 6)
    depth: int  # conv layers on the longest path (Table 6)
    dtype: torch.dtype | None = None  # where the model is loaded; None in the registry
    device: torch.device | None = None

    @property
    def any_scale(self) -> bool:
        """IMDN_AS: restores a bicubic upscale of any factor, at the same size."""
        return self.scale == 1

    @property
    def served_scale(self) -> int | str:
        """The scale a client may ask of it: the fixed factor, or "any"."""
        return "any" if self.any_scale else self.scale

    @property
    def precision(self) -> str | None:
        """The dtype as settings and reports name it ("float16"); None until loaded."""
        return None if self.dtype is None else str(self.dtype).removeprefix("torch.")

    def loaded(self, *, dtype: torch.dtype, device: torch.device) -> ModelDescriptor:
        """The same model with the runtime facts of where it was loaded."""
        return replace(self, dtype=dtype, device=device)

    def as_json(self) -> dict[str, Any]:
        """The facts `/v1/models` lists for a loaded model."""
        return {
            "name": self.name,
            "architecture": self.architecture,
            "scale": self.served_scale,
            "parameters": self.parameters,
            "depth": self.depth,
            "device": str(self.device),
            "precision": self.precision,
        }


def describe(name: str, network: IMDN) -> ModelDescriptor:
    """The static facts of `network`, read from the module itself (depth by tracing)."""
    return ModelDescriptor(
        name=name,
        architecture=network.architecture,
        scale=network.scale,
        size_multiple=network.size_multiple,
        parameters=count_parameters(network),
        depth=conv_depth(network),
    )
