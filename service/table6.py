"""`imdn bench`: the paper's Table 6 measured offline through the service's own engine.

For each scale (x2/x3/x4 for 2, 3, 4; IMDN_AS for any other) and each folder of HR
images, the LR input is made from the HR image by MATLAB bicubic
(`models.quality.matlab.imresize`, HR cropped to a multiple of the scale), then super-resolved
by `Engine.upscale`, the very call the HTTP service makes, so planning, tiling,
batching and precision are the service's. Recorded per image: the wall time of that
call, and the peak memory of its batches (the CUDA allocator's peak on a GPU, the
process's resident memory on the CPU, as `service.metrics` reports them).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from models.networks.descriptor import ModelDescriptor
from models.quality.evaluate import dataset_name, list_images, read_rgb
from models.quality.matlab import imresize, modcrop
from models.runtime.device import resolve_device
from service.engine import Engine, model_for_scale
from service.machine import describe
from service.metrics import Metrics, reset_peak_memory
from service.report import markdown_table
from service.settings import Settings

Image8 = npt.NDArray[np.uint8]


@dataclass(frozen=True)
class ModelFacts:
    """A row of Table 6: the model serving `scale`, its facts read from its descriptor."""

    descriptor: ModelDescriptor
    scale: float

    def as_dict(self) -> dict[str, Any]:
        """The row as `imdn bench --json` lists it under "models"."""
        d = self.descriptor
        return {"model": d.name, "scale": self.scale, "parameters": d.parameters, "depth": d.depth}


@dataclass(frozen=True)
class BenchCell:
    """One model at one scale on one data set."""

    dataset: str
    model: str
    scale: float
    images: int
    seconds_per_image: float  # mean wall time of `Engine.upscale`, LR in memory to SR array
    peak_memory_mb: float  # the largest per-image peak over the data set, MiB
    batch_shapes: list[list[int]]  # the distinct [h, w] crop shapes the device ran


@dataclass
class BenchResult:
    machine: dict[str, str]
    models: list[ModelFacts]
    cells: list[BenchCell]

    def as_dict(self) -> dict[str, Any]:
        return {
            "machine": self.machine,
            "models": [m.as_dict() for m in self.models],
            "results": [asdict(c) for c in self.cells],
        }

    def table(self) -> str:
        """Rows per model and scale; per data set a column 'peak MB / s per image'."""
        datasets = list(dict.fromkeys(c.dataset for c in self.cells))
        cells = {(c.model, c.scale, c.dataset): c for c in self.cells}
        header = ["model", "scale", "params", "depth"]
        header += [f"{d}: peak MB / s per image" for d in datasets]
        rows = []
        for m in self.models:
            facts = m.descriptor
            row: list[object] = [facts.name, f"×{m.scale:g}", facts.parameters, facts.depth]
            for d in datasets:
                c = cells.get((facts.name, m.scale, d))
                row.append(
                    None if c is None else f"{c.peak_memory_mb:.0f} / {c.seconds_per_image:.3f}"
                )
            rows.append(row)
        return markdown_table(header, rows)

    def markdown(self) -> str:
        """The machine it ran on, then the table."""
        facts = "\n".join(f"- {key}: {value}" for key, value in self.machine.items())
        return f"{facts}\n\n{self.table()}"


def models_for(scales: Sequence[float]) -> list[str]:
    """The models that serve `scales`, each once, in the order of the scales."""
    return list(dict.fromkeys(model_for_scale(s) for s in scales))


def bench_settings(
    scales: Sequence[float], *, weights_dir: Path | None = None, device: str | None = None
) -> Settings:
    """The service's settings (tiling, batch size, precision, shape buckets), with the
    models `scales` need. Two differences: no synthetic warm-up unless shape buckets are
    on (`run_bench` warms each model on a real image; with buckets the warm-up is what
    keeps tuning off the timed images, as in the service), and no batch wait, since
    images come one at a time and no other request could join a batch (the service
    waits `max_batch_wait_ms` for one)."""
    overrides: dict[str, Any] = {
        "models": models_for(scales),
        "max_batch_wait_ms": 0,
    }
    if weights_dir is not None:
        overrides["weights_dir"] = weights_dir
    if device is not None:
        overrides["device"] = device
    settings = Settings(**overrides)
    buckets = settings.buckets_on(resolve_device(settings.device))
    return settings.model_copy(update={"warmup": buckets})


def lr_from_hr(hr: Image8, scale: float) -> Image8:
    """The benchmark LR: MATLAB bicubic of the HR cropped to a multiple of the scale
    (integer scales, the paper's protocol), or resized to round(H/s) x round(W/s)."""
    if float(scale).is_integer():
        return imresize(modcrop(hr, int(scale)), scale=1 / scale)
    size = (max(1, round(hr.shape[0] / scale)), max(1, round(hr.shape[1] / scale)))
    return imresize(hr, size=size)


async def run_bench(
    settings: Settings,
    hr_dirs: Sequence[Path],
    scales: Sequence[float],
    *,
    progress: bool = True,
) -> BenchResult:
    """Time `Engine.upscale` on every image of every folder at every scale.

    The first image of each (scale, data set) is run once untimed before the timed
    pass, so one-time costs (allocator growth, oneDNN/cuDNN kernel selection) stay out
    of the averages, as the paper's timings keep them out.
    """
    if not hr_dirs or not scales:
        raise ValueError("give at least one HR folder and one scale")
    if any(not s > 1 for s in scales):
        raise ValueError(f"scales must be above 1, got {list(scales)}")
    names = [dataset_name(d) for d in hr_dirs]
    if len(set(names)) != len(names):
        raise ValueError(f"two folders have the same data set name: {names}")
    files = {name: list_images(d) for name, d in zip(names, hr_dirs, strict=True)}

    engine = Engine(settings, Metrics())
    await engine.start()
    try:
        machine = describe(engine.device, engine.precision)
        facts, cells = [], []
        for scale in scales:
            facts.append(ModelFacts(engine.models[engine.model_name(scale)].descriptor, scale))
            for name in names:
                cells.append(await _bench_cell(engine, name, files[name], scale, progress))
    finally:
        await engine.stop()
    return BenchResult(machine, facts, cells)


async def _bench_cell(
    engine: Engine,
    dataset: str,
    files: list[Path],
    scale: float,
    progress: bool,
) -> BenchCell:
    seconds: list[float] = []
    peaks: list[int] = []
    engine.batch_shapes.clear()
    bar = tqdm(files, desc=f"{dataset} ×{scale:g}", unit="img", disable=not progress, leave=False)
    for i, path in enumerate(bar):
        lr = lr_from_hr(read_rgb(path), scale).astype(np.float32) / 255
        if i == 0:
            await engine.upscale(lr, scale)  # untimed warm-up on a real shape
        reset_peak_memory(engine.device)
        started = time.perf_counter()
        result = await engine.upscale(lr, scale)
        seconds.append(time.perf_counter() - started)
        peaks.append(result.peak_memory_bytes)  # its largest batch's
    return BenchCell(
        dataset=dataset,
        model=engine.model_name(scale),
        scale=scale,
        images=len(seconds),
        seconds_per_image=float(np.mean(seconds)),
        peak_memory_mb=max(peaks) / 2**20,
        batch_shapes=sorted([h, w] for shapes in engine.batch_shapes.values() for h, w in shapes),
    )
