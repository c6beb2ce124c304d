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

from models.runtime.device import precision_dtype
from models.runtime.graphs import GraphedForward
from models.training.train import autocast_dtype
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


def test_cuda_graphs_need_cuda_buckets_and_a_plain_torch_backend(weights_dir: Path) -> None:
    """CUDA graphs capture the fixed shapes of buckets: refused without them, with a
    backend that captures its own (compile) or runs elsewhere; 'auto' is off on the CPU."""
    for conflict in ({"shape_buckets": "off"}, {"backend": "compile"}):
        with pytest.raises(ValueError, match="cuda_graphs 'on' captures"):
            Settings(weights_dir=weights_dir, cuda_graphs="on", **conflict)  # type: ignore[arg-type]
    cpu = torch.device("cpu")
    auto = Settings(weights_dir=weights_dir, cuda_graphs="auto", shape_buckets="on")
    assert not auto.graphs_on(cpu)
    assert auto.graphs_on(torch.device("cuda"))  # what the runner asks on a CUDA host
    assert not Settings(weights_dir=weights_dir, cuda_graphs="auto").graphs_on(cpu)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        Settings(weights_dir=weights_dir, cuda_graphs="on").graphs_on(cpu)
    with pytest.raises(ValueError, match="need a CUDA device"):
        GraphedForward(lambda crops, valid: crops, cpu)


def test_precision_auto_is_float32_off_cuda_for_serving_and_training() -> None:
    """One function names the dtype of a precision setting for the runner and the trainer;
    `prefer_bf16` is all they differ in, and only on CUDA."""
    cpu = torch.device("cpu")
    for prefer_bf16 in (False, True):  # the runner's 'auto', the trainer's
        assert precision_dtype("auto", cpu, prefer_bf16=prefer_bf16) == torch.float32
        assert precision_dtype("bf16", cpu, prefer_bf16=prefer_bf16) == torch.bfloat16
        with pytest.raises(ValueError, match="fp16 needs CUDA"):
            precision_dtype("fp16", cpu, prefer_bf16=prefer_bf16)
    with pytest.raises(ValueError, match="precision must be auto or one of"):
        precision_dtype("fp8", cpu, prefer_bf16=False)
    assert autocast_dtype("auto", cpu) is None  # training on the CPU: no autocast


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_precision_auto_on_cuda_serves_float16_and_trains_bfloat16_where_supported() -> None:
    cuda = torch.device("cuda")
    assert precision_dtype("auto", cuda, prefer_bf16=False) == torch.float16
    bf16 = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert precision_dtype("auto", cuda, prefer_bf16=True) == bf16
    assert autocast_dtype("auto", cuda) == bf16
