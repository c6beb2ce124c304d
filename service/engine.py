"""The inference engine: warm models on one device, crops batched across requests.

A request's image is planned into equal-shape crops (whole image, the paper's
ACS, or a tile grid within the pixel budget), the crops go into a bounded
queue keyed by (model, crop shape), and one scheduler forms batches from that
queue and runs them, one at a time, on a single device thread: the only code
that touches the device. Crops of one request always travel in one batch when
they fit in one. FastAPI is not imported here: `imdn upscale` uses the same
engine without HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from models import acs
from models.backend import Forward, prepare, resolve_backend
from models.checkpoints import REGISTRY, fetch, load_model, load_official
from models.device import resolve_device
from models.imdn import IMDN
from models.profile import conv_depth
from models.quality import imresize_tensor
from service.imaging import output_size
from service.metrics import Metrics, peak_memory_bytes, reset_peak_memory
from service.settings import Settings

log = logging.getLogger(__name__)

FIXED_SCALES = {2: "x2", 3: "x3", 4: "x4"}
ACS_PADDING = 32  # the authors' p for the paper's four-crop ACS


class EngineError(Exception):
    """Base of the errors a request can get from the engine; `status` is the HTTP one."""

    status = 500
    reason = "engine_error"


class ScaleNotServed(EngineError):
    status = 422
    reason = "model_not_loaded"


class QueueFull(EngineError):
    status = 429
    reason = "queue_full"

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(EngineError):
    status = 504
    reason = "deadline_exceeded"


class DeviceOutOfMemory(EngineError):
    """The device, or the configured memory budget, cannot hold a batch: retried smaller
    inside the engine, and a 503 only when even the smallest tile does not fit."""

    status = 503
    reason = "device_out_of_memory"


class NotReady(EngineError):
    status = 503
    reason = "not_ready"


@dataclass
class LoadedModel:
    """A warm network on the device, with the facts the reports need."""

    name: str
    network: IMDN
    scale: int
    size_multiple: int
    parameters: int
    depth: int
    dtype: torch.dtype
    backend: str  # models.backend: how `forward` runs `network`
    forward: Forward
    load_seconds: float = 0.0
    warmup_seconds: float = 0.0


@dataclass
class UpscaleResult:
    image: np.ndarray  # H' x W' x 3 float32 in [0, 1]
    model: str
    crops: int
    queue_seconds: float
    compute_seconds: float
    peak_memory_bytes: int  # the largest batch peak among this request's batches


class _Done(NamedTuple):
    """What a group's future resolves to (its outputs are already pasted)."""

    queue_seconds: float
    compute_seconds: float
    peak_memory_bytes: int


@dataclass(eq=False)
class _Group:
    """Crops of one request with one shape: they always share a batch."""

    model: str
    crops: torch.Tensor  # (n, 3, h, w), float32, on the CPU
    deadline: float
    future: asyncio.Future[_Done]
    paste: Callable[[torch.Tensor], None]  # writes the outputs into the request's image
    enqueued: float = field(default_factory=time.perf_counter)

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.model, self.crops.shape[-2], self.crops.shape[-1])


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    if dtype == torch.float16 and device.type == "cpu":
        raise ValueError("fp16 is not supported on the CPU; use fp32 or bf16")
    return dtype


def model_for_scale(scale: float) -> str:
    """The paper's fixed-scale network for 2, 3 and 4; IMDN_AS for any other scale."""
    return FIXED_SCALES.get(int(scale), "AS") if float(scale).is_integer() else "AS"


class Engine:
    """Owns the device: loads the models, plans requests into crops, batches them."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.device = resolve_device(settings.device)
        self.dtype = resolve_dtype(settings.precision, self.device)
        self.models: dict[str, LoadedModel] = {}
        self.ready = False
        self._pending: dict[tuple[str, int, int], deque[_Group]] = {}
        self._queued_crops = 0
        self._arrived = asyncio.Event()
        self._scheduler: asyncio.Task[None] | None = None
        self._device_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="imdn-device")
        self._recent_batch_seconds: deque[float] = deque(maxlen=32)
        self._busy_since: float | None = None

    # Life cycle

    async def start(self) -> None:
        """Load every configured model, warm it up, then start serving."""
        loop = asyncio.get_running_loop()
        if self.settings.torch_threads and self.device.type == "cpu":
            # in the device thread, which runs every forward (it also becomes the default
            # of threads started later: torch's thread count is process-wide state)
            await loop.run_in_executor(
                self._device_thread, torch.set_num_threads, self.settings.torch_threads
            )
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        for name in self.settings.models:
            self.models[name] = await loop.run_in_executor(self._device_thread, self._load, name)
            m = self.models[name]
            self.metrics.model_loaded(name, m.load_seconds, m.warmup_seconds)
            log.info(
                "model %s (backend %s) loaded in %.2fs, warm in %.2fs",
                name,
                m.backend,
                m.load_seconds,
                m.warmup_seconds,
            )
        self._scheduler = asyncio.create_task(self._schedule(), name="imdn-scheduler")
        self.ready = True
        self.metrics.set_ready(True)

    def drain(self) -> None:
        """Stop admitting requests (readiness turns 503); queued work still finishes."""
        self.ready = False
        self.metrics.set_ready(False)

    async def stop(self) -> None:
        """Stop taking work, fail what is queued, and release the device thread."""
        self.ready = False
        self.metrics.set_ready(False)
        if self._scheduler is not None:
            self._scheduler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._scheduler
        for queue in self._pending.values():
            for group in queue:
                if not group.future.done():
                    group.future.set_exception(NotReady("the service is shutting down"))
        self._pending.clear()
        self._device_thread.shutdown(wait=True)

    def _load(self, name: str) -> LoadedModel:
        started = time.perf_counter()
        spec = REGISTRY[name]
        if name in self.settings.checkpoints:  # the user's own file, e.g. from `imdn train`
            network = load_model(self.settings.checkpoints[name], expect=spec, verify_sha256=False)
        else:
            if self.settings.fetch_weights:
                fetch(spec, self.settings.weights_dir, base_url=self.settings.weights_url)
            network = load_official(name, Path(self.settings.weights_dir))
        depth = conv_depth(network)
        network = network.to(self.device, dtype=self.dtype).eval()
        backend = resolve_backend(self.settings.backend, self.device)
        loaded = LoadedModel(
            name=name,
            network=network,
            scale=network.scale,
            size_multiple=network.size_multiple,
            parameters=sum(p.numel() for p in network.parameters()),
            depth=depth,
            dtype=self.dtype,
            backend=backend,
            forward=prepare(network, backend, self.device, self.dtype),
            load_seconds=time.perf_counter() - started,
        )
        if self.settings.warmup:
            started = time.perf_counter()
            side = min(64, math.isqrt(self.settings.tile_max_pixels)) // 4 * 4
            for batch in (1, 4):
                self._run_batch(loaded, torch.rand(batch, 3, side, side), record=False)
            loaded.warmup_seconds = time.perf_counter() - started
        return loaded

    def device_busy_since(self) -> float | None:
        """`time.monotonic()` when the device call now running started; None when the
        device thread is idle. Liveness compares it with a timeout: a busy device keeps
        finishing calls (and renewing this), a wedged one does not."""
        return self._busy_since

    # Requests

    def model_name(self, scale: float) -> str:
        name = model_for_scale(scale)
        if name not in self.models:
            raise ScaleNotServed(
                f"scale {scale:g} needs model {name!r}, which this server does not load "
                f"(loaded: {', '.join(self.models) or 'none'})"
            )
        return name

    def plan(self, model: LoadedModel, height: int, width: int) -> acs.CropPlan:
        """Whole image when it fits the budget and the size rule; the paper's ACS for
        an unaligned image that fits; a tile grid for anything larger."""
        m = model.size_multiple
        # the budget counts pixels at the network's inner resolution: IMDN_AS works at a
        # quarter of each side, so its crops may be 16× larger for the same memory
        budget = self.settings.tile_max_pixels * m * m
        if height * width <= budget:
            if height % m == 0 and width % m == 0:
                return acs.whole_plan(height, width)
            return acs.acs_plan(height, width, padding=ACS_PADDING, multiple=m)
        return acs.grid_plan(
            height, width, max_crop_pixels=budget, padding=self.settings.tile_padding, multiple=m
        )

    async def upscale(
        self, rgb: np.ndarray, scale: float, *, deadline: float | None = None
    ) -> UpscaleResult:
        """Super-resolve an H×W×3 float32 image in [0, 1] by `scale`."""
        if self._scheduler is None or self._scheduler.done():  # not drain: in-flight work ends
            raise NotReady("the models are not loaded, or the server has stopped")
        name = self.model_name(scale)
        model = self.models[name]
        if deadline is None:
            deadline = time.perf_counter() + self.settings.request_timeout_s
        x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).unsqueeze(0)
        target = output_size(x.shape[-2], x.shape[-1], scale)
        if model.scale == 1:  # IMDN_AS restores a bicubic-upscaled image of the target size
            x = await asyncio.to_thread(_bicubic, x, target)
        h, w = x.shape[-2:]
        x = acs.pad_to_multiple(x, model.size_multiple)[0] if min(h, w) < model.size_multiple else x
        plan = self.plan(model, *x.shape[-2:])
        crops = acs.extract(x, plan)
        s = model.scale
        canvas = torch.empty(1, 3, plan.height * s, plan.width * s)

        def paster(first: int) -> Callable[[torch.Tensor], None]:
            def paste(outputs: torch.Tensor) -> None:
                for j in range(outputs.shape[0]):
                    acs.paste(canvas, outputs[j : j + 1], plan, first + j, scale=s)

            return paste

        groups = self._enqueue(name, crops, deadline, paster)
        try:
            results = await asyncio.wait_for(
                asyncio.gather(*(g.future for g in groups)),
                timeout=max(0.0, deadline - time.perf_counter()),
            )
        except TimeoutError:
            raise DeadlineExceeded(
                f"the request did not finish within {self.settings.request_timeout_s:g}s"
            ) from None
        finally:
            self._drop(groups)
        out = canvas[0, :, : h * s, : w * s]
        return UpscaleResult(
            image=out.permute(1, 2, 0).numpy(),
            model=name,
            crops=len(plan.crops),
            queue_seconds=max(r.queue_seconds for r in results),
            compute_seconds=sum(r.compute_seconds for r in results),
            peak_memory_bytes=max(r.peak_memory_bytes for r in results),
        )

    def _enqueue(
        self,
        model: str,
        crops: torch.Tensor,
        deadline: float,
        paster: Callable[[int], Callable[[torch.Tensor], None]],
    ) -> list[_Group]:
        """Queue a request's crops in groups of at most a batch; `paster(i)` pastes the
        outputs of the group starting at crop i."""
        n = crops.shape[0]
        limit = self.settings.max_queue_crops
        if self._queued_crops + n > limit and self._queued_crops > 0:
            raise QueueFull(
                f"the queue holds {self._queued_crops} crops (limit {limit}); retry shortly",
                retry_after_s=self._retry_after(),
            )
        loop = asyncio.get_running_loop()
        step = self.settings.max_batch_size
        groups = [
            _Group(model, crops[i : i + step], deadline, loop.create_future(), paster(i))
            for i in range(0, n, step)
        ]
        for g in groups:
            self._pending.setdefault(g.key, deque()).append(g)
        self._queued_crops += n
        self.metrics.set_queue_depth(self._queued_crops)
        self._arrived.set()
        return groups

    def _drop(self, groups: Iterable[_Group]) -> None:
        """Forget groups of a request that ended (done, timed out or cancelled)."""
        for g in groups:
            queue = self._pending.get(g.key)
            if queue is not None and g in queue:
                queue.remove(g)
                self._queued_crops -= g.crops.shape[0]
            if not g.future.done():
                g.future.cancel()
        self.metrics.set_queue_depth(self._queued_crops)

    def _retry_after(self) -> float:
        per_batch = (
            sum(self._recent_batch_seconds) / len(self._recent_batch_seconds)
            if self._recent_batch_seconds
            else 1.0
        )
        batches = self._queued_crops / self.settings.max_batch_size
        return max(1.0, math.ceil(per_batch * batches))

    # The scheduler: one batch at a time on the device thread

    async def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        max_wait = self.settings.max_batch_wait_ms / 1000
        while True:
            key = self._oldest_key()
            if key is None:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            queue = self._pending[key]
            waited = time.perf_counter() - queue[0].enqueued
            queued = sum(g.crops.shape[0] for g in queue)
            if queued < self.settings.max_batch_size and waited < max_wait:
                self._arrived.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._arrived.wait(), max_wait - waited)
                continue
            batch = self._take_batch(key)
            if not batch:
                continue
            model = self.models[key[0]]
            crops = torch.cat([g.crops for g in batch])
            started = time.perf_counter()
            try:
                outputs, compute, peak = await loop.run_in_executor(
                    self._device_thread, self._run_batch, model, crops
                )
            except Exception as exc:  # a failed batch fails its requests, not the scheduler
                log.exception("batch of %d crops for %s failed", crops.shape[0], model.name)
                for g in batch:
                    if not g.future.done():
                        g.future.set_exception(exc)
                continue
            self._recent_batch_seconds.append(compute)
            offset = 0
            for g in batch:
                n = g.crops.shape[0]
                if not g.future.done():
                    wait = started - g.enqueued
                    g.paste(outputs[offset : offset + n])  # stitched now: no copy kept
                    g.future.set_result(_Done(wait, compute, peak))
                offset += n

    def _oldest_key(self) -> tuple[str, int, int] | None:
        live = [(q[0].enqueued, k) for k, q in self._pending.items() if q]
        return min(live)[1] if live else None

    def _take_batch(self, key: tuple[str, int, int]) -> list[_Group]:
        """Whole groups, oldest first, up to the batch size; expired ones are failed."""
        queue = self._pending[key]
        batch: list[_Group] = []
        size = 0
        now = time.perf_counter()
        while queue and size + queue[0].crops.shape[0] <= self.settings.max_batch_size:
            g = queue.popleft()
            self._queued_crops -= g.crops.shape[0]
            if g.future.done():
                continue
            if now > g.deadline:
                g.future.set_exception(DeadlineExceeded("the request expired in the queue"))
                continue
            self.metrics.observe_queue_wait(g.model, now - g.enqueued)
            batch.append(g)
            size += g.crops.shape[0]
        if not queue:
            del self._pending[key]
        self.metrics.set_queue_depth(self._queued_crops)
        return batch

    def _run_batch(
        self, model: LoadedModel, crops: torch.Tensor, *, record: bool = True
    ) -> tuple[torch.Tensor, float, int]:
        """Run one batch on the device (device thread only): outputs on the CPU, seconds,
        and the batch's peak memory. Warm-up passes are not recorded in the metrics."""
        self._busy_since = time.monotonic()
        try:
            reset_peak_memory(self.device)
            started = time.perf_counter()
            y = self._forward_splitting(model, crops)
            seconds = time.perf_counter() - started
        finally:
            self._busy_since = None
        peak = peak_memory_bytes(self.device)
        if record:
            self.metrics.observe_batch(model.name, crops.shape[0], seconds, peak, self.device.type)
        return y, seconds, peak

    def _forward_splitting(self, model: LoadedModel, crops: torch.Tensor) -> torch.Tensor:
        """Forward a batch; when the device runs out of memory, retry smaller.

        A batch is split in halves; a single crop that still does not fit is cut
        into a grid of smaller overlapping crops (the ACS generalisation) and
        stitched back, so the client still gets its full image.
        """
        try:
            return self._forward(model, crops)
        except DeviceOutOfMemory:
            n, _, h, w = crops.shape
            self.metrics.count_error("device_oom_retry")
            if n > 1:
                log.warning("out of memory on a batch of %d %dx%d crops: halving", n, h, w)
                return torch.cat(
                    [
                        self._forward_splitting(model, crops[: n // 2]),
                        self._forward_splitting(model, crops[n // 2 :]),
                    ]
                )
            smallest = (2 * self.settings.tile_padding + 4 * model.size_multiple) ** 2
            if h * w // 2 < smallest:
                raise
            log.warning("out of memory on one %dx%d crop: tiling it", h, w)
            plan = acs.grid_plan(
                h,
                w,
                max_crop_pixels=h * w // 2,
                padding=self.settings.tile_padding,
                multiple=model.size_multiple,
            )
            pieces = acs.extract(crops, plan)
            outputs = torch.cat(
                [self._forward_splitting(model, pieces[i : i + 1]) for i in range(len(pieces))]
            )
            return acs.stitch(outputs, plan, scale=model.scale)

    def _forward(self, model: LoadedModel, crops: torch.Tensor) -> torch.Tensor:
        budget = self.settings.device_memory_budget_bytes
        if budget and activation_bytes(model, crops.shape) > budget:
            raise DeviceOutOfMemory(
                f"a batch of {tuple(crops.shape)} needs ~{activation_bytes(model, crops.shape)} "
                f"bytes; the budget is {budget}"
            )
        try:
            with torch.inference_mode():
                x = crops.to(self.device, dtype=model.dtype, non_blocking=True)
                y: torch.Tensor = model.forward(x)
                return y.clamp_(0, 1).to("cpu", dtype=torch.float32)
        except torch.OutOfMemoryError as exc:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            raise DeviceOutOfMemory(str(exc)) from exc


def activation_bytes(model: LoadedModel, shape: torch.Size | tuple[int, ...]) -> int:
    """A rough peak of a forward's activations: the six block outputs concatenated
    (384 channels) and a block's working set (~256) at the network's inner
    resolution (a quarter of each side for IMDN_AS), plus the output."""
    n, _, h, w = shape
    inner = (h // model.size_multiple) * (w // model.size_multiple)
    out = 3 * h * w * model.scale**2
    itemsize = torch.finfo(model.dtype).bits // 8
    return n * (640 * inner + 2 * out) * itemsize


def _bicubic(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return imresize_tensor(x, size=size).clamp_(0, 1)
