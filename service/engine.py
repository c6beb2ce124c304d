"""The inference engine: the facade the HTTP API and `imdn upscale` use.

It joins three parts, each testable on its own: the planner (`service.planner`: which
model, whole image / ACS / tiles, shape buckets), the batcher (`service.batcher`:
admission by cost, deadlines, fair batches across requests; pure asyncio) and the
device runner (`service.runner`: load, warm, forward, split on OOM; the only code that
touches the device). A request's pixels go to the device as integers, are normalised,
planned and cut into crops there; each batch's outputs are quantised there and pasted
into each request's integer canvas (a request of one crop keeps its slice of the batch
instead), which comes back to the host at the end. FastAPI is not imported here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F

from models.quality.matlab import imresize_tensor
from models.runtime import acs
from models.runtime.acs import CropPlan
from models.runtime.device import side_stream
from service import pixels
from service.batcher import Batcher, BatchOutcome, Key, Reservation, Slice, Ticket
from service.errors import (
    DeadlineExceeded,
    DeviceOutOfMemory,
    EngineError,
    NotReady,
    QueueFull,
    ScaleNotServed,
    TooCostly,
)
from service.imaging import output_size
from service.metrics import Metrics
from service.planner import FIXED_SCALES, Plan, Planner, check_served, model_for_scale
from service.runner import DeviceRunner, Job, LoadedModel, activation_bytes
from service.settings import Settings

__all__ = [
    "FIXED_SCALES",
    "DeadlineExceeded",
    "DeviceOutOfMemory",
    "Engine",
    "EngineError",
    "LoadedModel",
    "NotReady",
    "QueueFull",
    "ScaleNotServed",
    "TooCostly",
    "UpscaleResult",
    "activation_bytes",
    "model_for_scale",
]

log = logging.getLogger(__name__)


@dataclass
class UpscaleResult:
    image: np.ndarray
    """H'xW'xC quantised pixels: uint8, or uint16 for a uint16 input; C = 1 when asked
    for grey (the luma of the network's three planes), else 3. `imaging.compose` takes it."""
    model: str
    crops: int
    queue_seconds: float
    compute_seconds: float
    peak_memory_bytes: int  # the largest batch peak among this request's batches
    # the pixels to the device, normalised and cut into crops; the output back to the host
    # (each with its wait for a worker thread): between them and the batches, a request's
    # time on the engine is accounted for
    prepare_seconds: float = 0.0
    readback_seconds: float = 0.0


@dataclass(eq=False)
class Canvas:
    """A request's quantised output on the device, filled by its batches. A plan of one
    crop keeps that crop's slice of its batch's output as it is (the device thread then
    makes no call for it); a plan of several pastes each crop's keep region into
    `pixels`, allocated with the request's crops, as the crop's batch finishes."""

    plan: CropPlan
    scale: int
    # (1, C, H·s, W·s) once complete; larger for a one-crop slice padded into its bucket
    pixels: torch.Tensor | None = None

    def paste(self, first: int, quantised: torch.Tensor) -> None:
        if self.plan.is_whole:
            self.pixels = quantised
            return
        assert self.pixels is not None, "a plan of several crops needs its canvas"
        for j in range(quantised.shape[0]):
            acs.paste(self.pixels, quantised[j : j + 1], self.plan, first + j, scale=self.scale)


class Engine:
    """Owns the device through its runner; plans requests and batches their crops."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.runner = DeviceRunner(settings, self._planner(settings), self.metrics)
        self.planner = self.runner.planner
        self.device = self.runner.device
        self.dtype = self.runner.dtype
        self.precision = self.runner.precision
        self.ready = False
        self._batcher: Batcher | None = None

    @staticmethod
    def _planner(settings: Settings) -> Planner:
        from models.runtime.device import resolve_device

        return Planner(
            tile_max_pixels=settings.tile_max_pixels,
            tile_padding=settings.tile_padding,
            buckets=settings.buckets_on(resolve_device(settings.device)),
            max_batch=settings.max_batch_size,
            frames=tuple(settings.frame_buckets),
        )

    @property
    def models(self) -> dict[str, LoadedModel]:
        return self.runner.models

    @property
    def batch_shapes(self) -> dict[str, set[tuple[int, int]]]:
        """The distinct crop shapes (h, w) the device ran per model since start."""
        return self.runner.shapes_run

    def device_busy_since(self) -> float | None:
        """time.monotonic() at which the device call in flight started; None when idle."""
        return self.runner.busy_since()

    # Life cycle

    async def start(self) -> None:
        """Load every configured model, warm it up, then start serving."""
        batcher = Batcher(
            self._run,
            max_batch=self.settings.max_batch_size,
            max_wait_s=self.settings.max_batch_wait_ms / 1000,
            max_queue_crops=self.settings.max_queue_crops,
            max_batch_s=self.settings.max_batch_seconds,
            batch_limit=self.runner.batch_limit,
            metrics=self.metrics,
        )
        await self.runner.call(self.runner.configure)
        for name in self.settings.models:
            await self.runner.call(self.runner.load, name)
            m = self.models[name]
            self.metrics.model_loaded(name, m.load_seconds, m.warmup_seconds)
            for batch, h, w, seconds in self.runner.warm_timings(name):
                batcher.throughput.observe(name, batch * h * w, seconds, warm_up=True)
            log.info(
                "model %s (backend %s) loaded in %.2fs, warm in %.2fs (%d warm-up shapes, "
                "%d of them full: the plain forward too)",
                name,
                m.backend,
                m.load_seconds,
                m.warmup_seconds,
                len(self.runner.warm_batches(m)) if self.settings.warmup else 0,
                len(m.warm_full),
            )
        self.runner.shapes_run.clear()  # count what requests run, not the warm-up
        batcher.start()
        self._batcher = batcher
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
        if self._batcher is not None:
            await self._batcher.stop()
        self.runner.shutdown()

    async def _run(self, key: Key, slices: list[Slice]) -> BatchOutcome:
        return cast(BatchOutcome, await self.runner.call(self.runner.run_batch, key, slices))

    # Requests

    def model_name(self, scale: float) -> str:
        return check_served(scale, list(self.models))

    def plan(
        self, model: LoadedModel, height: int, width: int, *, tile_max_pixels: int | None = None
    ) -> Plan:
        return self.planner.plan(
            height, width, model.descriptor.size_multiple, tile_max_pixels=tile_max_pixels
        )

    def deadline(self) -> float:
        """A request's deadline if it arrives now (time.perf_counter())."""
        return time.perf_counter() + self.settings.request_timeout_s

    def hold(
        self, height: int, width: int, scale: float, deadline: float, *, who: object = None
    ) -> Reservation:
        """Raise `TooCostly` or `QueueFull` unless an image of height x width by `scale`
        fits now, from the sizes alone (the API asks before decoding it); else keep its
        place until `upscale(..., hold=)` queues it or `release` lets it go. `who`: the
        request's identity, by which its retry after a 429 finds the place kept for it."""
        batcher = self._running_batcher()
        model = self.models[self.model_name(scale)]
        key, crops = self._key(model, height, width, scale)
        return batcher.hold(key, crops, deadline, who=who)

    def release(self, held: Reservation) -> None:
        if self._batcher is not None:
            self._batcher.release(held)

    def _running_batcher(self) -> Batcher:
        batcher = self._batcher
        if batcher is None or not batcher.running:  # not drain: in-flight work ends
            raise NotReady("the models are not loaded, or the server has stopped")
        return batcher

    def _key(self, model: LoadedModel, height: int, width: int, scale: float) -> tuple[Key, int]:
        """The batch key and crop count of an image of height x width by `scale`."""
        plan = self._plan_of(model, height, width, scale)
        return (model.descriptor.name, *plan.shape), len(plan.crops.crops)

    def _plan_of(
        self,
        model: LoadedModel,
        height: int,
        width: int,
        scale: float,
        tile_max_pixels: int | None = None,
    ) -> Plan:
        """The plan of an image of height x width by `scale` (IMDN_AS runs at the output size)."""
        if model.descriptor.any_scale:
            height, width = output_size(height, width, scale)
        return self._plan_for(model, height, width, tile_max_pixels)

    async def upscale(
        self,
        image: np.ndarray,
        scale: float,
        *,
        grey: bool = False,
        deadline: float | None = None,
        hold: Reservation | None = None,
        tile_max_pixels: int | None = None,
    ) -> UpscaleResult:
        """Super-resolve an HxWx3 image (uint8, uint16, or float32 in [0, 1]) by `scale`
        before `deadline` (time.perf_counter(); default: the request timeout from now), in
        the place `hold` kept for it; `tile_max_pixels`: a tile budget of its own (a video
        frame's, `Settings.frame_tile_pixels`).

        The result is quantised as the input's depth (uint16 for uint16, else uint8),
        grey (one plane) when `grey`.
        """
        batcher = self._running_batcher()
        name = self.model_name(scale)
        model = self.models[name]
        if deadline is None:
            deadline = self.deadline()
        bits = pixels.bits_of(image)
        target = output_size(image.shape[0], image.shape[1], scale)
        # refuse what cannot fit before any pixel moves (the plan needs only the sizes)
        plan = self._plan_of(model, image.shape[0], image.shape[1], scale, tile_max_pixels)
        key = (name, *plan.shape)
        batcher.admit(key, len(plan.crops.crops), deadline, hold=hold)
        started = time.perf_counter()
        job, canvas, (h, w) = await asyncio.to_thread(
            self._prepare, model, plan, image, target, grey, bits
        )
        prepare_s = time.perf_counter() - started
        self.metrics.observe_transfer("to_device", prepare_s)
        ticket = batcher.submit(key, job.crops.shape[0], job, deadline, hold=hold)
        try:
            served = await asyncio.wait_for(
                ticket.future, timeout=max(0.0, deadline - time.perf_counter())
            )
        except (TimeoutError, DeadlineExceeded):
            self._missed(ticket)
            raise DeadlineExceeded(
                f"the request did not finish within {self.settings.request_timeout_s:g}s"
            ) from None
        finally:
            batcher.drop(ticket)
        s = model.descriptor.scale
        assert canvas.pixels is not None  # every crop was pasted
        started = time.perf_counter()
        out = await asyncio.to_thread(pixels.to_host, canvas.pixels[0, :, : h * s, : w * s], bits)
        readback_s = time.perf_counter() - started
        self.metrics.observe_transfer("to_host", readback_s)
        return UpscaleResult(
            image=out,
            model=name,
            crops=len(plan.crops.crops),
            queue_seconds=served.queue_seconds,
            compute_seconds=served.compute_seconds,
            peak_memory_bytes=served.peak_memory_bytes,
            prepare_seconds=prepare_s,
            readback_seconds=readback_s,
        )

    def _missed(self, ticket: Ticket) -> None:
        """An admitted request missed its deadline: count it, and say what was promised."""
        model = ticket.key[0]
        self.metrics.count_deadline_missed(model)
        promised = (
            "admitted unmeasured"
            if ticket.promised is None
            else f"estimated to finish {ticket.deadline - ticket.promised:.1f}s before it"
        )
        rate = self._batcher.throughput.rate(model) if self._batcher else None
        log.warning(
            "an admitted request (%d crops of %s) missed its deadline: %s; %d of its crops "
            "had run; the rate is now %s s per crop pixel",
            ticket.count,
            ticket.key,
            promised,
            ticket.finished,
            "unmeasured" if rate is None else f"{rate:.3g}",
        )

    def _padded_size(self, model: LoadedModel, height: int, width: int) -> tuple[int, int]:
        """The size the network sees: a side below the size rule is padded up to it; with
        buckets every side is (the masked forward needs IMDN_AS's valid region aligned
        to its stride of 4)."""
        m = model.descriptor.size_multiple
        if min(height, width) < m or (self.planner.buckets and (height % m or width % m)):
            return acs.round_up(height, m), acs.round_up(width, m)
        return height, width

    def _plan_for(
        self, model: LoadedModel, height: int, width: int, tile_max_pixels: int | None = None
    ) -> Plan:
        return self.plan(
            model, *self._padded_size(model, height, width), tile_max_pixels=tile_max_pixels
        )

    def _prepare(
        self,
        model: LoadedModel,
        plan: Plan,
        image: np.ndarray,
        target: tuple[int, int],
        grey: bool,
        bits: int,
    ) -> tuple[Job, Canvas, tuple[int, int]]:
        """The request's crops on the device, as `plan` says, and the canvas its batches
        fill. On CUDA the device work runs on a side stream, beside the forward in
        flight, and is complete on return."""
        s = model.descriptor.scale
        canvas = Canvas(plan.crops, s)
        with side_stream(self.device):
            crops, (h, w) = self._crops(model, plan, image, target)
            if not plan.crops.is_whole:
                canvas.pixels = torch.empty(
                    (1, 1 if grey else 3, plan.crops.height * s, plan.crops.width * s),
                    dtype=torch.uint8 if bits == 8 else torch.int32,
                    device=self.device,
                )
            crop_h, crop_w = plan.crops.crop_h, plan.crops.crop_w
            valid = torch.tensor([[crop_h, crop_w]], device=self.device).expand(len(crops), 2)
        job = Job(crops, valid, canvas.paste, full=not plan.padded, grey=grey, bits=bits)
        return job, canvas, (h, w)

    def _crops(
        self, model: LoadedModel, plan: Plan, image: np.ndarray, target: tuple[int, int]
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        """The image uploaded, normalised, resized (IMDN_AS) and cut into `plan`'s crops on
        the device, each padded into the plan's shape; and the size the network sees."""
        x = pixels.to_unit(image, self.device)
        # IMDN_AS restores a bicubic-upscaled image of the target size
        if model.descriptor.any_scale:
            x = imresize_tensor(x, size=target).clamp_(0, 1)
        h, w = x.shape[-2:]
        if (plan.crops.height, plan.crops.width) != (h, w):
            x = acs.pad_to_multiple(x, model.descriptor.size_multiple)[0]
        crops = acs.extract(x, plan.crops)
        if plan.padded:
            pad_h, pad_w = plan.shape[0] - plan.crops.crop_h, plan.shape[1] - plan.crops.crop_w
            crops = F.pad(crops, (0, pad_w, 0, pad_h), mode="replicate")
        return crops, (h, w)
