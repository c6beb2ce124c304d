"""The device runner's wiring on the CPU: the compiled backend without compiling, and the
batch sizes warm-up chooses (on fake networks whose batches are slower or faster per crop).

`torch.compile` itself is exercised on CUDA (tests/test_gpu.py); on two CPU cores it
takes tens of seconds a shape. Here it is replaced by a recorder that returns the
function as it is, which shows what the runner compiles, when, and that the cache
folder is written and read, whole, and that a damaged or unwritable one never stops a start.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from models.networks.checkpoints import REGISTRY
from models.runtime.device import precision_dtype
from models.runtime.graphs import GraphedForward
from models.training.train import autocast_dtype
from service.batcher import Batcher, BatchOutcome, Key, Slice
from service.engine import Engine
from service.metrics import Metrics
from service.runner import MEGACACHE_FILE, DeviceRunner, LoadedModel
from service.settings import Settings, usable_cpus

LOAD_CACHE_ARTIFACTS = torch.compiler.load_cache_artifacts  # PyTorch's, before any stub


class Recorder:
    def __init__(self) -> None:
        self.compiled: list[dict[str, Any]] = []
        self.calls: list[tuple[int, ...]] = []
        self.loaded: list[bytes] = []

    def load(self, artifacts: bytes) -> object:
        """What load_cache_artifacts returns for bytes it could read: not None."""
        self.loaded.append(artifacts)
        return "cache info"

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
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", rec.load)
    return rec


def test_compile_backend_compiles_the_full_shapes_and_keeps_its_cache(
    weights_dir: Path, tmp_path: Path, recorder: Recorder
) -> None:
    """The compile backend compiles the plain forward once, and warm-up runs it at each
    full shape (the 32-px tile at every batch size); padded crops run the masked forward
    eager, never compiled. A tiled image's full crops run the compiled forward."""
    settings = Settings(
        device="cpu",
        weights_dir=weights_dir,
        models=["x4"],
        backend="compile",  # shape_buckets auto: on with the compile backend
        compile_cache_dir=tmp_path / "cache",
        tile_max_pixels=32 * 32,
        tile_padding=8,
        max_batch_size=4,
        batch_limit="max",  # the four tiles in one batch, whatever this CPU times
    )
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    large = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)

    async def serve() -> tuple[Engine, list[tuple[int, ...]], np.ndarray]:
        engine = Engine(settings)
        await engine.start()
        try:
            warm_calls = list(recorder.calls)
            assert (await engine.upscale(small, 4)).image.shape == (80, 120, 3)
            assert recorder.calls == warm_calls  # padded: the masked forward, eager
            tiled = await engine.upscale(large, 4)
            assert recorder.calls[len(warm_calls) :] == [(4, 3, 32, 32)]  # its four tiles
        finally:
            await engine.stop()
        return engine, warm_calls, tiled.image

    engine, warm_calls, tiled = asyncio.run(serve())
    model = engine.models["x4"]
    assert recorder.compiled == [{"mode": "max-autotune-no-cudagraphs", "dynamic": False}]
    shapes = engine.planner.shapes(1)
    assert shapes == [(16, 16), (16, 32), (32, 16), (32, 32)]
    assert model.warm_shapes == {(b, 3, h, w) for h, w in shapes for b in (1, 2, 4)}
    full = {(b, 3, 32, 32) for b in (1, 2, 4)}
    assert model.warm_full == full and set(warm_calls) == full and len(warm_calls) == 3
    assert tiled.shape == (160, 160, 3)  # its quality: tests/test_engine.py, full crops
    assert (tmp_path / "cache" / MEGACACHE_FILE).read_bytes() == b"kernels"
    assert recorder.loaded == []  # nothing saved before this start
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache" / "inductor")

    recorder.calls.clear()
    asyncio.run(serve())  # a restart loads what the first run saved
    assert recorder.loaded == [b"kernels"]


def _start_and_stop(settings: Settings) -> None:
    async def run() -> None:
        engine = Engine(settings)
        await engine.start()
        await engine.stop()

    asyncio.run(run())


def _compiled(weights_dir: Path, cache: Path) -> Settings:
    return Settings(
        device="cpu",
        weights_dir=weights_dir,
        models=["x4"],
        backend="compile",
        compile_cache_dir=cache,
        tile_max_pixels=32 * 32,
        tile_padding=8,
        max_batch_size=4,
    )


def test_a_damaged_compile_cache_is_compiled_afresh_and_rewritten(
    weights_dir: Path,
    tmp_path: Path,
    recorder: Recorder,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A Mega-Cache cut short (a process killed while writing it) does not stop the
    start: PyTorch's own loader refuses the bytes, the runner says so and compiles, and
    warm-up writes a whole cache in its place."""
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", LOAD_CACHE_ARTIFACTS)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / MEGACACHE_FILE).write_bytes(b"\x80\x04\x95 a cache cut sh")
    with caplog.at_level("WARNING", logger="service.runner"):
        _start_and_stop(_compiled(weights_dir, cache))
    assert "not loaded (damaged, or saved by another PyTorch)" in caplog.text
    assert len(recorder.compiled) == 1 and recorder.calls  # compiled and warmed
    assert (cache / MEGACACHE_FILE).read_bytes() == b"kernels"
    assert not [p for p in cache.iterdir() if p.name.endswith(".partial")]


def test_a_compile_cache_that_cannot_be_written_keeps_the_old_one_whole(
    weights_dir: Path,
    tmp_path: Path,
    recorder: Recorder,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The disk fills half way through writing the cache: the service starts anyway, the
    cache of the earlier run is still there whole, and no partial file is left."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / MEGACACHE_FILE).write_bytes(b"earlier kernels")
    write_bytes = Path.write_bytes

    def disk_full(path: Path, data: Any) -> int:
        if path.parent != cache:
            return write_bytes(path, data)
        write_bytes(path, bytes(data)[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", disk_full)
    with caplog.at_level("WARNING", logger="service.runner"):
        _start_and_stop(_compiled(weights_dir, cache))
    assert recorder.loaded == [b"earlier kernels"]
    assert "not saved: [Errno 28] No space left on device" in caplog.text
    assert (cache / MEGACACHE_FILE).read_bytes() == b"earlier kernels"
    assert not [p for p in cache.iterdir() if p.name.endswith(".partial")]


def test_compile_without_buckets_is_refused(weights_dir: Path) -> None:
    with pytest.raises(ValueError, match="needs shape_buckets"):
        Settings(weights_dir=weights_dir, backend="compile", shape_buckets="off")


def test_cuda_graphs_need_cuda_buckets_and_a_pytorch_backend(weights_dir: Path) -> None:
    """CUDA graphs capture the fixed shapes of buckets: refused without them; 'auto' is
    off on the CPU, on with CUDA for every PyTorch backend (with compile, for the masked
    forward)."""
    with pytest.raises(ValueError, match="cuda_graphs 'on' captures"):
        Settings(weights_dir=weights_dir, cuda_graphs="on", shape_buckets="off")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    auto = Settings(weights_dir=weights_dir, cuda_graphs="auto", shape_buckets="on")
    assert not auto.graphs_on(cpu)
    assert auto.graphs_on(cuda)  # what the runner asks on a CUDA host
    assert Settings(weights_dir=weights_dir, backend="compile").graphs_on(cuda)
    assert not Settings(weights_dir=weights_dir, cuda_graphs="auto").graphs_on(cpu)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        Settings(weights_dir=weights_dir, cuda_graphs="on").graphs_on(cpu)
    with pytest.raises(ValueError, match="need a CUDA device"):
        GraphedForward(lambda crops, valid: crops, cpu)


def test_the_gil_switch_interval_is_shorter_on_cuda_and_set_by_the_runner(
    weights_dir: Path,
) -> None:
    """Unset, the runner leaves Python's interval on the CPU and sets 0.5 ms on CUDA (the
    device thread's small calls each wait for the GIL: bench/gil_convoy.py); a value
    given is used anywhere, process-wide."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    default = Settings(weights_dir=weights_dir)
    assert default.switch_interval_s(cpu) is None and default.switch_interval_s(cuda) == 0.0005
    with pytest.raises(ValueError, match="greater than 0"):
        Settings(weights_dir=weights_dir, gil_switch_interval_ms=0)
    before = sys.getswitchinterval()
    try:
        Engine(Settings(weights_dir=weights_dir, device="cpu")).runner.configure()
        assert sys.getswitchinterval() == before
        given = Settings(weights_dir=weights_dir, device="cpu", gil_switch_interval_ms=2)
        Engine(given).runner.configure()
        assert sys.getswitchinterval() == pytest.approx(0.002)
    finally:
        sys.setswitchinterval(before)


def test_encode_threads_leave_a_cpu_network_its_cores(
    weights_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The thread budget (docs/deploy.md): unset, one PNG encoder thread when the network
    runs on the CPU (its intra-op threads take every core), every usable CPU with CUDA;
    a value given is kept."""
    assert Settings(weights_dir=weights_dir, device="cpu").encode_threads == 1
    assert Settings(weights_dir=weights_dir, device="cpu", encode_threads=3).encode_threads == 3
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert Settings(weights_dir=weights_dir).encode_threads == usable_cpus()


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


def _timed_runner(weights_dir: Path, seconds: Callable[[int], float]) -> DeviceRunner:
    """A CPU runner whose x4 is a fake network: a batch of n crops takes `seconds(n)` of
    the runner's clock (a fake one, so a busy host cannot change the choice)."""
    settings = Settings(device="cpu", weights_dir=weights_dir, models=["x4"], warmup=False)
    runner = DeviceRunner(settings, Engine._planner(settings), Metrics())
    now = [0.0]
    runner.clock = lambda: now[0]

    def forward(x: torch.Tensor) -> torch.Tensor:
        now[0] += seconds(x.shape[0])
        return torch.zeros(x.shape[0], 3, 1, 1)

    descriptor = REGISTRY["x4"].model.loaded(dtype=torch.float32, device=runner.device)
    model = LoadedModel(descriptor, "eager", forward, masked=None, masked_eager=None)
    runner.models["x4"] = model
    runner.choose_batch_limits(model)
    return runner


@pytest.mark.parametrize(
    ("seconds", "limit"),
    [
        (lambda n: 0.1 * n**1.2, 1),  # each crop slower in company: the CPU's PyTorch
        (lambda n: 0.02 + 0.01 * n, 8),  # a fixed cost per batch: a GPU's
        (lambda n: 0.1 * n * (1 - 0.01 * n), 1),  # 2 is faster by 1 %: within the noise
        (lambda n: 0.02 + 0.01 * n + 0.001 * n**2, 4),  # 8 is slower per crop than 4
    ],
    ids=["slower-per-crop", "faster-per-crop", "about-as-fast", "faster-up-to-4"],
)
def test_warm_up_batches_only_sizes_at_least_as_fast_per_crop(
    weights_dir: Path, seconds: Callable[[int], float], limit: int
) -> None:
    """Without buckets, warm-up times batch sizes 1, 2, 4, 8 in pairs and the batcher's
    limit (`batch_limit`, for every crop shape of the model) is the largest size before
    one that is not faster per crop by 5 % (`planner.BATCH_GAIN`): 1 where batches cost
    more per crop or about the same, 8 where they cost less, 4 where 8 costs more per crop
    than 4. Where 2 already loses, 4 and 8 are not tried."""
    runner = _timed_runner(weights_dir, seconds)
    (shape,) = runner.models["x4"].batch_limits
    assert runner.models["x4"].batch_limits == {shape: limit}
    assert runner.batch_limit(("x4", 37, 53)) == runner.batch_limit(("x4", *shape)) == limit
    timed = sorted(runner.batch_seconds[("x4", *shape)])
    assert timed == ([1, 2] if limit == 1 else [1, 2, 4, 8])
    for batch, spent in runner.batch_seconds[("x4", *shape)].items():  # kept for admission
        assert spent == pytest.approx(seconds(batch))


def test_the_batcher_forms_only_the_chosen_sizes(weights_dir: Path) -> None:
    """A measured limit of 1 reaches the batcher: eight crops of one request run as eight
    batches of one, without the batch wait."""
    runner = _timed_runner(weights_dir, lambda n: 0.1 * n**1.2)
    sizes: list[int] = []

    async def run(key: Key, slices: list[Slice]) -> BatchOutcome:
        sizes.append(sum(s.stop - s.start for s in slices))
        return BatchOutcome(0.001, 0)

    async def go() -> None:
        batcher = Batcher(
            run, max_batch=8, max_wait_s=60, max_queue_crops=64, batch_limit=runner.batch_limit
        )
        batcher.start()
        ticket = batcher.submit(("x4", 40, 40), 8, None, deadline=time.perf_counter() + 30)
        await asyncio.wait_for(ticket.future, 10)
        await batcher.stop()

    asyncio.run(go())
    assert sizes == [1] * 8
