"""CUDA graphs of fixed-shape forwards: captured once per batch shape, replayed.

With shape buckets every batch has one of a few shapes, and a forward launches a few
hundred small kernels per batch. On a fast GPU a small image then costs Python's launch
overhead, not the GPU's time (GPU.md: IMDN x4 at 256x256 takes 2.9 ms eager and 1.84 ms
as a graph). A replayed graph launches them all at once. Capturing takes milliseconds,
where `torch.compile` takes seconds to minutes per shape.

Every graph draws on one memory pool: the device thread replays one graph at a time,
and each replay's output is copied out before the next can run, so no graph needs
another's memory to survive. Shapes never captured run the forward itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from torch.cuda import _POOL_HANDLE


@dataclass(frozen=True)
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]  # the graph's input buffers, filled before each replay
    output: torch.Tensor  # the graph's output buffer, overwritten by each replay


class GraphedForward:
    """A forward of tensors (the crops first: the plain `(crops)` or the masked
    `(crops, valid)`) that replays a CUDA graph for every crops shape it captured."""

    def __init__(
        self,
        forward: Callable[..., torch.Tensor],
        device: torch.device,
        pool: _POOL_HANDLE | None = None,
    ) -> None:
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {device}")
        self._forward = forward
        self._device = device
        self._captured: dict[tuple[int, ...], _Captured] = {}
        self.pool = pool if pool is not None else torch.cuda.graph_pool_handle()

    @property
    def shapes(self) -> set[tuple[int, ...]]:
        return set(self._captured)

    def capture(self, *inputs: torch.Tensor) -> None:
        """Capture the forward for the crops' shape. It runs twice on a side stream first,
        as capture requires (cuDNN picks its algorithms there, not inside the graph)."""
        inputs = tuple(t.clone() for t in inputs)
        side = torch.cuda.Stream(self._device)  # type: ignore[no-untyped-call]
        side.wait_stream(torch.cuda.current_stream(self._device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward(*inputs)
        torch.cuda.current_stream(self._device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            output = self._forward(*inputs)
        self._captured[tuple(inputs[0].shape)] = _Captured(graph, inputs, output)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        captured = self._captured.get(tuple(inputs[0].shape))
        if captured is None:
            return self._forward(*inputs)
        for buffer, value in zip(captured.inputs, inputs, strict=True):
            buffer.copy_(value)
        captured.graph.replay()
        return captured.output.clone()  # the next replay, of any graph, may overwrite it
