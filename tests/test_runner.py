"""The device runner's wiring on the CPU: the compiled backend without compiling.

`torch.compile` itself is exercised on CUDA (tests/test_gpu.py); on two CPU cores it
takes tens of seconds a shape. Here it is replaced by a recorder that returns the
function as it is, which shows what the runner compiles, when, and that the cache
folder is written and read.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from service.engine import Engine
from service.runner import MEGACACHE_FILE
from service.settings import Settings


class Recorder:
    def __init__(self) -> None:
        self.compiled: list[dict[str, Any]] = []
        self.calls: list[tuple[int, ...]] = []
        self.loaded: list[bytes] = []

    def compile(self, fn: Callable[..., Any], **options: Any) -> Callable[..., Any]:
        self.compiled.append(options)

        def counted(*args: Any) -> Any:
            self.calls.append(tuple(args[0].shape))
            return fn(*args)

        return counted


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    rec = Recorder()
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)  # the runner sets it
    monkeypatch.setattr(torch, "compile", rec.compile)
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (b"kernels", None))
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", rec.loaded.append)
    return rec


def test_compile_backend_warms_every_shape_and_keeps_its_cache(
    weights_dir: Path, tmp_path: Path, recorder: Recorder
) -> None:
    settings = Settings(
        device="cpu",
        weights_dir=weights_dir,
        models=["x4"],
        backend="compile",  # shape_buckets auto: on with the compile backend
        compile_cache_dir=tmp_path / "cache",
        tile_max_pixels=32 * 32,
        tile_padding=8,
        max_batch_size=4,
    )

    async def serve_one() -> Engine:
        engine = Engine(settings)
        await engine.start()
        try:
            image = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
            result = await engine.upscale(image, 4)
            assert result.image.shape == (80, 120, 3)
        finally:
            await engine.stop()
        return engine

    engine = asyncio.run(serve_one())
    model = engine.models["x4"]
    assert recorder.compiled == [{"mode": "max-autotune-no-cudagraphs", "dynamic": False}]
    shapes = engine.planner.shapes(1)
    assert shapes == [(16, 16), (16, 32), (32, 16), (32, 32)]
    expected = {(b, 3, h, w) for h, w in shapes for b in (1, 2, 4)}
    assert model.warm_shapes == expected
    # warm-up ran each (shape, batch) through the compiled function (twice: compile, time)
    assert {c for c in recorder.calls[: 2 * len(expected)]} == expected
    # the request (20x30 -> one crop padded to 32x32, batch padded to 1) used it too
    assert recorder.calls[-1] == (1, 3, 32, 32)
    assert (tmp_path / "cache" / MEGACACHE_FILE).read_bytes() == b"kernels"
    assert recorder.loaded == []  # nothing saved before this start
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache" / "inductor")

    asyncio.run(serve_one())  # a restart loads what the first run saved
    assert recorder.loaded == [b"kernels"]


def test_compile_without_buckets_is_refused(weights_dir: Path) -> None:
    with pytest.raises(ValueError, match="needs shape_buckets"):
        Settings(weights_dir=weights_dir, backend="compile", shape_buckets="off")
