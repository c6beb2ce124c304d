"""CUDA graphs of the fixed-shape masked forward: captured once per batch shape, replayed.

With shape buckets every batch has one of a few shapes, and the masked forward launches
a few hundred small kernels per batch. On a fast GPU a small image then costs Python's
launch overhead, not the GPU's time (GPU.md: IMDN x4 at 256x256 takes 2.9 ms eager and
1.84 ms as a graph). A replayed graph launches them all at once. Capturing takes
milliseconds, where `torch.compile` takes seconds to minutes per shape.

Every graph draws on one memory pool: the device thread replays one graph at a time,
and each replay's output is copied out before the next can run, so no graph needs
another's memory to survive. Shapes never captured run the plain forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.runtime.backend import MaskedForward


@dataclass(frozen=True)
class _Captured:
    graph: torch.cuda.CUDAGraph
    crops: torch.Tensor  # the graph's input buffers, filled before each replay
    valid: torch.Tensor
    output: torch.Tensor  # the graph's output buffer, overwritten by each replay


class GraphedForward:
    """A masked forward that replays a CUDA graph for every batch shape it captured."""

    def __init__(self, forward: MaskedForward, device: torch.device) -> None:
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {device}")
        self._forward = forward
        self._device = device
        self._captured: dict[tuple[int, ...], _Captured] = {}
        self._pool = torch.cuda.graph_pool_handle()

    @property
    def shapes(self) -> set[tuple[int, ...]]:
        return set(self._captured)

    def capture(self, crops: torch.Tensor, valid: torch.Tensor) -> None:
        """Capture the forward for `crops`' shape. It runs twice on a side stream first,
        as capture requires (cuDNN picks its algorithms there, not inside the graph)."""
        crops, valid = crops.clone(), valid.clone()
        side = torch.cuda.Stream(self._device)  # type: ignore[no-untyped-call]
        side.wait_stream(torch.cuda.current_stream(self._device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward(crops, valid)
        torch.cuda.current_stream(self._device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            output = self._forward(crops, valid)
        self._captured[tuple(crops.shape)] = _Captured(graph, crops, valid, output)

    def __call__(self, crops: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        captured = self._captured.get(tuple(crops.shape))
        if captured is None:
            return self._forward(crops, valid)
        captured.crops.copy_(crops)
        captured.valid.copy_(valid)
        captured.graph.replay()
        return captured.output.clone()  # the next replay, of any graph, may overwrite it
