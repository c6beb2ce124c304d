"""The service on CUDA: fp16, shape buckets and the compiled backend, held to tolerances
that mean something (PSNR within 0.02 dB of the fp32 forward, exact sizes and modes).

Marked `gpu`; every test skips without CUDA. On a CPU-only host the wiring of the
compiled backend is tested in tests/test_runner.py instead.
"""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.quality.evaluate import list_images, read_rgb
from models.quality.matlab import modcrop, psnr, rgb_to_y
from models.runtime.device import side_stream
from models.runtime.graphs import GraphedForward
from service import imaging
from service.engine import Engine
from service.settings import Settings
from tests.reference import whole_forward

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def run_engine(settings: Settings, images: list[np.ndarray], scale: float) -> list[np.ndarray]:
    async def go() -> list[np.ndarray]:
        engine = Engine(settings)
        await engine.start()
        try:
            assert engine.device.type == "cuda"
            results = [await engine.upscale(image, scale) for image in images]
            shapes = engine.planner.shapes(4 if scale % 1 else 1)
            for name, ran in engine.batch_shapes.items():
                assert ran <= set(shapes) or not engine.planner.buckets, (name, ran)
            for loaded in engine.runner.models.values():  # every warmed shape was captured
                if settings.graphs_on(engine.device):
                    assert isinstance(loaded.masked, GraphedForward)
                    assert loaded.masked.shapes == loaded.warm_shapes
                    if loaded.backend != "compile":  # the plain forward of full crops too
                        assert isinstance(loaded.forward, GraphedForward)
                        assert loaded.forward.shapes == loaded.warm_full
            return [r.image for r in results]
        finally:
            await engine.stop()

    return asyncio.run(go())


@pytest.mark.parametrize(
    ("scale", "backend"),
    [(2, "eager"), (3, "eager"), (4, "eager"), (2, "graphs"), (4, "graphs"), (4, "compile")],
)
def test_set5_psnr_within_0_02_db_of_the_fp32_forward(
    weights_dir: Path, datasets_dir: Path, official_model, scale: int, backend: str, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """Set5 through the engine in fp16 with buckets on (the CUDA default), eager, eager
    replayed as CUDA graphs, and compiled: the mean Y PSNR against HR within 0.02 dB of
    the fp32 CPU forward's.
    The compiled case uses compile mode 'default' and batches of up to 4 (3 graphs of
    the plain forward at the full 256-px tile), to keep its warm-up short; Set5's
    padded images run the masked forward eager beside it."""
    settings = Settings(
        weights_dir=weights_dir,
        models=[f"x{scale}"],
        device="cuda",
        precision="fp16",
        backend="eager" if backend == "graphs" else backend,
        cuda_graphs="on" if backend == "graphs" else "off",
        shape_buckets="on",
        compile_mode="default",
        max_batch_size=4 if backend == "compile" else 8,
        compile_cache_dir=tmp_path / "compile-cache",
    )
    hr_paths = list_images(datasets_dir / "Set5" / "HR")
    lr_dir = datasets_dir / "Set5" / "LR_bicubic" / f"x{scale}"
    lrs = [read_rgb(lr_dir / f"{p.stem}x{scale}{p.suffix}") for p in hr_paths]
    served = run_engine(settings, lrs, scale)
    ours, reference = [], []
    for hr_path, lr, out in zip(hr_paths, lrs, served, strict=True):
        hr = modcrop(read_rgb(hr_path), scale)
        assert out.shape == hr.shape and out.dtype == np.uint8
        ours.append(psnr(rgb_to_y(out), rgb_to_y(hr), border=scale))
        expected = whole_forward(official_model(f"x{scale}"), lr)
        reference.append(psnr(rgb_to_y(expected), rgb_to_y(hr), border=scale))
    assert abs(np.mean(ours) - np.mean(reference)) <= 0.02, (ours, reference)
    if backend == "compile":
        assert (tmp_path / "compile-cache" / "imdn-megacache.bin").is_file()


def test_modes_and_depths_on_cuda(weights_dir: Path, datasets_dir: Path) -> None:
    """Grey, RGBA and 16-bit inputs come back in their own mode and depth at the right size."""
    lr = read_rgb(datasets_dir / "Set5" / "LR_bicubic" / "x4" / "headx4.bmp")[:40, :36]
    grey16 = np.asarray(Image.fromarray(lr).convert("L")).astype(np.uint16) * 257
    cases = {
        "L": Image.fromarray(lr).convert("L"),
        "RGBA": Image.fromarray(np.dstack([lr, np.full(lr.shape[:2], 200, np.uint8)])),
        "I;16": Image.fromarray(grey16),
    }
    settings = Settings(weights_dir=weights_dir, models=["x4"], device="cuda")

    async def go() -> None:
        engine = Engine(settings)
        await engine.start()
        try:
            for mode, image in cases.items():
                buf = io.BytesIO()
                image.save(buf, format="PNG")
                decoded = imaging.decode(buf.getvalue(), "image/png", max_pixels=1 << 20)
                result = await engine.upscale(decoded.pixels, 4, grey=decoded.grey)
                out = imaging.compose(decoded, result.image)
                channels = {"L": 1, "RGBA": 4, "I;16": 1}[mode]
                assert out.shape == (160, 144, channels), mode
                assert out.dtype == (np.uint16 if mode == "I;16" else np.uint8), mode
        finally:
            await engine.stop()

    asyncio.run(go())


def test_buckets_keep_large_images_close_to_whole(weights_dir: Path, datasets_dir: Path) -> None:
    """A Set14 image on CUDA in fp16, tiled into fixed 128-px crops (full: the plain
    forward, replayed as graphs) and run whole in a frame bucket of its very size (the
    plain forward): each >= 45 dB from the same image run whole, padded into one 512-px
    crop (the masked forward) in fp16, so the bar measures tiling and the path, not
    fp16's own rounding (Set5 above holds fp16 to the fp32 forward). On the CPU in fp32
    the same tiling is 54.2 dB from the whole image; tiling costs more on busier images
    (the half-size comic at 128 px: 44.9 dB, the same on an H200 in fp16)."""
    lr = read_rgb(datasets_dir / "Set14" / "HR" / "comic.png")
    frame = f"{lr.shape[0]}x{lr.shape[1]}"
    tiled, framed, whole = (
        run_engine(
            Settings(
                weights_dir=weights_dir,
                models=["x2"],
                device="cuda",
                precision="fp16",
                tile_max_pixels=side * side,
                frame_buckets=frames,
            ),
            [lr],
            2,
        )[0]
        for side, frames in ((128, []), (128, [frame]), (512, []))
    )
    assert tiled.shape == framed.shape == whole.shape == (lr.shape[0] * 2, lr.shape[1] * 2, 3)
    assert psnr(tiled, whole) >= 45
    assert psnr(framed, whole) >= 45


def test_request_threads_copy_beside_the_forward_in_flight() -> None:
    """`side_stream`: a copy back to the host finishes while the default stream (where
    the device thread's forwards run) is still busy, and its bytes are complete."""
    cuda = torch.device("cuda")
    n = 1 << 22
    on_device = torch.arange(n, device=cuda, dtype=torch.int32)
    host = torch.empty(n, dtype=torch.int32, pin_memory=True)
    torch.cuda.synchronize(cuda)
    default = torch.cuda.current_stream(cuda)
    torch.cuda._sleep(2_000_000_000)  # about a second of a busy default stream
    with side_stream(cuda):
        assert torch.cuda.current_stream(cuda) != default
        host.copy_(on_device)
    assert torch.cuda.current_stream(cuda) == default
    assert not default.query(), "the default stream should still be busy"
    assert int(host[-1]) == n - 1 and int(host[12345]) == 12345
    torch.cuda.synchronize(cuda)


def test_concurrent_requests_match_one_at_a_time(weights_dir: Path, datasets_dir: Path) -> None:
    """Set5 at x4 and a tiled Set14 image, each sent three times at once (uploads and
    copies back on side streams while batches run, crops of different requests in one
    batch): every output within 50 dB of the same image sent alone (fp16, whose batch
    composition may change the rounding, not the picture)."""
    lrs = [read_rgb(p) for p in list_images(datasets_dir / "Set5" / "LR_bicubic" / "x4")]
    lrs.append(read_rgb(datasets_dir / "Set14" / "HR" / "comic.png"))
    settings = Settings(weights_dir=weights_dir, models=["x4"], device="cuda", precision="fp16")

    async def go() -> tuple[list[np.ndarray], list[np.ndarray]]:
        engine = Engine(settings)
        await engine.start()
        try:
            alone = [(await engine.upscale(lr, 4)).image for lr in lrs]
            together = await asyncio.gather(*(engine.upscale(lr, 4) for lr in lrs * 3))
            return alone, [r.image for r in together]
        finally:
            await engine.stop()

    alone, together = asyncio.run(go())
    for i, out in enumerate(together):
        expected = alone[i % len(lrs)]
        assert out.shape == expected.shape
        assert psnr(out, expected) >= 50, i
