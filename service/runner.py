"""The device runner: the only code that touches the device.

It loads each network once onto the device (one copy: the backend runs that very
module), warms every (shape, batch size) the planner will send when shape buckets are
on (so cuDNN's autotuning and `torch.compile` happen before `/readyz`, never on a
request), runs batches on its one device thread, and splits a batch that runs out of
memory (halves, then a grid of smaller tiles for a single crop). Outputs stay on the
device: each crop's output is clamped, quantised and pasted into its request's integer
canvas by the request's `paste`, in the device thread.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import cast

import torch
import torch.nn.functional as F

from models.networks.checkpoints import REGISTRY, fetch, load_model
from models.networks.descriptor import ModelDescriptor
from models.runtime import acs
from models.runtime.backend import Forward, MaskedForward, prepare, prepare_masked, resolve_backend
from models.runtime.device import precision_dtype, resolve_device
from models.runtime.graphs import GraphedForward
from service.batcher import BatchOutcome, Key, Slice
from service.errors import DeviceOutOfMemory
from service.metrics import Metrics, peak_memory_bytes, reset_peak_memory
from service.planner import Planner, padded_batch
from service.settings import ModelName, Settings

log = logging.getLogger(__name__)

MEGACACHE_FILE = "imdn-megacache.bin"


@dataclass
class LoadedModel:
    """A warm network on the device: its descriptor (with this dtype and device) and the
    forwards that run it."""

    descriptor: ModelDescriptor
    backend: str  # models.runtime.backend: how `forward` runs the network
    forward: Forward  # the backend's forward of the one copy on the device (no buckets)
    masked: MaskedForward | None  # with buckets: the backend's forward of padded crops
    masked_eager: MaskedForward | None  # the same, uncompiled: for shapes not warmed
    warm_shapes: set[tuple[int, ...]] = field(default_factory=set)
    load_seconds: float = 0.0
    warmup_seconds: float = 0.0


@dataclass(eq=False)
class Job:
    """A request's crops on the device (a ticket's payload)."""

    crops: torch.Tensor  # (n, 3, H, W) float32 in [0, 1], padded to the plan's shape
    valid: torch.Tensor  # (n, 2) int64: each crop's real (h, w) inside its padded shape
    paste: Callable[[int, torch.Tensor], None]  # (first crop, clamped outputs) into the canvas


def activation_bytes(model: LoadedModel, shape: torch.Size | tuple[int, ...]) -> int:
    """A rough peak of a forward's activations: the six block outputs concatenated
    (384 channels) and a block's working set (~256) at the network's inner
    resolution (a quarter of each side for IMDN_AS), plus the output."""
    d = model.descriptor
    n, _, h, w = shape
    inner = (h // d.size_multiple) * (w // d.size_multiple)
    out = 3 * h * w * d.scale**2
    itemsize = torch.finfo(d.dtype or torch.float32).bits // 8
    return n * (640 * inner + 2 * out) * itemsize


class DeviceRunner:
    """Owns the device and its thread: load, warm, forward, split on OOM."""

    def __init__(self, settings: Settings, planner: Planner, metrics: Metrics) -> None:
        self.settings = settings
        self.planner = planner
        self.metrics = metrics
        self.device = resolve_device(settings.device)
        self.dtype = precision_dtype(settings.precision, self.device, prefer_bf16=False)
        self.models: dict[str, LoadedModel] = {}
        self.shapes_run: dict[str, set[tuple[int, int]]] = {}  # crop shapes per model
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="imdn-device")
        self._busy_since: float | None = None
        self.warm_timings: dict[str, list[tuple[int, int, int, float]]] = {}

    # Life cycle (on the device thread)

    async def call(self, fn: Callable[..., object], *args: object) -> object:
        """Run `fn(*args)` on the device thread."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def configure(self) -> None:
        """Process-wide torch state for serving: threads, cuDNN tuning, compile caches."""
        if self.settings.torch_threads and self.device.type == "cpu":
            # in the device thread, which runs every forward (it also becomes the default
            # of threads started later: torch's thread count is process-wide state)
            torch.set_num_threads(self.settings.torch_threads)
        if self.device.type == "cuda":
            # tuning per shape pays only when the shapes are few and warmed before traffic;
            # without buckets every new image size would be tuned on a request (~180 ms)
            torch.backends.cudnn.benchmark = self.planner.buckets
        if self.settings.backend == "compile":
            self._load_compile_cache()

    def shutdown(self) -> None:
        self._thread.shutdown(wait=True)

    def load(self, name: ModelName) -> LoadedModel:
        started = time.perf_counter()
        spec = REGISTRY[name]
        own = name in self.settings.checkpoints  # the user's own file, e.g. from `imdn train`
        if self.settings.fetch_weights and not own:
            fetch(spec, self.settings.weights_dir, base_url=self.settings.weights_url)
        network = load_model(
            self.settings.checkpoint_path(name), expect=spec, verify_sha256=not own
        )
        # the file fits the registry's model exactly (architecture, scale, every shape)
        descriptor = spec.model.loaded(dtype=self.dtype, device=self.device)
        backend = resolve_backend(self.settings.backend, self.device)
        # one copy on the device: every forward below runs `network` itself, moved and
        # converted in place (exported backends keep their own runtime copy instead)
        plain = "channels_last" if self.device.type == "cuda" and backend == "compile" else "eager"
        masked = masked_eager = None
        if self.planner.buckets:
            masked = prepare_masked(
                network, backend, self.device, self.dtype, compile_mode=self.settings.compile_mode
            )
            masked_eager = (
                prepare_masked(network, plain, self.device, self.dtype)
                if backend == "compile"
                else masked
            )
            if self.settings.graphs_on(self.device):  # warm-up captures each shape
                masked = GraphedForward(masked, self.device)
            forward = prepare(network, plain, self.device, self.dtype, in_place=True)
        else:
            forward = prepare(
                network,
                backend,
                self.device,
                self.dtype,
                in_place=True,
                compile_mode=self.settings.compile_mode,
            )
        del network
        loaded = LoadedModel(
            descriptor=descriptor,
            backend=backend,
            forward=forward,
            masked=masked,
            masked_eager=masked_eager,
            load_seconds=time.perf_counter() - started,
        )
        if self.settings.warmup:
            started = time.perf_counter()
            self._warm(loaded)
            loaded.warmup_seconds = time.perf_counter() - started
        self.models[name] = loaded
        return loaded

    def warm_batches(self, model: LoadedModel) -> list[tuple[int, int, int]]:
        """(batch, h, w) the warm-up runs: with buckets, every shape at every padded batch
        size; without, a small square at batch 1 and 4 (first-call costs only)."""
        multiple = model.descriptor.size_multiple
        shapes = self.planner.shapes(multiple)
        if shapes:
            frames = self.planner.frame_shapes(multiple)
            return [
                (b, h, w)
                for h, w in shapes
                for b in ((1,) if (h, w) in frames else self.planner.batch_sizes)
            ]
        side = min(64, math.isqrt(self.settings.tile_max_pixels)) // 4 * 4
        return [(1, side, side), (4, side, side)]

    def _warm(self, model: LoadedModel) -> list[tuple[int, int, int, float]]:
        """Run each warm-up batch twice (the first may tune or compile): the second
        pass's time is the measured throughput. Returns (batch, h, w, seconds)."""
        timings = []
        if model.backend == "compile":
            # one compiled code object serves every model: count all their graphs
            _allow_recompiles(len(self.warm_batches(model)) * len(self.settings.models))
        for batch, h, w in self.warm_batches(model):
            shape = (batch, 3, h, w)
            valid = torch.tensor([[h, w]] * batch, device=self.device)
            first = time.perf_counter()
            try:
                self._forward(model, torch.rand(shape, device=self.device), valid, warm=True)
            except DeviceOutOfMemory:  # requests will split such a batch: nothing to warm
                log.warning("warm-up: a batch of %s does not fit the device; skipped", shape)
                continue
            if isinstance(model.masked, GraphedForward):
                with torch.inference_mode():
                    crops = torch.rand(shape, device=self.device, dtype=model.descriptor.dtype)
                    model.masked.capture(crops, valid)
            model.warm_shapes.add(shape)
            prepared = time.perf_counter() - first
            started = time.perf_counter()
            self._forward(model, torch.rand(shape, device=self.device), valid)
            self._synchronise()
            seconds = time.perf_counter() - started
            timings.append((batch, h, w, seconds))
            if model.backend == "compile":
                log.info("compiled %s for %s in %.1fs", model.descriptor.name, shape, prepared)
        if model.backend == "compile":
            self._save_compile_cache()
        self.warm_timings[model.descriptor.name] = timings
        return timings

    # Batches (on the device thread)

    def busy_since(self) -> float | None:
        """time.monotonic() at which the device call in flight started; None when idle."""
        return self._busy_since

    def run_batch(self, key: Key, slices: list[Slice]) -> BatchOutcome:
        """Concatenate the slices' crops, pad the batch to a warmed size, forward, and
        hand each request its outputs (clamped, on the device)."""
        self._busy_since = time.monotonic()
        try:
            model = self.models[key[0]]
            jobs = [cast(Job, s.ticket.payload) for s in slices]
            x = torch.cat([j.crops[s.start : s.stop] for j, s in zip(jobs, slices, strict=True)])
            valid = torch.cat(
                [j.valid[s.start : s.stop] for j, s in zip(jobs, slices, strict=True)]
            )
            n = x.shape[0]
            frame = (x.shape[-2], x.shape[-1]) in self.planner.frame_shapes(
                model.descriptor.size_multiple
            )
            if self.planner.batch_sizes and not frame:
                size = padded_batch(n, self.planner.batch_sizes)
                if size > n:  # padding crops count as wholly valid: no empty statistics
                    x = torch.cat([x, x.new_zeros((size - n, *x.shape[1:]))])
                    valid = torch.cat([valid, valid[:1].expand(size - n, 2)])
            self.shapes_run.setdefault(model.descriptor.name, set()).add((x.shape[-2], x.shape[-1]))
            reset_peak_memory(self.device)
            started = time.perf_counter()
            if frame:  # a frame fills the device: one at a time, the batch size warmed
                y = torch.cat(
                    [
                        self._forward_splitting(model, x[i : i + 1], valid[i : i + 1])
                        for i in range(n)
                    ]
                )
            else:
                y = self._forward_splitting(model, x, valid)[:n]
            offset = 0
            for job, s in zip(jobs, slices, strict=True):
                count = s.stop - s.start
                job.paste(s.start, y[offset : offset + count])
                offset += count
            self._synchronise()
            seconds = time.perf_counter() - started
            peak = peak_memory_bytes(self.device)
            self.metrics.observe_batch(model.descriptor.name, n, seconds, peak, self.device.type)
            return BatchOutcome(seconds, peak)
        finally:
            self._busy_since = None

    def _synchronise(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _forward_splitting(
        self, model: LoadedModel, crops: torch.Tensor, valid: torch.Tensor
    ) -> torch.Tensor:
        """Forward a batch; when the device runs out of memory, retry smaller.

        A batch is split in halves; a single crop that still does not fit is cut
        into a grid of smaller overlapping crops of its valid region (the ACS
        generalisation) and stitched back, so the client still gets its full image.
        """
        try:
            return self._forward(model, crops, valid)
        except DeviceOutOfMemory:
            n, _, h, w = crops.shape
            self.metrics.count_error("device_oom_retry")
            if n > 1:
                log.warning("out of memory on a batch of %d %dx%d crops: halving", n, h, w)
                half = n // 2
                return torch.cat(
                    [
                        self._forward_splitting(model, crops[:half], valid[:half]),
                        self._forward_splitting(model, crops[half:], valid[half:]),
                    ]
                )
            vh, vw = (int(v) for v in valid[0])
            smallest = (2 * self.settings.tile_padding + 4 * model.descriptor.size_multiple) ** 2
            if vh * vw // 2 < smallest:
                raise
            log.warning("out of memory on one %dx%d crop: tiling it", vh, vw)
            plan = acs.grid_plan(
                vh,
                vw,
                max_crop_pixels=vh * vw // 2,
                padding=self.settings.tile_padding,
                multiple=model.descriptor.size_multiple,
            )
            pieces = acs.extract(crops[:, :, :vh, :vw], plan)
            full = torch.tensor([[plan.crop_h, plan.crop_w]], device=crops.device)
            outputs = torch.cat(
                [
                    self._forward_splitting(model, pieces[i : i + 1], full)
                    for i in range(len(pieces))
                ]
            )
            s = model.descriptor.scale
            stitched = acs.stitch(outputs, plan, scale=s)
            return F.pad(stitched, (0, (w - vw) * s, 0, (h - vh) * s))

    def _forward(
        self, model: LoadedModel, crops: torch.Tensor, valid: torch.Tensor, *, warm: bool = False
    ) -> torch.Tensor:
        """The network's clamped output in its dtype, on the device: with buckets the
        masked forward (the backend's for warmed shapes or while warming, else the same
        module eager), without them the backend's plain forward."""
        budget = self.settings.device_memory_budget_bytes
        if budget and activation_bytes(model, crops.shape) > budget:
            raise DeviceOutOfMemory(
                f"a batch of {tuple(crops.shape)} needs ~{activation_bytes(model, crops.shape)} "
                f"bytes; the budget is {budget}"
            )
        x = crops.to(self.device, dtype=model.descriptor.dtype)
        try:
            with torch.inference_mode():
                if model.masked is None or model.masked_eager is None:
                    y: torch.Tensor = model.forward(x)
                elif warm or tuple(crops.shape) in model.warm_shapes:
                    y = model.masked(x, valid)
                else:
                    y = model.masked_eager(x, valid)
                return y.clamp_(0, 1)
        except torch.OutOfMemoryError as exc:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            raise DeviceOutOfMemory(str(exc)) from exc

    # torch.compile's caches

    def _load_compile_cache(self) -> None:
        """Point inductor's on-disk cache at the configured folder and load the Mega-Cache
        saved by an earlier run, so a restart skips compiling the same shapes."""
        folder = self.settings.compile_cache_dir
        if folder is None:
            return
        folder.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(folder / "inductor"))
        saved = folder / MEGACACHE_FILE
        if saved.is_file():
            started = time.perf_counter()
            torch.compiler.load_cache_artifacts(saved.read_bytes())
            log.info("loaded compile cache %s in %.1fs", saved, time.perf_counter() - started)

    def _save_compile_cache(self) -> None:
        folder = self.settings.compile_cache_dir
        if folder is None:
            return
        saved = torch.compiler.save_cache_artifacts()
        if saved is not None:
            artifacts, _ = saved
            (folder / MEGACACHE_FILE).write_bytes(artifacts)
            log.info("saved compile cache %s (%d bytes)", folder / MEGACACHE_FILE, len(artifacts))


def _allow_recompiles(graphs: int) -> None:
    """Let dynamo keep one graph per warmed (shape, batch size) of a module (its default
    limit, 8, would send later shapes back to eager silently)."""
    import torch._dynamo

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(int(getattr(config, name)), graphs + 8))
